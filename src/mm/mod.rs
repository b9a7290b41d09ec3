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
mod check;
mod compact;
mod evict;
mod fault;
mod fork;
mod frame;
mod loaded;
mod pin;
mod rmap;
mod table;

pub use adopt::AdoptAt;
pub use async_wp::ScanSpan;
#[allow(unused_imports)]
pub use evict::SwapSlots;
pub use fault::{Action, FaultKind, Resolution, Src, FAULT_AROUND_MAX};
pub use fork::{DropPlan, Dropped, SharePlan};
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
    /// A chunk of the arena's swap file (`evict.rs`): its free slots. Such a region lives
    /// as long as the arena (it is never dead, sparse or compacted).
    pub swap: Option<Box<evict::SwapSlots>>,
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
            swap: None,
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
    /// The view is registered with an async-WP userfaultfd (`async_wp.rs`): stores to its
    /// read-only pages are resolved by the kernel without a trap, so it never holds the
    /// home of a frame another table or space can see. Every space of an
    /// `ArenaBuilder::async_wp` arena; the forks of an `ArenaBuilder::async_forks` one.
    /// Fixed for the life of the view (a freeze keeps the registration).
    pub async_wp: bool,
    /// Pinned pages (`pin.rs`): the bit per page, and how many pins hold each.
    pub pinned: Bits,
    pub pin_depth: std::collections::BTreeMap<usize, u32>,
    /// Pages whose fill runs with the lock released ([`Mm::begin_fill`]).
    pub filling: Bits,
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
    /// Pages of read windows filled with the arena lock released (`Mm::begin_fill`).
    pub pages_filled_unlocked: u64,
    /// Frames written to the swap file and re-homed there, frames brought back, and view
    /// pages zapped by evictions (`evict.rs`).
    pub frames_evicted: u64,
    pub frames_swapped_in: u64,
    pub evict_zaps: u64,
    /// Frames the eviction clock found referenced and gave a second chance.
    pub frames_aged: u64,
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

/// Two ascending lists of pages as one ascending list, each page once (`dirty_pages` and
/// `clean` merge the model's dirty pages with the stores the kernel served alone).
pub fn merge_pages(a: Vec<usize>, b: Vec<usize>) -> Vec<usize> {
    if b.is_empty() {
        return a;
    }
    if a.is_empty() {
        return b;
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(&x), Some(&y)) if x == y => {
                b.next();
                a.next()
            }
            (Some(&x), Some(&y)) if x < y => a.next(),
            (Some(_), Some(_)) | (None, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => break,
        };
        out.extend(next);
    }
    out
}

/// Bit chunks kept ready for the fault path ([`Mm::reserve_headroom`]): 512 (32 KiB). With
/// 64, sparse faults (a chunk each) ran dry every ~60 faults and waited for the refiller —
/// which retries the lock every millisecond when it finds it busy: ~30 000 `sched_yield`s
/// for 19 200 faults in a scratch run, ~1 µs a fault.
const BIT_SPARES: usize = 512;

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
    /// Some `ACCESSED` bit was ever cleared (aging: `clear_referenced`, the eviction clock).
    /// Until then every page homed in a view has `ACCESSED` in its entry — the write or
    /// adoption that made it a home set it — which lets `clean` skip re-setting it
    /// ([`Mm::note_rewritten_home`]).
    accessed_cleared: bool,
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
    /// Every new space's view is async-WP (`async_wp.rs`; [`SpaceMm::async_wp`]).
    async_wp: bool,
    /// Streams reading frame homes outside the lock ([`Mm::begin_stream`]). While any is
    /// open, a frozen or pool home keeps its address and bytes: nothing is discarded or
    /// unmapped ([`Mm::drain_reclaim`] holds the queue) and no home is taken by
    /// `UFFDIO_MOVE` ([`Action::Take`]).
    streams: u32,
    /// Fills in flight with the lock released ([`Mm::begin_fill`]); like a stream, they
    /// hold the reclaim queue and `UFFDIO_MOVE` takes.
    fills: u32,
    /// Regions holding loaded images' pages (see [`Region::check`]).
    file_regions: Vec<RegionId>,
    /// Pinned pages of every space (`pin.rs`).
    pinned_now: usize,
    /// Swap regions (`evict.rs`), frames homed in them, and where the eviction clock's
    /// hand is (a frame slot).
    swap_regions: Vec<RegionId>,
    swapped_now: usize,
    evict_hand: usize,
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
            accessed_cleared: false,
            reclaim: Reclaim::default(),
            sparse: Vec::new(),
            compact_cursor: 0,
            pending_drops: Vec::new(),
            streams: 0,
            fills: 0,
            file_regions: Vec::new(),
            async_wp: false,
            pinned_now: 0,
            swap_regions: Vec::new(),
            swapped_now: 0,
            evict_hand: 0,
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
        self.frames.in_use() - self.swapped_now + copies
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
        self.regions.iter().filter(|(_, r)| r.kind == RegionKind::Frozen && !r.pool && r.swap.is_none()).count()
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
            swap: None,
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
            async_wp: self.async_wp,
            pinned: Bits::new(pages),
            pin_depth: Default::default(),
            filling: Bits::new(pages),
        }));
        self.region_mut(region).kind = RegionKind::View(sp);
        self.views.insert(base, sp);
        self.views_gen += 1;
        self.families.entry(family).or_default().push(sp);
        sp
    }

    /// Drain the kernel work queued by state changes: `discard(addr, len)` for each dead
    /// frozen page range, then `unmap(backing)` for each dead region. Keeps the queues'
    /// capacity (the fault path must not allocate).
    pub fn drain_reclaim(&mut self, mut discard: impl FnMut(usize, usize), mut unmap: impl FnMut(B)) {
        if self.streams > 0 || self.fills > 0 {
            // A stream or an unlocked fill may be reading a home queued here (see
            // `Mm::begin_stream`, `Mm::begin_fill`).
            return;
        }
        for (a, l) in self.reclaim.discard.drain(..) {
            discard(a, l);
        }
        for b in self.reclaim.dead.drain(..) {
            unmap(b);
        }
    }

    /// Entries waiting in the reclaim queue (page ranges to discard, regions to unmap).
    pub fn reclaim_queued(&self) -> usize {
        self.reclaim.discard.len() + self.reclaim.dead.len()
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

    /// Is the headroom down to half of what [`Mm::reserve_headroom`] provides? Then a
    /// refill should be asked for now, in the background, before [`Mm::has_headroom`]
    /// fails and a fault has to wait for one.
    pub fn wants_refill(&self) -> bool {
        !self.has_headroom_for(64) || !self.tables.has_headroom(32) || self.bit_spares.len() < BIT_SPARES / 2
    }

    /// Preallocate what the next faults need (called outside signal context). Bit chunks
    /// go fastest: a fault in a table its view has not touched takes one (`present`), so
    /// sparse faults use one each; [`BIT_SPARES`] of them (64 B each) last a few hundred
    /// faults while the refiller, which must find the lock free, gets its turn. Fallible
    /// rather than aborting: under an exhausted address space (`RLIMIT_AS`) the caller
    /// reports the failure and the faults that need headroom fail loudly.
    pub fn reserve_headroom(&mut self) -> Result<(), std::collections::TryReserveError> {
        const N: usize = 256;
        self.tables.reserve(N / 4)?;
        self.frames.reserve(4 * N)?;
        self.reclaim.discard.try_reserve(N)?;
        self.reclaim.dead.try_reserve(16)?;
        self.regions.free.try_reserve(16)?;
        self.bit_spares.try_reserve(BIT_SPARES.saturating_sub(self.bit_spares.len()))?;
        self.sparse.try_reserve(4 * N)?;
        while self.bit_spares.len() < BIT_SPARES {
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
        if let Some(s) = r.swap.as_mut() {
            // A swap slot: free it for reuse (capacity reserved: no allocation). Its bytes
            // stay in the file until the slot is written again.
            s.free.push(home.page);
            self.swapped_now -= 1;
            return;
        }
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
}

#[cfg(test)]
mod tests;
