//! Eviction: the seed's fourth rmap walker, `try_to_unmap_one`, in user space. A cold
//! frame's bytes go to a slot of the arena's swap file and the frame is *re-homed* there
//! (its home becomes a page of a read-only mapping of that slot); every view page mapping
//! it is zapped, so the next touch faults and brings it back ([`Mm::swap_in`]: a pool slot
//! becomes its home again). Entries name frames, not addresses, so — unlike the kernel,
//! whose PTEs hold physical addresses and must be broken (`PVMW_BREAK_COW_PTE`) — no
//! shared table is broken: a frame that a hundred spaces share through one table is
//! evicted by one re-homing and comes back by one.
//!
//! Which frames are cold is the aging bits' business (`Pte::ACCESSED`, set by faults and
//! the API, cleared by `clear_referenced`): [`Mm::evict_candidates`] is a clock over the
//! frame store — a referenced frame loses its bit (a second chance, detection re-armed as
//! `clear_referenced` does) and is passed over; an unreferenced one is taken.
//!
//! Never evicted: pinned frames (their pages must stay where DMA writes them), frames
//! still homed in a loaded image (their bytes are on a file already), frames already in
//! the swap — and, in async-WP arenas, frames a view maps (see `Mm::evictable`).

use super::*;

/// Free slots of a swap region (a chunk of the arena's swap file, mapped read-only).
/// Swap regions live as long as the arena: their slots are reused, never compacted.
pub struct SwapSlots {
    /// Offset of the chunk in the swap file.
    pub file_off: u64,
    /// Slots never used yet start here.
    next: u32,
    /// Slots freed by frames that died or were swapped in. Capacity reserved for every
    /// slot at creation: the fault path frees slots and must not allocate.
    pub(super) free: Vec<u32>,
}

impl<B> Mm<B> {
    /// Add a swap region of `pages` slots: the chunk at `file_off` of the swap file, mapped
    /// read-only at `base` (`backing` owns the mapping).
    pub fn add_swap_region(&mut self, base: usize, pages: usize, file_off: u64, backing: B) -> RegionId {
        let mut region = Region::pool(base, pages, backing);
        region.pool = false;
        region.peak = 0;
        region.swap = Some(Box::new(SwapSlots { file_off, next: 0, free: Vec::with_capacity(pages) }));
        let r = RegionId(self.regions.insert(region));
        self.swap_regions.push(r);
        r
    }

    /// Free swap slots in every swap region.
    pub fn swap_slots_free(&self) -> usize {
        self.swap_regions
            .iter()
            .map(|&r| {
                let reg = self.region(r);
                let s = reg.swap.as_ref().expect("swap regions carry slots");
                s.free.len() + (reg.pages - s.next as usize)
            })
            .sum()
    }

    /// Take a free swap slot: its home, and its offset in the swap file.
    pub fn alloc_swap_slot(&mut self) -> Option<(Home, u64)> {
        for &r in &self.swap_regions {
            let reg = self.regions.get_mut(r.0).expect("live swap region");
            let pages = reg.pages;
            let s = reg.swap.as_mut().expect("swap regions carry slots");
            let slot = match s.free.pop() {
                Some(slot) => slot,
                None if (s.next as usize) < pages => {
                    s.next += 1;
                    s.next - 1
                }
                None => continue,
            };
            return Some((Home { region: r, page: slot }, s.file_off + slot as u64 * PAGE_SIZE as u64));
        }
        None
    }

    /// Give back a slot taken by [`Mm::alloc_swap_slot`] and not used (a failed write-out).
    pub fn free_swap_slot(&mut self, home: Home) {
        let s = self.region_mut(home.region).swap.as_mut().expect("a swap slot");
        s.free.push(home.page);
    }

    /// Is `home` a swap slot?
    pub fn is_swap_home(&self, home: Home) -> bool {
        self.region(home.region).swap.is_some()
    }

    /// The frame page `page` of `sp` names, if it is in the swap, with its slot's offset
    /// in the swap file.
    pub fn swapped_at(&self, sp: SpaceId, page: usize) -> Option<(FrameId, u64)> {
        if self.swapped_now == 0 {
            return None; // the common case: nothing evicted (no frame or region lookups)
        }
        let f = self.lookup(sp, page).frame()?;
        let home = self.frames.get(f).home;
        let s = self.region(home.region).swap.as_ref()?;
        Some((f, s.file_off + home.page as u64 * PAGE_SIZE as u64))
    }

    /// Frames in the swap now.
    pub fn swapped_frames(&self) -> usize {
        self.swapped_now
    }

    /// Can frame `f` be evicted at all (not pinned, not in an image or the swap)? In an
    /// async-WP arena, not while any view maps it: a store the kernel serves alone to a
    /// mapped page takes no lock and leaves no fault, so it could land between the
    /// write-out and the unmapping and be lost (write-protection does not stop it there).
    /// (`any_async`: [`Mm::any_async`], computed once by the caller: it walks the spaces.)
    fn evictable(&self, f: FrameId, any_async: bool) -> bool {
        let home = self.frames.get(f).home;
        let r = self.region(home.region);
        r.check.is_none()
            && r.swap.is_none()
            && !self.frame_pinned(f)
            && !self.frame_pinned_anywhere(f)
            && !(any_async && self.frame_mapped_async(f))
    }

    /// The region of `sp`'s view (a freeze turns it into the frozen region).
    pub fn view_region(&self, sp: SpaceId) -> RegionId {
        self.space(sp).view
    }

    /// Invariants of the swap (for [`Mm::check`]): `swapped_now` counts the frames homed in
    /// swap regions; each swap region's free list holds distinct slots below its bump
    /// pointer, none of them a live frame's home, and free + used + untouched = its slots.
    pub(super) fn check_swap(&self) -> Result<(), String> {
        let homed = self.frames.iter().filter(|(_, f)| self.region(f.home.region).swap.is_some()).count();
        if homed != self.swapped_now {
            return Err(format!("{homed} frames homed in the swap, but swapped_now is {}", self.swapped_now));
        }
        for &r in &self.swap_regions {
            let reg = self.region(r);
            let s = reg.swap.as_ref().ok_or("a swap region without slots")?;
            let mut seen = vec![false; reg.pages];
            for &slot in &s.free {
                if slot >= s.next || std::mem::replace(&mut seen[slot as usize], true) {
                    return Err(format!("swap region {}: free slot {slot} repeated or never used", r.0));
                }
            }
            if s.free.len() + reg.homes != s.next as usize {
                return Err(format!(
                    "swap region {}: {} free + {} homes != {} slots used",
                    r.0,
                    s.free.len(),
                    reg.homes,
                    s.next
                ));
            }
        }
        Ok(())
    }

    /// Pages `sp`'s view maps now (homes and copies).
    pub fn view_pages_mapped(&self, sp: SpaceId) -> usize {
        self.space(sp).vs.present.count()
    }

    /// Does any view map `f` (its home view page, or a copy)?
    fn frame_mapped_async(&self, f: FrameId) -> bool {
        let fr = self.frames.get(f);
        if let RegionKind::View(sp) = self.region(fr.home.region).kind {
            if self.space(sp).async_wp {
                return true;
            }
        }
        let idx = fr.index as usize;
        self.families.get(&fr.family).is_some_and(|members| {
            members.iter().any(|&sp| {
                let s = self.space(sp);
                s.async_wp && idx < s.pages && s.vs.present.get(idx) && self.lookup(sp, idx).frame() == Some(f)
            })
        })
    }

    /// Is any page mapping `f` pinned (a pinned page's frame is homed in its view, but a
    /// fork's copy of it is another frame; this covers a home elsewhere for safety)?
    fn frame_pinned_anywhere(&self, f: FrameId) -> bool {
        let fr = self.frames.get(f);
        let idx = fr.index as usize;
        self.families.get(&fr.family).is_some_and(|members| {
            members.iter().any(|&sp| {
                let s = self.space(sp);
                idx < s.pages && s.pinned.get(idx) && self.lookup(sp, idx).frame() == Some(f)
            })
        })
    }

    /// Is any entry naming `f` marked ACCESSED?
    fn frame_referenced(&self, f: FrameId) -> bool {
        let fr = self.frames.get(f);
        let idx = fr.index as usize;
        self.families.get(&fr.family).is_some_and(|members| {
            members.iter().any(|&sp| {
                let e = if idx < self.space(sp).pages { self.lookup(sp, idx) } else { Pte::NONE };
                e.frame() == Some(f) && e.has(Pte::ACCESSED)
            })
        })
    }

    /// Clear ACCESSED in every entry naming `f` and re-arm detection in the views that map
    /// it (read-only copies zapped, writable homes protected), breaking no table.
    fn age_frame(&mut self, f: FrameId, ops: &mut Vec<KernelOp>) {
        let fr = *self.frames.get(f);
        let idx = fr.index as usize;
        let ei = idx % PTRS_PER_PTE;
        let members = self.families.get(&fr.family).cloned().unwrap_or_default();
        self.counters.frames_aged += 1;
        for sp in members {
            let async_wp = self.space(sp).async_wp;
            if idx >= self.space(sp).pages {
                continue;
            }
            let Some(t) = self.space(sp).dir[idx / PTRS_PER_PTE] else { continue };
            let e = self.tables.get(t).entry(ei);
            if e.frame() != Some(f) {
                continue;
            }
            if e.has(Pte::ACCESSED) {
                self.accessed_cleared = true;
                self.tables.get_mut(t).set(ei, e.without(Pte::ACCESSED));
            }
            let base = self.view_base(sp);
            let vs = &mut self.space_mut(sp).vs;
            if vs.present.get(idx) {
                super::rmap::rearm_page(vs, base, idx, async_wp, ops);
            }
        }
    }

    /// Choose up to `want` frames to evict: a clock over the frame store from where the
    /// last sweep stopped. A referenced frame is aged ([`Mm::age_frame`]: its re-arming
    /// appended to `ops`) and passed over; an unreferenced, evictable one is chosen. At
    /// most two turns of the clock (so every evictable frame is chosen on the second if
    /// need be). Frames whose home is a writable view page are write-protected first
    /// (appended to `ops`), so that their bytes hold still while they are written out.
    pub fn evict_candidates(&mut self, want: usize, ops: &mut Vec<KernelOp>) -> Vec<FrameId> {
        let slots = self.frames.slots_len();
        let mut chosen = Vec::new();
        // (The second turn passes the frames chosen on the first again: once each.)
        let mut taken = vec![false; slots];
        let mut scanned = 0;
        let any_async = self.any_async();
        while chosen.len() < want && scanned < 2 * slots {
            if self.evict_hand >= slots {
                self.evict_hand = 0;
            }
            let f = FrameId(self.evict_hand as u32);
            self.evict_hand += 1;
            scanned += 1;
            if taken[f.0 as usize] || self.frames.try_get(f).is_none() || !self.evictable(f, any_async) {
                continue;
            }
            if self.frame_referenced(f) {
                self.age_frame(f, ops);
                continue;
            }
            let home = self.frames.get(f).home;
            if let RegionKind::View(sp) = self.region(home.region).kind {
                let page = home.page as usize;
                if self.space(sp).vs.writable.get(page) {
                    self.space_mut(sp).vs.writable.clear(page);
                    ops.push(KernelOp::Protect { addr: self.home_addr(home), len: PAGE_SIZE });
                }
            }
            taken[f.0 as usize] = true;
            chosen.push(f);
        }
        chosen
    }

    /// Where frame `f`'s bytes are now (the address to write out).
    pub fn frame_addr(&self, f: FrameId) -> usize {
        self.home_addr(self.frames.get(f).home)
    }

    /// Frame `f`'s bytes were written to swap slot `slot`: re-home it there and zap every
    /// view page mapping it (appended to `ops`); its old home is discarded by the next
    /// reclaim. No table changes: the entries keep naming `f`.
    pub fn evict_commit(&mut self, f: FrameId, slot: Home, ops: &mut Vec<KernelOp>) {
        debug_assert!(self.evictable(f, self.any_async()) && self.is_swap_home(slot));
        let fr = *self.frames.get(f);
        let idx = fr.index as usize;
        let members = self.families.get(&fr.family).cloned().unwrap_or_default();
        let mut zap = |mm: &mut Self, sp: SpaceId, page: usize| {
            let base = mm.view_base(sp);
            let vs = &mut mm.space_mut(sp).vs;
            if vs.present.get(page) {
                vs.present.clear(page);
                vs.writable.clear(page);
                ops.push(KernelOp::Zap { addr: base + page * PAGE_SIZE, len: PAGE_SIZE });
                mm.counters.evict_zaps += 1;
            }
        };
        for sp in members {
            if idx < self.space(sp).pages && self.lookup(sp, idx).frame() == Some(f) {
                zap(self, sp, idx);
            }
        }
        if let RegionKind::View(sp) = self.region(fr.home.region).kind {
            zap(self, sp, fr.home.page as usize); // (its own entry may name another frame)
        }
        self.unhome(fr.home, false);
        self.frames.get_mut(f).home = slot;
        self.region_mut(slot.region).homes += 1;
        self.swapped_now += 1;
        self.counters.frames_evicted += 1;
    }

    /// The address of the pool slot [`Mm::swap_in`] will take next (the engine reads the
    /// swap slot into it first). Needs pool headroom, as the fault path always has.
    /// `None` if the pool has no free slot (the engine checks headroom first, so this
    /// is a bug, reported as an error rather than a write past the pool).
    pub fn next_pool_slot_addr(&self) -> Option<usize> {
        let r = self.pool?;
        (self.pool_next < self.region(r).pages).then(|| self.region(r).base + self.pool_next * PAGE_SIZE)
    }

    /// Frame `f` (in the swap) was read into the slot at [`Mm::next_pool_slot_addr`]:
    /// re-home it there and free its swap slot. Allocation-free.
    pub fn swap_in(&mut self, f: FrameId) {
        let old = self.frames.get(f).home;
        debug_assert!(self.is_swap_home(old));
        let slot = self.alloc_pool_slot();
        self.frames.get_mut(f).home = slot;
        self.region_mut(slot.region).homes += 1;
        self.unhome(old, true);
        self.counters.frames_swapped_in += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    /// A hundred sharers of one table: evicting its frames breaks nothing, re-homes each
    /// frame into the swap and zaps every copy; swap-in re-homes into the pool.
    #[test]
    fn eviction_rehomes_frames_and_breaks_no_table() {
        let mut mm: Mm<()> = Mm::new();
        mm.add_pool(0x6000_0000_0000, 4096, ());
        let pages = 1024;
        let root = mm.new_space(pages, 0x1000_0000_0000, ());
        for p in 0..pages {
            let r = mm.resolve_fault(root, p, true);
            mm.commit(r);
        }
        // The view freezes (as the engine's fork does): its homes become immutable.
        mm.freeze_view(root, 0x5000_0000_0000, ());
        let mut kids = Vec::new();
        for i in 0..100 {
            let mut ops = Vec::new();
            kids.push(mm.fork(root, 0x2000_0000_0000 + i * 0x1000_0000, (), &mut ops));
        }
        // Every sharer maps page 5 read-only (a copy) and page 600 too.
        for &k in &kids {
            for p in [5, 600] {
                let r = mm.resolve_fault(k, p, false);
                mm.commit(r);
            }
        }
        mm.check().unwrap();
        let shared = mm.tables_shared_now();
        mm.add_swap_region(0x7000_0000_0000, 2048, 0, ());
        // Everything was just faulted: referenced; the first turn ages, the second takes.
        let mut ops = Vec::new();
        let victims = mm.evict_candidates(usize::MAX, &mut ops);
        assert!(!victims.is_empty() && victims.len() <= pages);
        let mut sorted = victims.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), victims.len(), "a frame chosen twice");
        let mut ops = Vec::new();
        for &f in &victims {
            let (slot, _) = mm.alloc_swap_slot().unwrap();
            mm.evict_commit(f, slot, &mut ops);
        }
        mm.check().unwrap();
        assert_eq!(mm.tables_shared_now(), shared, "eviction breaks no shared table");
        assert_eq!(mm.swapped_frames(), victims.len());
        for &k in &kids {
            assert!(!mm.is_present(k, 5) && mm.swapped_at(k, 5).is_some());
        }
        // One swap-in serves every sharer.
        let (f, _) = mm.swapped_at(kids[7], 5).unwrap();
        mm.swap_in(f);
        mm.check().unwrap();
        assert!(kids.iter().all(|&k| mm.swapped_at(k, 5).is_none()));
        assert_eq!(mm.swapped_frames(), victims.len() - 1);
        assert_eq!(mm.counters.frames_swapped_in, 1);
        // Dropping everything frees every slot.
        for k in kids {
            let _ = mm.drop_space(k);
        }
        let _ = mm.drop_space(root);
        mm.check().unwrap();
        assert_eq!(mm.swapped_frames(), 0);
        assert_eq!(mm.swap_slots_free(), 2048);
    }
}
