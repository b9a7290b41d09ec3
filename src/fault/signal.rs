//! Same-thread fault serving: the SIGBUS callback and the registry of arenas it searches.
//!
//! Async-signal-safe by construction: the registry is a fixed array of atomics; the owner
//! of an address is found through each arena's lock-free view index (no lock taken); only
//! the owner's lock is taken, with [`Core::lock_spin`] (a bounded spin, then a futex
//! sleep, refused when this thread holds it already); the fault path allocates nothing as
//! long as [`Mm::has_headroom`](crate::mm::Mm::has_headroom) holds, and when it does not,
//! the handler asks the engine thread to refill (an eventfd write) and waits for it — a
//! bounded time once refills are failing, then it dies naming the errno.

use std::sync::atomic::Ordering;

use super::registry::Registry;
use super::Core;
use crate::mm::PAGE_SIZE;
use crate::sys::signal::{self, Outcome};

/// Arenas in signal mode (a process rarely has more than a few).
pub const MAX_ARENAS: usize = 64;

#[cfg(not(loom))]
static ARENAS: Registry<Core, MAX_ARENAS> = Registry::new();

#[cfg(not(loom))]
fn arenas() -> &'static Registry<Core, MAX_ARENAS> {
    &ARENAS
}

#[cfg(loom)]
fn arenas() -> &'static Registry<Core, MAX_ARENAS> {
    unreachable!("the signal fault mode is not modelled under loom; the registry is, in registry.rs")
}

/// Register an arena's core; returns its slot, or `None` when all slots are taken.
pub fn register(core: &Core) -> Option<usize> {
    arenas().register(core)
}

/// Unregister, then wait until no handler can still be looking at `core`.
pub fn unregister(slot: usize) {
    arenas().unregister(slot)
}

/// The SIGBUS callback.
pub fn on_fault(addr: usize, cpu_says_write: bool) -> Outcome {
    let page_addr = addr & !(PAGE_SIZE - 1);
    arenas().find(|core| serve_in(core, page_addr, cpu_says_write)).unwrap_or(Outcome::NotOurs)
}

/// How long a handler waits for headroom once refills are failing, and how many failed
/// refills it sees before giving up: the reader thread retries each request, so a few
/// failures in a row mean memory really cannot be had.
const REFILL_WAIT_NS: u64 = 1_000_000_000;
const REFILL_FAILURES: u32 = 3;

/// Serve the fault if `addr` is in one of `core`'s views; `None` when it is not.
///
/// The owner is found by address *without* taking any arena's lock (the lock-free view
/// index): an arena busy with a long operation never delays faults on other arenas. Only
/// the owner's lock is taken, and `space_at` is checked again under it (a view removed
/// meanwhile is no longer ours).
fn serve_in(core: &Core, page_addr: usize, cpu_says_write: bool) -> Option<Outcome> {
    // An arena inherited through fork(2) has no view mapped here (and its lock may be held
    // by a thread that does not exist in this process): never ours.
    if !core.in_owner_process() {
        return None;
    }
    use super::registry::Lookup;
    let known = match core.sig.index.lookup(page_addr) {
        Lookup::Out => return None,
        Lookup::In => true,
        Lookup::Unknown => false,
    };
    // (start of the wait for headroom, failed refills seen then)
    let mut waiting: Option<(u64, u32)> = None;
    loop {
        let Some(mut mm) = core.lock_spin() else {
            core.faults_failed.fetch_add(1, Ordering::Relaxed);
            return Some(Outcome::Failed(if known {
                "a fault on a view of this arena while this thread holds its lock: a tracing subscriber \
                 or allocator callback touched view memory during a cowarena call"
            } else {
                "a fault on a view while this thread holds an arena lock: a tracing subscriber or \
                 allocator callback touched view memory during a cowarena call"
            }));
        };
        let (sp, page) = mm.space_at(page_addr)?;
        if !mm.has_headroom() {
            let gen = core.sig.refills.load(Ordering::Acquire);
            drop(mm);
            let failures = core.sig.refill_failures.load(Ordering::Acquire);
            let now = signal::monotonic_ns();
            let (since, failures_then) = *waiting.get_or_insert((now, failures));
            let errno = core.sig.refill_errno.load(Ordering::Acquire);
            if errno != 0 && (failures.wrapping_sub(failures_then) >= REFILL_FAILURES || now - since > REFILL_WAIT_NS) {
                core.faults_failed.fetch_add(1, Ordering::Relaxed);
                return Some(Outcome::Failed(refill_failure_reason(
                    errno,
                    core.sig.refill_alloc.load(Ordering::Relaxed),
                )));
            }
            let _ = core.refill.signal();
            // Leave the lock to the refiller (the reader thread only `try_lock`s, retrying
            // every 1 ms): wait for a refill to happen, a bounded time, before locking again.
            let t = signal::monotonic_ns();
            while core.sig.refills.load(Ordering::Acquire) == gen && signal::monotonic_ns() - t < 2_000_000 {
                signal::yield_now();
            }
            continue;
        }
        // A fault on a page we already mapped (read-only) can only be a write.
        let write = cpu_says_write || mm.is_present(sp, page);
        let served =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.fault_in_around(&mut mm, sp, page, write)));
        // Ask for a refill at half the headroom (once), long before a fault must wait for
        // one (above): a fault that finds none waits for the reader thread, which must
        // find the lock free and otherwise retries every millisecond.
        let ask = !mm.has_headroom()
            || crate::sys::inject::hit(crate::sys::inject::Point::AskRefill).is_some()
            || (mm.wants_refill() && !core.sig.refill_asked.swap(true, Ordering::AcqRel));
        if ask {
            let _ = core.refill.signal();
        }
        drop(mm);
        let failed = |why| {
            core.faults_failed.fetch_add(1, Ordering::Relaxed);
            Some(Outcome::Failed(why))
        };
        return match served {
            Ok(Ok(_)) => Some(Outcome::Handled),
            Ok(Err(crate::Error::CorruptPage { .. })) => failed(
                "a page of a space loaded from an image failed its checksum: the image file is damaged or was \
                 changed after it was saved",
            ),
            Ok(Err(crate::Error::SwapIo { .. })) => failed(
                "an evicted page could not be read back from the arena's swap file (I/O error, or the file \
                 was truncated): it is not replaced by zeros",
            ),
            Ok(Err(crate::Error::CapacityExhausted { .. })) => {
                failed("arena memory limit reached (Arena::builder().max_memory counts written pages and read-only copies in views)")
            }
            Ok(Err(e)) => {
                // Name the call and its errno (no formatting machinery: a stack buffer).
                if let crate::Error::Os { op, source } | crate::Error::MappingLimit { op, source } = &e {
                    let mut buf = [0u8; 12];
                    signal::write_stderr(&[
                        "cowarena: ",
                        op,
                        " failed with errno ",
                        decimal(source.raw_os_error().unwrap_or(0), &mut buf),
                        "\n",
                    ]);
                }
                failed("a userfaultfd ioctl failed")
            }
            Err(_) => failed("a panic in the fault path"),
        };
    }
}

/// `v` in decimal, written into `buf` (signal-safe: no allocation).
fn decimal(v: i32, buf: &mut [u8; 12]) -> &str {
    let (mut n, mut i) = (v.unsigned_abs(), buf.len());
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("?")
}

/// A static reason (signal context: no formatting) naming the errno of a failed refill.
fn refill_failure_reason(errno: i32, alloc: bool) -> &'static str {
    match (alloc, errno) {
        (true, _) => "cannot allocate memory for the fault path's bookkeeping: ENOMEM (RLIMIT_AS or memory exhausted?)",
        (false, libc::ENOMEM) => {
            "cannot map memory for the fault path: mmap failed with ENOMEM (RLIMIT_AS, vm.max_map_count \
             or memory exhausted?)"
        }
        (false, libc::EAGAIN) => "cannot map memory for the fault path: mmap failed with EAGAIN (locked memory limit?)",
        (false, libc::EPERM) => "cannot map memory for the fault path: mmap failed with EPERM",
        (false, _) => "cannot map memory for the fault path: mmap failed",
    }
}
