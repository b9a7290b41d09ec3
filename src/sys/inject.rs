//! Fault injection for tests (cargo feature `fault-injection`): make the next N calls at an
//! injection point fail with an errno (or, for [`Point::FaultPath`], panic). Lock-free and
//! allocation-free, so it is safe on the signal-handler fault path. Without the feature,
//! [`hit`] is a constant `None` and compiles away.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

/// Where a failure can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// `UFFDIO_COPY` (fills of view pages).
    UffdCopy = 0,
    /// `UFFDIO_WRITEPROTECT` (un-protect on write faults, protect for mkclean/aging).
    UffdWriteprotect = 1,
    /// The start of every fault served (the armed errno is ignored: it panics).
    FaultPath = 2,
    /// `UFFDIO_MOVE` (taking an exclusive frame's page into a view on a write fault).
    UffdMove = 3,
    /// The signal handler asks the engine to refill the fault path's headroom after the
    /// fault it serves, needed or not (the armed errno is ignored).
    AskRefill = 4,
    /// The engine's reader thread waits before it refills the headroom: the armed "errno"
    /// is the delay in milliseconds (a reader scheduled late, as on a loaded machine).
    RefillDelay = 5,
    /// Swap-file I/O: writing evicted pages out, reading one back (`sys::swap`).
    SwapIo = 6,
}

const N: usize = 7;
static ERRNO: [AtomicI32; N] = [const { AtomicI32::new(0) }; N];
static LEFT: [AtomicU32; N] = [const { AtomicU32::new(0) }; N];

/// Make the next `times` calls at `point` fail with `errno` (process-wide).
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
pub fn arm(point: Point, errno: i32, times: u32) {
    ERRNO[point as usize].store(errno, Ordering::SeqCst);
    LEFT[point as usize].store(times, Ordering::SeqCst);
}

/// Disarm every point.
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
pub fn disarm() {
    for l in &LEFT {
        l.store(0, Ordering::SeqCst);
    }
}

/// Consume one armed failure at `point`, if any: the errno to fail with. Like the failing
/// libc call it stands for, it also leaves that value in this thread's `errno`.
#[inline]
pub fn hit(point: Point) -> Option<i32> {
    if !cfg!(feature = "fault-injection") {
        return None;
    }
    let left = &LEFT[point as usize];
    let mut n = left.load(Ordering::SeqCst);
    while n > 0 {
        match left.compare_exchange(n, n - 1, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => {
                let errno = ERRNO[point as usize].load(Ordering::SeqCst);
                // SAFETY: `__errno_location` returns this thread's errno slot, always valid;
                // writing it is async-signal-safe.
                unsafe { *libc::__errno_location() = errno };
                return Some(errno);
            }
            Err(cur) => n = cur,
        }
    }
    None
}
