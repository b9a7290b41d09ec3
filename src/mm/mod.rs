//! The memory-management core: software page tables shared copy-on-write between the
//! spaces of a fork family, frames with reference counts and homes, and the decisions of
//! the fault path. Pure, safe Rust: nothing here touches the kernel or view memory. The
//! fault engine (`crate::fault`) asks this module *what* to do and performs it with
//! `crate::sys`.
//!
//! Kernel names are used where they fit: [`Mm::break_cow_pte`] duplicates (or reuses) a
//! shared table before a write, as in the COW-PTE series; [`Mm::resolve_fault`] is the
//! analog of `handle_pte_fault` / `do_wp_page`.

mod adopt;
mod async_wp;
mod bits;
mod frame;
mod loaded;
mod pin;
mod rmap;
mod table;

pub use adopt::AdoptAt;
pub use async_wp::ScanSpan;
pub use rmap::KernelOp;

pub use bits::Bits;
#[allow(unused_imports)] // the whole vocabulary, for tests and readers
pub use frame::{Frame, FrameId, FrameStore, Home};
#[allow(unused_imports)]
pub use table::{Pte, PteTable, TableId, TableStore, PTRS_PER_PTE};

/// Bytes per page.
pub const PAGE_SIZE: usize = 4096;

/// Index of a region (a view or a frozen region) in the [`Mm`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RegionId(pub(crate) u32);

/// Index of a space in the [`Mm`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct SpaceId(pub(crate) u32);

/// What a region is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RegionKind {
    /// The view of a space: mapped pages are read-only copies or (writable) homes.
    View(SpaceId),
    /// Pages moved out of a view by a fork (`mremap(MREMAP_DONTUNMAP)`). Immutable: they
    /// are homes of frames that were shared when frozen; a page dies with its frame.
    Frozen,
}

/// A range of memory holding frame homes. `B` is the owner of the mapping (the engine's
/// RAII mapping; `()` in pure tests): dropping it unmaps.
pub struct Region<B> {
    pub base: usize,
    pub pages: usize,
    pub kind: RegionKind,
    /// Invariant: the number of live frames whose home is in this region. A frozen region
    /// is released when it reaches zero.
    pub homes: usize,
    /// The most homes this region held (set when it is frozen, or its slot count for a
    /// pool): a frozen region whose `homes` fall to a quarter of it is *sparse* and queued
    /// for automatic compaction ([`Mm::compact_step`]).
    pub peak: usize,
    /// Queued in [`Mm`]'s sparse list (each region at most once: frozen homes only leave).
    pub queued: bool,
    /// A pool (slots filled one page at a time: evacuations, re-homes, migrations) rather
    /// than pages frozen out of a view; both are `RegionKind::Frozen` (immutable homes).
    pub pool: bool,
    /// A loaded image's data (`Mm::new_loaded_space`): each page's expected checksum, and
    /// which were checked. Such a region is never compacted and its frames never migrate
    /// or move: their bytes leave it only after [`Mm::unverified`] said they may.
    pub check: Option<Box<PageChecks>>,
    pub backing: B,
}

/// Expected checksums of a loaded image's pages, and which have been verified.
pub struct PageChecks {
    pub crcs: Vec<u32>,
    pub verified: Vec<u64>,
}

impl<B> Region<B> {
    /// An empty pool region of `pages` slots at `base` (the active pool, or a migration
    /// target).
    fn pool(base: usize, pages: usize, backing: B) -> Self {
        Region {
            base,
            pages,
            kind: RegionKind::Frozen,
            homes: 0,
            peak: pages,
            queued: false,
            pool: true,
            check: None,
            backing,
        }
    }
}

/// Per-page state of a space's view, as the kernel sees it.
///
/// Invariants (checked by [`Mm::check`]):
/// * `writable ⊆ present`, `home ⊆ present`, `writable ⊆ home`;
/// * a present page holds the bytes of the frame its entry names, or zeros when the entry
///   is empty (BRIEF 3);
/// * a writable page's frame is homed there, its table has `share == 1` and the frame
///   `refs == 1` (BRIEF 2).
#[derive(Clone, Debug)]
pub struct ViewState {
    pub present: Bits,
    pub writable: Bits,
    pub home: Bits,
}

impl ViewState {
    fn new(pages: usize) -> ViewState {
        ViewState { present: Bits::new(pages), writable: Bits::new(pages), home: Bits::new(pages) }
    }
    fn reset(&mut self) {
        self.present.clear_all();
        self.writable.clear_all();
        self.home.clear_all();
    }
}

/// One space: a directory of table references (one per 2 MiB) and its view.
pub struct SpaceMm {
    pub pages: usize,
    /// The directory (the PMD level): `dir[i]` maps pages `512*i .. 512*(i+1)`.
    pub dir: Vec<Option<TableId>>,
    pub view: RegionId,
    /// Fork family: every space descending from one root shares it (the `anon_vma`).
    pub family: u32,
    pub vs: ViewState,
    /// The last page faulted through the view (`None` before the first fault) and the
    /// length of the run of consecutive faults ending there: the fault-around detector
    /// (like readahead).
    last_fault: Option<usize>,
    streak: u32,
    /// The view is plain kernel memory, not registered with userfaultfd (a space never
    /// forked; see `adopt.rs`). Invariant: then `dir` is all `None` and `vs` is empty — the
    /// kernel, not the model, holds the contents.
    pub plain: bool,
    /// The view is registered with the arena's second userfaultfd — the one of the fault
    /// mode other than the arena's default (`Arena::space_in`, `Space::fork_in`) — so its
    /// ioctls go there (`Core::uffd_of`). Fixed for the life of the view.
    pub other_uffd: bool,
    /// Pinned pages (`pin.rs`): the bit per page, and how many pins hold each.
    pub pinned: Bits,
    pub pin_depth: std::collections::BTreeMap<usize, u32>,
}

/// The most pages served ahead of one sequential fault.
pub const FAULT_AROUND_MAX: usize = 16;

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

/// A dropped view whose surviving homes are at most this many is evacuated to the pool
/// (one 4 KiB copy each) instead of frozen: no frozen region (one mapping, the whole
/// view's address space) is left behind for a few pages.
pub const EVACUATE_MAX: usize = 1024;
/// ... or at most this many when they fill less than 1/16 of the view.
pub const EVACUATE_SPARSE_MAX: usize = 1 << 16;

/// Frozen regions allowed before the sparsest (by address space) are compacted regardless
/// of their peak; see [`Mm::queue_excess_frozen`].
pub const FROZEN_SOFT_MAX: usize = 128;
/// ... or before the address space they reserve exceeds this (1 TiB).
pub const FROZEN_SOFT_BYTES: usize = 1 << 40;

/// The outcome of [`Mm::drop_space`].
pub enum Dropped<B> {
    /// Unmap this view.
    Unmap(B),
    /// The view holds homes of shared frames: freeze it, then [`Mm::drop_frozen`].
    Freeze,
}

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

/// Counters kept by the core (read under the arena lock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmCounters {
    pub forks: u64,
    pub freezes: u64,
    pub faults_read_zero: u64,
    pub faults_read_copy: u64,
    pub faults_write_zero: u64,
    pub faults_write_cow: u64,
    pub faults_write_reuse: u64,
    pub faults_spurious: u64,
    pub faults_around: u64,
    pub tables_shared: u64,
    pub tables_broken: u64,
    /// Breaks by cause (the sum is `tables_broken`).
    pub broken_by: BrokenBy,
    /// Table references dropped without a break (discard of a wholly covered shared table).
    pub tables_dropped: u64,
    /// rmap walks (`page_vma_mapped_walk`).
    pub walks: u64,
    /// Frames moved to a new home by migration or compaction.
    pub frames_migrated: u64,
    pub tables_reused: u64,
    pub bytes_copied: u64,
    pub bytes_reclaimed: u64,
    /// Pages taken into a view by UFFDIO_MOVE instead of copied (write faults on exclusive
    /// frames homed elsewhere).
    pub pages_moved: u64,
    /// Dense read fills: tables whose rest was mapped read-only at once, and the pages so
    /// mapped.
    pub dense_fills: u64,
    pub pages_filled: u64,
    /// Aging: `clear_referenced` operations, entries whose ACCESSED bit they cleared, and
    /// view pages zapped or write-protected to re-arm detection.
    pub aging_clears: u64,
    pub referenced_cleared: u64,
    pub aging_rearms: u64,
    /// Frames whose home was copied out of a sparse frozen region (or a dropped view) into
    /// the pool, without touching any entry (no table broken).
    pub frames_rehomed: u64,
    /// Drops whose freeze failed (e.g. `vm.max_map_count` reached): the space was kept on
    /// the pending list and is retried at the next fork or drop.
    pub drops_deferred: u64,
    /// Spaces created plain (their view kernel memory until the first fork), plain spaces
    /// adopted, and the written pages those adoptions turned into frames.
    pub plain_spaces_created: u64,
    pub adoptions: u64,
    pub pages_adopted: u64,
    /// Spaces created by `Arena::load`, their stored pages, and the pages whose checksum
    /// was checked on first use.
    pub spaces_loaded: u64,
    pub pages_loaded: u64,
    pub pages_verified: u64,
    /// Writes to read-only view pages that the kernel served alone (async write-protect)
    /// and a later sync recorded (see `async_wp.rs`).
    pub writes_async: u64,
    /// Pages a reset restored in place (bytes copied back, write-protected again) instead
    /// of replacing their table (async-WP arenas).
    pub pages_restored: u64,
    /// `pin` calls, and pinned pages copied for a fork's child or a reset instead of
    /// shared (`pin.rs`).
    pub pins: u64,
    pub pinned_copied: u64,
}

/// Shared tables broken, by the operation that needed an exclusive table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BrokenBy {
    pub write: u64,
    pub migrate: u64,
    pub discard: u64,
    pub mkclean: u64,
}

/// Why a table is being made exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakCause {
    Write,
    Migrate,
    Discard,
    Mkclean,
}

/// Work the engine must do in the kernel after a state change: give frozen pages back and
/// unmap dead regions. Drained with [`Mm::drain_reclaim`].
pub struct Reclaim<B> {
    /// Page ranges `(addr, len)` of frozen regions whose frames died.
    pub discard: Vec<(usize, usize)>,
    /// Backings of regions that no longer hold anything: drop (unmap) them.
    pub dead: Vec<B>,
}

impl<B> Default for Reclaim<B> {
    fn default() -> Self {
        Reclaim { discard: Vec::new(), dead: Vec::new() }
    }
}

/// A simple slab with id reuse.
struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Slab<T> {
    const fn new() -> Self {
        Slab { slots: Vec::new(), free: Vec::new(), len: 0 }
    }
    fn insert(&mut self, t: T) -> u32 {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(t);
                i
            }
            None => {
                self.slots.push(Some(t));
                self.slots.len() as u32 - 1
            }
        }
    }
    fn remove(&mut self, i: u32) -> T {
        let t = self.slots[i as usize].take().expect("remove of a free slot");
        self.free.push(i);
        self.len -= 1;
        t
    }
    fn get(&self, i: u32) -> Option<&T> {
        self.slots.get(i as usize).and_then(|s| s.as_ref())
    }
    fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.slots.get_mut(i as usize).and_then(|s| s.as_mut())
    }
    fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i as u32, s)))
    }
}

/// `Box::new([fill; N])`, or an error instead of an abort when memory is exhausted
/// (headroom refills may run with the address space at its limit).
fn try_box<T: Clone, const N: usize>(fill: T) -> Result<Box<[T; N]>, std::collections::TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(N)?;
    v.resize(N, fill);
    Ok(v.into_boxed_slice().try_into().unwrap_or_else(|_| unreachable!("exactly N elements")))
}

/// The state of one arena: every space, table, frame and region.
pub struct Mm<B> {
    tables: TableStore,
    frames: FrameStore,
    regions: Slab<Region<B>>,
    spaces: Slab<SpaceMm>,
    next_family: u32,
    /// The active pool region (homes of frames evacuated from views) and its next free slot.
    pool: Option<RegionId>,
    pool_next: usize,
    /// Preallocated bitmap chunks for view state, so the fault path never allocates.
    bit_spares: Vec<bits::Chunk>,
    /// Override of the protect-or-freeze threshold of [`Mm::share_plan`] (tests, tuning).
    protect_limit: Option<usize>,
    /// Resolve write faults on exclusive frames homed elsewhere with [`Action::Take`]
    /// (the kernel offers UFFDIO_MOVE) rather than a copy.
    take_exclusive: bool,
    /// Members of each fork family (the rmap walk's `anon_vma` chain).
    families: std::collections::HashMap<u32, Vec<SpaceId>>,
    /// View base address -> space, for the fault path's address lookup.
    views: std::collections::BTreeMap<usize, SpaceId>,
    /// See [`Mm::views_gen`].
    views_gen: u64,
    reclaim: Reclaim<B>,
    /// Sparse frozen regions waiting for [`Mm::compact_step`] (capacity kept for the fault
    /// path, which may queue one per frame it re-homes).
    sparse: Vec<RegionId>,
    /// Where the next [`Mm::compact_step`] resumes its sweep of the frame store.
    compact_cursor: usize,
    /// Dropped spaces whose view could not be frozen yet (retried by the engine).
    pending_drops: Vec<SpaceId>,
    /// Read-only view pages are write-protected asynchronously (`async_wp.rs`).
    async_wp: bool,
    /// Streams reading frame homes outside the lock ([`Mm::begin_stream`]). While any is
    /// open, a frozen or pool home keeps its address and bytes: nothing is discarded or
    /// unmapped ([`Mm::drain_reclaim`] holds the queue) and no home is taken by
    /// `UFFDIO_MOVE` ([`Action::Take`]).
    streams: u32,
    /// Regions holding loaded images' pages (see [`Region::check`]).
    file_regions: Vec<RegionId>,
    /// Pinned pages of every space (`pin.rs`).
    pinned_now: usize,
    pub counters: MmCounters,
}

impl<B> Default for Mm<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B> Mm<B> {
    pub fn new() -> Self {
        Mm {
            tables: TableStore::default(),
            frames: FrameStore::default(),
            regions: Slab::new(),
            spaces: Slab::new(),
            next_family: 0,
            views: std::collections::BTreeMap::new(),
            views_gen: 0,
            families: std::collections::HashMap::new(),
            pool: None,
            pool_next: 0,
            bit_spares: Vec::new(),
            protect_limit: None,
            take_exclusive: false,
            reclaim: Reclaim::default(),
            sparse: Vec::new(),
            compact_cursor: 0,
            pending_drops: Vec::new(),
            streams: 0,
            file_regions: Vec::new(),
            async_wp: false,
            pinned_now: 0,
            counters: MmCounters::default(),
        }
    }

    // ---- gauges -------------------------------------------------------------------------

    pub fn frames_in_use(&self) -> usize {
        self.frames.in_use()
    }
    /// Pages the arena holds resident: every frame's home, plus the read-only copies
    /// mapped in views (present view pages that are not homes). What
    /// `ArenaBuilder::max_memory` bounds. O(spaces).
    pub fn resident_pages(&self) -> usize {
        let copies: usize = self.spaces.iter().map(|(_, s)| s.vs.present.count() - s.vs.home.count()).sum();
        self.frames.in_use() + copies
    }
    pub fn tables_in_use(&self) -> usize {
        self.tables.in_use()
    }
    pub fn spaces_in_use(&self) -> usize {
        self.spaces.len
    }
    pub fn views_in_use(&self) -> usize {
        self.views.len()
    }
    /// Regions of pages frozen out of views by forks (and dropped views), mapped now.
    pub fn frozen_regions(&self) -> usize {
        self.regions.iter().filter(|(_, r)| r.kind == RegionKind::Frozen && !r.pool).count()
    }
    /// Pool regions mapped now besides the active one (which is reserved for the fault
    /// path): they hold homes of evacuated, re-homed, migrated or compacted frames.
    pub fn pool_regions(&self) -> usize {
        let active = usize::from(self.pool.is_some());
        self.regions.iter().filter(|(_, r)| r.pool).count() - active
    }
    /// Tables currently shared by more than one space.
    pub fn tables_shared_now(&self) -> usize {
        self.tables.iter().filter(|(_, t)| t.share > 1).count()
    }

    // ---- spaces -------------------------------------------------------------------------

    fn space(&self, sp: SpaceId) -> &SpaceMm {
        self.spaces.get(sp.0).expect("use of a dropped space")
    }
    fn space_mut(&mut self, sp: SpaceId) -> &mut SpaceMm {
        self.spaces.get_mut(sp.0).expect("use of a dropped space")
    }
    fn region(&self, r: RegionId) -> &Region<B> {
        self.regions.get(r.0).expect("use of a dead region")
    }
    fn region_mut(&mut self, r: RegionId) -> &mut Region<B> {
        self.regions.get_mut(r.0).expect("use of a dead region")
    }

    /// Every live space.
    pub fn space_ids(&self) -> Vec<SpaceId> {
        self.spaces.iter().map(|(i, _)| SpaceId(i)).collect()
    }

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

    /// Is `page` of `sp` mapped in its view (read-only or writable)?
    pub fn is_present(&self, sp: SpaceId, page: usize) -> bool {
        self.space(sp).vs.present.get(page)
    }

    /// Is page `page` of `sp` mapped writable in its view (its frame homed there, table and
    /// frame exclusive)?
    pub fn is_writable(&self, sp: SpaceId, page: usize) -> bool {
        self.space(sp).vs.writable.get(page)
    }

    /// Pages of a space.
    pub fn pages(&self, sp: SpaceId) -> usize {
        self.space(sp).pages
    }

    /// Base address of a space's view.
    pub fn view_base(&self, sp: SpaceId) -> usize {
        self.region(self.space(sp).view).base
    }

    /// The backing (mapping owner) of a space's view.
    pub fn view_backing(&self, sp: SpaceId) -> &B {
        &self.region(self.space(sp).view).backing
    }

    /// Mark `sp`'s view as registered with the arena's second userfaultfd (see
    /// [`SpaceMm::other_uffd`]); right after the space is created, under the same lock.
    pub fn set_other_uffd(&mut self, sp: SpaceId, other: bool) {
        self.space_mut(sp).other_uffd = other;
    }

    /// Is `sp`'s view registered with the arena's second userfaultfd?
    pub fn other_uffd(&self, sp: SpaceId) -> bool {
        self.space(sp).other_uffd
    }

    /// The space whose view contains `addr`, and the page index.
    pub fn space_at(&self, addr: usize) -> Option<(SpaceId, usize)> {
        let (&base, &sp) = self.views.range(..=addr).next_back()?;
        let pages = self.space(sp).pages;
        (addr < base + pages * PAGE_SIZE).then_some((sp, (addr - base) / PAGE_SIZE))
    }

    /// A new, empty space of `pages` pages whose view is mapped at `view_base`.
    pub fn new_space(&mut self, pages: usize, view_base: usize, view: B) -> SpaceId {
        let family = self.next_family;
        self.next_family += 1;
        self.insert_space(pages, view_base, view, vec![None; pages.div_ceil(PTRS_PER_PTE)], family)
    }

    fn insert_space(&mut self, pages: usize, base: usize, view: B, dir: Vec<Option<TableId>>, family: u32) -> SpaceId {
        let region = RegionId(self.regions.insert(Region {
            base,
            pages,
            kind: RegionKind::Frozen, // fixed below once the space id is known
            homes: 0,
            peak: 0,
            queued: false,
            pool: false,
            check: None,
            backing: view,
        }));
        let sp = SpaceId(self.spaces.insert(SpaceMm {
            pages,
            dir,
            view: region,
            family,
            vs: ViewState::new(pages),
            last_fault: None,
            streak: 0,
            plain: false,
            other_uffd: false,
            pinned: Bits::new(pages),
            pin_depth: Default::default(),
        }));
        self.region_mut(region).kind = RegionKind::View(sp);
        self.views.insert(base, sp);
        self.views_gen += 1;
        self.families.entry(family).or_default().push(sp);
        sp
    }

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
        if self.async_wp {
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

    fn alloc_pool_slot(&mut self) -> Home {
        let r = self.pool.expect("pool headroom is guaranteed by the engine");
        assert!(self.pool_next < self.region(r).pages, "pool headroom is guaranteed by the engine");
        self.pool_next += 1;
        Home { region: r, page: self.pool_next as u32 - 1 }
    }

    /// Move the home of frame `f` (homed at view page `page` of `sp`) to a pool slot; the
    /// view keeps a read-only copy. Returns the copy to perform.
    fn evacuate(&mut self, sp: SpaceId, page: usize, f: FrameId) -> KernelOp {
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
    fn queue_if_sparse(&mut self, r: RegionId) {
        if self.pool == Some(r) {
            return;
        }
        let reg = self.region_mut(r);
        if reg.kind == RegionKind::Frozen
            && reg.check.is_none()
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
            if r.kind != RegionKind::Frozen || r.queued || pool == Some(RegionId(i)) || r.homes * 16 >= r.pages {
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
    fn rehome_to_pool(&mut self, f: FrameId, ops: &mut Vec<KernelOp>) {
        let old = self.frames.get(f).home;
        debug_assert!(matches!(self.region(old.region).kind, RegionKind::Frozen));
        let slot = self.alloc_pool_slot();
        ops.push(KernelOp::CopyPage { dst: self.home_addr(slot), src: self.home_addr(old) });
        self.frames.get_mut(f).home = slot;
        self.region_mut(slot.region).homes += 1;
        self.unhome(old, false);
        self.counters.frames_rehomed += 1;
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
        debug_assert!(self.async_wp, "only async-WP arenas share a view that way");
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

    /// Drain the kernel work queued by state changes: `discard(addr, len)` for each dead
    /// frozen page range, then `unmap(backing)` for each dead region. Keeps the queues'
    /// capacity (the fault path must not allocate).
    pub fn drain_reclaim(&mut self, mut discard: impl FnMut(usize, usize), mut unmap: impl FnMut(B)) {
        if self.streams > 0 {
            return; // a stream may be reading a home queued here (see `Mm::begin_stream`)
        }
        for (a, l) in self.reclaim.discard.drain(..) {
            discard(a, l);
        }
        for b in self.reclaim.dead.drain(..) {
            unmap(b);
        }
    }

    /// Can one more fault be served without allocating? The fault path takes at most one
    /// table and one frame, and may queue one discard and one dead region. Checked before
    /// serving a fault from a signal handler; [`Mm::reserve_headroom`] refills outside it.
    pub fn has_headroom(&self) -> bool {
        self.has_headroom_for(2)
    }

    /// Can `n` more faults be served without allocating?
    pub fn has_headroom_for(&self, n: usize) -> bool {
        self.tables.has_headroom(2)
            && self.frames.has_headroom(n)
            && self.reclaim.discard.capacity() - self.reclaim.discard.len() >= n
            && self.reclaim.dead.capacity() - self.reclaim.dead.len() >= 2
            && self.regions.free.capacity() - self.regions.free.len() >= 2
            && self.pool_free() >= n
            && self.sparse.capacity() - self.sparse.len() >= n
            && self.bit_spares.len() >= 6
    }

    /// Preallocate what the next faults need (called outside signal context). Fallible
    /// rather than aborting: under an exhausted address space (`RLIMIT_AS`) the caller
    /// reports the failure and the faults that need headroom fail loudly.
    pub fn reserve_headroom(&mut self) -> Result<(), std::collections::TryReserveError> {
        const N: usize = 256;
        self.tables.reserve(N / 4)?;
        self.frames.reserve(4 * N)?;
        self.reclaim.discard.try_reserve(N)?;
        self.reclaim.dead.try_reserve(16)?;
        self.regions.free.try_reserve(16)?;
        self.bit_spares.try_reserve(64usize.saturating_sub(self.bit_spares.len()))?;
        self.sparse.try_reserve(4 * N)?;
        while self.bit_spares.len() < 64 {
            self.bit_spares.push(Bits::try_new_chunk()?);
        }
        Ok(())
    }

    /// Bumped whenever a view is added or removed: the signal handler's lock-free index of
    /// view ranges is rebuilt when it changes.
    pub fn views_gen(&self) -> u64 {
        self.views_gen
    }

    /// The address ranges `[base, end)` of every view, sorted by base (for the signal
    /// handler's index); `None` when the array cannot be allocated.
    pub fn view_ranges(&self) -> Option<Box<[(usize, usize)]>> {
        let mut v = Vec::new();
        v.try_reserve_exact(self.views.len()).ok()?;
        v.extend(self.views.iter().map(|(&base, &sp)| (base, base + self.space(sp).pages * PAGE_SIZE)));
        Some(v.into_boxed_slice())
    }

    // ---- tables and frames --------------------------------------------------------------

    fn put_table(&mut self, t: TableId) {
        let tab = self.tables.get_mut(t);
        tab.share -= 1;
        if tab.share > 0 {
            return;
        }
        let entries = *tab.entries();
        for f in entries.iter().filter_map(|e| e.frame()) {
            self.put_frame(f);
        }
        self.tables.release(t);
    }

    fn put_frame(&mut self, f: FrameId) {
        let fr = self.frames.get_mut(f);
        fr.refs -= 1;
        if fr.refs == 0 {
            let fr = self.frames.release(f);
            self.unhome(fr.home, false);
        }
    }

    /// A frame leaves its home (it died or moved into a view).
    /// `home` no longer holds a frame; `moved`: its page already left (UFFDIO_MOVE), so
    /// there is nothing to discard.
    fn unhome(&mut self, home: Home, moved: bool) {
        let r = self.region_mut(home.region);
        r.homes -= 1;
        match r.kind {
            RegionKind::View(sp) => {
                debug_assert!(!moved, "a view page is never the source of a move");
                self.space_mut(sp).vs.home.clear(home.page as usize);
            }
            RegionKind::Frozen => {
                let addr = r.base + home.page as usize * PAGE_SIZE;
                let queued = r.queued;
                let dead = r.homes == 0 && self.pool != Some(home.region);
                if !moved {
                    match self.reclaim.discard.last_mut() {
                        Some((a, l)) if *a + *l == addr => *l += PAGE_SIZE,
                        _ => self.reclaim.discard.push((addr, PAGE_SIZE)),
                    }
                    self.counters.bytes_reclaimed += PAGE_SIZE as u64;
                }
                if !dead {
                    self.queue_if_sparse(home.region);
                } else {
                    if queued {
                        self.sparse.retain(|q| *q != home.region);
                    }
                    let r = self.regions.remove(home.region.0);
                    if r.check.is_some() {
                        self.file_regions.retain(|q| *q != home.region);
                    }
                    // No need to discard pages of a region about to be unmapped.
                    let (lo, hi) = (r.base, r.base + r.pages * PAGE_SIZE);
                    self.reclaim.discard.retain(|(a, _)| *a < lo || *a >= hi);
                    self.reclaim.dead.push(r.backing);
                }
            }
        }
    }

    fn home_addr(&self, home: Home) -> usize {
        self.region(home.region).base + home.page as usize * PAGE_SIZE
    }

    /// The entry mapping `page` of `sp`.
    pub fn lookup(&self, sp: SpaceId, page: usize) -> Pte {
        match self.space(sp).dir[page / PTRS_PER_PTE] {
            None => Pte::NONE,
            Some(t) => self.tables.get(t).entry(page % PTRS_PER_PTE),
        }
    }

    /// Make the table covering `page` exclusive to `sp` before a change to it: allocate it
    /// if absent, reuse it when no one else shares it any more, otherwise duplicate it and
    /// take a frame reference for every entry (the COW-PTE break).
    pub fn break_cow_pte(&mut self, sp: SpaceId, page: usize, cause: BreakCause) -> TableId {
        let ti = page / PTRS_PER_PTE;
        match self.space(sp).dir[ti] {
            None => {
                let t = self.tables.alloc(None);
                self.space_mut(sp).dir[ti] = Some(t);
                t
            }
            Some(t) if self.tables.get(t).share == 1 => {
                let tab = self.tables.get_mut(t);
                if tab.cow {
                    tab.cow = false;
                    self.counters.tables_reused += 1;
                }
                t
            }
            Some(t) => {
                let entries = *self.tables.get(t).entries();
                let new = self.tables.alloc(Some(&entries));
                for e in entries.iter() {
                    if let Some(f) = e.frame() {
                        self.frames.get_mut(f).refs += 1;
                    }
                }
                self.tables.get_mut(t).share -= 1;
                self.space_mut(sp).dir[ti] = Some(new);
                self.counters.tables_broken += 1;
                let b = &mut self.counters.broken_by;
                match cause {
                    BreakCause::Write => b.write += 1,
                    BreakCause::Migrate => b.migrate += 1,
                    BreakCause::Discard => b.discard += 1,
                    BreakCause::Mkclean => b.mkclean += 1,
                }
                new
            }
        }
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
        if writable || (!write && present) || self.space(sp).plain {
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
                        && self.region(fr.home.region).check.is_none()
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

    fn map_writable(&mut self, sp: SpaceId, page: usize) {
        let Mm { spaces, bit_spares, .. } = self;
        let vs = &mut spaces.get_mut(sp.0).expect("use of a dropped space").vs;
        vs.present.set_with(page, bit_spares);
        vs.writable.set_with(page, bit_spares);
        vs.home.set_with(page, bit_spares);
    }

    fn set_entry_bits(&mut self, sp: SpaceId, page: usize, bits: u64) {
        let t = self.space(sp).dir[page / PTRS_PER_PTE].expect("entry without table");
        let tab = self.tables.get_mut(t);
        debug_assert!(tab.share == 1 || bits == Pte::ACCESSED, "invariant 1: shared table modified");
        tab.set(page % PTRS_PER_PTE, tab.entry(page % PTRS_PER_PTE).with(bits));
    }

    /// Where the explicit read API finds the bytes of `page` of `sp`: zeros or a frame's
    /// home (populated memory). Marks the entry accessed.
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

    pub fn read_source(&mut self, sp: SpaceId, page: usize) -> Src {
        let s = self.space(sp);
        if s.plain {
            // The kernel holds the bytes, in the (unregistered) view itself.
            return Src::Addr(self.view_base(sp) + page * PAGE_SIZE);
        }
        if self.async_wp && s.vs.present.get(page) && !s.vs.home.get(page) {
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

    // ---- invariants ---------------------------------------------------------------------

    /// Check every structural invariant; returns a description of the first violation.
    /// Cost O(everything): for tests and debug assertions.
    pub fn check(&self) -> Result<(), String> {
        use std::collections::HashMap;
        let mut share: HashMap<TableId, u32> = HashMap::new();
        for (i, s) in self.spaces.iter() {
            if s.plain && (s.dir.iter().any(Option::is_some) || s.vs.present.count() > 0) {
                return Err(format!("plain space {i} has tables or mapped view pages"));
            }
            for t in s.dir.iter().flatten() {
                *share.entry(*t).or_default() += 1;
            }
            self.check_pins(SpaceId(i))?;
        }
        if self.spaces.iter().map(|(_, s)| s.pin_depth.len()).sum::<usize>() != self.pinned_now {
            return Err("the count of pinned pages disagrees with the spaces' pins".into());
        }
        let mut refs: HashMap<FrameId, u32> = HashMap::new();
        for (id, t) in self.tables.iter() {
            let want = share.get(&id).copied().unwrap_or(0);
            if t.share != want {
                return Err(format!("table {id:?}: share {} but {want} directories name it", t.share));
            }
            if !t.dirty_summary_ok() {
                return Err(format!("table {id:?}: dirty summary out of step with its entries"));
            }
            for f in t.entries().iter().filter_map(|e| e.frame()) {
                *refs.entry(f).or_default() += 1;
            }
        }
        let mut homes: HashMap<RegionId, usize> = HashMap::new();
        for (id, f) in self.frames.iter() {
            let want = refs.get(&id).copied().unwrap_or(0);
            if f.refs != want {
                return Err(format!("frame {id:?}: refs {} but {want} tables name it", f.refs));
            }
            *homes.entry(f.home.region).or_default() += 1;
            let r = self.regions.get(f.home.region.0).ok_or(format!("frame {id:?} homed in a dead region"))?;
            if let RegionKind::View(sp) = r.kind {
                let s = self.space(sp);
                let p = f.home.page as usize;
                if !s.vs.home.get(p) || !s.vs.present.get(p) {
                    return Err(format!("frame {id:?} homed at view page {p} of {sp:?} not marked present+home"));
                }
                if self.lookup(sp, p).frame() != Some(id) && !self.pending_drops.contains(&sp) {
                    return Err(format!("frame {id:?} homed in {sp:?} page {p} whose entry names another frame"));
                }
                if s.vs.writable.get(p) && f.refs != 1 {
                    return Err(format!("frame {id:?} writable in a view but has {} refs", f.refs));
                }
            }
        }
        for (rid, r) in self.regions.iter() {
            let want = homes.get(&RegionId(rid)).copied().unwrap_or(0);
            if r.homes != want {
                return Err(format!("region {rid}: homes {} but {want} frames live there", r.homes));
            }
            if r.kind == RegionKind::Frozen && r.homes == 0 && self.pool != Some(RegionId(rid)) {
                return Err(format!("frozen region {rid} is empty but not released"));
            }
            let active = self.pool == Some(RegionId(rid));
            let frozen = r.kind == RegionKind::Frozen && !active;
            // (A loaded image's region is never compacted: see `Region::check`.)
            let sparse = frozen && r.check.is_none() && r.homes * 4 <= r.peak;
            let queue_ok = (!sparse || r.queued) && (!r.queued || frozen);
            if !queue_ok || r.queued != self.sparse.contains(&RegionId(rid)) {
                return Err(format!(
                    "region {rid}: homes {} of peak {}, queued {} (in queue: {})",
                    r.homes,
                    r.peak,
                    r.queued,
                    self.sparse.contains(&RegionId(rid))
                ));
            }
        }
        if let Some(q) = self.sparse.iter().find(|q| self.regions.get(q.0).is_none()) {
            return Err(format!("dead region {q:?} queued for compaction"));
        }
        for (sid, s) in self.spaces.iter() {
            let sp = SpaceId(sid);
            for p in 0..s.pages {
                let (pr, w, h) = (s.vs.present.get(p), s.vs.writable.get(p), s.vs.home.get(p));
                let writable_ok = !w || h;
                let present_ok = pr || !h;
                let consistent = writable_ok && present_ok;
                if !consistent {
                    return Err(format!("{sp:?} page {p}: view bits present={pr} writable={w} home={h}"));
                }
                if w {
                    let t = s.dir[p / PTRS_PER_PTE].ok_or("writable page without table")?;
                    if self.tables.get(t).share != 1 {
                        return Err(format!("{sp:?} page {p}: writable under a shared table (invariant 2)"));
                    }
                }
            }
        }
        self.check_async_homes()
    }
}

#[cfg(test)]
mod tests;
