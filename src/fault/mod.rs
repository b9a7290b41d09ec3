//! The fault engine: serves MISSING and WRITE-PROTECT faults on views, and performs in the
//! kernel what the core (`crate::mm`) decides.
//!
//! Threads: a *reader* reads the userfaultfd and never blocks on the arena lock — it must
//! stay free to acknowledge REMAP events, because a fork that freezes a view blocks in
//! `mremap` (while holding the lock) until the event is read. Page faults are handed to a
//! *worker* that takes the lock and serves them.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::mm::{Action, FaultKind, Mm, Resolution, SpaceId, Src, FAULT_AROUND_MAX, PAGE_SIZE};
use crate::sys::mem::Mapping;
use crate::sys::uffd::{self, Uffd, UffdMsg};
use crate::sys::wake::EventFd;

mod adopt;
mod async_wp;
mod evict;
pub(crate) mod fills;
pub use evict::EvictStats;
pub(crate) mod lock;
mod registry;
pub(crate) mod signal;

pub(crate) use adopt::AdoptHow;
pub use lock::LockStats;

/// How view faults reach the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FaultMode {
    /// The faulting thread serves its own fault in a SIGBUS handler
    /// (`UFFD_FEATURE_SIGBUS`): ≈5 µs per fault on our machines, against ≈55 µs for a
    /// handler thread. Contract: a *syscall* touching an unpopulated or write-protected
    /// view page fails with EFAULT instead of waiting (e.g. `write(fd, view)`); call
    /// `Space::populate` on the range first, use `Space::read`/`Space::write`/
    /// `Space::write_to`, or serve that space in [`FaultMode::Thread`] — the whole arena
    /// (`ArenaBuilder::fault_mode`), or just the spaces handed to syscalls
    /// (`Arena::space_in`, `Space::fork_in`: e.g. a thread-mode snapshot of a signal-mode
    /// space to `write(2)` from). The default when the kernel offers it.
    ///
    /// Every thread that touches a view must leave SIGBUS *unblocked* (a common "all
    /// signals to one thread" setup blocks it everywhere else): a fault in a thread that
    /// blocks it is fatal — the kernel unblocks the signal, resets its action to the
    /// default and kills the process without running any handler, so not even a message
    /// can be written. `Arena::space`, `Space::fork` and `Space::populate` check the
    /// calling thread and return [`Error::SigbusBlocked`];
    /// other threads are the program's to check. Use [`FaultMode::Thread`] for such
    /// programs (or for the spaces such threads touch).
    #[default]
    Signal,
    /// A handler thread serves every fault; syscalls on view memory are served too (unless
    /// userfaultfd is user-mode-only). Slower: each fault is a cross-thread wake-up.
    Thread,
}

/// Most frames one housekeeping step re-homes out of sparse frozen regions (4 MiB of copies,
/// ~0.5 ms).
pub(crate) const COMPACT_BUDGET: usize = 1024;
/// Free pool slots kept for the fault path.
const POOL_MARGIN: usize = 64;

/// The arena's userfaultfds ([`Core::uffd_by`]): the default fault mode's, the other
/// mode's (`Arena::space_in`, `Space::fork_in`), and the async-WP one of forks
/// (`ArenaBuilder::async_forks`).
pub(crate) const UFFD_MAIN: u8 = 0;
pub(crate) const UFFD_OTHER: u8 = 1;
pub(crate) const UFFD_ASYNC: u8 = 2;

/// Open a userfaultfd for views served in `mode`, with write-protection (asynchronous when
/// `async_wp`) and the optional features every one of the arena's contexts asks for.
pub(crate) fn open_uffd(mode: FaultMode, async_wp: bool) -> Result<Uffd> {
    let required = uffd::FEATURE_WP
        | if mode == FaultMode::Signal { uffd::FEATURE_SIGBUS } else { 0 }
        | if async_wp { uffd::FEATURE_WP_ASYNC } else { 0 };
    Uffd::open(required, uffd::FEATURE_EVENT_REMAP | uffd::FEATURE_THREAD_ID | uffd::FEATURE_MOVE)
}
/// Most frame slots one housekeeping step examines.
pub(crate) const COMPACT_SCAN: usize = 1 << 16;

/// Pages decided (and copied from consecutive homes in one `UFFDIO_COPY`) per window of a
/// read-only fill; zero runs are bounded by the static zero source's size instead.
const FILL_WINDOW: usize = 64;
/// Async-WP forks: how many times the view's homes are evacuated again after stores
/// raced the copies before the fork freezes the view instead (`Core::prepare_share_async`).
const EVACUATE_ROUNDS: usize = 4;
/// Dead regions at least this large are unmapped by the reader thread, not by the fork
/// that found them dead (`Core::reclaim_off_path`).
const REAP_OFF_PATH_BYTES: usize = 16 << 20;
/// Fills leave the lock only while fewer reclaim entries than this wait (fills in flight
/// hold the queue; a long queue means memory not yet given back): then they fill under
/// the lock until the count of fills in flight drops to zero and the queue drains.
const RECLAIM_HELD_MAX: usize = 64;

/// How long the faulting thread must be seen holding its arena's lock before a fault
/// message from it counts as a self-deadlock (thread mode; see `Core::lock_for`).
const SELF_FAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How often thread mode's worker, sleeping on a busy lock, looks at who holds it.
const SELF_FAULT_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// A page of zeros, the source of zero fills.
#[repr(C, align(4096))]
struct ZeroPage([u8; PAGE_SIZE * FAULT_AROUND_MAX]);
/// Zeros for fills of up to [`FAULT_AROUND_MAX`] pages in one `UFFDIO_COPY`.
static ZERO_PAGE: ZeroPage = ZeroPage([0; PAGE_SIZE * FAULT_AROUND_MAX]);

/// State shared by the API and the engine threads.
pub(crate) struct Core {
    /// The arena lock (a futex lock the SIGBUS handler may take; see `lock.rs`). It also
    /// records its holder's thread id: a fault taken while the faulting thread itself holds
    /// the lock would wait forever; the handler checks and dies loudly instead.
    pub mm: lock::ArenaLock<Mm<Mapping>>,
    /// The userfaultfd of the arena's default fault mode (`mode`).
    pub uffd: Uffd,
    /// The userfaultfd of the other fault mode, opened by the first space created in that
    /// mode (`Arena::space_in`, `Space::fork_in`; see [`Core::uffd_for_mode`]). Views
    /// registered with it are marked [`Mm::other_uffd`] and every ioctl on them goes
    /// through it (the kernel checks the context for `UFFDIO_MOVE`, and a wake-up reaches
    /// only the waiters of its own context); the reader thread polls it beside `uffd`.
    pub other: std::sync::OnceLock<Uffd>,
    /// Serialises opening `other` and `async_uffd`.
    pub other_init: Mutex<()>,
    /// An async-WP userfaultfd of the default fault mode, for the forks of an
    /// `ArenaBuilder::async_forks` arena (opened with the first; [`Core::async_fork_uffd`]).
    /// Views registered with it are [`Mm::space_async`]; the reader polls it too.
    pub async_uffd: std::sync::OnceLock<Uffd>,
    /// Forks (in the default fault mode) get async-WP views (`ArenaBuilder::async_forks`).
    pub async_forks: bool,
    /// The SIGBUS handler's registry slot, once the arena has a signal-mode userfaultfd
    /// (at build, or with its first signal-mode space); released when the arena drops.
    pub signal_slot: std::sync::OnceLock<usize>,
    /// Memory limit for frames, in bytes (`u64::MAX`: none).
    pub max_memory: u64,
    pub faults_failed: AtomicU64,
    pub stopping: AtomicBool,
    pub mode: FaultMode,
    /// Written (from signal context) to ask the engine thread to refill the preallocated
    /// tables and frames the signal handler serves faults from.
    pub refill: EventFd,
    /// The process that created the arena (see `crate::sys::process`).
    pub pid: i32,
    /// Map the rest of a 2 MiB table read-only once reads in it are dense (see
    /// `ArenaBuilder::dense_read_fill`).
    pub dense_fill: bool,
    /// Thread mode: the address and rounds of the last fault refused because its thread
    /// held the lock (see `Core::lock_for`). Only the engine's worker thread uses it.
    pub self_faults: Mutex<(usize, u32)>,
    /// What the signal handler reads without the lock: the view ranges and the outcome of
    /// the last headroom refills.
    pub sig: SignalState,
    /// `PAGEMAP_SCAN` (Linux 6.7+), to adopt plain spaces; `None` where the kernel lacks it.
    pub pagemap: Option<crate::sys::pagemap::Pagemap>,
    /// New spaces start plain (kernel memory until their first fork; see
    /// `ArenaBuilder::plain_until_fork`).
    pub plain: bool,
    /// The gate of fault-path fills whose `UFFDIO_COPY` runs with the arena lock released
    /// (`ArenaBuilder::unlocked_fills`; see [`Core::fill_unlocked`] and `fills.rs`).
    pub fills: fills::FillGate,
    /// Whether the fault path may release the lock around its fills.
    pub unlocked_fills: bool,
    /// Dead regions of at least [`REAP_OFF_PATH_BYTES`] waiting for the reader thread to
    /// unmap them (`Core::reclaim_off_path`): unmapping a populated 256 MiB frozen region
    /// costs ~10 ms of page freeing, which a fork need not wait for. Never touched from
    /// signal context.
    pub reaper: std::sync::Mutex<Vec<Mapping>>,
    /// The swap file evicted frames go to (`evict.rs`), created by the first eviction at
    /// `swap_path` (or unnamed in the temporary directory); its length.
    pub swap: std::sync::OnceLock<crate::sys::swap::SwapFile>,
    pub swap_path: Option<std::path::PathBuf>,
    pub swap_len: AtomicU64,
    /// `ArenaBuilder::max_resident` in pages (0: none), and the evictor thread's doorbell,
    /// its round count (faults waiting for room sleep on it) and its stop flag.
    pub max_resident_pages: usize,
    pub evict_req: AtomicU32,
    pub evicted_gen: AtomicU32,
    pub evict_stop: AtomicBool,
}

/// State the SIGBUS handler reads without taking the arena lock (atomics only).
pub(crate) struct SignalState {
    /// This arena's view ranges, so the handler finds the owner of an address without
    /// taking any arena's lock (see [`registry::RangeIndex`]).
    pub index: registry::RangeIndex,
    /// [`Mm::views_gen`] of the published index (`u64::MAX`: publish at the next unlock).
    /// Only touched under the lock.
    published_gen: AtomicU64,
    /// errno of the last failed headroom refill (0: the last refill succeeded).
    pub refill_errno: AtomicI32,
    /// Whether that failure was an allocation (1) rather than an `mmap` (0).
    pub refill_alloc: AtomicBool,
    /// Failed refills so far: a handler waiting for headroom gives up after a few.
    pub refill_failures: AtomicU32,
    /// Refills attempted so far (successful or not): a handler waiting for headroom waits
    /// for this to move before it takes the lock again, leaving the lock to the refiller.
    pub refills: AtomicU32,
    /// A refill was asked for early (headroom below half, [`Mm::wants_refill`]) and has
    /// not run yet: the handler asks once, not at every fault until it runs.
    pub refill_asked: AtomicBool,
}

impl Default for SignalState {
    fn default() -> Self {
        SignalState {
            index: registry::RangeIndex::new(),
            published_gen: AtomicU64::new(u64::MAX),
            refill_errno: AtomicI32::new(0),
            refill_alloc: AtomicBool::new(false),
            refill_failures: AtomicU32::new(0),
            refills: AtomicU32::new(0),
            refill_asked: AtomicBool::new(false),
        }
    }
}

/// The arena lock, held (by the thread recorded as its owner, for the self-deadlock
/// check); republishes the view index on unlock when views were added or removed.
pub(crate) struct MmGuard<'a> {
    guard: lock::Guard<'a, Mm<Mapping>>,
    core: &'a Core,
}

impl std::ops::Deref for MmGuard<'_> {
    type Target = Mm<Mapping>;
    fn deref(&self) -> &Mm<Mapping> {
        &self.guard
    }
}

impl std::ops::DerefMut for MmGuard<'_> {
    fn deref_mut(&mut self) -> &mut Mm<Mapping> {
        &mut self.guard
    }
}

impl MmGuard<'_> {
    /// Release the arena lock around `f` (see `lock::Guard::unlocked`).
    pub fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.guard.unlocked(f)
    }
}

impl Drop for MmGuard<'_> {
    fn drop(&mut self) {
        // Still under the lock (the lock guard field drops after this body, releasing it):
        // writers of the index are serialised. Views never change in the fault path, so the signal handler
        // never gets past the comparison (publishing allocates).
        let gen = self.guard.views_gen();
        let sig = &self.core.sig;
        if sig.published_gen.load(Ordering::Relaxed) != gen {
            let ranges = self.guard.view_ranges();
            // No array (allocation failed): lookups answer "unknown" and the handler falls
            // back to asking under the lock; retry at the next unlock.
            let next = if ranges.is_some() { gen } else { u64::MAX };
            sig.index.publish(ranges);
            sig.published_gen.store(next, Ordering::Relaxed);
        }
    }
}

/// Increments its counter when dropped (after the refill's outcome is recorded).
struct Bump<'a>(&'a AtomicU32);

impl Drop for Bump<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// This thread's id, cached per thread. Async-signal-safe, also on a thread's first call
/// (from the SIGBUS handler, say): a `const`-initialised thread-local of a type without
/// `Drop` is a plain `#[thread_local]` static — no lazy initialisation, no destructor
/// registration, no allocation — and the first call adds one `gettid` (a raw syscall that
/// leaves `errno` alone) and a store.
fn this_tid() -> i32 {
    const _: () = assert!(!std::mem::needs_drop::<std::cell::Cell<i32>>());
    thread_local! { static TID: std::cell::Cell<i32> = const { std::cell::Cell::new(0) }; }
    TID.with(|t| {
        if t.get() == 0 {
            t.set(rustix::thread::gettid().as_raw_nonzero().get());
        }
        t.get()
    })
}

impl Core {
    /// `Err` in a `fork(2)` child: every API entry point checks this before touching the
    /// arena (its lock may have been held by a parent thread at the fork, its userfaultfd
    /// acts on the parent's address space).
    pub fn check_process(&self) -> Result<()> {
        let current = crate::sys::process::pid();
        if current == self.pid {
            Ok(())
        } else {
            Err(Error::ForkedProcess { owner: self.pid, current })
        }
    }

    /// For a space in signal mode, `Err` when the calling thread blocks SIGBUS (its first
    /// view fault would kill the process silently). Checked where the library can: space
    /// creation, fork, populate.
    pub fn check_sigmask(&self, mode: FaultMode) -> Result<()> {
        if mode == FaultMode::Signal && crate::sys::signal::sigbus_blocked() {
            Err(Error::SigbusBlocked)
        } else {
            Ok(())
        }
    }

    /// The userfaultfd serving views in `mode`, and whether it is the arena's second one
    /// ([`Core::other`]); opens that one (and, for signal mode, installs the SIGBUS handler
    /// and takes a registry slot) on first use. Never called with the arena lock held: the
    /// reader thread is woken to start polling the new descriptor.
    ///
    /// # Errors
    /// Those of opening a userfaultfd ([`Error::UffdUnavailable`], [`Error::MissingFeature`]
    /// where the kernel lacks `UFFD_FEATURE_SIGBUS`); [`Error::TooManyArenas`] when every
    /// signal-mode slot is taken.
    pub fn uffd_for_mode(&self, mode: FaultMode) -> Result<(&Uffd, bool)> {
        if mode == self.mode {
            return Ok((&self.uffd, false));
        }
        if let Some(u) = self.other.get() {
            return Ok((u, true));
        }
        let _init = self.other_init.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = self.other.get() {
            return Ok((u, true));
        }
        // The same write-protect features as the first one (async WP is arena-wide).
        let u = open_uffd(mode, self.uffd.features() & uffd::FEATURE_WP_ASYNC != 0)?;
        if mode == FaultMode::Signal {
            self.take_signal_slot()?;
        }
        tracing::debug!(access = ?u.access(), features = u.features(), ?mode, "second userfaultfd opened");
        let u = self.other.get_or_init(|| u);
        // Wake the reader: its next poll includes the new descriptor (before any view is
        // registered with it, so before any event can wait on it).
        let _ = self.refill.signal();
        Ok((u, true))
    }

    /// Install the SIGBUS handler and register this core with it, once.
    pub fn take_signal_slot(&self) -> Result<()> {
        if self.signal_slot.get().is_some() {
            return Ok(());
        }
        crate::sys::signal::install(signal::on_fault).map_err(|e| Error::os("sigaction(SIGBUS)", e))?;
        let slot = signal::register(self).ok_or(Error::TooManyArenas { limit: signal::MAX_ARENAS })?;
        if self.signal_slot.set(slot).is_err() {
            signal::unregister(slot); // (lost a race: one slot is enough)
        }
        Ok(())
    }

    /// The userfaultfd `sp`'s view is registered with.
    pub fn uffd_of<'a>(&'a self, mm: &Mm<Mapping>, sp: SpaceId) -> &'a Uffd {
        self.uffd_by(Self::uffd_sel(mm, sp))
    }

    /// Which of the arena's userfaultfds `sp`'s view is registered with: [`UFFD_MAIN`],
    /// [`UFFD_OTHER`] (the other fault mode) or [`UFFD_ASYNC`] (an async-WP fork).
    pub fn uffd_sel(mm: &Mm<Mapping>, sp: SpaceId) -> u8 {
        if mm.other_uffd(sp) {
            UFFD_OTHER
        } else if mm.space_async(sp) && !mm.async_wp() {
            UFFD_ASYNC
        } else {
            UFFD_MAIN
        }
    }

    /// One of the arena's userfaultfds (see [`Core::uffd_sel`]); the first when the one
    /// asked for does not exist (nothing is registered with one before it exists).
    pub fn uffd_by(&self, sel: u8) -> &Uffd {
        let extra = match sel {
            UFFD_OTHER => self.other.get(),
            UFFD_ASYNC => self.async_uffd.get(),
            _ => None,
        };
        extra.unwrap_or(&self.uffd)
    }

    /// The async-WP userfaultfd for forks (`ArenaBuilder::async_forks`), opened by the
    /// first; `None` when the arena does not give forks async-WP views (or all its views
    /// are async already).
    pub fn async_fork_uffd(&self) -> Result<Option<&Uffd>> {
        if !self.async_forks {
            return Ok(None);
        }
        if let Some(u) = self.async_uffd.get() {
            return Ok(Some(u));
        }
        let _init = self.other_init.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = self.async_uffd.get() {
            return Ok(Some(u));
        }
        let u = open_uffd(self.mode, true)?;
        tracing::debug!(access = ?u.access(), features = u.features(), "async-WP userfaultfd for forks opened");
        let u = self.async_uffd.get_or_init(|| u);
        // Wake the reader: its next poll includes the new descriptor.
        let _ = self.refill.signal();
        Ok(Some(u))
    }

    /// The userfaultfd of the view holding `addr` (one lookup, only once the arena has a
    /// second userfaultfd).
    pub fn uffd_at<'a>(&'a self, mm: &Mm<Mapping>, addr: usize) -> &'a Uffd {
        if self.other.get().is_none() && self.async_uffd.get().is_none() {
            return &self.uffd;
        }
        match mm.space_at(addr) {
            Some((sp, _)) => self.uffd_of(mm, sp),
            None => &self.uffd,
        }
    }

    /// Is this the process that created the arena (cheap, signal-safe: atfork-tracked)?
    pub fn in_owner_process(&self) -> bool {
        crate::sys::process::pid_cached() == self.pid
    }

    fn guard<'a>(&'a self, guard: lock::Guard<'a, Mm<Mapping>>) -> MmGuard<'a> {
        MmGuard { guard, core: self }
    }

    /// [`Core::lock`] if the lock is free right now (refilling the headroom as `lock`
    /// does); `None` when someone holds it.
    pub fn try_lock(&self) -> Option<MmGuard<'_>> {
        let mut mm = self.guard(self.mm.try_lock(this_tid())?);
        let _ = self.refill(&mut mm);
        Some(mm)
    }

    /// Take the arena lock (sleeping in `FUTEX_WAIT` while another thread holds it) and
    /// refill the fault path's headroom.
    pub fn lock(&self) -> MmGuard<'_> {
        // No poisoning: a panic while holding the lock leaves state we cannot fully trust,
        // but the views must stay served (a closed uffd would turn them into zero pages),
        // so the guard dropped by the unwinding releases the lock and the next holder goes
        // on with the state as it is. (The fault paths turn such panics into loud
        // failures, counted in `faults_failed`; API calls into `Error::Internal`.)
        let mut mm = self.guard(self.mm.lock(this_tid()));
        // Everything but the fault path's fills needs the state still: wait for fills
        // running with the lock released.
        self.drain_fills(&mut mm);
        // A failed refill only shrinks headroom: it is recorded, faults that find no
        // headroom fail with its reason (see `refill_error`).
        let _ = self.refill(&mut mm);
        mm
    }

    /// Take the arena lock for work that reads the state and the frames' homes but moves,
    /// maps and unmaps nothing — `Space::read`, `write_to`'s plans — so fills running with
    /// the lock released ([`Core::fill_unlocked`]) may go on meanwhile: a page being
    /// filled is not yet present in the model, so such work reads its frame's home, which
    /// the fill leaves in place. Refills the headroom as [`Core::lock`] does.
    ///
    /// Except for an async-WP `sp`: there a page mapped by a fill in flight takes stores
    /// the kernel serves alone before the fill is committed, so the home is stale for it
    /// and the work waits for the fills in flight ([`Core::drain_fills`]) as `lock` does.
    /// (Found by `tests/snapshot_io.rs` under load: a `write_to` right after the stores
    /// streamed the snapshot's bytes for a page stored to.)
    pub fn lock_beside_fills(&self, sp: SpaceId) -> MmGuard<'_> {
        let mut mm = self.guard(self.mm.lock(this_tid()));
        if mm.space_async(sp) {
            self.drain_fills(&mut mm);
        }
        let _ = self.refill(&mut mm);
        mm
    }

    /// Wait (the lock released meanwhile) until no fill runs with the lock released. On
    /// return the lock is held and none is in flight; none can start until it is released
    /// (fills begin under the lock). Async-signal-safe: `FUTEX_WAIT` on the count.
    pub fn drain_fills(&self, mm: &mut MmGuard<'_>) {
        self.fills.drain(&mut mm.guard, |m| m.fills_in_flight());
    }

    /// May a window of read-only fills run with the lock released now? Not while a
    /// drainer waits, and not while the reclaim queue (held by fills in flight) is long.
    /// Their commits take no frame, table or pool slot — only view bits, which the
    /// headroom check covers — so any number in flight commit without allocating.
    fn may_fill_unlocked(&self, mm: &Mm<Mapping>) -> bool {
        self.unlocked_fills && self.fills.open() && mm.has_headroom() && mm.reclaim_queued() < RECLAIM_HELD_MAX
    }

    /// Mark `pages` of `sp` as filling (see [`Mm::begin_fill`]).
    fn begin_fills(&self, mm: &mut Mm<Mapping>, sp: SpaceId, pages: impl Iterator<Item = usize>) {
        let mut n = 0;
        for p in pages {
            mm.begin_fill(sp, p);
            n += 1;
        }
        self.fills.begin(n);
        mm.counters.pages_filled_unlocked += u64::from(n);
    }

    /// Undo [`Core::begin_fills`]; wakes drainers when the last fill in flight ends.
    fn end_fills(&self, mm: &mut Mm<Mapping>, sp: SpaceId, pages: impl Iterator<Item = usize>) {
        let mut n = 0;
        for p in pages {
            mm.end_fill(sp, p);
            n += 1;
        }
        self.fills.end(n);
    }

    /// Perform `perform` (the ioctls of fills decided under the lock for `pages` of `sp`)
    /// with the lock released: the pages are marked filling first, so a fault on one of
    /// them retries, and everything the fills read stays put (`Mm::begin_fill`);
    /// operations that would move it wait in [`Core::drain_fills`]. Other faults —
    /// fills, un-protects, table breaks — proceed meanwhile: none of them can invalidate
    /// these resolutions (each fill's own entry keeps naming its source frame, and the
    /// pages themselves are ours until committed), which the caller commits after this
    /// returns. A panic in `perform` is re-raised once the marks are undone.
    fn fill_unlocked<R>(&self, mm: &mut MmGuard<'_>, sp: SpaceId, pages: &[usize], perform: impl FnOnce() -> R) -> R {
        self.begin_fills(mm, sp, pages.iter().copied());
        let r = mm.unlocked(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(perform)));
        self.end_fills(mm, sp, pages.iter().copied());
        r.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Refill the fault path's headroom (preallocated bookkeeping and pool slots) and
    /// record the outcome where the signal handler can read it.
    fn refill(&self, mm: &mut Mm<Mapping>) -> Result<()> {
        let r = match mm.reserve_headroom() {
            Err(_) => Err((true, libc::ENOMEM)),
            Ok(()) => self.ensure_pool(mm, 0).map_err(|e| match e {
                Error::Os { source, .. } => (false, source.raw_os_error().unwrap_or(libc::ENOMEM)),
                _ => (false, libc::ENOMEM),
            }),
        };
        let sig = &self.sig;
        sig.refill_asked.store(false, Ordering::Release);
        // (Published after the outcome below is: see the end of this function.)
        let _bump = Bump(&sig.refills);
        match r {
            Ok(()) => {
                if sig.refill_errno.load(Ordering::Relaxed) != 0 {
                    sig.refill_errno.store(0, Ordering::Release);
                }
                Ok(())
            }
            Err((alloc, errno)) => {
                sig.refill_alloc.store(alloc, Ordering::Relaxed);
                sig.refill_errno.store(errno, Ordering::Release);
                sig.refill_failures.fetch_add(1, Ordering::AcqRel);
                Err(self
                    .refill_error()
                    .unwrap_or_else(|| Error::os("mmap pool", std::io::Error::from_raw_os_error(errno))))
            }
        }
    }

    /// The error of the last failed refill, if the last refill failed.
    fn refill_error(&self) -> Option<Error> {
        let errno = self.sig.refill_errno.load(Ordering::Acquire);
        if errno == 0 {
            return None;
        }
        let op =
            if self.sig.refill_alloc.load(Ordering::Relaxed) { "allocate fault-path bookkeeping" } else { "mmap pool" };
        Some(Error::os(op, std::io::Error::from_raw_os_error(errno)))
    }

    /// Make sure one more fault can be served without allocating (API paths, thread
    /// mode): refill when short; the typed reason when the refill fails.
    pub(crate) fn ensure_headroom(&self, mm: &mut Mm<Mapping>) -> Result<()> {
        if mm.has_headroom() {
            return Ok(());
        }
        self.refill(mm)?;
        if mm.has_headroom() {
            Ok(())
        } else {
            Err(Error::os("mmap pool", std::io::Error::from_raw_os_error(libc::ENOMEM)))
        }
    }

    /// Keep the pool (homes for frames evacuated from views) stocked with at least
    /// `extra` free slots plus a margin for the fault path.
    pub fn ensure_pool(&self, mm: &mut Mm<Mapping>, extra: usize) -> Result<()> {
        if mm.pool_free() >= POOL_MARGIN + extra {
            return Ok(());
        }
        let pages = (POOL_MARGIN + extra).max(512).next_multiple_of(512);
        let pool = Mapping::anon(pages * PAGE_SIZE).map_err(|e| Error::os("mmap pool", e))?;
        mm.add_pool(pool.addr(), pages, pool);
        self.reclaim(mm);
        Ok(())
    }

    /// Make `sp`'s tables shareable (before a fork of it, or a reset to it): write-protect
    /// its few writable pages, or freeze its view. Returns whether it froze.
    pub fn prepare_share(&self, mm: &mut Mm<Mapping>, sp: SpaceId, strategy: crate::ForkStrategy) -> Result<bool> {
        use crate::mm::SharePlan;
        self.housekeeping(mm);
        let async_wp = mm.space_async(sp);
        self.adopt_if_plain(
            mm,
            sp,
            match strategy {
                // (An async-WP arena never keeps homes write-protected in a view.)
                _ if async_wp => AdoptHow::Freeze,
                crate::ForkStrategy::Auto => AdoptHow::Auto,
                crate::ForkStrategy::KeepWarm => AdoptHow::InPlace,
                crate::ForkStrategy::Freeze => AdoptHow::Freeze,
            },
        )?;
        if async_wp {
            return self.prepare_share_async(mm, sp, strategy);
        }
        let plan = match (mm.share_plan(sp), strategy) {
            (SharePlan::Ready, _) => SharePlan::Ready,
            // A space with pinned pages never freezes (that would move them under the I/O
            // using them): its share plan protects the other written pages in place.
            (plan, _) if mm.pinned_in(sp) > 0 => plan,
            (plan, crate::ForkStrategy::Auto) => plan,
            (_, crate::ForkStrategy::KeepWarm) if !async_wp => SharePlan::Protect,
            (_, _) => SharePlan::Freeze,
        };
        let froze = match plan {
            crate::mm::SharePlan::Ready => false,
            crate::mm::SharePlan::Protect => {
                let mut ops = Vec::new();
                mm.protect_writable(sp, &mut ops);
                self.run_ops(mm, &ops)?;
                false
            }
            crate::mm::SharePlan::Freeze => {
                self.freeze_into_mm(mm, sp)?;
                true
            }
        };
        if strategy == crate::ForkStrategy::Freeze {
            self.make_view_async(mm, sp)?;
        }
        Ok(froze)
    }

    /// In an `ArenaBuilder::async_forks` arena, a space forked with
    /// [`ForkStrategy::Freeze`](crate::ForkStrategy::Freeze) has chosen to re-fault its
    /// working set after the fork, so it gains what forks have: an async-WP view, whose
    /// stores to the pages it re-reads are the kernel's alone. Only an empty view changes
    /// its context (as after the freeze): a fresh mapping registered with the async-WP
    /// userfaultfd replaces it in one `mremap`, so an access meanwhile traps in one context
    /// or the other and never meets an unregistered page (which the kernel would fill with
    /// zeros). Thread-mode waiters queued on the old context are woken to retry in the new
    /// one. A no-op for async views, other-mode views, and views with pages mapped.
    fn make_view_async(&self, mm: &mut Mm<Mapping>, sp: SpaceId) -> Result<()> {
        if mm.space_async(sp) || mm.other_uffd(sp) || mm.is_plain(sp) || mm.view_pages_mapped(sp) > 0 {
            return Ok(());
        }
        let Some(u) = self.async_fork_uffd()? else { return Ok(()) };
        let len = mm.view_backing(sp).len();
        // A failure leaves the view as it was (trapping): the fork goes on.
        let switched = Mapping::anon(len).and_then(|fresh| {
            u.register(fresh.addr(), len)?;
            mm.view_backing(sp).replace_with(fresh)
        });
        if let Err(e) = switched {
            tracing::warn!(space = sp.0, error = %e, "could not make the frozen view async-WP; it keeps trapping");
            return Ok(());
        }
        mm.set_space_async(sp, true);
        let _ = self.uffd.wake(mm.view_base(sp), len);
        tracing::debug!(space = sp.0, "view made async-WP after a freezing fork");
        Ok(())
    }

    /// [`Core::prepare_share`] in an async-WP arena, where a home write-protected in the
    /// view would still take stores without a trap. A view holding no home is ready once
    /// the stores the kernel served alone are recorded (they make homes). One holding at
    /// most [`Mm::protect_limit_for`] homes stays warm (`Auto`, `KeepWarm`): the homes
    /// move to pool slots, one 4 KiB copy each, and the view keeps read-only copies
    /// ([`Mm::evacuate_view_homes`]).
    ///
    /// Stores do not wait for us here, so a writer may run ahead of the copies: the fork
    /// is a consistent cut of every writer's program order only if one scan, started after
    /// the last protect, finds *no* page of the view written — then every page was
    /// unchanged over a common window, and the copies are the view at one instant. So each
    /// round syncs the whole view: the pages found written are recorded (a frame, still
    /// exclusive, goes back into the view with the bytes the store left) and evacuated
    /// again, up to [`EVACUATE_ROUNDS`] times. Anything else freezes the view (`mremap`,
    /// atomic). (`tests/threads.rs` catches a sync over only the re-evacuated pages.)
    fn prepare_share_async(&self, mm: &mut Mm<Mapping>, sp: SpaceId, strategy: crate::ForkStrategy) -> Result<bool> {
        let limit = mm.protect_limit_for(sp);
        let pages = mm.pages(sp);
        for round in 0..=EVACUATE_ROUNDS {
            // A view already holding homes and asked to freeze needs no sync: the freeze
            // records the stores it finds in the frozen pages.
            if !(strategy == crate::ForkStrategy::Freeze && mm.view_homes(sp) > 0) {
                self.sync_written(mm, sp, 0, pages)?;
            }
            let homes = mm.view_homes(sp);
            if homes == 0 {
                return Ok(false);
            }
            if round == EVACUATE_ROUNDS
                || strategy == crate::ForkStrategy::Freeze
                || homes > limit
                || self.ensure_pool(mm, homes).is_err()
            {
                break;
            }
            let mut ops = Vec::new();
            mm.evacuate_view_homes(sp, &mut ops);
            self.run_ops(mm, &ops)?;
            tracing::trace!(space = sp.0, homes, round, "view homes evacuated to keep the view warm");
        }
        self.freeze_into_mm(mm, sp)?;
        Ok(true)
    }

    fn freeze(&self, mm: &mut Mm<Mapping>, sp: SpaceId) -> Result<Mapping> {
        mm.view_backing(sp).freeze().map_err(|e| Error::os("mremap(MREMAP_DONTUNMAP) freezing the view", e))
    }

    /// Freeze `sp`'s view into a new frozen region (see `Mm::freeze_view`).
    /// Freeze `sp`'s view now, whatever it maps (eviction in an async-WP arena).
    /// A view of read-only copies leaves an empty frozen region, released at once.
    pub(crate) fn freeze_view_now(&self, mm: &mut Mm<Mapping>, sp: SpaceId) -> Result<()> {
        let old = mm.view_region(sp); // becomes the frozen region
        self.freeze_into_mm(mm, sp)?;
        mm.release_if_empty(old);
        self.reclaim(mm);
        Ok(())
    }

    fn freeze_into_mm(&self, mm: &mut Mm<Mapping>, sp: SpaceId) -> Result<()> {
        let candidates = self.prepare_frozen_writes(mm, sp)?;
        let frozen = self.freeze(mm, sp)?;
        let base = frozen.addr();
        self.record_frozen_writes(mm, sp, base, &candidates);
        mm.freeze_view(sp, base, frozen);
        self.reclaim_off_path(mm);
        Ok(())
    }

    /// Drop a space. Homes in its view that other spaces still need are copied to the pool
    /// when few (no frozen region is left behind for them), else the view is frozen. If
    /// that freeze fails (e.g. `vm.max_map_count` or the address space is exhausted), the
    /// space is kept, counted in `drops_deferred`, and its drop is retried by the next
    /// [`Core::housekeeping`]; the error is returned for the caller to report.
    pub fn drop_space(&self, mm: &mut Mm<Mapping>, sp: SpaceId) -> Result<()> {
        self.housekeeping(mm);
        if let crate::mm::DropPlan::Evacuate(n) = mm.drop_plan(sp) {
            // Without pool slots, fall back to freezing.
            if self.ensure_pool(mm, n).is_ok() {
                let mut ops = Vec::new();
                mm.evacuate_survivors(sp, &mut ops);
                self.run_ops(mm, &ops)?; // copies only: cannot fail
            }
        }
        self.finish_drop(mm, sp, true)
    }

    /// Release `sp`'s tables and unmap its view, freezing it first if it still holds homes
    /// of frames others need; on a failed freeze, keep it pending (`first`: count it).
    fn finish_drop(&self, mm: &mut Mm<Mapping>, sp: SpaceId, first: bool) -> Result<()> {
        let view = match mm.drop_space(sp) {
            crate::mm::Dropped::Unmap(view) => view,
            crate::mm::Dropped::Freeze => match self.freeze(mm, sp) {
                Ok(frozen) => {
                    let base = frozen.addr();
                    mm.drop_frozen(sp, base, frozen)
                }
                Err(e) => {
                    mm.defer_drop(sp, first);
                    return Err(e);
                }
            },
        };
        // A drop gives memory back before it returns (dead regions queued by forks too).
        self.reclaim(mm);
        self.reap();
        drop(view);
        Ok(())
    }

    /// Bounded upkeep, run under the lock by every fork and drop (never in the fault path):
    /// retry the drops whose freeze failed, and one step of automatic compaction of sparse
    /// frozen regions (at most [`COMPACT_BUDGET`] page copies over [`COMPACT_SCAN`] frame
    /// slots; nothing at all while no region is sparse).
    pub fn housekeeping(&self, mm: &mut Mm<Mapping>) {
        for sp in mm.take_pending_drops() {
            let _ = self.finish_drop(mm, sp, false);
        }
        mm.queue_excess_frozen();
        if !mm.compaction_pending() {
            return;
        }
        // Use the pool's free slots beyond the fault path's margin; map a fresh pool only
        // when the current one is nearly full (so no half-empty pool is retired for this).
        if mm.pool_free() < 2 * POOL_MARGIN && self.ensure_pool(mm, COMPACT_BUDGET).is_err() {
            return;
        }
        let budget = mm.pool_free().saturating_sub(POOL_MARGIN).min(COMPACT_BUDGET);
        let mut ops = Vec::new();
        mm.compact_step(budget, COMPACT_SCAN, &mut ops);
        let _ = self.run_ops(mm, &ops); // copies only: cannot fail
    }

    /// Take the lock from signal context (the SIGBUS handler) for one fault: a bounded
    /// spin, a few `sched_yield`s, then `FUTEX_WAIT` (async-signal-safe) — never a spin
    /// that burns the time slice while the holder is descheduled. No headroom refill (it
    /// allocates). The hold is timed for [`LockStats`].
    /// Library code never faults on a view while holding the lock, so the holder is always
    /// another thread that will release it.
    /// Returns `None` when this very thread holds the lock (a fault inside a locked
    /// section: a user callback — tracing subscriber, allocator hook — touching view memory
    /// of this arena during a cowarena call), which would otherwise wait forever.
    pub fn lock_spin(&self) -> Option<MmGuard<'_>> {
        let mut g = self.mm.lock_signal(this_tid())?;
        g.time_hold();
        Some(self.guard(g))
    }

    /// The arena lock's counters (see [`LockStats`]).
    pub fn lock_stats(&self) -> LockStats {
        self.mm.stats()
    }

    /// UFFDIO_COPY onto view pages the core knows to be unpopulated: finding one populated
    /// (EEXIST) is an error here, not a race.
    ///
    /// # Safety
    /// As [`crate::sys::uffd::Uffd::copy`].
    unsafe fn fill(u: &Uffd, dst: usize, src: usize, len: usize, wp: bool) -> std::io::Result<()> {
        // SAFETY: forwarded to the caller.
        match unsafe { u.copy(dst, src, len, wp) } {
            Ok(true) => Ok(()),
            Ok(false) => Err(std::io::Error::from_raw_os_error(libc::EEXIST)),
            Err(e) => Err(e),
        }
    }

    fn exec(u: &Uffd, action: Action) -> std::io::Result<usize> {
        Self::exec_run(u, action, 1)
    }

    /// Perform `n` consecutive actions of `first`'s kind (see [`continues`]) with one ioctl.
    /// Returns how many leading pages of a [`Action::Take`] run the kernel moved; the rest
    /// were copied, and their resolutions must be committed as [`Resolution::fell_back`].
    /// `u` is the userfaultfd the view is registered with ([`Core::uffd_of`]).
    fn exec_run(u: &Uffd, first: Action, n: usize) -> std::io::Result<usize> {
        debug_assert!((1..=FILL_WINDOW).contains(&n));
        debug_assert!(n <= FAULT_AROUND_MAX || !matches!(first, Action::Fill { src: Src::Zero, .. }));
        let len = n * PAGE_SIZE;
        match first {
            Action::Take { dst, src } => {
                // SAFETY: `src..src+len` are homes of frames only this space maps (populated,
                // never touched again once the commit rehomes them) and `dst..dst+len`
                // unpopulated pages of a registered view, all mapped under the lock.
                let (moved, r) = unsafe { u.move_pages(dst, src, len) };
                if r.is_err() {
                    // EBUSY (pages shared with a fork(2) child or pinned) and the like: copy
                    // what did not move. Failing that, the fault fails as a copy would. (No
                    // log here: this may run in a signal handler.)
                    // SAFETY: as for `Fill`: the unmoved homes are populated and mapped.
                    unsafe { Self::fill(u, dst + moved, src + moved, len - moved, false) }?;
                }
                Ok(moved / PAGE_SIZE)
            }
            Action::Wake => Ok(0),
            Action::Fill { dst, src, wp } => {
                let src = match src {
                    Src::Zero => ZERO_PAGE.0.as_ptr() as usize,
                    Src::Addr(a) => a,
                };
                // SAFETY: `src..src+len` is the static zero run or consecutive frame homes,
                // which the core guarantees are populated and stay mapped under the lock.
                unsafe { Self::fill(u, dst, src, len, wp) }.map(|()| 0)
            }
            Action::Unprotect { dst } => u.writeprotect(dst, len, false).map(|()| 0),
            Action::Evacuate { dst, to } => {
                for k in 0..n {
                    // SAFETY: `dst` pages are populated, write-protected view pages (homes)
                    // and `to` pages fresh pool slots; all stay mapped under the lock.
                    unsafe { crate::sys::mem::copy_page(to + k * PAGE_SIZE, dst + k * PAGE_SIZE) };
                }
                u.writeprotect(dst, len, false).map(|()| 0)
            }
        }
    }

    /// Is there a memory limit? (Without one, nothing counts resident pages: O(spaces).)
    fn limited(&self) -> bool {
        self.max_memory != u64::MAX
    }

    /// Before the bytes at `addr` are copied out of their home for the first time: if it
    /// is a page of a loaded image ([`Mm::unverified`]), check its checksum, once.
    /// Allocation-free (the fault path calls it).
    pub fn verify_src(&self, mm: &mut Mm<Mapping>, addr: usize) -> Result<()> {
        let addr = addr & !(PAGE_SIZE - 1);
        if let Some((r, page, want)) = mm.unverified(addr) {
            // SAFETY: a page of a loaded image's read-only data mapping, which its frames
            // (this one included) keep mapped while we hold the lock.
            if unsafe { crate::sys::mem::crc_page(addr) } != want {
                return Err(Error::CorruptPage { page });
            }
            mm.set_verified(r, page);
        }
        Ok(())
    }

    /// Serve (or pre-serve) page `page` of `sp` under the lock. Does not wake anyone
    /// beyond what the ioctl does; the caller decides.
    /// When it had to release the lock (waiting for the evictor or for fills in flight)
    /// and other threads used up the headroom meanwhile, the fault is not served: it
    /// returns [`FaultKind::Spurious`] and the access retries (faults again, with a fresh
    /// headroom check) — see [`Core::fault_in_once`].
    pub fn fault_in(&self, mm: &mut MmGuard<'_>, sp: SpaceId, page: usize, write: bool) -> Result<FaultKind> {
        Ok(self.fault_in_once(mm, sp, page, write)?.unwrap_or(FaultKind::Spurious))
    }

    /// [`Core::fault_in`], or `None` when the fault must be retried after a headroom
    /// refill: the lock was released (waiting for room under `max_resident`, or for
    /// fills in flight before an evacuation) and the headroom checked before the call
    /// may be gone. Everything decided comes after the last release.
    fn fault_in_once(&self, mm: &mut MmGuard<'_>, sp: SpaceId, page: usize, write: bool) -> Result<Option<FaultKind>> {
        if crate::sys::inject::hit(crate::sys::inject::Point::FaultPath).is_some() {
            panic!("injected panic in the fault path");
        }
        // At the `max_resident` limit: wait for the evictor to make room for what this
        // fault adds — a frame brought back from the swap, a copy or a new frame for a page
        // not mapped, a pool slot for an evacuation (un-protects and spurious faults add
        // nothing and never wait).
        let limit = self.max_resident_pages;
        if limit != 0 {
            let need = usize::from(mm.swapped_at(sp, page).is_some())
                + usize::from(!mm.is_present(sp, page))
                + usize::from(write && mm.evacuates_on_write(sp, page));
            let what = "a page brought in (nothing left to evict: pinned or loaded pages, or the swap failed)";
            if self.make_room(mm, need, what)? && !mm.has_headroom() {
                return Ok(None);
            }
        }
        if write && mm.fills_in_flight() > 0 && mm.evacuates_on_write(sp, page) {
            // An evacuation changes a home that fills in flight may be reading. (After the
            // wait for room: a fill could start while that wait released the lock.)
            self.drain_fills(mm);
            if !mm.has_headroom() {
                return Ok(None);
            }
        }
        // A frame in the swap comes back to a pool slot first; then the fault is served
        // from there as from any home.
        self.swap_in_page(mm, sp, page)?;
        let r = mm.resolve_fault(sp, page, write);
        if let Some(src) = action_src(r.action) {
            self.verify_src(mm, src)?;
        }
        // Only a page that adds to what the arena holds resident counts against the limit
        // (a new frame, a read-only copy, an evacuation slot): rewriting or taking over a
        // frame the space already owns, or un-protecting a copy, needs none.
        if self.limited()
            && r.adds_resident()
            && ((mm.resident_pages() + mm.fills_in_flight()) as u64 + 1) * PAGE_SIZE as u64 > self.max_memory
        {
            return Err(Error::CapacityExhausted {
                what: if write { "a page written" } else { "a page copied for reading" },
                limit: self.max_memory,
            });
        }
        // (One page's ioctl stays under the lock: releasing and re-taking it costs about as
        // much as the copy saves — `ArenaBuilder::unlocked_fills`.)
        let moved = Self::exec(self.uffd_of(mm, sp), r.action).map_err(|e| Error::os(op_name(r.action), e))?;
        let kind = mm.commit(if moved == 1 { r } else { r.fell_back() });
        self.reclaim(mm);
        if limit != 0 {
            self.note_resident(mm);
        }
        Ok(Some(kind))
    }

    /// Serve a fault through the view, then — when *read* faults on this space run
    /// sequentially — map the pages just after it read-only (fault-around): one trap then
    /// serves several pages. Write faults serve only their own page, as the kernel's
    /// anonymous write faults do: a page ahead made writable would be marked dirty (and a
    /// shared one copied) without ever being written, and `dirty_pages` promises
    /// "written". (Mapping the pages ahead of a write read-only was measured too: it saves
    /// nothing — each page still takes its write-protect fault — and it defeats the
    /// zero-copy `UFFDIO_MOVE` of exclusive pages.) Pages already mapped stop the window;
    /// so does the first one beyond the memory limit.
    pub fn fault_in_around(&self, mm: &mut MmGuard<'_>, sp: SpaceId, page: usize, write: bool) -> Result<FaultKind> {
        let kind = self.fault_in(mm, sp, page, write)?;
        if mm.is_plain(sp) {
            return Ok(kind); // a stale fault on a plain view: nothing around it is ours
        }
        let ahead = mm.fault_around(sp, page);
        // Pages mapped read-only ahead of a *write* would each take a write-protect fault
        // to user space — unless the kernel serves those alone (async WP), recording the
        // store for the next sync: then writes get fault-around too, and dirty tracking
        // stays exact.
        if (write && !mm.space_async(sp)) || !mm.has_headroom_for(FAULT_AROUND_MAX + 2) {
            return Ok(kind);
        }
        if self.dense_fill && mm.dense_in_table(sp, page) {
            // Dense reads in this 2 MiB table: map the rest of it read-only now.
            let (lo, hi) = mm.table_pages(sp, page);
            let filled = self.map_read_only(mm, sp, lo..hi, true);
            mm.counters.dense_fills += 1;
            mm.counters.pages_filled += filled as u64;
        } else if !ahead.is_empty() {
            self.map_read_only(mm, sp, ahead, false);
        }
        self.reclaim(mm);
        Ok(kind)
    }

    /// Map `pages` of `sp` read-only, as read faults would, in as few ioctls as the sources
    /// allow (windows of up to [`FILL_WINDOW`] pages decided under the lock, one
    /// `UFFDIO_COPY` per contiguous run, performed with the lock released where allowed —
    /// [`Core::fill_unlocked`]), committing what succeeded. A page already mapped ends the
    /// run (`skip_present`: is skipped); so does the memory limit or a failing ioctl (the
    /// pages left will fault on their own). Allocation-free. Returns the pages mapped.
    fn map_read_only(
        &self,
        mm: &mut MmGuard<'_>,
        sp: SpaceId,
        pages: std::ops::Range<usize>,
        skip_present: bool,
    ) -> usize {
        let limited = self.limited();
        let u = self.uffd_of(mm, sp);
        let mut resident = if limited { (mm.resident_pages() + mm.fills_in_flight()) as u64 } else { 0 };
        let mut mapped = 0;
        let mut pages = pages.peekable();
        while pages.peek().is_some() {
            // Decide one window (the pages `ps`, their resolutions `rs`), then perform it.
            let mut rs: [Option<Resolution>; FILL_WINDOW] = [None; FILL_WINDOW];
            let mut ps = [0usize; FILL_WINDOW];
            let mut n = 0;
            let mut stop = false;
            while n < FILL_WINDOW {
                let Some(q) = pages.next() else { break };
                if mm.is_present(sp, q) {
                    if skip_present {
                        continue;
                    }
                    stop = true;
                    break;
                }
                // A page in the swap, or one more page past 15/16 of `max_resident`, ends
                // the window: such pages fault on their own (a swap-in each).
                let limit = self.max_resident_pages;
                if mm.swapped_at(sp, q).is_some() || (limit != 0 && (mm.resident_pages() + n + 1) * 16 > limit * 15) {
                    stop = true;
                    break;
                }
                let r = mm.resolve_fault(sp, q, false);
                if r.action == Action::Wake || action_src(r.action).is_some_and(|a| self.verify_src(mm, a).is_err()) {
                    // (A page failing its checksum is left to fault on its own: loudly.)
                    stop = true;
                    break;
                }
                if limited && r.adds_resident() {
                    resident += 1;
                    if resident * PAGE_SIZE as u64 > self.max_memory {
                        stop = true;
                        break;
                    }
                }
                rs[n] = Some(r);
                ps[n] = q;
                n += 1;
            }
            // One ioctl per run of continuing actions: `runs[..k]` = (first, end, moved).
            // A failing ioctl ends the window: the pages left fault on their own.
            let mut runs = [(0usize, 0usize, 0usize); FILL_WINDOW];
            let perform = |runs: &mut [(usize, usize, usize); FILL_WINDOW]| -> (usize, bool) {
                let (mut k, mut i) = (0, 0);
                while i < n {
                    let Some(first) = rs[i] else { break };
                    let mut j = i + 1;
                    // (Zero runs are bounded by the static zero source.)
                    let cap =
                        if matches!(first.action, Action::Fill { src: Src::Zero, .. }) { FAULT_AROUND_MAX } else { n };
                    while j < n && j - i < cap && rs[j].is_some_and(|r| continues(first.action, r.action, j - i)) {
                        j += 1;
                    }
                    match Self::exec_run(u, first.action, j - i) {
                        Ok(moved) => runs[k] = (i, j, moved),
                        Err(_) => return (k, true),
                    }
                    k += 1;
                    i = j;
                }
                (k, false)
            };
            let (k, failed) = if n > 1 && self.may_fill_unlocked(mm) {
                self.fill_unlocked(mm, sp, &ps[..n], || perform(&mut runs))
            } else {
                perform(&mut runs)
            };
            for &(i, j, moved) in &runs[..k] {
                for (m, r) in rs[i..j].iter().flatten().enumerate() {
                    mm.commit(if m < moved { *r } else { r.fell_back() });
                }
                mapped += j - i;
            }
            if failed || stop {
                break;
            }
        }
        mapped
    }

    /// [`Core::fault_in`] for API calls: a panic inside the fault path becomes
    /// [`Error::Internal`] for the caller instead of unwinding through user code with the
    /// arena lock poisoned.
    /// Refills the headroom first when it is short (the fault path may not allocate), and
    /// fails with the refill's reason when memory cannot be had.
    /// Loops until the fault is served: the API may refill the headroom a released lock
    /// let other threads use up ([`Core::fault_in_once`]). The lock may be released in
    /// between: callers re-check what they decided before the call.
    pub fn fault_in_api(&self, mm: &mut MmGuard<'_>, sp: SpaceId, page: usize, write: bool) -> Result<FaultKind> {
        loop {
            self.ensure_headroom(mm)?;
            let served =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.fault_in_once(mm, sp, page, write)))
                    .unwrap_or_else(|p| Err(Error::Internal(panic_message(&p))))?;
            if let Some(kind) = served {
                return Ok(kind);
            }
        }
    }

    /// Perform kernel work queued by an rmap operation, in order, under the lock.
    pub fn run_ops(&self, mm: &mut Mm<Mapping>, ops: &[crate::mm::KernelOp]) -> Result<()> {
        use crate::mm::KernelOp;
        for op in ops {
            match *op {
                KernelOp::Zap { addr, len } => {
                    crate::sys::mem::discard_range(addr, len).map_err(|e| Error::os("MADV_DONTNEED view pages", e))?
                }
                KernelOp::Protect { addr, len } => self
                    .uffd_at(mm, addr)
                    .writeprotect(addr, len, true)
                    .map_err(|e| Error::os("UFFDIO_WRITEPROTECT", e))?,
                KernelOp::CopyPage { dst, src } => {
                    // (Frames still homed in a loaded image are never moved; this is the
                    // backstop.)
                    self.verify_src(mm, src)?;
                    // SAFETY: `src` is a frame's home (populated; write-protected first if
                    // it was a view page, except a pinned page copied for a fork, which
                    // stores and DMA may change meanwhile, as in `fork(2)`: the copy holds
                    // each byte before or after) and `dst` a slot of a fresh pool region,
                    // both mapped while we hold the lock.
                    unsafe { crate::sys::mem::copy_page(dst, src) }
                }
            }
        }
        self.reclaim(mm);
        Ok(())
    }

    /// Perform the kernel side of released memory. Runs under the lock: a discarded address
    /// must not be reused by a new mapping before we madvise it.
    pub fn reclaim(&self, mm: &mut Mm<Mapping>) {
        // Discarding is an optimisation: a failure leaves memory in use, not wrong data.
        // Dropping a dead region's mapping unmaps it.
        mm.drain_reclaim(
            |addr, len| {
                let _ = crate::sys::mem::discard_range(addr, len);
            },
            drop,
        );
    }

    /// [`Core::reclaim`] for a fork's freeze (never the fault path): large dead regions go
    /// to the reader thread to be unmapped there. Their address space stays reserved until
    /// then, so nothing can be mapped over them early; a drop unmaps what is still queued
    /// before it returns, so dropping spaces gives memory back at once.
    pub fn reclaim_off_path(&self, mm: &mut Mm<Mapping>) {
        let mut queued = false;
        mm.drain_reclaim(
            |addr, len| {
                let _ = crate::sys::mem::discard_range(addr, len);
            },
            |b| {
                if b.len() >= REAP_OFF_PATH_BYTES {
                    self.reaper.lock().unwrap_or_else(|p| p.into_inner()).push(b);
                    queued = true;
                } else {
                    drop(b);
                }
            },
        );
        if queued && self.refill.signal().is_err() {
            // No wake-up: unmap here after all.
            self.reap();
        }
    }

    /// Unmap the dead regions queued by [`Core::reclaim_off_path`].
    pub fn reap(&self) {
        let dead = std::mem::take(&mut *self.reaper.lock().unwrap_or_else(|p| p.into_inner()));
        drop(dead);
    }

    /// Take the lock to serve a fault of thread `tid` (0: unknown, the kernel did not
    /// report it). `None` when `tid` itself holds the lock: it faulted inside a locked
    /// section (a user callback touching this arena's view memory during a cowarena call)
    /// and waits for us — blocking would deadlock both.
    ///
    /// A fault message can be *stale*: the kernel may wake and retry a faulting access
    /// (another fill of the same range, a `fork(2)` of the process retrying the fault) and
    /// the thread may have moved on — and legitimately taken the lock — by the time the
    /// message is read. So "the faulting thread holds the lock" only counts once it has
    /// lasted [`SELF_FAULT_WAIT`]; even then the caller only wakes the address (a stale
    /// message is harmless; a real self-deadlock faults again) and fails loudly on the
    /// third such round for the same address.
    fn lock_for<'a>(&'a self, tid: u32) -> Option<MmGuard<'a>> {
        let me = this_tid();
        let timed = |mut g: lock::Guard<'a, Mm<Mapping>>| {
            g.time_hold();
            let mut mm = self.guard(g);
            let _ = self.refill(&mut mm);
            mm
        };
        if tid == 0 {
            return Some(timed(self.mm.lock(me)));
        }
        let mut held_since: Option<std::time::Instant> = None;
        loop {
            // Busy with another thread's (possibly long) operation: sleep on the lock, but
            // wake now and then to check who holds it.
            if let Some(g) = self.mm.lock_timeout(me, SELF_FAULT_POLL) {
                return Some(timed(g));
            }
            if self.mm.owner() == tid as i32 {
                let since = *held_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= SELF_FAULT_WAIT {
                    return None;
                }
            } else {
                held_since = None;
            }
        }
    }

    /// Serve one fault message from one of the arena's userfaultfds ([`Core::uffd_by`]).
    fn serve(&self, address: u64, flags: u64, tid: u32, sel: u8) {
        let addr = address as usize & !(PAGE_SIZE - 1);
        let u = self.uffd_by(sel);
        let write = flags & (uffd::PAGEFAULT_FLAG_WRITE | uffd::PAGEFAULT_FLAG_WP) != 0;
        let Some(mut mm) = self.lock_for(tid) else {
            let mut last = self.self_faults.lock().unwrap_or_else(|p| p.into_inner());
            let rounds = if last.0 == addr { last.1 + 1 } else { 1 };
            *last = (addr, rounds);
            drop(last);
            if rounds < 3 {
                // Possibly a stale message: let the thread retry (it faults again if not).
                let _ = u.wake(addr, PAGE_SIZE);
                return;
            }
            self.fail_loudly(
                u,
                addr,
                &"a fault on a view of this arena while the faulting thread holds its lock: a tracing \
                  subscriber or allocator callback touched view memory during a cowarena call",
            );
            return;
        };
        {
            let mut last = self.self_faults.lock().unwrap_or_else(|p| p.into_inner());
            if last.0 == addr {
                *last = (0, 0);
            }
        }
        let Some((sp, page)) = mm.space_at(addr) else {
            // The view is gone (its space was dropped while a thread touched it): waking
            // makes the thread retry against an unmapped range and take SIGSEGV.
            drop(mm);
            let _ = u.wake(addr, PAGE_SIZE);
            return;
        };
        // `lock` refilled the headroom; if it is still short, memory cannot be had.
        let served = self.ensure_headroom(&mut mm).and_then(|()| self.fault_in_around(&mut mm, sp, page, write));
        // No tracing event under the lock: a subscriber may touch view memory.
        drop(mm);
        match served {
            Ok(kind) => {
                if kind == FaultKind::Spurious {
                    let _ = u.wake(addr, PAGE_SIZE);
                }
                tracing::trace!(space = sp.0, page, ?kind, "fault served");
            }
            Err(e) => self.fail_loudly(u, addr, &e),
        }
    }

    /// A fault we cannot serve must never yield a zero page: make the page inaccessible
    /// and wake the thread, which then dies of SIGSEGV at the faulting access.
    fn fail_loudly(&self, u: &Uffd, addr: usize, e: &dyn std::fmt::Display) {
        self.faults_failed.fetch_add(1, Ordering::Relaxed);
        // The reason first: the woken thread's death may end the process at once. The
        // tracing event last, after the wake (a subscriber may need a lock the faulting
        // thread holds).
        eprintln!("cowarena: cannot serve the fault at {addr:#x}: {e}; the faulting thread gets SIGSEGV");
        let _ = crate::sys::mem::poison_page(addr);
        let _ = u.wake(addr, PAGE_SIZE);
        tracing::error!(addr = format_args!("{addr:#x}"), error = %e, "cowarena: cannot serve fault; the faulting access will fail");
    }
}

/// Does `next` continue a run of `k` actions starting with `first` (same kind, the next
/// page of the view, and for copies the next page of the same source)?
fn continues(first: Action, next: Action, k: usize) -> bool {
    let step = k * PAGE_SIZE;
    match (first, next) {
        (Action::Fill { dst: d0, src: s0, wp: w0 }, Action::Fill { dst, src, wp }) => {
            dst == d0 + step
                && wp == w0
                && match (s0, src) {
                    (Src::Zero, Src::Zero) => true,
                    (Src::Addr(a0), Src::Addr(a)) => a == a0 + step,
                    _ => false,
                }
        }
        (Action::Unprotect { dst: d0 }, Action::Unprotect { dst }) => dst == d0 + step,
        (Action::Evacuate { dst: d0, to: t0 }, Action::Evacuate { dst, to }) => dst == d0 + step && to == t0 + step,
        (Action::Take { dst: d0, src: s0 }, Action::Take { dst, src }) => dst == d0 + step && src == s0 + step,
        _ => false,
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// The home an action copies (or moves) bytes out of, if any.
fn action_src(a: Action) -> Option<usize> {
    match a {
        Action::Fill { src: Src::Addr(s), .. } | Action::Take { src: s, .. } => Some(s),
        _ => None,
    }
}

fn op_name(a: Action) -> &'static str {
    match a {
        Action::Fill { .. } => "UFFDIO_COPY",
        Action::Take { .. } => "UFFDIO_MOVE (then UFFDIO_COPY)",
        Action::Unprotect { .. } | Action::Evacuate { .. } => "UFFDIO_WRITEPROTECT",
        Action::Wake => "UFFDIO_WAKE",
    }
}

/// The engine's threads; stopping and joining happens on drop.
pub(crate) struct Engine {
    stop: Arc<EventFd>,
    reader: Option<JoinHandle<()>>,
    worker: Option<JoinHandle<()>>,
    /// The evictor thread (`ArenaBuilder::max_resident`), and the core it watches.
    evictor: Option<(JoinHandle<()>, Arc<Core>)>,
}

impl Engine {
    pub fn start(core: Arc<Core>) -> Result<Engine> {
        let stop = Arc::new(EventFd::new().map_err(|e| Error::open_fd("eventfd", "an eventfd", e))?);
        let (tx, rx) = mpsc::channel::<(u64, u64, u32, u8)>();
        let reader = {
            let (core, stop) = (core.clone(), stop.clone());
            std::thread::Builder::new()
                .name("cowarena-uffd".into())
                .spawn(move || reader_loop(&core, &stop, tx))
                .map_err(|e| Error::os("spawn reader thread", e))?
        };
        let evict_core = (core.max_resident_pages != 0).then(|| core.clone());
        let worker = std::thread::Builder::new()
            .name("cowarena-fault".into())
            .spawn(move || {
                for (address, flags, tid, sel) in rx {
                    let served =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.serve(address, flags, tid, sel)));
                    if let Err(p) = served {
                        let addr = address as usize & !(PAGE_SIZE - 1);
                        core.fail_loudly(core.uffd_by(sel), addr, &Error::Internal(panic_message(&p)));
                    }
                }
            })
            .map_err(|e| Error::os("spawn fault thread", e))?;
        let mut engine = Engine { stop, reader: Some(reader), worker: Some(worker), evictor: None };
        // Last: if it cannot start, dropping `engine` stops the other two.
        if let Some(core) = evict_core {
            let c = core.clone();
            let h = std::thread::Builder::new()
                .name("cowarena-evict".into())
                .spawn(move || evict::evictor_loop(&c))
                .map_err(|e| Error::os("spawn evictor thread", e))?;
            engine.evictor = Some((h, core));
        }
        Ok(engine)
    }
}

/// The reader thread: reads userfaultfd messages (fault messages go to the worker; reading
/// a REMAP event is the acknowledgement a freezing `mremap` waits for) and refills the fault
/// path's headroom when the signal handler asks.
///
/// It must never block on the arena lock: the thread that holds it may be inside that very
/// `mremap`, waiting for this thread to read the event — a deadlock (seen in the W1 bench).
/// So a refill request meets `try_lock`; when the lock is busy the request stays pending
/// and is retried every millisecond, while messages keep being read.
fn reader_loop(core: &Core, stop: &EventFd, tx: mpsc::Sender<(u64, u64, u32, u8)>) {
    let mut msgs = Vec::with_capacity(64);
    let mut refill_pending = false;
    loop {
        let timeout = if refill_pending { 1 } else { -1 };
        // The second and third userfaultfds once they exist (their opener wakes us through
        // `refill`); until then the first one stands in their place.
        let (other, asy) = (core.other.get(), core.async_uffd.get());
        let fds = [
            core.uffd.as_fd(),
            stop.as_fd(),
            core.refill.as_fd(),
            other.unwrap_or(&core.uffd).as_fd(),
            asy.unwrap_or(&core.uffd).as_fd(),
        ];
        let ready = match crate::sys::wake::poll(fds, timeout) {
            Ok([_, true, _, _, _]) => return,
            Ok([first, false, refill, second, third]) => {
                if refill {
                    core.refill.clear();
                    core.reap();
                    refill_pending = true;
                    if let Some(ms) = crate::sys::inject::hit(crate::sys::inject::Point::RefillDelay) {
                        std::thread::sleep(std::time::Duration::from_millis(ms as u64));
                    }
                }
                if refill_pending {
                    // `lock` refills the headroom; a busy lock means: try again shortly.
                    refill_pending = core.try_lock().is_none();
                }
                [first, second && other.is_some(), third && asy.is_some()]
            }
            Err(e) => {
                tracing::error!(error = %e, "cowarena: poll on userfaultfd failed");
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
        };
        for (sel, u) in [(UFFD_MAIN, Some(&core.uffd)), (UFFD_OTHER, other), (UFFD_ASYNC, asy)] {
            let Some(u) = u.filter(|_| ready[usize::from(sel)]) else { continue };
            msgs.clear();
            if let Err(e) = u.read_msgs(&mut msgs) {
                tracing::error!(error = %e, "cowarena: read from userfaultfd failed");
                continue;
            }
            for m in &msgs {
                match *m {
                    UffdMsg::PageFault { address, flags, tid } => {
                        tracing::trace!(address, flags, tid, sel, "fault message");
                        if tx.send((address, flags, tid, sel)).is_err() {
                            return;
                        }
                    }
                    // Reading the event is the acknowledgement the mremap caller waits for.
                    UffdMsg::Remap { from, to, len } => {
                        tracing::trace!(from, to, len, "remap event");
                    }
                    UffdMsg::Other(ev) => tracing::debug!(event = ev, "unexpected userfaultfd event"),
                }
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some((h, core)) = self.evictor.take() {
            core.evict_stop.store(true, Ordering::Release);
            core.evict_req.fetch_add(1, Ordering::AcqRel);
            crate::sys::futex::wake(&core.evict_req, 1);
            let _ = h.join();
        }
        let _ = self.stop.signal();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        // The reader dropped the sender: the worker drains what is queued and ends.
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
