//! Same-thread fault serving: the SIGBUS callback and the registry of arenas it searches.
//!
//! Async-signal-safe by construction: the registry is a fixed array of atomics; the arena
//! lock is taken with [`Core::lock_spin`]; the fault path allocates nothing as long as
//! [`Mm::has_headroom`](crate::mm::Mm::has_headroom) holds, and when it does not, the
//! handler asks the engine thread to refill (an eventfd write) and waits for it.

use std::sync::atomic::{AtomicPtr, Ordering};

use super::Core;
use crate::mm::{FaultKind, PAGE_SIZE};
use crate::sys::signal::{self, Outcome};

/// Arenas in signal mode (a process rarely has more than a few).
pub const MAX_ARENAS: usize = 64;

static ARENAS: [AtomicPtr<Core>; MAX_ARENAS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_ARENAS];

/// Register an arena's core; returns its slot, or `None` when all slots are taken.
pub fn register(core: &Core) -> Option<usize> {
    let p = core as *const Core as *mut Core;
    ARENAS.iter().position(|s| s.compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire).is_ok())
}

/// Unregister, then wait until no handler can still be looking at `core`.
pub fn unregister(slot: usize) {
    ARENAS[slot].store(std::ptr::null_mut(), Ordering::Release);
    while signal::IN_FLIGHT.load(Ordering::Acquire) != 0 {
        signal::yield_now();
    }
}

/// The SIGBUS callback.
pub fn on_fault(addr: usize, cpu_says_write: bool) -> Outcome {
    let page_addr = addr & !(PAGE_SIZE - 1);
    for slot in &ARENAS {
        let p = slot.load(Ordering::Acquire);
        if p.is_null() {
            continue;
        }
        // SAFETY: a registered core stays alive until `unregister` has waited for every
        // running handler (`IN_FLIGHT`), and this handler is counted.
        let core = unsafe { &*p };
        loop {
            let mut mm = core.lock_spin();
            let Some((sp, page)) = mm.space_at(page_addr) else { break };
            if !mm.has_headroom() {
                drop(mm);
                let _ = core.refill.signal();
                signal::yield_now();
                continue;
            }
            // A fault on a page we already mapped (read-only) can only be a write.
            let write = cpu_says_write || mm.is_present(sp, page);
            let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                core.fault_in(&mut mm, sp, page, write)
            })) {
                Ok(r) => r,
                Err(_) => {
                    core.faults_failed.fetch_add(1, Ordering::Relaxed);
                    return Outcome::Failed("a panic in the fault path");
                }
            };
            if !mm.has_headroom() {
                let _ = core.refill.signal();
            }
            drop(mm);
            return match r {
                Ok(FaultKind::Spurious) | Ok(_) => Outcome::Handled,
                Err(crate::Error::CapacityExhausted { .. }) => {
                    core.faults_failed.fetch_add(1, Ordering::Relaxed);
                    Outcome::Failed("arena capacity exhausted (Arena::builder().max_memory)")
                }
                Err(_) => {
                    core.faults_failed.fetch_add(1, Ordering::Relaxed);
                    Outcome::Failed("a userfaultfd ioctl failed")
                }
            };
        }
    }
    Outcome::NotOurs
}
