//! Synchronisation primitives, from `loom` under `--cfg loom` (model checking) and from
//! `std` otherwise — the crossbeam-style shim for the lock-free parts.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicPtr, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicPtr, AtomicUsize, Ordering};

/// Yield while spinning (async-signal-safe outside loom).
pub(crate) fn spin_yield() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    crate::sys::signal::yield_now();
}
