//! Synchronisation primitives, from `loom` under `--cfg loom` (model checking) and from
//! `std` otherwise — the crossbeam-style shim for the lock-free parts.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicI32, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicI32, AtomicPtr, AtomicU32, AtomicUsize, Ordering};

/// Yield while spinning (async-signal-safe outside loom).
pub(crate) fn spin_yield() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    crate::sys::signal::yield_now();
}

/// A busy-wait hint (`pause` on x86-64; a yield point under loom).
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(loom)]
    loom::hint::spin_loop();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}
