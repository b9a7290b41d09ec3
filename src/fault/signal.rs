//! Same-thread fault serving: the SIGBUS callback and the registry of arenas it searches.
//!
//! Async-signal-safe by construction: the registry is a fixed array of atomics; the arena
//! lock is taken with [`Core::lock_spin`]; the fault path allocates nothing as long as
//! [`Mm::has_headroom`](crate::mm::Mm::has_headroom) holds, and when it does not, the
//! handler asks the engine thread to refill (an eventfd write) and waits for it.

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

/// Serve the fault if `addr` is in one of `core`'s views; `None` when it is not.
fn serve_in(core: &Core, page_addr: usize, cpu_says_write: bool) -> Option<Outcome> {
    // An arena inherited through fork(2) has no view mapped here (and its lock may be held
    // by a thread that does not exist in this process): never ours.
    if !core.in_owner_process() {
        return None;
    }
    loop {
        let Some(mut mm) = core.lock_spin() else {
            core.faults_failed.fetch_add(1, Ordering::Relaxed);
            return Some(Outcome::Failed("a fault on a view while this thread holds the arena lock (a cowarena bug)"));
        };
        let (sp, page) = mm.space_at(page_addr)?;
        if !mm.has_headroom() {
            drop(mm);
            let _ = core.refill.signal();
            signal::yield_now();
            continue;
        }
        // A fault on a page we already mapped (read-only) can only be a write.
        let write = cpu_says_write || mm.is_present(sp, page);
        let served =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.fault_in_around(&mut mm, sp, page, write)));
        if !mm.has_headroom() || crate::sys::inject::hit(crate::sys::inject::Point::AskRefill).is_some() {
            let _ = core.refill.signal();
        }
        drop(mm);
        let failed = |why| {
            core.faults_failed.fetch_add(1, Ordering::Relaxed);
            Some(Outcome::Failed(why))
        };
        return match served {
            Ok(Ok(_)) => Some(Outcome::Handled),
            Ok(Err(crate::Error::CapacityExhausted { .. })) => {
                failed("arena capacity exhausted (Arena::builder().max_memory)")
            }
            Ok(Err(_)) => failed("a userfaultfd ioctl failed"),
            Err(_) => failed("a panic in the fault path"),
        };
    }
}
