//! The fault path: deciding how to serve a fault on a view page ([`Mm::resolve_fault`],
//! the analog of `handle_pte_fault` / `do_wp_page`) and recording what the engine did
//! ([`Mm::commit`]); fault-around and dense-fill detection; the read sources of the API and
//! of streams.

use super::*;

/// Where to fill a view page from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Src {
    /// A page of zeros.
    Zero,
    /// The page at this address (a frame's home; always populated memory).
    Addr(usize),
}

/// What the engine must do in the kernel to serve a fault.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Action {
    /// Nothing: the page was served by someone else first; wake the faulting thread.
    Wake,
    /// UFFDIO_COPY one page into `dst`, write-protected when `wp`.
    Fill { dst: usize, src: Src, wp: bool },
    /// UFFDIO_WRITEPROTECT(clear) the page at `dst` (its bytes are already right).
    Unprotect { dst: usize },
    /// Copy the page at `dst` (a view page holding a shared frame's home) to the pool slot
    /// `to`, then clear write protection on `dst`: the old frame moves out, a new one takes
    /// the view page.
    Evacuate { dst: usize, to: usize },
    /// UFFDIO_MOVE the page at `src` (the home, in a frozen region or the pool, of a frame
    /// only this space maps) to the unpopulated view page `dst`, writable: a write fault on
    /// an exclusive frame reuses its page, as `do_wp_page` does, instead of copying it.
    /// `src` is a hole afterwards. Where the kernel refuses, the engine copies instead and
    /// commits [`Resolution::fell_back`].
    Take { dst: usize, src: usize },
}

/// The state change that follows a successful [`Action`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Commit {
    None,
    MapReadOnly {
        frame: Option<FrameId>,
    },
    NewFrame {
        old: Option<FrameId>,
        copied: bool,
    },
    /// The frame's home moves to the faulting view page; `moved`: by UFFDIO_MOVE, so the
    /// old home is already a hole.
    Rehome {
        frame: FrameId,
        copied: bool,
        moved: bool,
    },
    Evacuate {
        old: FrameId,
        slot: Home,
    },
    MakeWritable,
}

/// A decided fault: perform `action`, then hand it back to [`Mm::commit`].
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct Resolution {
    pub action: Action,
    space: SpaceId,
    page: usize,
    commit: Commit,
}

impl Resolution {
    /// The same fault when the kernel refused to move the page: copy it instead (the old
    /// home keeps its page until it is discarded as an ordinary unhomed slot).
    pub fn fell_back(self) -> Resolution {
        match (self.action, self.commit) {
            (Action::Take { dst, src }, Commit::Rehome { frame, .. }) => Resolution {
                action: Action::Fill { dst, src: Src::Addr(src), wp: false },
                commit: Commit::Rehome { frame, copied: true, moved: false },
                ..self
            },
            _ => self,
        }
    }

    /// Will performing this resolution add a page to what the arena holds resident? A
    /// fill of a read-only copy or of a new frame does, and so does an evacuation (a pool
    /// slot); un-protecting a page already mapped, or taking or re-homing a frame the
    /// space already owns (the old page is released), does not.
    pub fn adds_resident(&self) -> bool {
        match (self.action, self.commit) {
            (_, Commit::Rehome { .. }) => false,
            (Action::Fill { .. } | Action::Evacuate { .. }, _) => true,
            _ => false,
        }
    }
}

/// Kinds of fault, for the counters.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultKind {
    ReadZero,
    ReadCopy,
    WriteZero,
    WriteCow,
    WriteReuse,
    Spurious,
}

/// The most pages served ahead of one sequential fault.
pub const FAULT_AROUND_MAX: usize = 16;

impl<B> Mm<B> {
    /// Record a fault through the view at `page` and return the pages to serve ahead of it:
    /// none for isolated faults; for a run of consecutive faults, a window that doubles with
    /// the run (up to [`FAULT_AROUND_MAX`]) and stays inside the page's 2 MiB table.
    pub fn fault_around(&mut self, sp: SpaceId, page: usize) -> std::ops::Range<usize> {
        let s = self.space_mut(sp);
        // The first fault of a space starts no run (page 0 is not "after" anything).
        let sequential = s.last_fault.is_some_and(|l| l + 1 == page);
        s.streak = if sequential { s.streak.saturating_add(1) } else { 0 };
        let ahead = if s.streak == 0 { 0 } else { (1usize << s.streak.min(8)).min(FAULT_AROUND_MAX) };
        let table_end = (page / PTRS_PER_PTE + 1) * PTRS_PER_PTE;
        let end = (page + 1 + ahead).min(table_end).min(s.pages);
        // The next fault, if the run continues, lands just past the window.
        s.last_fault = Some(end - 1);
        self.counters.faults_around += (end - page - 1) as u64;
        page + 1..end
    }

    /// Reads of a table count as dense once this many of its pages are mapped in the view
    /// (the faulting one included): [`Mm::dense_in_table`].
    pub const DENSE_FILL_PAGES: usize = 32;

    /// Is the 2 MiB table of `page` densely used by `sp`'s view — at least
    /// [`Mm::DENSE_FILL_PAGES`] of its pages mapped, but not all — so that mapping the rest
    /// read-only at once is likely to save faults (as the kernel's fault-around and THP
    /// heuristics bet)? One popcount of the table's bitmap chunk.
    pub fn dense_in_table(&self, sp: SpaceId, page: usize) -> bool {
        let s = self.space(sp);
        let (lo, hi) = self.table_pages(sp, page);
        let n = s.vs.present.count_range(lo, hi);
        n >= Self::DENSE_FILL_PAGES && n < hi - lo
    }

    /// The pages `[lo, hi)` of `sp` that the 2 MiB table of `page` covers.
    pub fn table_pages(&self, sp: SpaceId, page: usize) -> (usize, usize) {
        let lo = page / PTRS_PER_PTE * PTRS_PER_PTE;
        (lo, (lo + PTRS_PER_PTE).min(self.space(sp).pages))
    }

    // ---- the fault path -----------------------------------------------------------------

    /// Decide how to serve a fault on page `page` of `sp` (`write`: the access writes).
    /// May break a shared table (invisible to readers); all other state changes wait for
    /// [`Mm::commit`], after the engine performed `action`.
    pub fn resolve_fault(&mut self, sp: SpaceId, page: usize, write: bool) -> Resolution {
        let (view, present, writable) = {
            let s = self.space(sp);
            (s.view, s.vs.present.get(page), s.vs.writable.get(page))
        };
        let dst = self.region(view).base + page * PAGE_SIZE;
        let done = |action, commit| Resolution { action, space: sp, page, commit };
        // (A page whose fill another thread is performing with the lock released: the
        // access retries once that fill is committed; see `Mm::begin_fill`.)
        if writable || (!write && present) || self.space(sp).plain || self.space(sp).filling.get(page) {
            // (A plain view is the kernel's: a fault message for it is stale — it was
            // unregistered after a failed adoption — and the access retries there.)
            return done(Action::Wake, Commit::None);
        }
        if !write {
            return match self.lookup(sp, page).frame() {
                None => done(Action::Fill { dst, src: Src::Zero, wp: true }, Commit::MapReadOnly { frame: None }),
                Some(f) => {
                    let home = self.frames.get(f).home;
                    debug_assert!(home.region != view, "a home page is always present");
                    let src = Src::Addr(self.home_addr(home));
                    done(Action::Fill { dst, src, wp: true }, Commit::MapReadOnly { frame: Some(f) })
                }
            };
        }
        let t = self.break_cow_pte(sp, page, BreakCause::Write);
        let fill_or_unprotect = |src| {
            if present {
                Action::Unprotect { dst }
            } else {
                Action::Fill { dst, src, wp: false }
            }
        };
        match self.tables.get(t).entry(page % PTRS_PER_PTE).frame() {
            None => done(fill_or_unprotect(Src::Zero), Commit::NewFrame { old: None, copied: false }),
            Some(f) => {
                let fr = *self.frames.get(f);
                let here = fr.home == Home { region: view, page: page as u32 };
                if here && fr.refs == 1 {
                    debug_assert!(present);
                    done(Action::Unprotect { dst }, Commit::MakeWritable)
                } else if here {
                    // The view holds the home of a frame others share (kept warm by a
                    // protecting fork): move the old bytes out to the pool, then write here.
                    let slot = self.alloc_pool_slot();
                    let to = self.home_addr(slot);
                    done(Action::Evacuate { dst, to }, Commit::Evacuate { old: f, slot })
                } else if fr.refs == 1 {
                    let src = self.home_addr(fr.home);
                    if !present
                        && self.take_exclusive
                        && self.streams == 0
                        && self.fills == 0
                        && self.region(fr.home.region).check.is_none()
                        && self.region(fr.home.region).swap.is_none()
                    {
                        done(Action::Take { dst, src }, Commit::Rehome { frame: f, copied: false, moved: true })
                    } else {
                        let action = fill_or_unprotect(Src::Addr(src));
                        done(action, Commit::Rehome { frame: f, copied: !present, moved: false })
                    }
                } else {
                    let src = Src::Addr(self.home_addr(fr.home));
                    done(fill_or_unprotect(src), Commit::NewFrame { old: Some(f), copied: !present })
                }
            }
        }
    }

    /// Would a write fault on `page` of `sp` evacuate its view page ([`Action::Evacuate`]:
    /// the page is the home of a frame that others share, so its bytes move to the pool
    /// before the write)? An evacuation changes a home, so it waits for fills in flight.
    pub fn evacuates_on_write(&self, sp: SpaceId, page: usize) -> bool {
        let s = self.space(sp);
        if !s.vs.home.get(page) || s.vs.writable.get(page) {
            return false;
        }
        let Some(t) = s.dir[page / PTRS_PER_PTE] else { return false };
        let tab = self.tables.get(t);
        tab.share > 1 || tab.entry(page % PTRS_PER_PTE).frame().is_some_and(|f| self.frames.get(f).refs > 1)
    }

    /// Apply a resolution whose action succeeded. Returns the kind of fault served.
    pub fn commit(&mut self, r: Resolution) -> FaultKind {
        let (sp, page) = (r.space, r.page);
        let ei = page % PTRS_PER_PTE;
        let view = self.space(sp).view;
        let here = Home { region: view, page: page as u32 };
        let kind = match r.commit {
            Commit::None => FaultKind::Spurious,
            Commit::MapReadOnly { frame } => {
                let Mm { spaces, bit_spares, .. } = self;
                spaces.get_mut(sp.0).expect("use of a dropped space").vs.present.set_with(page, bit_spares);
                if frame.is_some() {
                    // Setting ACCESSED is the one change allowed on a shared table.
                    let t = self.space(sp).dir[page / PTRS_PER_PTE].expect("entry without table");
                    let tab = self.tables.get_mut(t);
                    tab.set(ei, tab.entry(ei).with(Pte::ACCESSED));
                    self.counters.bytes_copied += PAGE_SIZE as u64;
                    FaultKind::ReadCopy
                } else {
                    FaultKind::ReadZero
                }
            }
            Commit::NewFrame { old, copied } => {
                let family = self.space(sp).family;
                let g = self.frames.alloc(here, page as u32, family);
                self.region_mut(view).homes += 1;
                let t = self.space(sp).dir[page / PTRS_PER_PTE].expect("break_cow_pte ran");
                debug_assert_eq!(self.tables.get(t).share, 1);
                self.tables.get_mut(t).set(ei, Pte::new(g, Pte::ACCESSED | Pte::DIRTY));
                if let Some(old) = old {
                    let o = self.frames.get_mut(old);
                    debug_assert!(o.refs > 1);
                    o.refs -= 1;
                }
                if copied {
                    self.counters.bytes_copied += PAGE_SIZE as u64;
                }
                self.map_writable(sp, page);
                if old.is_some() {
                    FaultKind::WriteCow
                } else {
                    FaultKind::WriteZero
                }
            }
            Commit::Rehome { frame, copied, moved } => {
                let old_home = self.frames.get(frame).home;
                self.unhome(old_home, moved);
                if moved {
                    self.counters.pages_moved += 1;
                }
                self.frames.get_mut(frame).home = here;
                self.region_mut(view).homes += 1;
                self.set_entry_bits(sp, page, Pte::ACCESSED | Pte::DIRTY);
                if copied {
                    self.counters.bytes_copied += PAGE_SIZE as u64;
                }
                self.map_writable(sp, page);
                FaultKind::WriteReuse
            }
            Commit::Evacuate { old, slot } => {
                self.frames.get_mut(old).home = slot;
                self.region_mut(slot.region).homes += 1;
                self.region_mut(view).homes -= 1;
                let family = self.space(sp).family;
                let g = self.frames.alloc(here, page as u32, family);
                self.region_mut(view).homes += 1;
                let t = self.space(sp).dir[page / PTRS_PER_PTE].expect("break_cow_pte ran");
                self.tables.get_mut(t).set(ei, Pte::new(g, Pte::ACCESSED | Pte::DIRTY));
                let o = self.frames.get_mut(old);
                debug_assert!(o.refs > 1);
                o.refs -= 1;
                self.counters.bytes_copied += PAGE_SIZE as u64;
                self.map_writable(sp, page);
                FaultKind::WriteCow
            }
            Commit::MakeWritable => {
                self.set_entry_bits(sp, page, Pte::ACCESSED | Pte::DIRTY);
                self.map_writable(sp, page);
                FaultKind::WriteReuse
            }
        };
        let c = &mut self.counters;
        match kind {
            FaultKind::ReadZero => c.faults_read_zero += 1,
            FaultKind::ReadCopy => c.faults_read_copy += 1,
            FaultKind::WriteZero => c.faults_write_zero += 1,
            FaultKind::WriteCow => c.faults_write_cow += 1,
            FaultKind::WriteReuse => c.faults_write_reuse += 1,
            FaultKind::Spurious => c.faults_spurious += 1,
        }
        kind
    }

    pub(super) fn map_writable(&mut self, sp: SpaceId, page: usize) {
        let Mm { spaces, bit_spares, .. } = self;
        let vs = &mut spaces.get_mut(sp.0).expect("use of a dropped space").vs;
        vs.present.set_with(page, bit_spares);
        vs.writable.set_with(page, bit_spares);
        vs.home.set_with(page, bit_spares);
    }

    pub(super) fn set_entry_bits(&mut self, sp: SpaceId, page: usize, bits: u64) {
        let t = self.space(sp).dir[page / PTRS_PER_PTE].expect("entry without table");
        let tab = self.tables.get_mut(t);
        debug_assert!(tab.share == 1 || bits == Pte::ACCESSED, "invariant 1: shared table modified");
        tab.set(page % PTRS_PER_PTE, tab.entry(page % PTRS_PER_PTE).with(bits));
    }

    /// Mark page `page` of `sp` as being filled with the lock released (the engine's
    /// unlocked fills, `Core::fault_in`): until [`Mm::end_fill`], a fault on it resolves to
    /// a wake-up (its thread retries), no home is taken by `UFFDIO_MOVE` and the reclaim
    /// queue is held — so every home an in-flight fill reads keeps its bytes and stays
    /// mapped. (Each in-flight fill's own entry still names its source frame until its
    /// commit, so the frame cannot die; moving a home otherwise — evacuation, migration,
    /// compaction, freezing — waits for fills to drain.) Allocation-free.
    pub fn begin_fill(&mut self, sp: SpaceId, page: usize) {
        let Mm { spaces, bit_spares, .. } = self;
        spaces.get_mut(sp.0).expect("use of a dropped space").filling.set_with(page, bit_spares);
        self.fills += 1;
    }

    /// The fill of [`Mm::begin_fill`] is done (committed or failed).
    pub fn end_fill(&mut self, sp: SpaceId, page: usize) {
        debug_assert!(self.fills > 0 && self.space(sp).filling.get(page), "end_fill without begin_fill");
        self.space_mut(sp).filling.clear(page);
        self.fills -= 1;
    }

    /// Fills in flight with the lock released ([`Mm::begin_fill`]).
    pub fn fills_in_flight(&self) -> usize {
        self.fills as usize
    }

    /// Open a stream: until the matching [`Mm::end_stream`], every address
    /// [`Mm::stream_source`] calls stable keeps its bytes and stays mapped, so the caller
    /// may read it without the lock (`Space::write_to`).
    pub fn begin_stream(&mut self) {
        self.streams += 1;
    }

    /// Close a stream opened by [`Mm::begin_stream`]; the held reclaim queue drains at the
    /// next reclaim.
    pub fn end_stream(&mut self) {
        debug_assert!(self.streams > 0, "end_stream without begin_stream");
        self.streams -= 1;
    }

    /// Where page `page` of `sp` can be read for a stream, as [`Mm::read_source`] (the page
    /// counts as accessed): zeros; a frozen or pool home, which keeps its bytes while a
    /// stream is open (`Ok(addr)`, readable without the lock); or memory that may change
    /// or move once the lock is dropped — a view page (this space's own home or copy,
    /// another view's warm home, a plain view) — which must be copied under the lock
    /// (`Err(addr)`).
    pub fn stream_source(&mut self, sp: SpaceId, page: usize) -> Option<std::result::Result<usize, usize>> {
        debug_assert!(self.streams > 0, "stream_source outside a stream");
        let a = match self.read_source(sp, page) {
            Src::Zero => return None,
            Src::Addr(a) => a,
        };
        let stable = self.lookup(sp, page).frame().is_some_and(|f| {
            let home = self.frames.get(f).home;
            // (`read_source` may answer with a view page instead of the home.)
            self.home_addr(home) == a && matches!(self.region(home.region).kind, RegionKind::Frozen)
        });
        Some(if stable { Ok(a) } else { Err(a) })
    }

    /// Where the explicit read API finds the bytes of `page` of `sp`: zeros or a frame's
    /// home (populated memory). Marks the entry accessed.
    pub fn read_source(&mut self, sp: SpaceId, page: usize) -> Src {
        let s = self.space(sp);
        if s.plain {
            // The kernel holds the bytes, in the (unregistered) view itself.
            return Src::Addr(self.view_base(sp) + page * PAGE_SIZE);
        }
        if s.async_wp && s.vs.present.get(page) && !s.vs.home.get(page) {
            // A mapped copy holds its frame's bytes, or newer ones the kernel let a store
            // write without telling us yet (`async_wp.rs`): the view is the truth.
            if let Some(t) = s.dir[page / PTRS_PER_PTE] {
                let tab = self.tables.get_mut(t);
                tab.set(page % PTRS_PER_PTE, tab.entry(page % PTRS_PER_PTE).with(Pte::ACCESSED));
            }
            return Src::Addr(self.view_base(sp) + page * PAGE_SIZE);
        }
        let Some(t) = self.space(sp).dir[page / PTRS_PER_PTE] else {
            return Src::Zero;
        };
        let tab = self.tables.get_mut(t);
        let e = tab.entry(page % PTRS_PER_PTE);
        match e.frame() {
            None => Src::Zero,
            Some(f) => {
                tab.set(page % PTRS_PER_PTE, e.with(Pte::ACCESSED));
                Src::Addr(self.home_addr(self.frames.get(f).home))
            }
        }
    }
}
