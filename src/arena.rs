//! [`Arena`]: one userfaultfd, one fault engine, and the spaces created from it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fault::{AdoptHow, Core, Engine, EvictStats};
pub use crate::fault::{FaultMode, LockStats};
use crate::mm::{Mm, PAGE_SIZE};
use crate::space::Space;
use crate::sys::mem::Mapping;
use crate::sys::uffd::{self, Uffd};

pub use crate::sys::uffd::UffdAccess;

/// Largest space: 1 TiB (the directory and view bitmaps are sized by it).
pub const MAX_SPACE: usize = 1 << 40;

/// The engine state kept alive by the arena and every space. Dropping the last handle
/// stops the engine threads first, then unmaps what is left, then closes the userfaultfd:
/// a view is never left registered but unserved.
pub(crate) struct Inner {
    pub core: Arc<Core>,
    engine: Option<Engine>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.core.check_process().is_err() {
            // A fork(2) child dropping its inherited copy: the engine threads do not exist
            // here, the stop eventfd and the userfaultfd are shared with the parent (a stop
            // signal would end the *parent's* reader), and the mappings the core owns are
            // not mapped in the child (unmapping them could hit the child's own memory).
            // Leak it all: touching nothing is the only safe way out.
            std::mem::forget(self.engine.take());
            std::mem::forget(self.core.clone());
            return;
        }
        // Every space holds an `Arc<Inner>`, so no view is live here: stopping is safe.
        self.core.stopping.store(true, Ordering::Relaxed);
        if let Some(&slot) = self.core.signal_slot.get() {
            crate::fault::signal::unregister(slot);
        }
        drop(self.engine.take());
    }
}

/// Builder for an [`Arena`].
///
/// ```
/// # fn main() -> Result<(), cowarena::Error> {
/// let arena = cowarena::Arena::builder().max_memory(64 << 20).build()?;
/// let s = arena.space(1 << 20)?;
/// assert_eq!(s.len(), 1 << 20);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until `.build()`"]
pub struct ArenaBuilder {
    max_memory: Option<u64>,
    fault_mode: Option<FaultMode>,
    no_move: bool,
    no_dense_fill: bool,
    registered_from_start: bool,
    unlocked_fills: Option<bool>,
    async_wp: Option<bool>,
    async_forks: Option<bool>,
    max_resident: Option<u64>,
    swap_path: Option<std::path::PathBuf>,
}

impl ArenaBuilder {
    /// Limit the memory the arena makes resident, in bytes: every page holding a frame
    /// (written pages, and the frozen or pooled pages that keep shared contents alive)
    /// *and* every read-only copy mapped into a view for reading. An access that needs one
    /// more page beyond it fails — [`Error::CapacityExhausted`] from the API, a loud fault
    /// (SIGBUS in signal fault mode, SIGSEGV in thread mode, with the reason on stderr)
    /// from a view access — while rewriting pages a space already owns keeps working.
    /// [`Space::read`](crate::Space::read) maps nothing and is never refused (it may bring
    /// an evicted page back, see [`Arena::evict`]). Not counted:
    /// the arena's bookkeeping (tables, bitmaps: a few bytes per page touched). Dropping
    /// spaces, [`Space::discard`](crate::Space::discard) and resets give pages back. To
    /// stay under a container limit, set it below the limit by your process's other memory.
    /// Default: no limit (checking costs O(spaces) per fault when set).
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.max_memory = Some(bytes);
        self
    }

    /// Keep the memory the arena makes resident (counted as for
    /// [`max_memory`](Self::max_memory)) under `bytes` by evicting cold frames to the swap
    /// file ([`Arena::evict`]) instead of refusing pages: an evictor thread starts evicting
    /// past 15/16 of the limit, down to 7/8; a fault that would pass the limit waits for it
    /// (up to ~3 s, then it fails as with `max_memory`: only pinned and loaded pages are
    /// left). Lets a workload whose working set fits run when its total does not — e.g. in
    /// a container without swap, set it below the `--memory` limit by your process's other
    /// memory. Spaces are then registered from the start (a never-forked space is not left
    /// to the kernel, whose memory cowarena cannot evict). At least 1 MiB. Default: none.
    pub fn max_resident(mut self, bytes: u64) -> Self {
        self.max_resident = Some(bytes.max(1 << 20));
        self
    }

    /// Where the swap file of [`Arena::evict`] goes: a file created (or truncated) at
    /// `path` at the first eviction and removed with the arena. Default: an unnamed file in
    /// the temporary directory (`$TMPDIR`, else `/tmp`) — on a disk, not a `tmpfs`, or
    /// eviction only moves memory around.
    pub fn swap_path(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.swap_path = Some(path.into());
        self
    }

    /// How view faults are served. Default: [`FaultMode::Signal`] when the kernel offers
    /// `UFFD_FEATURE_SIGBUS` (5.11+: always, in practice), else [`FaultMode::Thread`]. Read
    /// the contract of [`FaultMode::Signal`] before passing view memory to syscalls.
    pub fn fault_mode(mut self, mode: FaultMode) -> Self {
        self.fault_mode = Some(mode);
        self
    }

    /// Whether a write fault on a page only this space still maps (its sharers were
    /// dropped or wrote their own copies) takes the page with `UFFDIO_MOVE` instead of
    /// copying it — the user-space analogue of the kernel reusing an exclusive page in
    /// `do_wp_page`. Default: on where the kernel offers `UFFD_FEATURE_MOVE` (Linux 6.8+);
    /// the engine copies whenever the kernel refuses a move (e.g. the page is shared with
    /// a `fork(2)` child). Turning it off is for measurement.
    pub fn uffd_move(mut self, on: bool) -> Self {
        self.no_move = !on;
        self
    }

    /// Whether a read fault in a 2 MiB table where the view already maps at least 32 pages
    /// maps the rest of that table read-only at once (one `UFFDIO_COPY` per contiguous
    /// run, ~1.2 µs per page instead of a ~6 µs fault each), as the kernel's fault-around
    /// and THP heuristics bet on density. It never dirties, copies-on-write or breaks
    /// anything (the pages are mapped as read faults would map them, ACCESSED included),
    /// and it stops at the memory limit. Memory bound: at most the whole view — one table
    /// (2 MiB) more per table in which 32 pages (1/16) were touched. Default: on; off for sparse
    /// readers that care about RSS more than fault cost.
    pub fn dense_read_fill(mut self, on: bool) -> Self {
        self.no_dense_fill = !on;
        self
    }

    /// Whether a new space starts as *plain* kernel memory and stays so until it is first
    /// forked: until then the kernel serves every fault itself (a first-touch write costs
    /// the kernel's ~1.7 µs instead of a ~4–7 µs user-space fault) and syscalls on the view
    /// just work in every fault mode. At the first fork — or the first
    /// [`Space::clean`](crate::Space::clean) / `clear_referenced` — the view is registered
    /// with userfaultfd and the pages written so far become frames (`PAGEMAP_SCAN` finds
    /// them; O(written pages) of bookkeeping, once). [`Space::dirty_pages`](crate::Space::dirty_pages)
    /// and [`Space::referenced`](crate::Space::referenced) answer from the kernel's page
    /// tables meanwhile, exactly. Default: on, where the kernel has `PAGEMAP_SCAN`
    /// (Linux 6.7+) and no [`ArenaBuilder::max_memory`] is set (the limit counts pages the
    /// arena makes resident; plain pages are the kernel's, so a limited arena registers
    /// every view from the start).
    pub fn plain_until_fork(mut self, on: bool) -> Self {
        self.registered_from_start = !on;
        self
    }

    /// Whether stores to view pages mapped read-only — copies of a shared page, pages read
    /// before they were written, pages made clean by [`Space::clean`](crate::Space::clean) —
    /// are served by the kernel alone (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7+) instead of a
    /// write-protect fault to user space each. The kernel marks the page written; the arena
    /// records it as a write at the next operation that needs to know (`PAGEMAP_SCAN` over
    /// the read-only pages: a fork, a reset, `dirty_pages`, `clean`, aging), so dirty
    /// tracking stays exact. Writes then get fault-around and the dense fill as reads do:
    /// the pages around a write fault are mapped read-only, and the stores that follow
    /// cost the kernel's own fault.
    ///
    /// What changes: a page written in place cannot be write-protected against the sharers
    /// of its frame, so a fork never leaves a written page in the view. A fork of a view
    /// holding at most `max(256, pages/256)` pages written since the last fork keeps it
    /// warm — their frames move to pool slots (one 4 KiB copy each) and the view keeps
    /// read-only copies; more, or [`ForkStrategy::Freeze`](crate::ForkStrategy::Freeze),
    /// *freeze* the view ([`ForkStrategy::KeepWarm`](crate::ForkStrategy::KeepWarm)
    /// included). And [`Space::clear_referenced`](crate::Space::clear_referenced) no longer
    /// observes reads of pages that stay mapped read-only (it re-arms only pages written
    /// since the last fork).
    ///
    /// Default: off. What it costs where it loses (`examples/bench`, same run): a fork must
    /// record the stores the kernel served since the last one, ~45 ns a page, so the fork of
    /// a 256 MiB space rewritten whole takes ~3 ms instead of ~0.3 ms (W1; the stores
    /// themselves cost ~130× less than their traps did); and a parent that reads its pages
    /// again after a freezing fork holds two resident copies of each (W3 peak memory 1.8×
    /// the kernel's, against 1.0× with `KeepWarm` protecting in place).
    /// ([`Arena::async_wp`](crate::Arena::async_wp) says which you got.)
    ///
    /// # Errors (at [`ArenaBuilder::build`])
    /// `async_wp(true)` on kernels before 6.7: [`Error::MissingFeature`] naming
    /// `UFFD_FEATURE_WP_ASYNC` or `PAGEMAP_SCAN`.
    pub fn async_wp(mut self, on: bool) -> Self {
        self.async_wp = Some(on);
        self
    }

    /// Give every fork (in the arena's default fault mode) an async-WP view, while the
    /// spaces made by [`Arena::space`](crate::Arena::space) and
    /// [`Arena::load`](crate::Arena::load) keep the default, trapping one — the split of
    /// [`ArenaBuilder::async_wp`] that keeps each side where it wins. Linux 6.7+.
    ///
    /// A fork's stores to the pages it reads or was filled with are then the kernel's
    /// alone (the kernel's own fault speed, no trap), recorded by the next sync as
    /// `async_wp` describes: copy-on-write in a fork at or above the kernel's own
    /// (`examples/bench`, W4). The parent — usually the long-lived space, and the one a
    /// snapshot is read from — keeps write-protecting its written pages in place at a
    /// fork: forks stay O(pages written since the last one), and the parent neither
    /// re-faults its working set nor holds a second copy of it. A fork that is forked
    /// again shares as an async-WP space does (its few written pages move to the pool, or
    /// its view freezes). [`Space::pin`](crate::Space::pin) is refused for the forks.
    /// Ignored when `async_wp(true)` makes every view async already.
    ///
    /// Default: on in [`FaultMode::Signal`] arenas where the kernel offers both features
    /// (Linux 6.7+); off before, and off in [`FaultMode::Thread`] arenas (opt in there:
    /// thread-mode async-WP views are the less exercised path — one stress run hung in CI
    /// with them, not reproduced since; see DESIGN.md). Turn it
    /// off to pin pages of forks, to have [`Space::clear_referenced`](crate::Space::clear_referenced)
    /// observe reads of a fork's read-only copies, or to count every first write of a fork
    /// as a fault ([`Stats::faults`](crate::Stats)). DESIGN.md, "Fault economy", has the
    /// figures for both settings.
    ///
    /// # Errors (at [`ArenaBuilder::build`])
    /// `async_forks(true)` on kernels before 6.7: [`Error::MissingFeature`] naming
    /// `UFFD_FEATURE_WP_ASYNC` or `PAGEMAP_SCAN`.
    pub fn async_forks(mut self, on: bool) -> Self {
        self.async_forks = Some(on);
        self
    }

    /// Let the fault path release the arena lock while the `UFFDIO_COPY`s of a read
    /// fault's window run (fault-around, dense fills: a 2 MiB dense fill's copies are
    /// nearly all the time its fault holds the lock), so threads reading a fork overlap
    /// their copies. Operations that would move what an in-flight copy reads — forks,
    /// resets, drops, evacuations, compaction — wait for the copies in flight; a fault on
    /// a page being filled retries. A single page's copy stays under the lock (releasing
    /// and re-taking it costs about what it saves). Default: on; see DESIGN.md, "Fills
    /// outside the lock", for the figures.
    pub fn unlocked_fills(mut self, on: bool) -> Self {
        self.unlocked_fills = Some(on);
        self
    }

    /// Open userfaultfd (the most capable access available), negotiate features and start
    /// the fault engine.
    ///
    /// # Errors
    /// [`Error::UffdUnavailable`] when this process may not use userfaultfd (the message
    /// names the remedy: seccomp profile, device permission, sysctl);
    /// [`Error::MissingFeature`] on kernels without write-protect support;
    /// [`Error::TooManyArenas`] past the signal-mode arena limit; [`Error::Os`] when an
    /// eventfd, a thread or the SIGBUS handler cannot be set up.
    pub fn build(self) -> Result<Arena> {
        crate::sys::process::init();
        let (_, offered) = Uffd::probe()?;
        let mode = self.fault_mode.unwrap_or(if offered & uffd::FEATURE_SIGBUS != 0 {
            FaultMode::Signal
        } else {
            FaultMode::Thread
        });
        // Without PAGEMAP_SCAN (before 6.7, or no /proc) spaces are registered from the start
        // and stores are never the kernel's alone.
        let pagemap = crate::sys::pagemap::Pagemap::open().ok();
        let async_forks = match self.async_forks {
            Some(true) if pagemap.is_none() => {
                return Err(Error::MissingFeature {
                    feature: "PAGEMAP_SCAN",
                    kernel: crate::sys::uffd::kernel_release(),
                })
            }
            Some(true) if offered & uffd::FEATURE_WP_ASYNC == 0 => {
                return Err(Error::MissingFeature {
                    feature: "UFFD_FEATURE_WP_ASYNC",
                    kernel: crate::sys::uffd::kernel_release(),
                })
            }
            Some(on) => on,
            // On where the kernel offers it (6.7+), in signal mode: see the builder method.
            None => mode == FaultMode::Signal && pagemap.is_some() && offered & uffd::FEATURE_WP_ASYNC != 0,
        };
        let async_wp = match self.async_wp {
            Some(true) if pagemap.is_none() => {
                return Err(Error::MissingFeature {
                    feature: "PAGEMAP_SCAN",
                    kernel: crate::sys::uffd::kernel_release(),
                })
            }
            Some(on) => on,
            // Off by default: see the builder method for what it would cost W1 and W3.
            None => false,
        };
        let uffd = crate::fault::open_uffd(mode, async_wp)?;
        tracing::debug!(access = ?uffd.access(), features = uffd.features(), ?mode, async_wp, "userfaultfd opened");
        let mut mm = Mm::new();
        mm.set_async_wp(async_wp);
        mm.set_take_exclusive(!self.no_move && uffd.features() & uffd::FEATURE_MOVE != 0);
        let core = Arc::new(Core {
            mm: crate::fault::lock::ArenaLock::new(mm),
            uffd,
            other: Default::default(),
            other_init: Default::default(),
            async_uffd: Default::default(),
            async_forks: async_forks && !async_wp,
            signal_slot: Default::default(),
            max_memory: self.max_memory.unwrap_or(u64::MAX),
            faults_failed: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            mode,
            refill: crate::sys::wake::EventFd::new().map_err(|e| Error::open_fd("eventfd", "an eventfd", e))?,
            pid: crate::sys::process::pid(),
            dense_fill: !self.no_dense_fill,
            self_faults: std::sync::Mutex::new((0, 0)),
            sig: Default::default(),
            reaper: Default::default(),
            fills: crate::fault::fills::FillGate::new(),
            unlocked_fills: self.unlocked_fills.unwrap_or(true),
            swap: Default::default(),
            swap_path: self.swap_path.clone(),
            swap_len: Default::default(),
            max_resident_pages: self.max_resident.map_or(0, |b| (b / PAGE_SIZE as u64) as usize),
            evict_req: Default::default(),
            evicted_gen: Default::default(),
            evict_stop: Default::default(),
            plain: !self.registered_from_start
                && self.max_memory.is_none()
                && self.max_resident.is_none()
                && pagemap.is_some(),
            pagemap,
        });
        drop(core.lock()); // preallocate the fault path's headroom
        let engine = Engine::start(core.clone())?;
        // (Built first: dropping it on an error below stops the engine and frees the slot.)
        let arena = Arena { inner: Arc::new(Inner { core, engine: Some(engine) }) };
        if mode == FaultMode::Signal {
            arena.inner.core.take_signal_slot()?;
        }
        Ok(arena)
    }
}

/// A family of forkable address spaces served by one userfaultfd.
///
/// ```
/// # fn main() -> Result<(), cowarena::Error> {
/// use cowarena::Arena;
/// let arena = Arena::new()?;
/// let mut root = arena.space(4 << 20)?;
/// root.as_mut_slice()[..5].copy_from_slice(b"hello");
/// let mut child = root.fork()?;
/// child.as_mut_slice()[0] = b'j';
/// assert_eq!(&root.as_slice()[..5], b"hello");
/// assert_eq!(&child.as_slice()[..5], b"jello");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Arena {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena").field("access", &self.uffd_access()).finish_non_exhaustive()
    }
}

impl Arena {
    /// An arena with default settings; see [`Arena::builder`].
    ///
    /// # Errors
    /// As [`ArenaBuilder::build`].
    pub fn new() -> Result<Arena> {
        ArenaBuilder::default().build()
    }

    /// Configure an arena.
    pub fn builder() -> ArenaBuilder {
        ArenaBuilder::default()
    }

    /// Map a new zero-filled space of `len` bytes in this process. The view is rounded up
    /// to whole pages; [`Space::len`] is `len`.
    ///
    /// # Errors
    /// [`Error::InvalidSize`] for a zero length or one above 1 TiB; [`Error::Os`] when the
    /// view cannot be mapped or registered (address space, `vm.max_map_count`).
    pub fn space(&self, len: usize) -> Result<Space> {
        self.space_in(len, self.fault_mode())
    }

    /// [`Arena::space`], with the space's faults served in `mode` whatever the arena's
    /// default ([`ArenaBuilder::fault_mode`]) — e.g. a [`FaultMode::Thread`] buffer that
    /// `read(2)` fills straight into its view in a signal-mode arena (where a syscall
    /// touching an unpopulated page fails with EFAULT; see [`FaultMode::Signal`]). Forks
    /// keep their parent's mode; [`Space::fork_in`] chooses another. Spaces of either mode
    /// share tables and frames as usual.
    ///
    /// The first space in the mode other than the arena's opens a second userfaultfd (and
    /// for signal mode installs the SIGBUS handler); later ones reuse it.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use cowarena::{Arena, FaultMode};
    /// use std::io::Read;
    /// # let path = std::env::temp_dir().join(format!("cowarena-doc-space-in-{}", std::process::id()));
    /// # std::fs::write(&path, [7u8; 8192])?;
    /// let arena = Arena::builder().fault_mode(FaultMode::Signal).build()?;
    /// let mut buf = arena.space_in(8192, FaultMode::Thread)?;
    /// // read(2) copies into pages never touched before: the engine's thread serves the
    /// // kernel's faults (a signal-mode view would make this read fail with EFAULT).
    /// std::fs::File::open(&path)?.read_exact(buf.as_mut_slice())?;
    /// assert_eq!(buf.as_slice()[8191], 7);
    /// # std::fs::remove_file(&path)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Arena::space`]; those of opening a userfaultfd for the first space in the other
    /// mode ([`Error::MissingFeature`] for signal mode on kernels without
    /// `UFFD_FEATURE_SIGBUS`, [`Error::TooManyArenas`] past the signal-mode arena limit);
    /// [`Error::SigbusBlocked`] for a signal-mode space created by a thread blocking SIGBUS.
    pub fn space_in(&self, len: usize, mode: FaultMode) -> Result<Space> {
        if len == 0 {
            return Err(Error::InvalidSize { size: len, why: "a space needs at least one byte" });
        }
        if len > MAX_SPACE {
            return Err(Error::InvalidSize { size: len, why: "larger than the 1 TiB maximum space" });
        }
        let core = &self.inner.core;
        core.check_process()?;
        core.check_sigmask(mode)?;
        let pages = len.div_ceil(PAGE_SIZE);
        let id;
        let base;
        if core.plain {
            // Kernel memory until the first fork (see `ArenaBuilder::plain_until_fork`);
            // registered with its mode's userfaultfd then, so that one is opened now.
            let (_, other) = core.uffd_for_mode(mode)?;
            let view = Mapping::anon(pages * PAGE_SIZE).map_err(|e| Error::os("mmap view", e))?;
            base = view.addr();
            let mut mm = core.lock();
            id = mm.new_plain_space(pages, base, view);
            mm.set_other_uffd(id, other);
        } else {
            let (view, other) = new_view(core, pages, mode)?;
            base = view.addr();
            let mut mm = core.lock();
            id = mm.new_space(pages, base, view);
            mm.set_other_uffd(id, other);
        } // (the guard dropped: no event under it)
        tracing::debug!(space = id.0, len, ?mode, "space created");
        Ok(Space::new(self.inner.clone(), id, base, len, mode))
    }

    /// A space holding the image at `path` (written by [`Space::save`]), ready at once:
    /// the header and index are read and checked, the image's data area is mapped
    /// read-only, and each stored page becomes a frame whose home is that mapping — so a
    /// page is read from the file (the page cache) only when first touched through the
    /// view or the API, as Firecracker's and CRIU's lazy restores do, and its checksum is
    /// checked then. A page that fails it is never used: [`Error::CorruptPage`] from the
    /// API, a loud failure (SIGBUS or SIGSEGV, the reason on stderr) at a view access. The
    /// loaded space forks, resets, streams and saves like any other.
    ///
    /// The file must not change while spaces loaded from it (or their forks) still use
    /// pages homed in it; pages already brought in are unaffected.
    ///
    /// # Errors
    /// [`Error::BadImage`] naming the problem — not an image, a newer format version, a
    /// damaged header or index, a truncated file — with nothing mapped;
    /// [`Error::ImageIo`] when the file cannot be opened, read or mapped.
    pub fn load(&self, path: impl AsRef<std::path::Path>) -> Result<Space> {
        use std::io::Read;
        let path = path.as_ref();
        let core = &self.inner.core;
        core.check_process()?;
        core.check_sigmask(core.mode)?;
        let io = |op: &'static str| move |source| Error::ImageIo { op, path: path.to_path_buf(), source };
        let bad = |problem| Error::BadImage { path: path.to_path_buf(), problem };
        let mut file = std::fs::File::open(path).map_err(io("open"))?;
        let file_len = file.metadata().map_err(io("read"))?.len();
        let mut head = Vec::with_capacity(crate::image::HEADER_LEN);
        (&mut file).take(crate::image::HEADER_LEN as u64).read_to_end(&mut head).map_err(io("read"))?;
        let h = crate::image::parse_header(&head, file_len).map_err(bad)?;
        let mut index = vec![0u8; crate::image::index_len(h.pages) as usize];
        file.read_exact(&mut index).map_err(io("read"))?;
        let index = crate::image::parse_index(&index, &h).map_err(bad)?;
        let (len, pages) = (h.len as usize, h.pages as usize);
        let data = Mapping::file_read_only(&file, h.data_offset, pages * PAGE_SIZE).map_err(io("map"))?;
        let (view, _) = new_view(core, pages, core.mode)?;
        let base = view.addr();
        let id = core.lock().new_loaded_space(pages, base, view, data.addr(), data, index);
        tracing::debug!(space = id.0, len, stored = h.stored, path = %path.display(), "space loaded");
        Ok(Space::new(self.inner.clone(), id, base, len, core.mode))
    }

    /// A snapshot of the arena's counters.
    #[must_use]
    pub fn stats(&self) -> Stats {
        if self.inner.core.check_process().is_err() {
            return Stats::default(); // a fork(2) child: see `Error::ForkedProcess`
        }
        let mm = self.inner.core.lock();
        let c = mm.counters;
        Stats {
            forks: c.forks,
            freezes: c.freezes,
            faults: FaultStats {
                read_zero: c.faults_read_zero,
                read_copy: c.faults_read_copy,
                write_zero: c.faults_write_zero,
                write_cow: c.faults_write_cow,
                write_reuse: c.faults_write_reuse,
                spurious: c.faults_spurious,
                around: c.faults_around,
                dense_fills: c.dense_fills,
                filled: c.pages_filled,
                failed: self.inner.core.faults_failed.load(Ordering::Relaxed),
            },
            tables_shared: c.tables_shared,
            tables_broken: c.tables_broken,
            broken_by: BrokenBy {
                write: c.broken_by.write,
                migrate: c.broken_by.migrate,
                discard: c.broken_by.discard,
                mkclean: c.broken_by.mkclean,
            },
            tables_dropped: c.tables_dropped,
            walks: c.walks,
            frames_migrated: c.frames_migrated,
            tables_reused: c.tables_reused,
            tables_in_use: mm.tables_in_use() as u64,
            tables_shared_now: mm.tables_shared_now() as u64,
            frames_in_use: mm.frames_in_use() as u64,
            spaces_in_use: mm.spaces_in_use() as u64,
            views_in_use: mm.views_in_use() as u64,
            frozen_regions: mm.frozen_regions() as u64,
            pool_regions: mm.pool_regions() as u64,
            bytes_copied: c.bytes_copied,
            bytes_reclaimed: c.bytes_reclaimed,
            pages_moved: c.pages_moved,
            aging: AgingStats {
                clears: c.aging_clears,
                referenced_cleared: c.referenced_cleared,
                rearmed: c.aging_rearms,
            },
            frames_rehomed: c.frames_rehomed,
            drops_deferred: c.drops_deferred,
            drops_pending: mm.drops_pending() as u64,
            plain_spaces: mm.plain_spaces() as u64,
            adoptions: c.adoptions,
            pages_adopted: c.pages_adopted,
            spaces_loaded: c.spaces_loaded,
            pages_loaded: c.pages_loaded,
            pages_verified: c.pages_verified,
            writes_async: c.writes_async,
            pages_restored: c.pages_restored,
            pages_pinned: mm.pinned_pages() as u64,
            pins: c.pins,
            pinned_copied: c.pinned_copied,
            pages_filled_unlocked: c.pages_filled_unlocked,
            frames_evicted: c.frames_evicted,
            frames_swapped_in: c.frames_swapped_in,
            pages_swapped: mm.swapped_frames() as u64,
            resident_bytes: (mm.resident_pages() * PAGE_SIZE) as u64,
            lock: self.inner.core.lock_stats(),
        }
    }

    /// How this arena's userfaultfd was obtained, and so what view accesses from syscalls
    /// can expect; see [`UffdAccess::implications`].
    pub fn uffd_access(&self) -> UffdAccess {
        self.inner.core.uffd.access()
    }

    /// Compact frozen memory: move the surviving frames of frozen regions that are at most
    /// half full into one new region (a migration under the seed's rules: shared tables on
    /// the way are broken), so the sparse regions are unmapped. Returns frames moved.
    ///
    /// # Errors
    /// [`Error::Os`] when the new region cannot be mapped or a page cannot be protected.
    pub fn compact(&self) -> Result<usize> {
        let core = &self.inner.core;
        core.check_process()?;
        let mut mm = core.lock();
        core.housekeeping(&mut mm); // retries deferred drops first
        let frames = mm.sparse_frozen_frames();
        let r = crate::space::migrate_frames(core, &mut mm, frames);
        drop(mm);
        if let Ok(n) = r {
            tracing::debug!(frames = n, "compacted");
        }
        r
    }

    /// Page out cold frames until about `target_bytes` are evicted (fewer when fewer can
    /// be): their bytes go to the arena's swap file ([`ArenaBuilder::swap_path`]), every
    /// view page mapping them is unmapped, and their memory is given back. The next touch
    /// — through a view or the API — reads the frame back from the file, transparently.
    /// Frames are re-homed, not tables broken: a frame shared by many forks is written
    /// once and keeps every sharer's table shared.
    ///
    /// Cold means unreferenced: a clock over the frames, using the same bits as
    /// [`Space::referenced`](crate::Space::referenced) — a frame referenced since its last
    /// pass has its bit cleared (a second chance) and is passed over; so after
    /// [`Arena::clear_referenced`], the frames touched since are kept. Never evicted:
    /// pinned pages ([`Space::pin`](crate::Space::pin)), pages still homed in a loaded
    /// image (they are on a file already), pages already evicted. Faults wait while it
    /// runs (it holds the arena lock, disk writes and one `fdatasync` per 8 MiB
    /// included). The memory of an evicted page whose old home a
    /// [`Space::write_to`](crate::Space::write_to) stream may still be reading is given
    /// back when the stream ends. In an [async-WP arena](ArenaBuilder::async_wp) stores to
    /// mapped pages take no trap, so a mapped page cannot be evicted safely: eviction
    /// first freezes every view that maps pages (as a fork does), and their working sets
    /// fault back in afterwards, whatever the target.
    ///
    /// ```
    /// # fn main() -> Result<(), cowarena::Error> {
    /// let arena = cowarena::Arena::new()?;
    /// let mut s = arena.space(1 << 20)?;
    /// s.as_mut_slice().fill(7);
    /// let st = arena.evict(1 << 20)?;
    /// assert_eq!(st.frames_evicted, 256);
    /// assert!(s.as_slice().iter().all(|&b| b == 7)); // brought back on touch
    /// assert_eq!(arena.stats().frames_swapped_in, 256);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::SwapIo`] when the swap file cannot be created, grown or written: the batch
    /// being written (up to 8 MiB) moves nothing, earlier batches stay evicted (pages
    /// aged or write-protected on the way stay so: harmless, they fault once);
    /// [`Error::Os`] if unmapping or write-protecting view pages fails.
    pub fn evict(&self, target_bytes: u64) -> Result<EvictStats> {
        let core = &self.inner.core;
        core.check_process()?;
        let pages = target_bytes.div_ceil(PAGE_SIZE as u64).min(usize::MAX as u64) as usize;
        let mut mm = core.lock();
        let st = core.evict(&mut mm, pages);
        drop(mm);
        if let Ok(st) = &st {
            tracing::debug!(frames = st.frames_evicted, aged = st.frames_aged, unmapped = st.pages_unmapped, "evicted");
        }
        st
    }

    /// Clear the referenced bits of every space (aging), breaking no table. Returns how many
    /// distinct page-table entries were referenced: an entry of a table that several spaces
    /// share has one bit for all of them and counts once (as with [`Space::clear_referenced`]
    /// on each space in turn, where later sharers find the shared bits already clear).
    ///
    /// # Errors
    /// [`Error::Os`] if re-arming a view (`MADV_DONTNEED`, `UFFDIO_WRITEPROTECT`) fails.
    pub fn clear_referenced(&self) -> Result<usize> {
        let core = &self.inner.core;
        core.check_process()?;
        let mut mm = core.lock();
        let mut n = 0;
        core.sync_all_written(&mut mm)?;
        for sp in mm.space_ids() {
            // Aging needs the model: a plain space is adopted first.
            core.adopt_if_plain(&mut mm, sp, AdoptHow::Auto)?;
            let mut ops = Vec::new();
            let pages = mm.pages(sp);
            n += mm.clear_referenced(sp, 0, pages, &mut ops);
            core.run_ops(&mut mm, &ops)?;
        }
        Ok(n)
    }

    /// The arena's default fault mode: that of [`Arena::space`] and [`Arena::load`]
    /// ([`Space::fault_mode`] tells a space's own).
    pub fn fault_mode(&self) -> FaultMode {
        self.inner.core.mode
    }

    /// Whether stores to read-only view pages are the kernel's alone in every view of this
    /// arena ([`ArenaBuilder::async_wp`]; off by default).
    pub fn async_wp(&self) -> bool {
        self.inner.core.lock().async_wp()
    }

    /// Whether forks get async-WP views while the other spaces keep trapping ones
    /// ([`ArenaBuilder::async_forks`]; on by default in signal mode where the kernel offers
    /// it). False
    /// when [`Arena::async_wp`] is true (every view is async-WP then).
    pub fn async_forks(&self) -> bool {
        self.inner.core.async_forks
    }

    /// Check every internal invariant (O(everything); for tests and debugging).
    #[doc(hidden)]
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.inner.core.check_process().map_err(|e| e.to_string())?;
        self.inner.core.lock().check()
    }
}

/// Map a view of `pages` pages and register it with the userfaultfd of `mode`; also
/// returns whether that is the arena's second one (for [`Mm::set_other_uffd`]).
pub(crate) fn new_view(core: &Core, pages: usize, mode: FaultMode) -> Result<(Mapping, bool)> {
    let (uffd, other) = core.uffd_for_mode(mode)?;
    let view = Mapping::anon(pages * PAGE_SIZE).map_err(|e| Error::os("mmap view", e))?;
    uffd.register(view.addr(), view.len()).map_err(|e| Error::os("UFFDIO_REGISTER view", e))?;
    Ok((view, other))
}

/// [`new_view`] for a fork's child: in an [`ArenaBuilder::async_forks`] arena, a child in
/// the default fault mode is registered with the async-WP userfaultfd instead (the third
/// value: for `Mm::set_space_async`).
pub(crate) fn new_fork_view(core: &Core, pages: usize, mode: FaultMode) -> Result<(Mapping, bool, bool)> {
    if mode == core.mode {
        if let Some(uffd) = core.async_fork_uffd()? {
            let view = Mapping::anon(pages * PAGE_SIZE).map_err(|e| Error::os("mmap view", e))?;
            uffd.register(view.addr(), view.len()).map_err(|e| Error::os("UFFDIO_REGISTER view", e))?;
            return Ok((view, false, true));
        }
    }
    let (view, other) = new_view(core, pages, mode)?;
    Ok((view, other, false))
}

/// Faults served, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultStats {
    /// Reads of never-written pages (filled with zeros, write-protected).
    pub read_zero: u64,
    /// Reads of written pages (copied from the frame's home, write-protected).
    pub read_copy: u64,
    /// First writes to never-written pages (a new frame).
    pub write_zero: u64,
    /// Writes to shared frames (copy-on-write into a new frame).
    pub write_cow: u64,
    /// Writes to frames that were no longer shared (taken over, no copy of a shared frame).
    pub write_reuse: u64,
    /// Faults found already served (another thread faulted the same page).
    pub spurious: u64,
    /// Pages offered to fault-around after sequential read faults (each served page is
    /// also counted under its kind above).
    pub around: u64,
    /// Dense read fills ([`ArenaBuilder::dense_read_fill`]): tables whose missing pages
    /// were mapped read-only at once.
    pub dense_fills: u64,
    /// Pages mapped by dense read fills (also counted as `read_zero`/`read_copy`).
    pub filled: u64,
    /// Faults that could not be served and were turned into SIGSEGV for the faulting thread.
    pub failed: u64,
}

impl Stats {
    /// Nothing in use: no space, frame, table, view, frozen or pool region (what every
    /// space dropping must lead to).
    ///
    /// ```
    /// # fn main() -> Result<(), cowarena::Error> {
    /// let arena = cowarena::Arena::new()?;
    /// let mut s = arena.space(1 << 20)?;
    /// s.write(0, b"x")?;
    /// drop(s.fork()?);
    /// drop(s);
    /// assert!(arena.stats().is_idle());
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.spaces_in_use == 0
            && self.frames_in_use == 0
            && self.tables_in_use == 0
            && self.views_in_use == 0
            && self.frozen_regions == 0
            && self.pool_regions == 0
    }
}

/// Aging ([`Space::clear_referenced`], [`Arena::clear_referenced`]): what clearing the
/// referenced bits did. No table is ever broken by it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgingStats {
    /// Clear operations (one per space visited).
    pub clears: u64,
    /// Page-table entries whose referenced bit was set and is now clear (an entry shared
    /// by several spaces counts once).
    pub referenced_cleared: u64,
    /// View pages unmapped (read-only copies) or write-protected (pages homed in the view)
    /// so that the next access is seen.
    pub rearmed: u64,
}

/// Shared tables broken (`break_cow_pte`), by the operation that needed them exclusive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokenBy {
    /// A write through a view or [`Space::write`].
    pub write: u64,
    /// Migration or compaction (`PVMW_BREAK_COW_PTE`).
    pub migrate: u64,
    /// Discard of a partly covered table.
    pub discard: u64,
    /// mkclean ([`Space::clean`]).
    pub mkclean: u64,
}

/// Counters and gauges of an arena; see [`Arena::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Forks performed.
    pub forks: u64,
    /// Forks that had to freeze the parent's view (it held pages written since the last fork).
    pub freezes: u64,
    /// Faults served, by kind.
    pub faults: FaultStats,
    /// Table references taken by forks (each fork shares every table of its parent).
    pub tables_shared: u64,
    /// Shared tables duplicated by a write (`break_cow_pte`).
    pub tables_broken: u64,
    /// Shared tables broken, by cause.
    pub broken_by: BrokenBy,
    /// Table references dropped without a break (discard of a wholly covered table).
    pub tables_dropped: u64,
    /// rmap walks performed.
    pub walks: u64,
    /// Frames moved by migration or compaction.
    pub frames_migrated: u64,
    /// Formerly shared tables reused in place because no one else shared them any more.
    pub tables_reused: u64,
    /// Tables allocated now.
    pub tables_in_use: u64,
    /// Tables currently shared by more than one space.
    pub tables_shared_now: u64,
    /// Frames (4 KiB each) allocated now.
    pub frames_in_use: u64,
    /// Spaces alive now.
    pub spaces_in_use: u64,
    /// Views mapped now.
    pub views_in_use: u64,
    /// Frozen regions mapped now: pages a fork (or the drop of a view other spaces still
    /// read) moved out of a view, kept while frames live there.
    pub frozen_regions: u64,
    /// Pool regions mapped now, besides the one kept ready for the fault path: slots
    /// holding frames that were evacuated from views, re-homed out of sparse frozen
    /// regions, migrated ([`Space::migrate`]) or compacted ([`Arena::compact`]).
    pub pool_regions: u64,
    /// Bytes of page data copied (fills of written pages and copy-on-write).
    pub bytes_copied: u64,
    /// Bytes of frozen memory given back to the OS.
    pub bytes_reclaimed: u64,
    /// Pages a write fault took into a view with `UFFDIO_MOVE` instead of copying (see
    /// [`ArenaBuilder::uffd_move`]).
    pub pages_moved: u64,
    /// Aging counters.
    pub aging: AgingStats,
    /// Frames whose home was copied into the pool without breaking any table: survivors of
    /// a dropped view (instead of freezing it) and of sparse frozen regions (automatic
    /// compaction; see DESIGN.md, "Long fork chains").
    pub frames_rehomed: u64,
    /// Drops whose freeze failed (e.g. at `vm.max_map_count`): the space's memory was kept
    /// and its drop retried at later forks, drops and [`Arena::compact`].
    pub drops_deferred: u64,
    /// Dropped spaces still waiting for that retry (their memory is still in use).
    pub drops_pending: u64,
    /// Spaces whose view is still plain kernel memory (never forked; see
    /// [`ArenaBuilder::plain_until_fork`]). Their pages are not in `frames_in_use`.
    pub plain_spaces: u64,
    /// Plain spaces adopted (registered, their written pages turned into frames) at a
    /// first fork, `clean` or `clear_referenced`.
    pub adoptions: u64,
    /// Written pages those adoptions turned into frames.
    pub pages_adopted: u64,
    /// Spaces created by [`Arena::load`].
    pub spaces_loaded: u64,
    /// Pages those images stored (frames homed in the image files).
    pub pages_loaded: u64,
    /// Loaded pages whose checksum was checked when first brought in.
    pub pages_verified: u64,
    /// Stores to read-only view pages that the kernel served alone, found by a later sync
    /// ([`ArenaBuilder::async_wp`]): recorded as writes, or undone by a reset
    /// (`pages_restored`); not counted in `faults`.
    pub writes_async: u64,
    /// Pages [`Space::reset_to`](crate::Space::reset_to) restored in place (bytes copied
    /// back from the snapshot, write-protected again) rather than by replacing their
    /// table: stores the kernel served alone in an async-WP arena.
    pub pages_restored: u64,
    /// Pages pinned now ([`Space::pin`](crate::Space::pin)).
    pub pages_pinned: u64,
    /// `Space::pin` calls so far.
    pub pins: u64,
    /// Pinned pages copied for a fork's child (or a space reset to a pinned one) instead
    /// of shared.
    pub pinned_copied: u64,
    /// Pages of read-fault windows (fault-around, dense fills) whose copies ran with the
    /// arena lock released ([`ArenaBuilder::unlocked_fills`]).
    pub pages_filled_unlocked: u64,
    /// Frames written to the swap file by [`Arena::evict`] (or the
    /// [`max_resident`](ArenaBuilder::max_resident) evictor).
    pub frames_evicted: u64,
    /// Evicted frames read back from the swap file on a later touch.
    pub frames_swapped_in: u64,
    /// Frames in the swap file now (counted in [`Stats::frames_in_use`], but holding no
    /// memory: not in [`Stats::resident_bytes`]).
    pub pages_swapped: u64,
    /// Memory the arena holds resident, as [`ArenaBuilder::max_memory`] and
    /// [`ArenaBuilder::max_resident`] count it: frames in memory and read-only copies in
    /// views.
    pub resident_bytes: u64,
    /// The arena lock as the fault path sees it: time held per fault (the serial part of
    /// a fault, which bounds the arena's fault rate on any number of cores) and sleeps in
    /// `FUTEX_WAIT`; see [`LockStats`].
    pub lock: LockStats,
}
