//! Baseline measurements for the cowarena benchmark: what the kernel and the peers named in
//! the brief ("Measured kernel primitives", "Peers") cost on this machine, measured the same
//! way as `shared/anchors/*.c`.
//!
//! Every region is anonymous (or memfd) memory in 4 KiB pages: `MADV_NOHUGEPAGE` is applied
//! before the first touch so the figures match 4K-page behaviour. Sizes are in bytes and are
//! rounded up to whole pages. Every function returns `io::Result`; expected failures (no
//! userfaultfd, out of memory, a child that dies) are errors, not panics.
//!
//! Fork safety: the functions that call `fork(2)` do so while this module runs no other
//! thread; the child runs only async-signal-safe code (loads, stores, `read`, `write`,
//! `clock_gettime`) and leaves through `_exit`. Call them from a process whose other threads,
//! if any, hold no lock the child could need (the child never allocates).

// The benchmark uses a subset of these baselines at a time.
#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cowarena::__bench::{
    category, PageRun, Pagemap, Query, Uffd, UffdMsg, CHECK_WPASYNC, FEATURE_WP, PAGEFAULT_FLAG_WP, WP_MATCHING,
};

/// The page size every baseline works in.
pub const PAGE: usize = 4096;

/// How long a process waits for its children's hand-shakes before giving up.
const CHILD_TIMEOUT_MS: libc::c_int = 30_000;

// ---------------------------------------------------------------------------------------
// PRNG
// ---------------------------------------------------------------------------------------

/// A tiny deterministic PRNG (xorshift64*) for choosing "random pages". It allocates
/// nothing and never panics, so a forked child may use it.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (a zero seed, which xorshift cannot leave, is replaced
    /// by a fixed non-zero constant).
    pub fn new(seed: u64) -> Self {
        Rng(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value uniformly distributed in `0..n` (multiply-high reduction); 0 when `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// `n` distinct pages of `0..pages`, in random order (a partial Fisher-Yates shuffle).
fn distinct_pages(rng: &mut Rng, pages: usize, n: usize) -> Vec<usize> {
    let n = n.min(pages);
    let mut all: Vec<usize> = (0..pages).collect();
    for i in 0..n {
        let j = i + rng.below(pages - i);
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

/// How many of `pages` pages a fraction stands for (clamped to `0..=pages`; NaN is 0).
fn fraction_of(pages: usize, fraction: f64) -> usize {
    let n = (pages as f64 * fraction.clamp(0.0, 1.0)).round();
    if n.is_nan() {
        0
    } else {
        (n as usize).min(pages)
    }
}

// ---------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------

/// What [`uffd_wp_snapshot`] measured.
#[derive(Clone, Copy, Debug)]
pub struct UffdWpReport {
    /// Pages in the region.
    pub pages: usize,
    /// `UFFDIO_REGISTER` (WP mode) of the whole region.
    pub register: Duration,
    /// `UFFDIO_WRITEPROTECT` of the whole, populated region: the snapshot's "fork" cost.
    pub protect: Duration,
    /// Distinct pages the owner wrote (each one write-protect fault).
    pub faults: usize,
    /// Faults the handler thread served (copied out and un-protected).
    pub handled: usize,
    /// The owner's wall time for all its writes.
    pub write_time: Duration,
    /// `write_time / faults`: the mean cost of one fault as seen by the writer.
    pub mean_fault: Duration,
}

/// What [`kernel_fork_live_snapshot`] (workload W3) measured.
#[derive(Clone, Copy, Debug)]
pub struct LiveSnapshotReport {
    /// Pages in the heap.
    pub pages: usize,
    /// The owner's pause at `fork()`.
    pub fork_pause: Duration,
    /// Distinct random pages the owner writes (before the fork, and again after it).
    pub pages_written: usize,
    /// The owner's write throughput before the fork, pages per second.
    pub write_rate_before: f64,
    /// The owner's write throughput while the child was still reading, pages per second
    /// (measured over the writes done before the child finished; NaN when none were).
    pub write_rate_during: f64,
    /// `write_rate_before / write_rate_during`.
    pub slowdown: f64,
    /// Writes the owner did while the child was still reading.
    pub pages_written_during: usize,
    /// True when the child was still reading after the owner's last write (so every write
    /// paid a COW fault).
    pub child_outlived_writes: bool,
    /// How long the child took to read the whole heap.
    pub child_read: Duration,
    /// The owner's `Pss` before the fork, bytes.
    pub pss_before: u64,
    /// The highest sampled `Pss(owner) + Pss(child)` during the run, bytes (an honest total:
    /// COW-shared pages are split between the two).
    pub peak_pss_total: u64,
    /// The highest sampled `Rss(owner) + Rss(child)`, bytes (counts shared pages twice).
    pub peak_rss_total: u64,
    /// Memory samples taken.
    pub samples: usize,
}

// ---------------------------------------------------------------------------------------
// Mappings
// ---------------------------------------------------------------------------------------

/// An owned mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes (a whole number of pages, not zero) and advises `MADV_NOHUGEPAGE`.
    fn map(len: usize, flags: libc::c_int, fd: RawFd) -> io::Result<Self> {
        // SAFETY: a new mapping at an address the kernel chooses; no existing memory is
        // touched. The result is checked before use.
        let p = unsafe { libc::mmap(ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let m = Mapping { ptr: p.cast(), len };
        // SAFETY: advice on the mapping just made, which this function owns.
        if unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(m)
    }

    /// Private anonymous memory, not yet populated.
    fn anon(len: usize) -> io::Result<Self> {
        Self::map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    /// Private anonymous memory with every page written (so present and dirty).
    fn populated(len: usize) -> io::Result<Self> {
        let m = Self::anon(len)?;
        m.populate();
        Ok(m)
    }

    fn pages(&self) -> usize {
        self.len / PAGE
    }

    fn page_ptr(&self, i: usize) -> *mut u8 {
        self.ptr.wrapping_add(i * PAGE)
    }

    /// Stores `v` at the start of page `i` (ignored when `i` is out of range). Allocation-
    /// and panic-free, so a forked child may call it.
    #[inline]
    fn write_page(&self, i: usize, v: u64) {
        if i < self.pages() {
            // SAFETY: page `i` lies inside this read-write mapping and is 8-byte aligned;
            // `&self` keeps the mapping alive.
            unsafe { ptr::write_volatile(self.page_ptr(i).cast::<u64>(), v) }
        }
    }

    /// Loads the first word of page `i` (0 when `i` is out of range). Allocation- and
    /// panic-free.
    #[inline]
    fn read_page(&self, i: usize) -> u64 {
        if i < self.pages() {
            // SAFETY: as in `write_page`; the mapping is readable.
            unsafe { ptr::read_volatile(self.page_ptr(i).cast::<u64>()) }
        } else {
            0
        }
    }

    /// Writes every page once.
    fn populate(&self) {
        for i in 0..self.pages() {
            self.write_page(i, i as u64 | 1);
        }
    }

    /// Copies page `i` of `src` over page `i` of `self` (ignored when out of range).
    #[inline]
    fn copy_page_from(&self, src: &Mapping, i: usize) {
        if i < self.pages() && i < src.pages() {
            // SAFETY: page `i` is inside both mappings, which are distinct mappings (so the
            // ranges do not overlap) kept alive by the borrows.
            unsafe { ptr::copy_nonoverlapping(src.page_ptr(i), self.page_ptr(i), PAGE) }
        }
    }

    /// Copies pages `[first, first + n)` of `src` over the same pages of `self` (one
    /// `memcpy`; clamped to both mappings).
    #[inline]
    fn copy_pages_from(&self, src: &Mapping, first: usize, n: usize) {
        let end = (first.saturating_add(n)).min(self.pages()).min(src.pages());
        if first < end {
            // SAFETY: pages `first..end` are inside both mappings, which are distinct
            // mappings (so the ranges do not overlap) kept alive by the borrows.
            unsafe { ptr::copy_nonoverlapping(src.page_ptr(first), self.page_ptr(first), (end - first) * PAGE) }
        }
    }

    /// `MADV_DONTNEED` over the whole mapping.
    fn discard(&self) -> io::Result<()> {
        // SAFETY: advice over this mapping only; no Rust reference into it is live.
        if unsafe { libc::madvise(self.ptr.cast(), self.len, libc::MADV_DONTNEED) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Mapping::map` with this address and length, and
        // nothing refers to it once its owner is dropped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `bytes` rounded up to whole pages; an error for zero.
fn region_len(bytes: usize) -> io::Result<usize> {
    if bytes == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "region size must be positive"));
    }
    bytes
        .checked_next_multiple_of(PAGE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "region size overflows"))
}

// ---------------------------------------------------------------------------------------
// Processes and file descriptors
// ---------------------------------------------------------------------------------------

/// A forked child: killed and reaped on drop unless [`Child::wait`] reaped it.
struct Child {
    pid: libc::pid_t,
    reaped: bool,
}

/// Ends a forked child should its code ever unwind, so the child never runs the parent's
/// code past the `fork()`.
struct ExitOnUnwind;

impl Drop for ExitOnUnwind {
    fn drop(&mut self) {
        // SAFETY: `_exit` is async-signal-safe and ends the process immediately.
        unsafe { libc::_exit(127) }
    }
}

/// Forks; the child runs `child` and `_exit`s with its result.
///
/// `child` must use async-signal-safe operations only (no allocation, no locks, no
/// printing): another thread of the parent may have held a lock at the fork.
fn fork_child<F: FnOnce() -> i32>(child: F) -> io::Result<Child> {
    // SAFETY: fork(2) itself has no memory-safety preconditions; the child below runs only
    // `child` (async-signal-safe by this function's contract) and leaves through `_exit`,
    // never returning into the parent's stack frames nor running its destructors.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            let guard = ExitOnUnwind;
            let code = child();
            std::mem::forget(guard);
            // SAFETY: ends the child at once, without atexit handlers or destructors.
            unsafe { libc::_exit(code) }
        }
        pid => Ok(Child { pid, reaped: false }),
    }
}

impl Child {
    /// Reaps the child; an error unless it exited with status 0.
    fn wait(mut self) -> io::Result<()> {
        let mut status: libc::c_int = 0;
        loop {
            // SAFETY: waitpid writes one int through a valid pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                if e.raw_os_error() == Some(libc::ECHILD) {
                    self.reaped = true;
                }
                return Err(e);
            }
        }
        self.reaped = true;
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            Ok(())
        } else {
            Err(io::Error::other(format!("child {} ended with wait status {status:#x}", self.pid)))
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: `pid` is our own unreaped child, so the id cannot have been reused.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let mut status = 0;
        loop {
            // SAFETY: as in `Child::wait`.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break;
            }
        }
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two ints into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by nobody else.
    let r = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((r, w))
}

/// Blocking one-byte read, retried on EINTR; async-signal-safe. Returns bytes read (0 at
/// end of file) or -1.
fn read_byte(fd: RawFd) -> isize {
    let mut b = 0u8;
    loop {
        // SAFETY: reads at most one byte into a live local.
        let r = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        // `last_os_error` only reads errno: no allocation, safe in a forked child.
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return r;
        }
    }
}

/// Writes `n` bytes of value 1 to a pipe (retrying on EINTR and short writes).
fn write_bytes(fd: &OwnedFd, n: usize) -> io::Result<()> {
    let buf = vec![1u8; n];
    let mut done = 0;
    while done < n {
        // SAFETY: writes from the live buffer, within its bounds.
        let r = unsafe { libc::write(fd.as_raw_fd(), buf[done..].as_ptr().cast(), n - done) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(())
}

/// Reads `n` bytes from a pipe, waiting at most `CHILD_TIMEOUT_MS` between bytes.
fn read_bytes_timeout(fd: &OwnedFd, n: usize) -> io::Result<()> {
    let mut got = 0;
    while got < n {
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one pollfd that lives for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, CHILD_TIMEOUT_MS) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "children did not report in time"));
        }
        match read_byte(fd.as_raw_fd()) {
            1 => got += 1,
            0 => return Err(io::Error::other("children's pipe closed early")),
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}

/// `(Rss, Pss)` of a process in bytes, from `/proc/<pid>/smaps_rollup`.
fn rss_pss(pid: libc::pid_t) -> io::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok((proc_kb(&text, "Rss")?, proc_kb(&text, "Pss")?))
}

/// The value of a `Key:   N kB` line, in bytes.
fn proc_kb(text: &str, key: &str) -> io::Result<u64> {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            let num = rest.trim().trim_end_matches("kB").trim();
            return num
                .parse::<u64>()
                .map(|kb| kb * 1024)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{key}: {e}")));
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("no {key} line")))
}

// ---------------------------------------------------------------------------------------
// Threaded page touching
// ---------------------------------------------------------------------------------------

/// A start line for worker threads: they block until it is opened (or abandoned).
struct Gate {
    state: Mutex<u8>, // 0 closed, 1 go, 2 abandoned
    cv: Condvar,
}

impl Gate {
    fn new() -> Self {
        Gate { state: Mutex::new(0), cv: Condvar::new() }
    }

    fn set(&self, v: u8) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = v;
        self.cv.notify_all();
    }

    /// Waits for the gate; true when told to go.
    fn wait(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while *s == 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        *s == 1
    }
}

/// Writes one word to every page of `m` with `threads` threads on disjoint, contiguous page
/// ranges; the wall time from releasing the threads until the last one finishes.
fn touch_all_threaded(m: &Mapping, threads: usize) -> io::Result<Duration> {
    let pages = m.pages();
    let threads = threads.clamp(1, pages.max(1));
    let base = m.ptr as usize;
    let gate = Gate::new();
    thread::scope(|s| {
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let (lo, hi) = (pages * t / threads, pages * (t + 1) / threads);
            let gate = &gate;
            let spawned = thread::Builder::new().name(format!("baseline-touch-{t}")).spawn_scoped(s, move || {
                if gate.wait() {
                    for i in lo..hi {
                        // SAFETY: page `i` < `pages` lies inside `m`, which the scope
                        // keeps mapped; threads write disjoint page ranges.
                        unsafe { ptr::write_volatile((base + i * PAGE) as *mut u64, 7) };
                    }
                }
            });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    gate.set(2);
                    return Err(e);
                }
            }
        }
        let start = Instant::now();
        gate.set(1);
        let mut panicked = false;
        for h in handles {
            panicked |= h.join().is_err();
        }
        let elapsed = start.elapsed();
        if panicked {
            return Err(io::Error::other("a touch thread panicked"));
        }
        Ok(elapsed)
    })
}

fn per_second(count: usize, d: Duration) -> f64 {
    count as f64 / d.as_secs_f64()
}

// ---------------------------------------------------------------------------------------
// 1-3: kernel fork, COW fault, first touch
// ---------------------------------------------------------------------------------------

/// Kernel `fork()` latency: a region of `bytes`, every page written, is held by this
/// process; `fork()` is timed in the parent (the child `_exit(0)`s at once and is reaped
/// after the timing). Returns the median of `reps` (at least 1) repetitions.
pub fn kernel_fork_latency(bytes: usize, reps: usize) -> io::Result<Duration> {
    let region = Mapping::populated(region_len(bytes)?)?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        let child = fork_child(|| 0)?;
        times.push(start.elapsed());
        child.wait()?;
    }
    drop(region);
    times.sort();
    Ok(times[times.len() / 2])
}

/// Kernel COW write faults per second: a region of `bytes` is written, a child is forked
/// and kept alive (blocked on a pipe) so every page is shared, then the parent writes one
/// word to each page with `threads` threads on disjoint page ranges (one COW fault each).
/// Returns faults per second (wall clock, all threads together).
///
/// With more than one thread every COW fault replaces a present PTE of an mm that is live
/// on several CPUs, so each costs a TLB-shootdown IPI: expect the rate to drop, not scale
/// (measured: ~2.5 us/fault with 1 thread, ~6 us/fault with 2, one IPI per fault).
pub fn kernel_cow_fault_rate(bytes: usize, threads: usize) -> io::Result<f64> {
    let region = Mapping::populated(region_len(bytes)?)?;
    let (release_r, release_w) = pipe()?;
    let rfd = release_r.as_raw_fd();
    let child = fork_child(|| {
        read_byte(rfd);
        0
    })?;
    let elapsed = touch_all_threaded(&region, threads)?;
    write_bytes(&release_w, 1)?;
    child.wait()?;
    Ok(per_second(region.pages(), elapsed))
}

/// Kernel write faults on pages that *were* shared with a `fork(2)` child which has since
/// exited: each page is exclusive again, so the write-protect fault reuses it in place
/// (`do_wp_page`, no copy). One word written to each page by one thread; faults per second.
pub fn kernel_reuse_fault_rate(bytes: usize) -> io::Result<f64> {
    let region = Mapping::populated(region_len(bytes)?)?;
    let child = fork_child(|| 0)?;
    child.wait()?;
    let elapsed = touch_all_threaded(&region, 1)?;
    Ok(per_second(region.pages(), elapsed))
}

/// Kernel first-touch faults per second: a fresh anonymous mapping of `bytes`; one word is
/// written to each page by `threads` threads on disjoint page ranges (a zero-fill fault
/// each). Returns faults per second.
pub fn kernel_first_touch_rate(bytes: usize, threads: usize) -> io::Result<f64> {
    let region = Mapping::anon(region_len(bytes)?)?;
    let elapsed = touch_all_threaded(&region, threads)?;
    Ok(per_second(region.pages(), elapsed))
}

// ---------------------------------------------------------------------------------------
// 4: naive uffd-wp snapshot
// ---------------------------------------------------------------------------------------

// The userfaultfd calls are cowarena's own sys layer (`cowarena::__bench`), so the
// baseline and the engine issue the same ioctls the same way.

fn uffd_err(e: cowarena::Error) -> io::Error {
    io::Error::other(e)
}

/// The handler thread of the uffd-wp snapshot: for each write-protect fault, copy the
/// page's old contents to the snapshot, then un-protect it (which wakes the writer).
/// Returns the number of faults served.
fn wp_handler(uffd: &Uffd, base: usize, len: usize, snap: usize, stop: &AtomicBool) -> io::Result<usize> {
    let mut msgs = Vec::with_capacity(64);
    let mut served = 0;
    let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: 5_000_000 };
    loop {
        let mut pfd = [rustix::event::PollFd::new(uffd, rustix::event::PollFlags::IN)];
        let r = match rustix::event::poll(&mut pfd, Some(&timeout)) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if r == 0 {
            if stop.load(Ordering::Acquire) {
                return Ok(served);
            }
            continue;
        }
        msgs.clear();
        match uffd.read_msgs(&mut msgs) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for msg in &msgs {
            let UffdMsg::PageFault { address, flags, .. } = *msg else { continue };
            let address = address as usize;
            if flags & PAGEFAULT_FLAG_WP == 0 || address < base || address >= base + len {
                continue;
            }
            let page = address & !(PAGE - 1);
            // SAFETY: `page` is a whole page inside the registered region and the same
            // offset is inside the snapshot buffer (same length); the writer that faulted
            // on it is blocked until the un-protect below, so nothing writes it meanwhile.
            unsafe { ptr::copy_nonoverlapping(page as *const u8, (snap + (page - base)) as *mut u8, PAGE) };
            uffd.writeprotect(page, PAGE, false)?;
            served += 1;
        }
    }
}

/// The naive userfaultfd write-protect snapshot (QEMU's background snapshot): the region of
/// `bytes` (every page written) is registered with userfaultfd in WP mode and
/// write-protected as a whole (the "fork"); the owner then writes `write_fraction` of its
/// pages (distinct, random) while a handler thread copies each faulting page out to a
/// preallocated, pre-touched snapshot buffer before un-protecting it. The background copy
/// of the untouched pages is not measured.
pub fn uffd_wp_snapshot(bytes: usize, write_fraction: f64) -> io::Result<UffdWpReport> {
    let len = region_len(bytes)?;
    let region = Mapping::populated(len)?;
    let snapshot = Mapping::populated(len)?;
    let pages = region.pages();
    let targets = distinct_pages(&mut Rng::new(0x5eed_0004), pages, fraction_of(pages, write_fraction));

    // Fails (MissingFeature) when userfaultfd write-protect is not supported.
    let uffd = Uffd::open(FEATURE_WP, 0).map_err(uffd_err)?;
    let t = Instant::now();
    uffd.register_modes(region.ptr as usize, len, false, true)?;
    let register = t.elapsed();
    let t = Instant::now();
    uffd.writeprotect(region.ptr as usize, len, true)?;
    let protect = t.elapsed();

    let uffd = &uffd;
    let (base, snap) = (region.ptr as usize, snapshot.ptr as usize);
    let stop = AtomicBool::new(false);
    let (write_time, handled) = thread::scope(|s| -> io::Result<(Duration, usize)> {
        let stop = &stop;
        let handler = thread::Builder::new().name("baseline-uffd-wp".into()).spawn_scoped(s, move || {
            let r = wp_handler(uffd, base, len, snap, stop);
            if r.is_err() {
                // Best effort: release any writer still blocked on a fault.
                let _ = uffd.writeprotect(base, len, false);
            }
            r
        })?;
        let t = Instant::now();
        for (k, &p) in targets.iter().enumerate() {
            region.write_page(p, k as u64);
        }
        let write_time = t.elapsed();
        stop.store(true, Ordering::Release);
        let handled = handler.join().map_err(|_| io::Error::other("uffd handler thread panicked"))??;
        Ok((write_time, handled))
    })?;
    let faults = targets.len();
    Ok(UffdWpReport {
        pages,
        register,
        protect,
        faults,
        handled,
        write_time,
        mean_fault: write_time / u32::try_from(faults.max(1)).unwrap_or(u32::MAX),
    })
}

// ---------------------------------------------------------------------------------------
// 5: memcpy snapshot
// ---------------------------------------------------------------------------------------

/// Snapshot by copying: `memcpy` of a written region of `bytes` into a preallocated,
/// already-touched buffer (a first, untimed copy touches it). Returns the timed copy.
pub fn memcpy_snapshot(bytes: usize) -> io::Result<Duration> {
    let len = region_len(bytes)?;
    let src = Mapping::populated(len)?;
    let dst = Mapping::anon(len)?;
    let copy = || {
        // SAFETY: two distinct live mappings of `len` bytes each.
        unsafe { ptr::copy_nonoverlapping(src.ptr, dst.ptr, len) };
        std::hint::black_box(dst.read_page(dst.pages() - 1));
    };
    copy();
    let t = Instant::now();
    copy();
    Ok(t.elapsed())
}

// ---------------------------------------------------------------------------------------
// 6-8: fuzzer reset loops
// ---------------------------------------------------------------------------------------

/// The random page accesses of one fuzz iteration: `writes` stores then `reads` loads, on
/// pages drawn with replacement. Allocation- and panic-free.
#[inline]
fn fuzz_accesses(m: &Mapping, rng: &mut Rng, writes: usize, reads: usize, it: u64) -> u64 {
    let pages = m.pages();
    for _ in 0..writes {
        m.write_page(rng.below(pages), it);
    }
    let mut acc = 0u64;
    for _ in 0..reads {
        acc = acc.wrapping_add(m.read_page(rng.below(pages)));
    }
    acc
}

const FUZZ_SEED: u64 = 0xf022_5eed;

/// The kernel fork server: a populated snapshot of `bytes`; each of `iters` iterations
/// forks, the child writes `writes` random pages, reads `reads` random pages and
/// `_exit(0)`s, and the parent waits for it. Returns iterations per second.
pub fn fork_server_iters_per_sec(bytes: usize, writes: usize, reads: usize, iters: usize) -> io::Result<f64> {
    let snapshot = Mapping::populated(region_len(bytes)?)?;
    let iters = iters.max(1);
    let t = Instant::now();
    for it in 0..iters as u64 {
        let snap = &snapshot;
        let child = fork_child(move || {
            let mut rng = Rng::new(FUZZ_SEED ^ it.wrapping_mul(0x9E37_79B9));
            std::hint::black_box(fuzz_accesses(snap, &mut rng, writes, reads, it));
            0
        })?;
        child.wait()?;
    }
    Ok(per_second(iters, t.elapsed()))
}

/// Wasmtime-style reset: a memfd holds the snapshot image (every page written), mapped
/// `MAP_PRIVATE`; each of `iters` iterations writes `writes` random pages, reads `reads`
/// random pages, then resets with `MADV_DONTNEED` over the whole mapping (so later reads
/// fault the image back in from the page cache). One untimed warm-up iteration runs
/// first. Returns iterations per second.
pub fn memfd_reset_iters_per_sec(bytes: usize, writes: usize, reads: usize, iters: usize) -> io::Result<f64> {
    let len = region_len(bytes)?;
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
    let raw = unsafe { libc::memfd_create(c"cowarena-baseline".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor owned by nobody else.
    let memfd = unsafe { OwnedFd::from_raw_fd(raw) };
    let size = libc::off_t::try_from(len).map_err(|_| io::Error::other("size too large"))?;
    // SAFETY: sizes a file we own.
    if unsafe { libc::ftruncate(memfd.as_raw_fd(), size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Mapping::map(len, libc::MAP_SHARED, memfd.as_raw_fd())?.populate();
    let view = Mapping::map(len, libc::MAP_PRIVATE, memfd.as_raw_fd())?;
    let mut rng = Rng::new(FUZZ_SEED);
    let mut iteration = |it: u64| -> io::Result<()> {
        std::hint::black_box(fuzz_accesses(&view, &mut rng, writes, reads, it));
        view.discard()
    };
    iteration(0)?;
    let iters = iters.max(1);
    let t = Instant::now();
    for it in 1..=iters as u64 {
        iteration(it)?;
    }
    Ok(per_second(iters, t.elapsed()))
}

/// Snapshot-fuzzer reset (LibAFL style): a working copy and a pristine copy of `bytes`;
/// each of `iters` iterations writes `writes` random pages (recording each newly dirtied
/// page in a software list, deduplicated by a bitmap), reads `reads` random pages, then
/// restores every dirty page by `memcpy` from the pristine copy. Pages are drawn from
/// `Rng::new(seed)`. Returns iterations per second.
pub fn dirty_memcpy_reset_iters_per_sec(
    bytes: usize,
    writes: usize,
    reads: usize,
    iters: usize,
    seed: u64,
) -> io::Result<f64> {
    let len = region_len(bytes)?;
    let pristine = Mapping::populated(len)?;
    let work = Mapping::anon(len)?;
    // SAFETY: two distinct live mappings of `len` bytes each.
    unsafe { ptr::copy_nonoverlapping(pristine.ptr, work.ptr, len) };
    let pages = work.pages();
    let mut bitmap = vec![0u64; pages.div_ceil(64)];
    let mut dirty: Vec<usize> = Vec::with_capacity(writes.min(pages));
    let mut rng = Rng::new(seed);
    let iters = iters.max(1);
    let t = Instant::now();
    for it in 0..iters as u64 {
        for _ in 0..writes {
            let p = rng.below(pages);
            let (word, bit) = (p / 64, 1u64 << (p % 64));
            if bitmap[word] & bit == 0 {
                bitmap[word] |= bit;
                dirty.push(p);
            }
            work.write_page(p, it);
        }
        let mut acc = 0u64;
        for _ in 0..reads {
            acc = acc.wrapping_add(work.read_page(rng.below(pages)));
        }
        std::hint::black_box(acc);
        for &p in &dirty {
            work.copy_page_from(&pristine, p);
            bitmap[p / 64] &= !(1u64 << (p % 64));
        }
        dirty.clear();
    }
    Ok(per_second(iters, t.elapsed()))
}

// ---------------------------------------------------------------------------------------
// 8b: the transparent kernel peer (W2, dirty tracking): userfaultfd WP_ASYNC + PAGEMAP_SCAN
// ---------------------------------------------------------------------------------------

/// The `PAGEMAP_SCAN` question "which pages were written since they were last protected?",
/// refused (EPERM) on a range no async-WP userfaultfd covers.
fn written_query() -> Query {
    Query { required: category::WRITTEN, report: category::WRITTEN, flags: CHECK_WPASYNC, ..Query::default() }
}

/// Page indices (relative to `base`) of `runs`, in order.
fn run_pages(runs: &[PageRun], base: usize) -> Vec<usize> {
    runs.iter().flat_map(|r| (r.start - base) / PAGE..(r.end - base) / PAGE).collect()
}

/// Sorted, deduplicated `pages`.
fn sorted_set(mut pages: Vec<usize>) -> Vec<usize> {
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// What one timed round of [`WpAsyncReset::fuzz_round`] measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResetRound {
    /// Iterations run.
    pub iters: usize,
    /// Wall time of the whole round (accesses and resets).
    pub elapsed: Duration,
    /// Time in `PAGEMAP_SCAN` listing the written pages.
    pub scan: Duration,
    /// Time copying the written pages back from the pristine copy.
    pub copy: Duration,
    /// Time in `PAGEMAP_SCAN` re-protecting them (`WP_MATCHING`).
    pub rearm: Duration,
    /// Pages restored over the round.
    pub pages: usize,
}

impl ResetRound {
    /// Iterations per second.
    pub fn rate(&self) -> f64 {
        per_second(self.iters, self.elapsed)
    }

    /// `d` per iteration.
    pub fn per_iter(&self, d: Duration) -> Duration {
        d / u32::try_from(self.iters.max(1)).unwrap_or(u32::MAX)
    }
}

/// The kernel's transparent reset (Linux 6.7+), the peer of W2's `reset_to` (and
/// `shared/anchors/w2_transparent_reset.c` in Rust, over cowarena's sys layer): a working
/// region of `bytes` with every page written, registered in WP mode on a userfaultfd opened
/// with `UFFD_FEATURE_WP_ASYNC` and wholly write-protected, beside a pristine copy. The
/// application's writes take no fault in user space (the kernel un-protects the page and
/// marks it written, ≈ 0.7 µs); a reset lists the written pages with `PAGEMAP_SCAN`
/// (`PAGE_IS_WRITTEN`), `memcpy`s each run back from the pristine copy, and re-protects
/// them with a second walk (`PM_SCAN_WP_MATCHING`).
///
/// Why two walks: the one-walk form (list and re-protect together, then copy back) is
/// wrong — the copies write pages just protected, which marks them written again, so every
/// reset restores the last one's pages too and the set grows towards the whole region (20
/// iterations/s, 24 000 pages per iteration, in a C trial on 256 MiB).
pub struct WpAsyncReset {
    // Declared (so dropped) before the userfaultfd: the registered range goes first.
    work: Mapping,
    pristine: Mapping,
    pagemap: Pagemap,
    uffd: Uffd,
    runs: Vec<PageRun>,
}

impl WpAsyncReset {
    /// Set up the region (untimed: populating, registering and protecting 256 MiB takes a
    /// few ms). Fails when the kernel has no `WP_ASYNC` or `PAGEMAP_SCAN` (before 6.7).
    pub fn new(bytes: usize) -> io::Result<WpAsyncReset> {
        let len = region_len(bytes)?;
        let pristine = Mapping::populated(len)?;
        let work = Mapping::anon(len)?;
        work.copy_pages_from(&pristine, 0, pristine.pages());
        let uffd = Uffd::open_wp_async().map_err(uffd_err)?;
        uffd.register_modes(work.ptr as usize, len, false, true)?;
        uffd.writeprotect(work.ptr as usize, len, true)?;
        let pagemap = Pagemap::open()?;
        let mut peer = WpAsyncReset { work, pristine, pagemap, uffd, runs: Vec::with_capacity(1024) };
        if !peer.list_written()?.is_empty() {
            return Err(io::Error::other("WP_ASYNC peer: pages listed as written right after protecting them all"));
        }
        Ok(peer)
    }

    fn range(&self) -> (usize, usize) {
        let base = self.work.ptr as usize;
        (base, base + self.work.len)
    }

    /// Pages of the working region.
    pub fn pages(&self) -> usize {
        self.work.pages()
    }

    /// The runs of pages written since they were last protected (one `PAGEMAP_SCAN`).
    fn list_written(&mut self) -> io::Result<&[PageRun]> {
        let (start, end) = self.range();
        self.runs.clear();
        self.pagemap.scan(start, end, written_query(), &mut self.runs)?;
        Ok(&self.runs)
    }

    /// Copy the listed runs back from the pristine copy; returns the pages copied.
    fn restore_listed(&self) -> usize {
        let base = self.work.ptr as usize;
        let mut pages = 0;
        for r in &self.runs {
            let (first, n) = ((r.start - base) / PAGE, (r.end - r.start) / PAGE);
            self.work.copy_pages_from(&self.pristine, first, n);
            pages += n;
        }
        pages
    }

    /// Re-protect every written page (one `PAGEMAP_SCAN` with `WP_MATCHING`, no output).
    fn rearm(&self) -> io::Result<()> {
        let (start, end) = self.range();
        self.pagemap.protect(start, end, written_query())
    }

    /// `iters` iterations of the fuzz loop (`fuzz_accesses` with values `it0..`, pages
    /// drawn from `rng`), each followed by a reset; the phases of the reset timed apart.
    pub fn fuzz_round(
        &mut self,
        rng: &mut Rng,
        writes: usize,
        reads: usize,
        it0: u64,
        iters: usize,
    ) -> io::Result<ResetRound> {
        let mut r = ResetRound { iters, ..ResetRound::default() };
        let t = Instant::now();
        for it in it0..it0 + iters as u64 {
            std::hint::black_box(fuzz_accesses(&self.work, rng, writes, reads, it));
            let t0 = Instant::now();
            self.list_written()?;
            let t1 = Instant::now();
            r.pages += self.restore_listed();
            let t2 = Instant::now();
            self.rearm()?;
            let t3 = Instant::now();
            r.scan += t1 - t0;
            r.copy += t2 - t1;
            r.rearm += t3 - t2;
        }
        r.elapsed = t.elapsed();
        Ok(r)
    }

    /// Exactness, untimed: `iters` iterations in which the pages written are recorded too;
    /// each reset must list exactly them, and afterwards every page must equal the pristine
    /// copy. Returns the pages checked.
    pub fn check_exact(&mut self, rng: &mut Rng, writes: usize, reads: usize, iters: usize) -> io::Result<usize> {
        let pages = self.pages();
        let mut checked = 0;
        for it in 0..iters as u64 {
            let written: Vec<usize> = (0..writes).map(|_| rng.below(pages)).collect();
            for &p in &written {
                self.work.write_page(p, it | 1 << 63);
            }
            let mut acc = 0u64;
            for _ in 0..reads {
                acc = acc.wrapping_add(self.work.read_page(rng.below(pages)));
            }
            std::hint::black_box(acc);
            let base = self.work.ptr as usize;
            let listed = run_pages(self.list_written()?, base);
            let expected = sorted_set(written);
            if listed != expected {
                return Err(io::Error::other(format!(
                    "WP_ASYNC peer: PAGEMAP_SCAN listed {} pages, {} were written (first listed {:?}, first written {:?})",
                    listed.len(),
                    expected.len(),
                    listed.first(),
                    expected.first()
                )));
            }
            checked += listed.len();
            self.restore_listed();
            self.rearm()?;
        }
        if !self.list_written()?.is_empty() {
            return Err(io::Error::other("WP_ASYNC peer: pages still listed as written after the re-arm"));
        }
        let differ = (0..pages).filter(|&p| self.work.read_page(p) != self.pristine.read_page(p)).count();
        if differ != 0 {
            return Err(io::Error::other(format!("WP_ASYNC peer: {differ} pages differ from the pristine copy")));
        }
        Ok(checked)
    }
}

/// What [`wp_async_dirty_scan`] measured (medians over the rounds).
#[derive(Clone, Copy, Debug)]
pub struct DirtyScanReport {
    /// Pages in the region.
    pub pages: usize,
    /// Distinct pages written per round.
    pub written: usize,
    /// `PAGEMAP_SCAN` for `PAGE_IS_WRITTEN` over the whole region ("which pages were
    /// written?"; the `dirty_pages` question).
    pub list: Duration,
    /// The same with `PM_SCAN_WP_MATCHING` ("list them and re-arm"; the `clean` question).
    pub list_rearm: Duration,
    /// A whole round: the stores (each page's first one an async write-protect fault),
    /// one list, then list-and-re-arm — what tracking the round's writes costs in all.
    pub cycle: Duration,
    /// Rounds run.
    pub rounds: usize,
}

/// Dirty tracking by the kernel (Linux 6.7+): a region of `bytes`, every page written,
/// registered in WP mode on an async-WP userfaultfd and wholly write-protected (untimed).
/// Each of `rounds` rounds writes `fraction` of its pages (distinct, random), then times
/// a `PAGEMAP_SCAN` listing the written pages (three times: the median is kept) and one
/// with `WP_MATCHING` that lists and re-protects them. Both answers must be exactly the
/// pages written, and nothing may be listed after the re-protect (else an error).
pub fn wp_async_dirty_scan(bytes: usize, fraction: f64, rounds: usize, seed: u64) -> io::Result<DirtyScanReport> {
    let len = region_len(bytes)?;
    let region = Mapping::populated(len)?;
    let pages = region.pages();
    let uffd = Uffd::open_wp_async().map_err(uffd_err)?;
    let (start, end) = (region.ptr as usize, region.ptr as usize + len);
    uffd.register_modes(start, len, false, true)?;
    uffd.writeprotect(start, len, true)?;
    let pagemap = Pagemap::open()?;
    let mut rng = Rng::new(seed);
    let mut runs = Vec::with_capacity(fraction_of(pages, fraction) + 16);
    let (mut lists, mut rearms, mut cycles) = (Vec::new(), Vec::new(), Vec::new());
    let mut written = 0;
    for round in 0..rounds.max(1) {
        let targets = distinct_pages(&mut rng, pages, fraction_of(pages, fraction));
        written = targets.len();
        let t = Instant::now();
        for &p in &targets {
            region.write_page(p, round as u64 + 2);
        }
        let stores = t.elapsed();
        let expected = sorted_set(targets);
        let mut one = Vec::new();
        for _ in 0..3 {
            runs.clear();
            let t = Instant::now();
            pagemap.scan(start, end, written_query(), &mut runs)?;
            one.push(t.elapsed());
            if run_pages(&runs, start) != expected {
                return Err(io::Error::other("WP_ASYNC dirty scan: the pages listed are not the pages written"));
            }
        }
        let first_list = one[0];
        one.sort();
        lists.push(one[1]);
        runs.clear();
        let q = Query { flags: written_query().flags | WP_MATCHING, ..written_query() };
        let t = Instant::now();
        pagemap.scan(start, end, q, &mut runs)?;
        rearms.push(t.elapsed());
        cycles.push(stores + first_list + t.elapsed());
        if run_pages(&runs, start) != expected {
            return Err(io::Error::other("WP_ASYNC dirty scan: list-and-re-arm did not list the pages written"));
        }
        runs.clear();
        pagemap.scan(start, end, written_query(), &mut runs)?;
        if !runs.is_empty() {
            return Err(io::Error::other("WP_ASYNC dirty scan: pages still listed as written after the re-arm"));
        }
    }
    drop(region); // unmapped before the userfaultfd closes
    drop(uffd);
    lists.sort();
    rearms.sort();
    cycles.sort();
    Ok(DirtyScanReport {
        pages,
        written,
        list: lists[lists.len() / 2],
        list_rearm: rearms[rearms.len() / 2],
        cycle: cycles[cycles.len() / 2],
        rounds: rounds.max(1),
    })
}

// ---------------------------------------------------------------------------------------
// 9: W3, live snapshot by fork
// ---------------------------------------------------------------------------------------

/// What the W3 child reports through a shared page.
#[repr(C)]
struct ChildReport {
    done: AtomicU32,
    sum: AtomicU64,
    nanos: AtomicU64,
}

/// Samples `Pss` and `Rss` of the owner and the child; keeps the maxima of the sums.
#[derive(Default)]
struct MemPeak {
    pss: AtomicU64,
    rss: AtomicU64,
    samples: AtomicU64,
}

impl MemPeak {
    fn sample(&self, owner: libc::pid_t, child: libc::pid_t) {
        if let (Ok((r1, p1)), Ok((r2, p2))) = (rss_pss(owner), rss_pss(child)) {
            self.pss.fetch_max(p1 + p2, Ordering::Relaxed);
            self.rss.fetch_max(r1 + r2, Ordering::Relaxed);
            self.samples.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Workload W3 on the kernel: a heap of `bytes`, every page written; the owner forks; the
/// child reads the whole heap (one `u64` per 64 bytes, summed) and exits, while the owner
/// writes `write_fraction` of the heap's pages (distinct, random). Reports the owner's
/// pause at `fork()`, its write throughput while the child reads against the same kind of
/// writes before the fork, and the peak memory of the two processes (`Pss` and `Rss` from
/// `/proc/<pid>/smaps_rollup`, sampled every 10 ms by a thread started after the fork, and
/// once more after the owner's last write).
pub fn kernel_fork_live_snapshot(bytes: usize, write_fraction: f64) -> io::Result<LiveSnapshotReport> {
    let len = region_len(bytes)?;
    let heap = Mapping::populated(len)?;
    let pages = heap.pages();
    let n = fraction_of(pages, write_fraction);
    let mut rng = Rng::new(0x5eed_0009);
    let before_list = distinct_pages(&mut rng, pages, n);
    let during_list = distinct_pages(&mut rng, pages, n);
    let shared = Mapping::map(PAGE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1)?;
    // SAFETY: the page is zero-filled (a valid `ChildReport`: atomics of zero), page-aligned,
    // shared with the child, and outlives `report` (both live to the end of this function).
    let report: &ChildReport = unsafe { &*shared.ptr.cast::<ChildReport>() };

    let t = Instant::now();
    for (k, &p) in before_list.iter().enumerate() {
        heap.write_page(p, k as u64);
    }
    let before_time = t.elapsed();
    // SAFETY: getpid cannot fail.
    let owner = unsafe { libc::getpid() };
    let pss_before = rss_pss(owner)?.1;

    let heap_ref = &heap;
    let t = Instant::now();
    let child = fork_child(move || {
        let start = Instant::now();
        let words = len / 8;
        let base = heap_ref.ptr.cast::<u64>();
        let mut sum = 0u64;
        let mut w = 0;
        while w < words {
            // SAFETY: word `w` < `len / 8` is inside the heap, which this child's copy of
            // the address space maps for its whole life.
            sum = sum.wrapping_add(unsafe { ptr::read_volatile(base.wrapping_add(w)) });
            w += 8;
        }
        report.sum.store(sum, Ordering::Relaxed);
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        report.nanos.store(nanos, Ordering::Relaxed);
        report.done.store(1, Ordering::Release);
        0
    })?;
    let fork_pause = t.elapsed();
    let child_pid = child.pid;

    let peak = MemPeak::default();
    let stop = AtomicBool::new(false);
    let (during_pages, during_time, outlived) = thread::scope(|s| -> io::Result<_> {
        let (peak, stop) = (&peak, &stop);
        let sampler = thread::Builder::new().name("baseline-memsample".into()).spawn_scoped(s, move || {
            while !stop.load(Ordering::Acquire) {
                peak.sample(owner, child_pid);
                thread::sleep(Duration::from_millis(10));
            }
        })?;
        const CHUNK: usize = 64;
        let t = Instant::now();
        let (mut during_pages, mut during_time) = (0, Duration::ZERO);
        let mut child_done = false;
        for (c, chunk) in during_list.chunks(CHUNK).enumerate() {
            if report.done.load(Ordering::Acquire) != 0 {
                child_done = true;
                break;
            }
            for (k, &p) in chunk.iter().enumerate() {
                heap.write_page(p, (c * CHUNK + k) as u64);
            }
            during_pages += chunk.len();
            during_time = t.elapsed();
        }
        let outlived = !child_done && report.done.load(Ordering::Acquire) == 0;
        if child_done {
            // Finish the owner's writes; they no longer overlap the child's read.
            for &p in &during_list[during_pages..] {
                heap.write_page(p, 0);
            }
        } else if outlived {
            peak.sample(owner, child_pid);
        }
        let waited = child.wait();
        stop.store(true, Ordering::Release);
        sampler.join().map_err(|_| io::Error::other("memory sampler thread panicked"))?;
        waited?;
        Ok((during_pages, during_time, outlived))
    })?;

    std::hint::black_box(report.sum.load(Ordering::Relaxed));
    let write_rate_before = per_second(n, before_time);
    let write_rate_during = if during_pages == 0 { f64::NAN } else { per_second(during_pages, during_time) };
    Ok(LiveSnapshotReport {
        pages,
        fork_pause,
        pages_written: n,
        write_rate_before,
        write_rate_during,
        slowdown: write_rate_before / write_rate_during,
        pages_written_during: during_pages,
        child_outlived_writes: outlived,
        child_read: Duration::from_nanos(report.nanos.load(Ordering::Relaxed)),
        pss_before,
        peak_pss_total: peak.pss.load(Ordering::Relaxed),
        peak_rss_total: peak.rss.load(Ordering::Relaxed),
        samples: peak.samples.load(Ordering::Relaxed) as usize,
    })
}

// ---------------------------------------------------------------------------------------
// 10: W5, page-table memory per forked child
// ---------------------------------------------------------------------------------------

/// Workload W5 on the kernel: a process holding `bytes` of written memory forks `children`
/// (at least 1) children; each writes one page, reports in, and blocks; each child's
/// `VmPTE` is read from `/proc/<pid>/status`. Returns the mean page-table bytes per child
/// (multiply by 1000 for 1000 children). All children are reaped.
pub fn kernel_fork_pagetable_bytes(bytes: usize, children: usize) -> io::Result<u64> {
    let region = Mapping::populated(region_len(bytes)?)?;
    let pages = region.pages();
    let children = children.max(1);
    let (ready_r, ready_w) = pipe()?;
    let (release_r, release_w) = pipe()?;
    let (ready_fd, release_fd) = (ready_w.as_raw_fd(), release_r.as_raw_fd());
    let mut kids = Vec::with_capacity(children);
    for k in 0..children {
        let region = &region;
        kids.push(fork_child(move || {
            region.write_page(k % pages, k as u64);
            let one = 1u8;
            // SAFETY: writes one byte from a live local to an inherited pipe.
            if unsafe { libc::write(ready_fd, (&one as *const u8).cast(), 1) } != 1 {
                return 1;
            }
            read_byte(release_fd);
            0
        })?);
    }
    read_bytes_timeout(&ready_r, children)?;
    let mut total = 0u64;
    for kid in &kids {
        let status = std::fs::read_to_string(format!("/proc/{}/status", kid.pid))?;
        total += proc_kb(&status, "VmPTE")?;
    }
    write_bytes(&release_w, children)?;
    for kid in kids {
        kid.wait()?;
    }
    Ok(total / children as u64)
}

// ---------------------------------------------------------------------------------------
// 11: W4 random-order faults: the kernel's own, and the same-thread userfaultfd floor
// ---------------------------------------------------------------------------------------

/// The access a forked process makes to each page of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touch {
    /// Load the first word of the page.
    Read,
    /// Store to the first word of the page.
    Write,
}

/// What [`kernel_fork_child_touch`] measured.
#[derive(Clone, Copy, Debug)]
pub struct ForkTouch {
    /// `fork(2)` as the parent sees it (page tables copied).
    pub fork: Duration,
    /// The child's time for its accesses, `order.len()` pages.
    pub touches: Duration,
}

/// Kernel first touch in a given order: a fresh anonymous mapping of `bytes`; one word is
/// written to each page of `order` (indices past the end are ignored), in that order, by
/// this thread. Returns the time of the writes.
pub fn kernel_first_touch_order(bytes: usize, order: &[usize]) -> io::Result<Duration> {
    let region = Mapping::anon(region_len(bytes)?)?;
    let t = Instant::now();
    for (k, &p) in order.iter().enumerate() {
        region.write_page(p, k as u64 | 1);
    }
    Ok(t.elapsed())
}

/// Kernel `fork(2)` then accesses in the child: a region of `bytes`, every page written, is
/// forked; the child `touch`es each page of `order` in that order (a COW fault per page for
/// writes; for reads nothing but TLB misses, the PTEs were copied at the fork), timing
/// itself, and reports through a shared page. Returns the fork latency seen by the parent
/// and the child's access time.
pub fn kernel_fork_child_touch(bytes: usize, order: &[usize], touch: Touch) -> io::Result<ForkTouch> {
    let region = Mapping::populated(region_len(bytes)?)?;
    let shared = Mapping::map(PAGE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1)?;
    // SAFETY: the page is zero-filled (a valid `ChildReport`: atomics of zero), page-aligned,
    // shared with the child, and outlives `report` (both live to the end of this function).
    let report: &ChildReport = unsafe { &*shared.ptr.cast::<ChildReport>() };
    let region_ref = &region;
    let t = Instant::now();
    let child = fork_child(move || {
        let start = Instant::now();
        let mut sum = 0u64;
        match touch {
            Touch::Read => {
                for &p in order {
                    sum = sum.wrapping_add(region_ref.read_page(p));
                }
            }
            Touch::Write => {
                for (k, &p) in order.iter().enumerate() {
                    region_ref.write_page(p, k as u64);
                }
            }
        }
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        report.sum.store(sum, Ordering::Relaxed);
        report.nanos.store(nanos, Ordering::Relaxed);
        report.done.store(1, Ordering::Release);
        0
    })?;
    let fork = t.elapsed();
    child.wait()?;
    if report.done.load(Ordering::Acquire) != 1 {
        return Err(io::Error::other("the fork(2) child did not report its time"));
    }
    std::hint::black_box(report.sum.load(Ordering::Relaxed));
    Ok(ForkTouch { fork, touches: Duration::from_nanos(report.nanos.load(Ordering::Relaxed)) })
}

/// Kernel COW write faults in the *parent* in a given order: a region of `bytes`, every page
/// written, is forked; the child blocks on a pipe (so every page stays shared) while the
/// parent writes one word to each page of `order`, in that order. Returns the writes' time.
pub fn kernel_fork_parent_write(bytes: usize, order: &[usize]) -> io::Result<Duration> {
    let region = Mapping::populated(region_len(bytes)?)?;
    let (release_r, release_w) = pipe()?;
    let rfd = release_r.as_raw_fd();
    let child = fork_child(|| {
        read_byte(rfd);
        0
    })?;
    let t = Instant::now();
    for (k, &p) in order.iter().enumerate() {
        region.write_page(p, k as u64);
    }
    let elapsed = t.elapsed();
    write_bytes(&release_w, 1)?;
    child.wait()?;
    Ok(elapsed)
}

// The same-thread floor: what the kernel charges for one userfaultfd fault served in the
// faulting thread (UFFD_FEATURE_SIGBUS): the SIGBUS delivery, one UFFDIO_COPY of a source
// page in the handler, and the return. The handler finds its userfaultfd, region and source
// page through these statics, set by `sigbus_copy_floor` for the measurement only.
static FLOOR_UFFD: AtomicPtr<Uffd> = AtomicPtr::new(ptr::null_mut());
static FLOOR_BASE: AtomicUsize = AtomicUsize::new(0);
static FLOOR_LEN: AtomicUsize = AtomicUsize::new(0);
static FLOOR_SRC: AtomicUsize = AtomicUsize::new(0);
/// The source is a region as large as the measured one, page `p` copied from its page `p`
/// (each fault copies bytes of its own, cold), rather than one (hot) page for every fault.
static FLOOR_SRC_REGION: AtomicBool = AtomicBool::new(false);

/// Writes a message to stderr and aborts; async-signal-safe.
fn floor_die(msg: &str) -> ! {
    // SAFETY: write(2) from a live byte slice; abort(3) ends the process at once. Both are
    // async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::abort()
    }
}

/// The floor's SIGBUS handler: one UFFDIO_COPY of the source page to the faulting page.
/// A SIGBUS outside the measured region is a bug of the benchmark: it aborts loudly.
extern "C" fn floor_on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: `__errno_location` returns this thread's errno slot, always valid; the
    // interrupted code must find its errno as it left it.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid `siginfo_t`; a SIGBUS
    // carries the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    let uffd = FLOOR_UFFD.load(Ordering::Acquire);
    let (base, len) = (FLOOR_BASE.load(Ordering::Relaxed), FLOOR_LEN.load(Ordering::Relaxed));
    if uffd.is_null() || addr < base || addr >= base + len {
        floor_die("bench: SIGBUS outside the same-thread floor's region\n");
    }
    let page = addr & !(PAGE - 1);
    let src =
        FLOOR_SRC.load(Ordering::Relaxed) + if FLOOR_SRC_REGION.load(Ordering::Relaxed) { page - base } else { 0 };
    // SAFETY: `uffd` points to the `Uffd` of the running `sigbus_copy_floor`, which clears
    // this pointer (restoring the previous handler first) before that `Uffd` is dropped;
    // the source is a live readable mapping owned by the same call: one page, or a region
    // as large as the measured one (then `page - base` is within it).
    let copied = unsafe { (*uffd).copy(page, src, PAGE, false) };
    if copied.is_err() {
        floor_die("bench: UFFDIO_COPY failed in the same-thread floor's handler\n");
    }
    // SAFETY: as above; restores the interrupted code's errno.
    unsafe { *libc::__errno_location() = errno };
}

/// Restores the previous SIGBUS action, then clears the handler's statics, when dropped.
struct FloorHandler {
    prev: libc::sigaction,
}

impl FloorHandler {
    fn install(uffd: &Uffd, base: usize, len: usize, src: usize) -> io::Result<FloorHandler> {
        FLOOR_BASE.store(base, Ordering::Relaxed);
        FLOOR_LEN.store(len, Ordering::Relaxed);
        FLOOR_SRC.store(src, Ordering::Relaxed);
        FLOOR_UFFD.store(uffd as *const Uffd as *mut Uffd, Ordering::Release);
        // SAFETY: zeroed sigaction structs are valid "no handler" values; ours is filled
        // before sigaction(2) reads it, and the kernel writes the previous one into `prev`.
        // The handler is async-signal-safe (loads, one ioctl, errno).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = floor_on_sigbus as *const () as usize;
            // As the engine's own handler: SA_SIGINFO | SA_NODEFER, on the thread's stack.
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut prev: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &sa, &mut prev) != 0 {
                FLOOR_UFFD.store(ptr::null_mut(), Ordering::Release);
                return Err(io::Error::last_os_error());
            }
            Ok(FloorHandler { prev })
        }
    }
}

impl Drop for FloorHandler {
    fn drop(&mut self) {
        // SAFETY: puts back the action sigaction(2) reported at install (the engine's
        // handler, or the default); `prev` is a valid sigaction.
        unsafe { libc::sigaction(libc::SIGBUS, &self.prev, ptr::null_mut()) };
        FLOOR_UFFD.store(ptr::null_mut(), Ordering::Release);
    }
}

/// The same-thread floor, measured: for each order, a fresh region of `bytes` registered
/// (MISSING) with a userfaultfd opened with `UFFD_FEATURE_SIGBUS`; this thread reads one
/// word of each page of the order, and each read's SIGBUS is served in this thread by a
/// handler that does one UFFDIO_COPY of a source page. Returns the total time of the reads
/// and the number of faults.
///
/// Replaces the process's SIGBUS action for the measurement (restored before returning):
/// no cowarena arena may be faulting meanwhile — call it while none is alive.
pub fn sigbus_copy_floor(bytes: usize, orders: &[Vec<usize>]) -> io::Result<(Duration, usize)> {
    sigbus_copy_floor_from(bytes, orders, false)
}

/// [`sigbus_copy_floor`] with each fault copying its own page's bytes from a populated
/// source region of the same size (`own_bytes`), as a fault of a fork must: the source is
/// then cold for a random order, where the one source page of the plain floor stays in
/// cache. Reported beside the floor, to tell the copy's cost from ours.
pub fn sigbus_copy_floor_from(bytes: usize, orders: &[Vec<usize>], own_bytes: bool) -> io::Result<(Duration, usize)> {
    let len = region_len(bytes)?;
    let uffd = Uffd::open(cowarena::__bench::FEATURE_SIGBUS, 0).map_err(uffd_err)?;
    let src = Mapping::populated(if own_bytes { len } else { PAGE })?;
    FLOOR_SRC_REGION.store(own_bytes, Ordering::Relaxed);
    let (mut total, mut faults) = (Duration::ZERO, 0);
    for order in orders {
        let region = Mapping::anon(len)?;
        uffd.register_modes(region.ptr as usize, len, true, false)?;
        let handler = FloorHandler::install(&uffd, region.ptr as usize, len, src.ptr as usize)?;
        let t = Instant::now();
        let mut sum = 0u64;
        for &p in order {
            sum = sum.wrapping_add(region.read_page(p));
        }
        total += t.elapsed();
        drop(handler);
        faults += order.len();
        std::hint::black_box(sum);
        if let Some(&p) = order.first() {
            if region.read_page(p) != src.read_page(if own_bytes { p } else { 0 }) {
                return Err(io::Error::other("same-thread floor: a page did not receive the source page"));
            }
        }
        // `region` is unmapped here, before `uffd` closes (declared first, dropped last).
    }
    Ok((total, faults))
}

/// The copy floor of a fork that is then read through a view: one UFFDIO_COPY (one call,
/// retried only if the kernel stops part-way) of a populated region of `bytes` into a fresh
/// registered region. Returns the copy's time.
pub fn uffd_copy_all(bytes: usize) -> io::Result<Duration> {
    uffd_copy_in(bytes, usize::MAX)
}

/// As [`uffd_copy_all`], in `UFFDIO_COPY` calls of at most `piece` bytes each (one huge
/// call is not always the fastest: on 6.18 a 1 GiB call can take twice as long as 2 MiB
/// pieces).
pub fn uffd_copy_in(bytes: usize, piece: usize) -> io::Result<Duration> {
    let len = region_len(bytes)?;
    let uffd = Uffd::open(0, 0).map_err(uffd_err)?;
    let src = Mapping::populated(len)?;
    let dst = Mapping::anon(len)?;
    uffd.register_modes(dst.ptr as usize, len, true, false)?;
    let t = Instant::now();
    let mut copied = true;
    let mut off = 0;
    while off < len && copied {
        let n = piece.min(len - off);
        // SAFETY: `src` is a live, populated, readable mapping of `len` bytes; `dst` is
        // registered with this userfaultfd and untouched (no page present) at `off..off+n`.
        copied = unsafe { uffd.copy(dst.ptr as usize + off, src.ptr as usize + off, n, false) }?;
        off += n;
    }
    let elapsed = t.elapsed();
    let last = dst.pages() - 1;
    if !copied || dst.read_page(last) != src.read_page(last) {
        return Err(io::Error::other("copy floor: the batched UFFDIO_COPY did not fill the region"));
    }
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------
// W6: a snapshot streamed out while writers go on
// ---------------------------------------------------------------------------------------

/// What one streamed snapshot cost: from just before the fork to the last byte written,
/// and the writers' stores over that window.
#[derive(Clone, Copy, Debug)]
pub struct Streamed {
    pub time: Duration,
    pub stores: u64,
}

/// Runs `writers` threads storing random words into `base..base+len` (thread `t` owns the
/// words `≡ t` mod `writers`) while `body` runs; returns `body`'s result, its time and the
/// stores made meanwhile. The threads are started (and storing) before `body` begins.
pub fn with_writers<R>(base: usize, len: usize, writers: usize, body: impl FnOnce() -> R) -> (R, Duration, u64) {
    let stop = AtomicBool::new(false);
    let counts: Vec<AtomicU64> = (0..writers).map(|_| AtomicU64::new(0)).collect();
    let started = AtomicUsize::new(0);
    thread::scope(|s| {
        for t in 0..writers {
            let (stop, counts, started) = (&stop, &counts, &started);
            s.spawn(move || {
                let mut rng = Rng::new(0x57e4 + t as u64);
                let words = len / 8 / writers;
                started.fetch_add(1, Ordering::Release);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        let w = rng.below(words) * writers + t;
                        // SAFETY: `w * 8 + 8 <= len`: inside the caller's mapping, which
                        // outlives this scope; each word has one writer.
                        unsafe { ((base + w * 8) as *mut u64).write_volatile(n) };
                        n += 1;
                    }
                    counts[t].store(n, Ordering::Relaxed);
                }
            });
        }
        while started.load(Ordering::Acquire) < writers {
            thread::yield_now();
        }
        thread::sleep(Duration::from_millis(20)); // the writers are in their loops
        let before: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let t = Instant::now();
        let r = body();
        let time = t.elapsed();
        let after: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        stop.store(true, Ordering::Relaxed);
        (r, time, after - before)
    })
}

/// The kernel peer of `Space::write_to` under writers: a region of `bytes`, every page
/// written, with two threads storing into it; `fork(2)`, and the child `write(2)`s the
/// whole region to `path` and exits. Timed from the fork to the child's exit.
pub fn kernel_fork_stream(bytes: usize, path: &std::path::Path) -> io::Result<Streamed> {
    let region = Mapping::populated(region_len(bytes)?)?;
    let file = std::fs::File::create(path)?;
    let fd = file.as_raw_fd();
    let (base, len) = (region.ptr as usize, region.len);
    let (r, time, stores) = with_writers(base, len, 2, || -> io::Result<()> {
        let child = fork_child(move || {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(1 << 20);
                // SAFETY: write(2) from the child's copy of the region, inside the mapping.
                let w = unsafe { libc::write(fd, (base + off) as *const libc::c_void, n) };
                if w <= 0 {
                    return 1;
                }
                off += w as usize;
            }
            0
        })?;
        child.wait()
    });
    r?;
    drop(file);
    if std::fs::metadata(path)?.len() != len as u64 {
        return Err(io::Error::other("the fork(2) child did not write the whole region"));
    }
    Ok(Streamed { time, stores })
}
