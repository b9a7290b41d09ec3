//! The pool (homes for frames evacuated from views) and automatic compaction of sparse
//! frozen regions: frames re-homed without touching any table.

use super::*;

impl<B> Mm<B> {
    // ---- the pool: homes for frames evacuated from a view --------------------------------

    /// Free slots in the active pool region.
    pub fn pool_free(&self) -> usize {
        self.pool.map_or(0, |r| self.region(r).pages - self.pool_next)
    }

    /// Install a fresh pool region of `pages` slots at `base`. Slots are bump-allocated and
    /// never reused (a dead slot is discarded; the region is unmapped when its last home dies).
    pub fn add_pool(&mut self, base: usize, pages: usize, backing: B) {
        if let Some(old) = self.pool.take() {
            if self.region(old).homes == 0 {
                let r = self.regions.remove(old.0);
                self.reclaim.dead.push(r.backing);
            } else {
                self.queue_if_sparse(old);
            }
        }
        self.pool = Some(RegionId(self.regions.insert(Region::pool(base, pages, backing))));
        self.pool_next = 0;
    }

    pub(super) fn alloc_pool_slot(&mut self) -> Home {
        let r = self.pool.expect("pool headroom is guaranteed by the engine");
        assert!(self.pool_next < self.region(r).pages, "pool headroom is guaranteed by the engine");
        self.pool_next += 1;
        Home { region: r, page: self.pool_next as u32 - 1 }
    }

    /// Move the home of frame `f` (homed at view page `page` of `sp`) to a pool slot; the
    /// view keeps a read-only copy. Returns the copy to perform.
    pub(super) fn evacuate(&mut self, sp: SpaceId, page: usize, f: FrameId) -> KernelOp {
        let slot = self.alloc_pool_slot();
        let src = self.view_base(sp) + page * PAGE_SIZE;
        let view = self.space(sp).view;
        self.region_mut(view).homes -= 1;
        self.space_mut(sp).vs.home.clear(page);
        self.region_mut(slot.region).homes += 1;
        self.frames.get_mut(f).home = slot;
        KernelOp::CopyPage { dst: self.home_addr(slot), src }
    }

    /// Homes in pages `[first, end)` of `sp` whose frames other tables also name: a zap of
    /// those pages must evacuate them first (one pool slot each).
    pub fn shared_homes(&self, sp: SpaceId, first: usize, end: usize) -> Vec<(usize, FrameId)> {
        let s = self.space(sp);
        s.vs.home
            .ones(first, end)
            .filter_map(|p| {
                let t = s.dir[p / PTRS_PER_PTE]?;
                let f = self.tables.get(t).entry(p % PTRS_PER_PTE).frame()?;
                (self.tables.get(t).share > 1 || self.frames.get(f).refs > 1).then_some((p, f))
            })
            .collect()
    }

    // ---- automatic compaction: sparse frozen regions and dropped views ----------------
    //
    // A frozen home is immutable (its frame is shared or only its pool/frozen copy is
    // read), and entries name frames, not addresses: copying the bytes of such a home to a
    // pool slot and re-pointing `Frame::home` changes no entry of any table, so no shared
    // table needs breaking. View pages holding read-only copies stay right (same bytes).
    // This is not the user-facing migration (`migrate_frame`), which replaces the frame
    // and so must break every shared table on the way (`broken_by.migrate`).

    /// Queue frozen region `r` for [`Mm::compact_step`] if it became sparse: its live homes
    /// fell to a quarter of its peak. Never the active pool, never twice (frozen regions
    /// only lose homes). Does not allocate when [`Mm::has_headroom`] holds.
    pub(super) fn queue_if_sparse(&mut self, r: RegionId) {
        if self.pool == Some(r) {
            return;
        }
        let reg = self.region_mut(r);
        if reg.kind == RegionKind::Frozen
            && reg.check.is_none()
            && reg.swap.is_none()
            && !reg.queued
            && reg.homes > 0
            && reg.homes * 4 <= reg.peak
        {
            reg.queued = true;
            self.sparse.push(r);
        }
    }

    /// Bound the number of frozen regions that reserve far more address space than they
    /// hold (e.g. a chain of freezing forks that each wrote a page: every region is one
    /// mapping the size of the view, holding one page): past [`FROZEN_SOFT_MAX`] such
    /// regions (frozen regions holding less than 1/16 of their pages), or past
    /// [`FROZEN_SOFT_BYTES`] of address space reserved by them, queue the least dense for
    /// compaction. O(regions), and only while over the bound; at most one per call (one per
    /// fork or drop), so the copying is bounded by the pages those regions hold. Dense
    /// regions (pool regions among them) are never forced: their address space is at most
    /// 16 times the memory they hold.
    pub fn queue_excess_frozen(&mut self) -> bool {
        if self.frozen_regions().saturating_sub(self.sparse.len()) <= 16 {
            return false; // the common case: no scan
        }
        let pool = self.pool;
        let (mut count, mut bytes, mut pick) = (0, 0, None::<(u32, usize, usize)>);
        for (i, r) in self.regions.iter() {
            if r.kind != RegionKind::Frozen
                || r.queued
                || pool == Some(RegionId(i))
                || r.check.is_some()
                || r.swap.is_some()
                || r.homes * 16 >= r.pages
            {
                continue;
            }
            count += 1;
            bytes += r.pages * PAGE_SIZE;
            // The least dense: homes/pages smallest.
            if pick.map_or(true, |(_, h, p)| (r.homes as u128 * p as u128) < (h as u128 * r.pages as u128)) {
                pick = Some((i, r.homes, r.pages));
            }
        }
        if count <= FROZEN_SOFT_MAX && bytes <= FROZEN_SOFT_BYTES {
            return false;
        }
        let Some((r, _, _)) = pick else { return false };
        let r = RegionId(r);
        self.region_mut(r).queued = true;
        self.sparse.push(r);
        true
    }

    /// Are sparse regions waiting for [`Mm::compact_step`]?
    pub fn compaction_pending(&self) -> bool {
        !self.sparse.is_empty()
    }

    /// Sparse frozen regions queued for compaction now.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn sparse_regions(&self) -> usize {
        self.sparse.len()
    }

    /// Bounded, amortised compaction: resume the sweep of the frame store for at most
    /// `scan` slots and copy (re-home, see above) up to `budget` frames homed in queued
    /// sparse regions into pool slots. The pool must hold `budget` free slots. Copies to
    /// perform are appended to `ops` (before the reclaim that discards the old pages); a
    /// region whose last home leaves is unmapped by the usual reclaim. Every queued region
    /// is empty after one full sweep (it never gains homes), and a region is queued only
    /// after losing 3/4 of its peak, so the copying is at most a third of the frame deaths
    /// that made it sparse. Returns the frames re-homed.
    pub fn compact_step(&mut self, budget: usize, scan: usize, ops: &mut Vec<KernelOp>) -> usize {
        let slots = self.frames.slots_len();
        let mut moved = 0;
        for _ in 0..scan.min(slots) {
            if moved == budget || self.sparse.is_empty() || self.pool_free() == 0 {
                break;
            }
            if self.compact_cursor >= slots {
                self.compact_cursor = 0;
            }
            let f = FrameId(self.compact_cursor as u32);
            self.compact_cursor += 1;
            let Some(fr) = self.frames.try_get(f) else { continue };
            if !self.region(fr.home.region).queued {
                continue;
            }
            self.rehome_to_pool(f, ops);
            moved += 1;
        }
        moved
    }

    /// Copy frame `f`'s (immutable) home to a pool slot and re-point its home; no entry
    /// changes. The old page is discarded (or its region unmapped) by the next reclaim.
    pub(super) fn rehome_to_pool(&mut self, f: FrameId, ops: &mut Vec<KernelOp>) {
        let old = self.frames.get(f).home;
        debug_assert!(matches!(self.region(old.region).kind, RegionKind::Frozen));
        let slot = self.alloc_pool_slot();
        ops.push(KernelOp::CopyPage { dst: self.home_addr(slot), src: self.home_addr(old) });
        self.frames.get_mut(f).home = slot;
        self.region_mut(slot.region).homes += 1;
        self.unhome(old, false);
        self.counters.frames_rehomed += 1;
    }
}
