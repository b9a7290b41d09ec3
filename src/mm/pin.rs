//! Pinned pages: the seed series' device-exclusive rule, and `fork(2)` copying pages
//! pinned for DMA (`page_needs_cow_for_dma`) instead of sharing them.
//!
//! While a `Pinned` guard lives, the kernel may be reading or writing the physical pages
//! behind a range of a view (O_DIRECT, io_uring, RDMA) without any fault reaching us. So a
//! pinned page must stay exactly where it is: mapped writable in its view, the home of a
//! frame no one else references. Every rule that would move, zap or protect it yields:
//!
//! | operation | on a pinned page |
//! | --- | --- |
//! | fork, reset to the space | the sharer's table is a copy ([`Mm::share_table`]) in which the page is a new frame holding its bytes now; the space's own table stays exclusive |
//! | fork's freeze | refused for a space with pins: its other written pages are write-protected in place ([`Mm::share_plan`]) |
//! | migrate, compact | skipped ([`Mm::frames_in`]; compaction only moves frozen homes) |
//! | clean (mkclean) | stays writable and dirty: reported by every `dirty_pages`, since DMA writes leave no trace |
//! | clear_referenced (aging) | stays mapped and referenced |
//! | discard, reset of the space itself | impossible while pinned (`&mut Space`, borrowed by the guard) |
//!
//! Invariant (checked by [`Mm::check`]): `pinned ⊆ writable ⊆ home`, and the frame of a
//! pinned page has one reference and its table one sharer — which the rules above keep,
//! since only a fork, a reset or a write makes a table or frame shared again.

use super::{FrameId, Home, KernelOp, Mm, Pte, RegionKind, SpaceId, TableId, PAGE_SIZE, PTRS_PER_PTE};

impl<B> Mm<B> {
    /// Pin pages `[first, end)` of `sp` (nesting: each page counts its pins). Every page
    /// must already be writable — its table and frame exclusive, its frame homed in the
    /// view (the engine write-faults the range first).
    pub fn pin(&mut self, sp: SpaceId, first: usize, end: usize) {
        let s = self.spaces.get_mut(sp.0).expect("use of a dropped space");
        for p in first..end {
            debug_assert!(s.vs.writable.get(p), "pin of a page that is not writable");
            let depth = s.pin_depth.entry(p).or_insert(0);
            *depth += 1;
            if *depth == 1 {
                s.pinned.set(p);
                self.pinned_now += 1;
            }
        }
        // DMA may write them unseen: dirty until unpinned and cleaned.
        for p in first..end {
            self.set_entry_bits(sp, p, Pte::DIRTY);
        }
        self.counters.pins += 1;
    }

    /// Undo one [`Mm::pin`] of the same range. The pages stay writable homes.
    pub fn unpin(&mut self, sp: SpaceId, first: usize, end: usize) {
        let s = self.spaces.get_mut(sp.0).expect("use of a dropped space");
        for p in first..end {
            let Some(depth) = s.pin_depth.get_mut(&p) else {
                debug_assert!(false, "unpin of a page that is not pinned");
                continue;
            };
            *depth -= 1;
            if *depth == 0 {
                s.pin_depth.remove(&p);
                s.pinned.clear(p);
                self.pinned_now -= 1;
            }
        }
    }

    /// Is page `page` of `sp` pinned?
    pub fn is_pinned(&self, sp: SpaceId, page: usize) -> bool {
        self.space(sp).pinned.get(page)
    }

    /// Pinned pages of `sp`.
    pub fn pinned_in(&self, sp: SpaceId) -> usize {
        self.space(sp).pin_depth.len()
    }

    /// Pinned pages of every space.
    pub fn pinned_pages(&self) -> usize {
        self.pinned_now
    }

    /// Is `f` the frame of a pinned page (homed there, since a pinned page is a home)?
    pub(super) fn frame_pinned(&self, f: FrameId) -> bool {
        let home = self.frames.get(f).home;
        match self.region(home.region).kind {
            RegionKind::View(sp) => self.space(sp).pinned.get(home.page as usize),
            RegionKind::Frozen => false,
        }
    }

    /// Pinned pages of `sp` in table `ti` (its `[512·ti, 512·(ti+1))`).
    fn pinned_in_table(&self, sp: SpaceId, ti: usize) -> usize {
        let s = self.space(sp);
        if s.pin_depth.is_empty() {
            return 0;
        }
        let lo = ti * PTRS_PER_PTE;
        s.pinned.count_range(lo, (lo + PTRS_PER_PTE).min(s.pages))
    }

    /// A reference to `owner`'s table `ti` for a new sharer (a fork's child, a space reset
    /// to `owner`), or `None` where `owner` has none. Normally the table itself, shared
    /// (`share += 1`, copy-on-write from now). A table holding pinned pages is never
    /// shared: the sharer gets a copy in which each pinned page is a new frame — homed in a
    /// pool slot, its bytes copied now (`ops`) — and every other entry names the same frame
    /// (one more reference each), as `copy_present_page` does for a pinned page in
    /// `fork(2)`. The pool must have a free slot per pinned page
    /// ([`Mm::pinned_in`] bounds them).
    pub fn share_table(&mut self, owner: SpaceId, ti: usize, ops: &mut Vec<KernelOp>) -> Option<TableId> {
        let t = self.space(owner).dir[ti]?;
        if self.pinned_in_table(owner, ti) == 0 {
            let tab = self.tables.get_mut(t);
            tab.share += 1;
            tab.cow = true;
            self.counters.tables_shared += 1;
            return Some(t);
        }
        debug_assert_eq!(self.tables.get(t).share, 1, "a table with pinned pages is exclusive");
        let mut entries = *self.tables.get(t).entries();
        let (base, family) = (self.view_base(owner), self.space(owner).family);
        for (i, e) in entries.iter_mut().enumerate() {
            let Some(f) = e.frame() else { continue };
            let page = ti * PTRS_PER_PTE + i;
            if !self.space(owner).pinned.get(page) {
                self.frames.get_mut(f).refs += 1;
                continue;
            }
            let slot: Home = self.alloc_pool_slot();
            self.region_mut(slot.region).homes += 1;
            let g = self.frames.alloc(slot, page as u32, family);
            ops.push(KernelOp::CopyPage { dst: self.home_addr(slot), src: base + page * PAGE_SIZE });
            let flags = [Pte::ACCESSED, Pte::DIRTY].iter().fold(0, |a, b| if e.has(*b) { a | b } else { a });
            *e = Pte::new(g, flags);
            self.counters.pinned_copied += 1;
            self.counters.bytes_copied += PAGE_SIZE as u64;
        }
        Some(self.tables.alloc(Some(&entries)))
    }

    /// The check of the pinning invariant for `sp` (see the module documentation).
    pub(super) fn check_pins(&self, sp: SpaceId) -> Result<(), String> {
        let s = self.space(sp);
        if s.pinned.count() != s.pin_depth.len() {
            return Err(format!("space {}: pinned bits and pin counts disagree", sp.0));
        }
        for (&p, &depth) in &s.pin_depth {
            let bad = |why: &str| Err(format!("space {}: pinned page {p} (depth {depth}) {why}", sp.0));
            if depth == 0 || !s.pinned.get(p) {
                return bad("has no pin bit");
            }
            if !s.vs.writable.get(p) || !s.vs.home.get(p) {
                return bad("is not a writable home in its view");
            }
            let Some(t) = s.dir[p / PTRS_PER_PTE] else { return bad("has no table") };
            if self.tables.get(t).share != 1 {
                return bad("is in a shared table");
            }
            let Some(f) = self.tables.get(t).entry(p % PTRS_PER_PTE).frame() else { return bad("has no frame") };
            let fr = self.frames.get(f);
            if fr.refs != 1 || fr.home != (Home { region: s.view, page: p as u32 }) {
                return bad("has a shared frame or one homed elsewhere");
            }
        }
        Ok(())
    }
}
