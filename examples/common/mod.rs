//! Helpers shared by the `snapshot_kv`, `fuzz_reset` and `branching_search` examples:
//! argument parsing, a deterministic PRNG, process memory figures, a leak check, and a
//! small, careful wrapper around `fork(2)` for the kernel baselines.
//!
//! Include with `#[path = "common/mod.rs"] mod common;` (each example uses a subset).

use std::error::Error;
use std::io;
use std::process::ExitCode;
use std::time::Duration;

use cowarena::Arena;

/// The examples' result type: any error, printed by [`main_with`].
pub type Res<T = ()> = Result<T, Box<dyn Error>>;

/// True when `--quick` was passed (the short mode `.ci/run` uses).
pub fn quick() -> bool {
    std::env::args().skip(1).any(|a| a == "--quick")
}

/// Run `body`, print its error (with its sources) and turn it into a non-zero exit status.
pub fn main_with(name: &str, body: impl FnOnce() -> Res) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name} FAILED: {e}");
            let mut src = e.source();
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// The splitmix64 finaliser: a cheap, well-mixing bijection on `u64`.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A tiny deterministic PRNG (xorshift64*); allocation-free, so a `fork(2)` child may use it.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (mixed, so small seeds give unrelated streams).
    pub fn new(seed: u64) -> Self {
        let s = mix(seed);
        Rng(if s == 0 { 0x9E37_79B9_7F4A_7C15 } else { s })
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

    /// A value in `0..n` (multiply-high reduction); 0 when `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// A field of `/proc/self/status` in bytes (`VmRSS`, `VmHWM`, ...), if present.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: u64 = line[field.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Resident set size of this process, bytes (0 if `/proc` is unreadable).
pub fn rss() -> u64 {
    proc_status_bytes("VmRSS").unwrap_or(0)
}

/// Reset the process's peak RSS (`VmHWM`) by writing 5 to `/proc/self/clear_refs`
/// (Linux 4.0+); returns false when that is not permitted.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes as MiB, for printing.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A duration in milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A duration in microseconds, for printing.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Fail unless every frame, table, view and frozen region of `arena` has been returned
/// (call it after dropping every space: the brief's invariant 5).
pub fn check_no_leak(arena: &Arena) -> Res {
    let s = arena.stats();
    let left = (s.frames_in_use, s.tables_in_use, s.views_in_use, s.frozen_regions, s.spaces_in_use);
    if left != (0, 0, 0, 0, 0) {
        return Err(format!(
            "arena leaked after every space was dropped: frames {} tables {} views {} frozen regions {} spaces {}",
            left.0, left.1, left.2, left.3, left.4
        )
        .into());
    }
    if s.faults.failed != 0 {
        return Err(format!("{} view faults could not be served", s.faults.failed).into());
    }
    Ok(())
}

/// Create a `fork(2)` child that runs `child` and leaves with `_exit(child())`; returns the
/// child's pid to the parent.
///
/// # Safety
/// This process may have other threads (writers, the arena's engine), so the child may only
/// run async-signal-safe code: no allocation, no locks, no panics that unwind (use plain
/// loads, stores and syscalls such as `write`). Memory the closure touches must be mapped
/// in the child: cowarena views are `MADV_DONTFORK` and are *absent* there.
pub unsafe fn fork_child(child: impl FnOnce() -> i32) -> io::Result<libc::pid_t> {
    // SAFETY: fork has no memory-safety preconditions of its own; what the child may do
    // afterwards is the caller's contract above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = child();
        // SAFETY: `_exit` ends the child without running the parent's atexit handlers or
        // destructors, which must not run twice.
        unsafe { libc::_exit(code) };
    }
    Ok(pid)
}

/// Wait for a child created by [`fork_child`]; an error unless it exited with status 0.
pub fn wait_child(pid: libc::pid_t) -> io::Result<()> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer; `pid` is our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else if libc::WIFEXITED(status) {
        Err(io::Error::other(format!("child {pid} exited with status {}", libc::WEXITSTATUS(status))))
    } else {
        Err(io::Error::other(format!("child {pid} was killed (wait status {status:#x})")))
    }
}

/// `write(2)` all of `buf` to `fd`, retrying short writes and EINTR; async-signal-safe
/// (a `fork(2)` child may call it). Returns false on error.
pub fn write_all_raw(fd: libc::c_int, buf: &[u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unwritten tail of `buf`.
        let n = unsafe { libc::write(fd, buf[done..].as_ptr().cast(), buf.len() - done) };
        if n > 0 {
            done += n as usize;
        } else if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return false;
        }
    }
    true
}

/// Plain anonymous memory in 4 KiB pages (`MADV_NOHUGEPAGE`, as cowarena views use), for
/// the kernel `fork(2)` baselines; unmapped on drop.
pub struct AnonMem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: `AnonMem` owns its mapping exclusively, like a `Box<[u8]>`; sharing the raw
// pointer between threads is governed by each example's own concurrency protocol.
unsafe impl Send for AnonMem {}
// SAFETY: as above: `&AnonMem` hands out only raw pointers and, through `&mut`, slices.
unsafe impl Sync for AnonMem {}

impl AnonMem {
    /// Map `len` zero-filled bytes.
    pub fn new(len: usize) -> io::Result<AnonMem> {
        // SAFETY: a fresh private anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the range is the mapping just created; the advice does not discard data.
        if unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping the mapping we created and nobody else references.
            unsafe { libc::munmap(p, len) };
            return Err(e);
        }
        Ok(AnonMem { ptr: p.cast(), len })
    }

    /// Start of the memory, for concurrent raw-pointer access.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The memory as a slice.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is live, readable and `len` bytes long while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The memory as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` excludes every other reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AnonMem {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
