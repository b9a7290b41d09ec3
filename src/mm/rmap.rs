//! The seed's rule set on top of the core: the rmap walk (`page_vma_mapped_walk`) and the
//! operations that go through it — migration and compaction (break, as
//! `PVMW_BREAK_COW_PTE`), discard (drop a wholly covered table, break a partly covered
//! one), aging (clear ACCESSED without breaking), and mkclean for dirty tracking (break).

use super::*;

/// Kernel work on views or frame homes that an operation needs, performed by the engine in
/// order, under the arena lock, after the state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOp {
    /// `MADV_DONTNEED` view pages: they fault again on the next access (re-armed).
    Zap { addr: usize, len: usize },
    /// Write-protect view pages so that the next write faults.
    Protect { addr: usize, len: usize },
    /// Copy one page of plain memory (a migration).
    CopyPage { dst: usize, src: usize },
}

/// Re-arm access detection on view page `p` (mapped, not pinned) after its ACCESSED bit
/// was cleared: a writable home is write-protected (its next write is seen), a read-only
/// copy zapped (its next access faults) — except in an async-WP arena, where a copy may
/// hold a store the kernel served alone and stays mapped (see `async_wp.rs`). Returns
/// whether anything was re-armed. Shared by aging and the eviction clock.
pub(super) fn rearm_page(vs: &mut ViewState, base: usize, p: usize, async_wp: bool, ops: &mut Vec<KernelOp>) -> bool {
    if vs.home.get(p) {
        if vs.writable.get(p) {
            vs.writable.clear(p);
            push_page(ops, false, base, p);
            return true;
        }
    } else if !async_wp {
        vs.present.clear(p);
        push_page(ops, true, base, p);
        return true;
    }
    false
}

/// Append `page` of the view at `base` to the last op of the same kind when adjacent.
fn push_page(ops: &mut Vec<KernelOp>, zap: bool, base: usize, page: usize) {
    let addr = base + page * PAGE_SIZE;
    match ops.last_mut() {
        Some(KernelOp::Zap { addr: a, len }) if zap && *a + *len == addr => *len += PAGE_SIZE,
        Some(KernelOp::Protect { addr: a, len }) if !zap && *a + *len == addr => *len += PAGE_SIZE,
        _ if zap => ops.push(KernelOp::Zap { addr, len: PAGE_SIZE }),
        _ => ops.push(KernelOp::Protect { addr, len: PAGE_SIZE }),
    }
}

impl<B> Mm<B> {
    /// Visit every space of `f`'s fork family that maps `f` (at its page index), with the
    /// table that maps it. With `break_cow`, each table is first made exclusive to the
    /// visited space (`PVMW_BREAK_COW_PTE`), so the visitor may modify the entry.
    pub fn page_vma_mapped_walk(
        &mut self,
        f: FrameId,
        break_cow: Option<BreakCause>,
        mut visit: impl FnMut(&mut Self, SpaceId, TableId),
    ) {
        self.counters.walks += 1;
        let fr = *self.frames.get(f);
        let idx = fr.index as usize;
        let members = self.families.get(&fr.family).cloned().unwrap_or_default();
        for sp in members {
            if idx >= self.space(sp).pages {
                continue;
            }
            let Some(t) = self.space(sp).dir[idx / PTRS_PER_PTE] else { continue };
            if self.tables.get(t).entry(idx % PTRS_PER_PTE).frame() != Some(f) {
                continue;
            }
            let t = match break_cow {
                Some(cause) => self.break_cow_pte(sp, idx, cause),
                None => t,
            };
            visit(self, sp, t);
        }
    }

    /// Add a region of `pages` fresh slots (a migration target) mapped at `base`.
    pub fn add_pool_region(&mut self, base: usize, pages: usize, backing: B) -> RegionId {
        RegionId(self.regions.insert(Region::pool(base, pages, backing)))
    }

    /// Release a pool or frozen region that holds no frame (nothing needed migrating; a
    /// view of read-only copies frozen by an eviction).
    pub fn release_if_empty(&mut self, r: RegionId) {
        if self.region(r).homes == 0 {
            let reg = self.regions.remove(r.0);
            if reg.queued {
                self.sparse.retain(|q| *q != r);
            }
            let (lo, hi) = (reg.base, reg.base + reg.pages * PAGE_SIZE);
            self.reclaim.discard.retain(|(a, _)| *a < lo || *a >= hi);
            self.reclaim.dead.push(reg.backing);
        }
    }

    /// Distinct frames mapped by `sp` in pages `[first, end)` (not those still homed in a
    /// loaded image: they stay where their checksum is checked; not pinned ones: they
    /// never move, `pin.rs`).
    pub fn frames_in(&self, sp: SpaceId, first: usize, end: usize) -> Vec<FrameId> {
        let mut v: Vec<FrameId> = (first..end)
            .filter_map(|p| self.lookup(sp, p).frame())
            .filter(|&f| {
                let r = self.region(self.frames.get(f).home.region);
                r.check.is_none() && r.swap.is_none() && !self.frame_pinned(f)
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Frames homed in frozen regions that are at most half full (compaction candidates).
    pub fn sparse_frozen_frames(&self) -> Vec<FrameId> {
        let sparse: std::collections::HashSet<u32> = self
            .regions
            .iter()
            .filter(|(_, r)| {
                r.kind == RegionKind::Frozen && r.check.is_none() && r.swap.is_none() && r.homes * 2 <= r.pages
            })
            .map(|(i, _)| i)
            .collect();
        self.frames.iter().filter(|(_, f)| sparse.contains(&f.home.region.0)).map(|(id, _)| id).collect()
    }

    /// Migrate frame `f` to slot `slot` of region `to` (`try_to_migrate_one` +
    /// `remove_migration_pte`): a new frame takes its place in every entry that named it,
    /// through an rmap walk that breaks shared tables on the way.
    pub fn migrate_frame(&mut self, f: FrameId, to: RegionId, slot: usize, ops: &mut Vec<KernelOp>) {
        let fr = *self.frames.get(f);
        let src = self.home_addr(fr.home);
        let home_view = match self.region(fr.home.region).kind {
            RegionKind::View(sp) => Some(sp),
            RegionKind::Frozen => None,
        };
        if let Some(sp) = home_view {
            // Its home is a writable view page: protect it before copying, so that no
            // concurrent store is lost; the view keeps a read-only copy.
            ops.push(KernelOp::Protect { addr: src, len: PAGE_SIZE });
            self.space_mut(sp).vs.writable.clear(fr.home.page as usize);
        }
        ops.push(KernelOp::CopyPage { dst: self.region(to).base + slot * PAGE_SIZE, src });
        let g = self.frames.alloc(Home { region: to, page: slot as u32 }, fr.index, fr.family);
        self.frames.get_mut(g).refs = 0;
        self.region_mut(to).homes += 1;
        let ei = fr.index as usize % PTRS_PER_PTE;
        self.page_vma_mapped_walk(f, Some(BreakCause::Migrate), |mm, sp, t| {
            let e = mm.tables.get(t).entry(ei);
            let mut flags = [Pte::ACCESSED, Pte::DIRTY].iter().fold(0, |a, b| if e.has(*b) { a | b } else { a });
            if home_view == Some(sp) {
                // The view keeps a read-only copy of its former home, which was read without
                // faults: count it referenced, as a present copy always is (reads of a copy
                // are seen only by the fault that maps it).
                flags |= Pte::ACCESSED;
            }
            mm.tables.get_mut(t).set(ei, Pte::new(g, flags));
            mm.frames.get_mut(g).refs += 1;
            mm.put_frame(f);
        });
        debug_assert!(self.frames.get(g).refs > 0);
        self.counters.frames_migrated += 1;
    }

    /// Discard pages `[first, end)` of `sp` (`MADV_DONTNEED`): they read as zero in this
    /// space only. A wholly covered table just loses this space's reference (no break); a
    /// partly covered one is broken and its entries cleared.
    pub fn discard(&mut self, sp: SpaceId, first: usize, end: usize, ops: &mut Vec<KernelOp>) {
        // Homes of frames others still need must leave the view before it is zapped.
        for (p, f) in self.shared_homes(sp, first, end) {
            let op = self.evacuate(sp, p, f);
            ops.push(op);
        }
        let pages = self.space(sp).pages;
        let mut ti = first / PTRS_PER_PTE;
        while ti * PTRS_PER_PTE < end {
            let (t_lo, t_hi) = (ti * PTRS_PER_PTE, ((ti + 1) * PTRS_PER_PTE).min(pages));
            let (lo, hi) = (first.max(t_lo), end.min(t_hi));
            if let Some(t) = self.space(sp).dir[ti] {
                if lo == t_lo && hi == t_hi {
                    if self.tables.get(t).share > 1 {
                        self.counters.tables_dropped += 1;
                    }
                    self.space_mut(sp).dir[ti] = None;
                    self.put_table(t);
                } else {
                    let t = self.break_cow_pte(sp, lo, BreakCause::Discard);
                    for p in lo..hi {
                        let e = self.tables.get_mut(t).take(p % PTRS_PER_PTE);
                        if let Some(f) = e.frame() {
                            self.put_frame(f);
                        }
                    }
                }
            }
            ti += 1;
        }
        let base = self.view_base(sp);
        let vs = &mut self.space_mut(sp).vs;
        let mut zap = Vec::new();
        for p in first..end {
            if vs.present.get(p) {
                vs.present.clear(p);
                vs.writable.clear(p);
                vs.home.clear(p);
                push_page(&mut zap, true, base, p);
            }
        }
        ops.extend(zap);
    }

    /// Pages of `sp` in `[first, end)` whose ACCESSED bit is set.
    pub fn referenced(&self, sp: SpaceId, first: usize, end: usize) -> Vec<usize> {
        (first..end).filter(|&p| self.lookup(sp, p).has(Pte::ACCESSED)).collect()
    }

    /// Clear ACCESSED on pages `[first, end)` of `sp` without breaking any table (the bit of a
    /// shared entry belongs to all its sharers), and re-arm detection in every sharer's view:
    /// read-only copies are zapped (the next access faults and sets the bit again); pages
    /// whose bytes live in the view are write-protected (their next *write* is seen).
    /// Returns how many pages were referenced.
    pub fn clear_referenced(&mut self, sp: SpaceId, first: usize, end: usize, ops: &mut Vec<KernelOp>) -> usize {
        let mut count = 0;
        let mut rearmed = 0u64;
        self.accessed_cleared = true;
        let family = self.space(sp).family;
        let members = self.families.get(&family).cloned().unwrap_or_default();
        let mut ti = first / PTRS_PER_PTE;
        while ti * PTRS_PER_PTE < end {
            let (lo, hi) = (first.max(ti * PTRS_PER_PTE), end.min((ti + 1) * PTRS_PER_PTE));
            if let Some(t) = self.space(sp).dir[ti] {
                for p in lo..hi {
                    // (A pinned page stays referenced and mapped: DMA leaves no trace.)
                    let pinned = self.is_pinned(sp, p);
                    let tab = self.tables.get_mut(t);
                    let e = tab.entry(p % PTRS_PER_PTE);
                    if e.has(Pte::ACCESSED) && !pinned {
                        count += 1;
                        tab.set(p % PTRS_PER_PTE, e.without(Pte::ACCESSED));
                    }
                }
                // Re-arm in every space that sees these entries through this table.
                for &m in &members {
                    if self.space(m).dir.get(ti).copied().flatten() != Some(t) {
                        continue;
                    }
                    let base = self.view_base(m);
                    let s = self.space_mut(m);
                    let async_wp = s.async_wp;
                    let (vs, pinned) = (&mut s.vs, &s.pinned);
                    for p in lo..hi {
                        if vs.present.get(p) && !pinned.get(p) && rearm_page(vs, base, p, async_wp, ops) {
                            rearmed += 1;
                        }
                    }
                }
            }
            ti += 1;
        }
        self.counters.aging_clears += 1;
        self.counters.referenced_cleared += count as u64;
        self.counters.aging_rearms += rearmed;
        count
    }

    /// Can `sp` be reset to `snap` (same family and size)?
    pub fn resettable(&self, sp: SpaceId, snap: SpaceId) -> bool {
        let (a, b) = (self.space(sp), self.space(snap));
        sp != snap && a.family == b.family && a.pages == b.pages
    }

    /// Make `sp` a copy of `snap` again in place: every table of `sp` that differs from
    /// `snap`'s is dropped and `snap`'s is shared instead (O(differing tables)). View pages
    /// whose entry is unchanged stay mapped, so a reset fork's clean working set does not
    /// fault again; the others are zapped. `snap`'s view must have no writable page
    /// ([`Mm::share_plan`] is `Ready`), as for a fork. The pool must have a free slot for
    /// each of `sp`'s shared homes ([`Mm::shared_homes`]).
    pub fn reset_to(&mut self, sp: SpaceId, snap: SpaceId, ops: &mut Vec<KernelOp>) -> usize {
        debug_assert!(self.resettable(sp, snap) && self.share_plan(snap) == SharePlan::Ready);
        let base = self.view_base(sp);
        let pages = self.space(sp).pages;
        let mut changed = 0;
        for ti in 0..self.space(sp).dir.len() {
            let (mine, theirs) = (self.space(sp).dir[ti], self.space(snap).dir[ti]);
            if mine == theirs {
                continue;
            }
            changed += 1;
            for p in ti * PTRS_PER_PTE..((ti + 1) * PTRS_PER_PTE).min(pages) {
                let a = mine.and_then(|t| self.tables.get(t).entry(p % PTRS_PER_PTE).frame());
                let b = theirs.and_then(|t| self.tables.get(t).entry(p % PTRS_PER_PTE).frame());
                if a != b && self.space(sp).vs.home.get(p) {
                    let (t, f) = (mine.expect("a home has an entry"), a.expect("a home has an entry"));
                    if self.tables.get(t).share > 1 || self.frames.get(f).refs > 1 {
                        let op = self.evacuate(sp, p, f);
                        ops.push(op);
                    }
                }
                let vs = &mut self.space_mut(sp).vs;
                if a != b && vs.present.get(p) {
                    vs.present.clear(p);
                    vs.writable.clear(p);
                    push_page(ops, true, base, p);
                }
            }
            // (A table of `snap` holding pinned pages is copied, not shared.)
            let new = self.share_table(snap, ti, ops);
            self.space_mut(sp).dir[ti] = new;
            if let Some(m) = mine {
                self.put_table(m);
            }
        }
        changed
    }

    /// Pages of `sp` in `[first, end)` written since the last [`Mm::mkclean`].
    pub fn dirty_pages(&self, sp: SpaceId, first: usize, end: usize) -> Vec<usize> {
        let dir = &self.space(sp).dir;
        let mut out = Vec::new();
        let mut ti = first / PTRS_PER_PTE;
        while ti * PTRS_PER_PTE < end {
            let lo = first.max(ti * PTRS_PER_PTE);
            let hi = end.min((ti + 1) * PTRS_PER_PTE);
            if let Some(t) = dir[ti] {
                let base = ti * PTRS_PER_PTE;
                out.extend(self.tables.get(t).dirty_in(lo - base, hi - base).map(|i| base + i));
            }
            ti += 1;
        }
        out
    }

    /// mkclean pages `[first, end)` of `sp`: every table holding a dirty entry there is made
    /// exclusive first (clearing DIRTY modifies the table, so a shared one is broken), the
    /// bits are cleared, and writable view pages are write-protected so the next write
    /// marks them dirty again. Returns the pages that were dirty.
    pub fn mkclean(&mut self, sp: SpaceId, first: usize, end: usize, ops: &mut Vec<KernelOp>) -> Vec<usize> {
        let dirty = self.dirty_pages(sp, first, end);
        let mut last_table = usize::MAX;
        for &p in &dirty {
            if p / PTRS_PER_PTE != last_table {
                last_table = p / PTRS_PER_PTE;
                self.break_cow_pte(sp, p, BreakCause::Mkclean);
            }
            if self.space(sp).pinned.get(p) {
                continue; // stays dirty (and writable): DMA may write it unseen
            }
            let t = self.space(sp).dir[p / PTRS_PER_PTE].expect("dirty entry without table");
            let tab = self.tables.get_mut(t);
            let e = tab.entry(p % PTRS_PER_PTE);
            tab.set(p % PTRS_PER_PTE, e.without(Pte::DIRTY));
        }
        let base = self.view_base(sp);
        let s = self.space_mut(sp);
        for (a, b) in s.vs.writable.runs_in(first, end) {
            for p in (a..b).filter(|&p| !s.pinned.get(p)) {
                s.vs.writable.clear(p);
                push_page(ops, false, base, p);
            }
        }
        dirty
    }

    /// Re-protects of `sp`'s view for [`Mm::mkclean`], as few calls as pay: when the
    /// `Protect` runs in `ops` are many and the span they cover is cheap enough to walk,
    /// one `UFFDIO_WRITEPROTECT` of the span (split only around pinned pages, which stay
    /// writable) does the work of all of them for one TLB flush instead of one per run.
    /// Protecting the pages between the runs changes nothing: in a trapping view every
    /// mapped page there is already write-protected (a writable one would be dirty and in a
    /// run) and holes stay holes (no `WP_UNPOPULATED` on that context). Other ops keep their
    /// order.
    ///
    /// The cost model (6.18, 2 vCPUs; a scratch program: 1 GiB, 1 % written at random per
    /// round, 2026-12-08): a call costs ~1.4 µs, its TLB flush included. The span walk
    /// costs little per 2 MiB with no kernel PTE table, but ~14 ns per entry of a table the
    /// kernel has, and ~175 ns more per *mapped* entry — `change_pte_range` rewrites every
    /// present entry, protected already or not, and looks up its folio (a cache miss for
    /// scattered memory). So the walk pays only where the runs crowd few tables: 2 600
    /// scattered pages of 1 GiB took 4.5 ms by one walk (growing to 8 ms as the view
    /// refilled) against 3.6 ms by a call per run. A table with a page mapped in the model
    /// is taken to have a kernel table.
    pub fn coalesce_protects(&self, sp: SpaceId, ops: Vec<KernelOp>) -> Vec<KernelOp> {
        const MIN_RUNS: usize = 16;
        const CALL_NS: usize = 1_400;
        const EMPTY_TABLE_NS: usize = 50;
        const TABLE_NS: usize = 14 * PTRS_PER_PTE;
        const MAPPED_NS: usize = 175;
        let protects: Vec<(usize, usize)> = ops
            .iter()
            .filter_map(|op| match *op {
                KernelOp::Protect { addr, len } => Some((addr, addr + len)),
                _ => None,
            })
            .collect();
        let (Some(&(lo, _)), Some(hi)) = (protects.first(), protects.iter().map(|r| r.1).max()) else {
            return ops;
        };
        let lo = protects.iter().map(|r| r.0).min().unwrap_or(lo);
        if protects.len() < MIN_RUNS {
            return ops;
        }
        let base = self.view_base(sp);
        let (first, end) = ((lo - base) / PAGE_SIZE, (hi - base) / PAGE_SIZE);
        let s = self.space(sp);
        let mut walk_ns = 0;
        let mut ti = first / PTRS_PER_PTE;
        while ti * PTRS_PER_PTE < end {
            let (a, b) = ((ti * PTRS_PER_PTE).max(first), ((ti + 1) * PTRS_PER_PTE).min(end));
            walk_ns += match s.vs.present.count_range(a, b) {
                0 => EMPTY_TABLE_NS,
                mapped => TABLE_NS + mapped * MAPPED_NS,
            };
            ti += 1;
        }
        if walk_ns >= protects.len() * CALL_NS {
            return ops;
        }
        let mut out: Vec<KernelOp> = ops.into_iter().filter(|op| !matches!(op, KernelOp::Protect { .. })).collect();
        let mut at = first;
        for (a, b) in s.pinned.runs_in(first, end).into_iter().chain([(end, end)]) {
            if a > at {
                out.push(KernelOp::Protect { addr: base + at * PAGE_SIZE, len: (a - at) * PAGE_SIZE });
            }
            at = b.max(at);
        }
        out
    }
}
