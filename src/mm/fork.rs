//! Fork and sharing: what a space needs before its tables can be shared
//! ([`Mm::share_plan`]: protect in place, or freeze the view), the fork itself (O(tables)),
//! and dropping a space (evacuate the homes others need, or freeze).

use super::*;

/// What must happen before a space's tables can be shared; see [`Mm::share_plan`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SharePlan {
    /// Nothing: no page of the view is writable.
    Ready,
    /// Write-protect the few writable pages ([`Mm::protect_writable`]).
    Protect,
    /// Freeze the view (`mremap`), then [`Mm::freeze_view`].
    Freeze,
}

/// What dropping a space needs, decided before its tables are released; see
/// [`Mm::drop_plan`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DropPlan {
    /// No frame homed in the view outlives the drop: unmap it.
    Unmap,
    /// A few homes outlive it: copy them to this many pool slots
    /// ([`Mm::evacuate_survivors`]), then unmap the view.
    Evacuate(usize),
    /// Many homes outlive it: freeze the view (one `mremap`, O(tables)).
    Freeze,
}

/// The outcome of [`Mm::drop_space`].
pub enum Dropped<B> {
    /// Unmap this view.
    Unmap(B),
    /// The view holds homes of shared frames: freeze it, then [`Mm::drop_frozen`].
    Freeze,
}

impl<B> Mm<B> {
    /// What sharing `sp`'s tables (fork, or reset to it) needs first. Pages mapped
    /// writable (written since the last share) must stop being writable before their frames
    /// become shared: either write-protect just those pages, keeping the whole view warm
    /// (cheap when few were written: ~1 µs per run), or freeze the view (one `mremap`,
    /// O(tables), but the view re-faults what it touches afterwards).
    ///
    /// In an async-WP arena (`async_wp.rs`) a home write-protected in the view would still
    /// take stores without a trap, so a view holding any home is not ready: the engine
    /// moves a few out ([`Mm::evacuate_view_homes`]) or freezes the view.
    pub fn share_plan(&self, sp: SpaceId) -> SharePlan {
        if self.space(sp).async_wp {
            return if self.region(self.space(sp).view).homes == 0 { SharePlan::Ready } else { SharePlan::Freeze };
        }
        // Pinned pages stay writable: a fork copies them (`Mm::share_table`). A space with
        // pins never freezes (that would move them): it protects the rest in place.
        let pins = self.pinned_in(sp);
        let rw = self.space(sp).vs.writable.count() - pins;
        if rw == 0 {
            SharePlan::Ready
        } else if pins > 0 || rw <= self.protect_limit_for(sp) {
            SharePlan::Protect
        } else {
            SharePlan::Freeze
        }
    }

    /// The most written pages a fork protects in place rather than freezing the view.
    pub fn protect_limit_for(&self, sp: SpaceId) -> usize {
        self.protect_limit.unwrap_or((self.space(sp).pages / 256).max(256))
    }

    /// See [`Action::Take`]: on when the kernel offers UFFDIO_MOVE.
    pub fn set_take_exclusive(&mut self, on: bool) {
        self.take_exclusive = on;
    }

    /// Share by write-protecting when at most `pages` are writable, else freeze (`None`:
    /// the default, `max(256, pages/256)`).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn set_protect_limit(&mut self, pages: Option<usize>) {
        self.protect_limit = pages;
    }

    /// Write-protect every writable page of `sp`'s view (ops to perform), so that its tables
    /// can be shared; the pages stay mapped and stay the homes of their frames. Pinned
    /// pages stay writable (a fork copies them instead; `pin.rs`).
    pub fn protect_writable(&mut self, sp: SpaceId, ops: &mut Vec<KernelOp>) {
        let base = self.view_base(sp);
        let s = self.space_mut(sp);
        if s.pin_depth.is_empty() {
            for (a, b) in s.vs.writable.runs_in(0, s.vs.writable.bit_len()) {
                ops.push(KernelOp::Protect { addr: base + a * PAGE_SIZE, len: (b - a) * PAGE_SIZE });
            }
            s.vs.writable.clear_all();
            return;
        }
        for (a, b) in s.vs.writable.runs_and_not(&s.pinned) {
            ops.push(KernelOp::Protect { addr: base + a * PAGE_SIZE, len: (b - a) * PAGE_SIZE });
            for p in a..b {
                s.vs.writable.clear(p);
            }
        }
    }

    /// What dropping `sp` needs (decide before [`Mm::drop_space`] releases its tables): its
    /// view holds no home that outlives the drop, a few (evacuate them: one copy each,
    /// cheaper than a frozen region that reserves the whole view's address space and one
    /// mapping for them), or many (freeze). O(homes in the view) when few.
    pub fn drop_plan(&self, sp: SpaceId) -> DropPlan {
        let s = self.space(sp);
        let homes = self.region(s.view).homes;
        if homes == 0 {
            return DropPlan::Unmap;
        }
        if homes <= EVACUATE_MAX || (homes <= EVACUATE_SPARSE_MAX && homes * 16 <= s.pages) {
            return match self.shared_homes(sp, 0, s.pages).len() {
                0 => DropPlan::Unmap,
                n => DropPlan::Evacuate(n),
            };
        }
        DropPlan::Freeze
    }

    /// Before dropping `sp`: move every home in its view that outlives the drop (see
    /// [`Mm::shared_homes`]) to a pool slot (the pool must have that many free). The copies
    /// are appended to `ops`; perform them before unmapping the view. Then
    /// [`Mm::drop_space`] returns [`Dropped::Unmap`].
    pub fn evacuate_survivors(&mut self, sp: SpaceId, ops: &mut Vec<KernelOp>) {
        let pages = self.space(sp).pages;
        for (p, f) in self.shared_homes(sp, 0, pages) {
            let op = self.evacuate(sp, p, f);
            ops.push(op);
            self.counters.frames_rehomed += 1;
        }
    }

    /// Async-WP arenas, before sharing `sp`'s tables (a fork that keeps the view warm):
    /// write-protect every writable page of the view and move the home of every frame
    /// homed in it to a pool slot (the pool must have [`Mm::view_homes`] free); the view
    /// keeps each page as a read-only copy, so a later store there is a private copy's,
    /// which the kernel may serve alone. The ops (protects first, then the copies) are
    /// appended to `ops`; perform them in order. Returns the pages evacuated.
    ///
    /// A store racing the copies lands after the protect, so the kernel marks the page
    /// written: the next sync records it as a write that takes the frame back into the
    /// view (its only reference). The caller must then evacuate again, and share nothing
    /// until a sync of the whole view finds no page written (`Core::prepare_share_async`).
    pub fn evacuate_view_homes(&mut self, sp: SpaceId, ops: &mut Vec<KernelOp>) -> usize {
        debug_assert!(self.space(sp).async_wp, "only async-WP views are shared that way");
        self.protect_writable(sp, ops);
        let s = self.space(sp);
        let homes: Vec<(usize, FrameId)> =
            s.vs.home
                .ones(0, s.pages)
                .map(|p| {
                    let t = s.dir[p / PTRS_PER_PTE].expect("a home is named by its table");
                    (p, self.tables.get(t).entry(p % PTRS_PER_PTE).frame().expect("a home is named by its entry"))
                })
                .collect();
        for &(p, f) in &homes {
            let op = self.evacuate(sp, p, f);
            ops.push(op);
            self.counters.frames_rehomed += 1;
        }
        homes.len()
    }

    /// Frames homed in `sp`'s view.
    pub fn view_homes(&self, sp: SpaceId) -> usize {
        self.region(self.space(sp).view).homes
    }

    /// A drop whose freeze failed: keep `sp` (tables released, view still holding the
    /// homes others need) for a retry; counted once in `drops_deferred`.
    pub fn defer_drop(&mut self, sp: SpaceId, first: bool) {
        if first {
            self.counters.drops_deferred += 1;
        }
        self.pending_drops.push(sp);
    }

    /// Take the dropped spaces waiting for a retry of their freeze.
    pub fn take_pending_drops(&mut self) -> Vec<SpaceId> {
        std::mem::take(&mut self.pending_drops)
    }

    /// Dropped spaces waiting for a retry now.
    pub fn drops_pending(&self) -> usize {
        self.pending_drops.len()
    }

    /// The view of `sp` was moved to `frozen_base` (`mremap(MREMAP_DONTUNMAP)`), and its
    /// old address stays mapped but empty. Re-homes every frame of the view in O(1): the
    /// view's region becomes the frozen region. Read-only copies that moved along are not
    /// homes; their pages are queued for discard.
    pub fn freeze_view(&mut self, sp: SpaceId, frozen_base: usize, frozen: B) -> RegionId {
        let old = self.space(sp).view;
        let (pages, view_base) = (self.region(old).pages, self.region(old).base);
        // The region (and every Home naming it) now describes the frozen pages.
        let r = self.region_mut(old);
        r.kind = RegionKind::Frozen;
        r.base = frozen_base;
        r.peak = r.homes;
        let view_backing = std::mem::replace(&mut r.backing, frozen);
        let new = RegionId(self.regions.insert(Region {
            base: view_base,
            pages,
            kind: RegionKind::View(sp),
            homes: 0,
            peak: 0,
            queued: false,
            pool: false,
            check: None,
            swap: None,
            backing: view_backing,
        }));
        let s = self.space_mut(sp);
        s.view = new;
        let garbage = s.vs.present.runs_and_not(&s.vs.home);
        s.vs.reset();
        for (a, b) in garbage {
            self.reclaim.discard.push((frozen_base + a * PAGE_SIZE, (b - a) * PAGE_SIZE));
        }
        self.counters.freezes += 1;
        old
    }

    /// Fork `parent`: the child shares every table of the parent (O(tables)); no frame is
    /// touched — except pinned pages, which the child gets copies of (`ops`; the pool must
    /// have a slot for each: see [`Mm::share_table`]). The parent's view must have no
    /// writable page but pinned ones ([`Mm::share_plan`] is `Ready`).
    pub fn fork(&mut self, parent: SpaceId, view_base: usize, view: B, ops: &mut Vec<KernelOp>) -> SpaceId {
        debug_assert_eq!(self.share_plan(parent), SharePlan::Ready, "fork of a view with writable pages");
        let (pages, family, tables) = {
            let p = self.space(parent);
            (p.pages, p.family, p.dir.len())
        };
        let dir = (0..tables).map(|ti| self.share_table(parent, ti, ops)).collect();
        self.counters.forks += 1;
        self.insert_space(pages, view_base, view, dir, family)
    }

    /// Drop a space: release its tables (and the frames only they held). Returns the view's
    /// backing to unmap — or [`Dropped::Freeze`] when the view still holds homes of frames
    /// that other spaces share: then the caller freezes the view and calls
    /// [`Mm::drop_frozen`].
    pub fn drop_space(&mut self, sp: SpaceId) -> Dropped<B> {
        let dir = std::mem::replace(&mut self.space_mut(sp).dir, vec![None; 0]);
        for t in dir.iter().flatten() {
            self.put_table(*t);
        }
        self.space_mut(sp).dir = vec![None; dir.len()];
        if self.region(self.space(sp).view).homes > 0 {
            return Dropped::Freeze;
        }
        let s = self.spaces.remove(sp.0);
        if let Some(members) = self.families.get_mut(&s.family) {
            members.retain(|m| *m != sp);
            if members.is_empty() {
                self.families.remove(&s.family);
            }
        }
        let view = self.regions.remove(s.view.0);
        self.views.remove(&view.base);
        self.views_gen += 1;
        Dropped::Unmap(view.backing)
    }

    /// Finish dropping `sp` after [`Dropped::Freeze`]: its view was moved to `frozen_base`.
    /// Returns the (now empty) view's backing to unmap.
    pub fn drop_frozen(&mut self, sp: SpaceId, frozen_base: usize, frozen: B) -> B {
        self.freeze_view(sp, frozen_base, frozen);
        match self.drop_space(sp) {
            Dropped::Unmap(b) => b,
            Dropped::Freeze => unreachable!("a frozen view holds no homes"),
        }
    }
}
