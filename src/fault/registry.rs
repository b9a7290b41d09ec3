//! The registry the SIGBUS handler searches for the arena owning a faulting address: a
//! fixed array of atomic pointers (no allocation, no lock) and a count of handlers in
//! flight, so that an arena can be freed only after no handler can still be using it.
//!
//! The protocol is a store-buffering pattern — the handler announces itself then reads a
//! slot; `unregister` clears the slot then reads the announcement count — so each side
//! needs a sequentially consistent fence between its write and its read; with only
//! acquire/release both could read stale values and a handler could use a freed arena.
//! `loom` checks it (`RUSTFLAGS="--cfg loom" cargo test --release --lib registry`).

use crate::sync::{fence, AtomicPtr, AtomicUsize, Ordering};

pub struct Registry<T, const N: usize> {
    slots: [AtomicPtr<T>; N],
    in_flight: AtomicUsize,
}

impl<T, const N: usize> Registry<T, N> {
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Registry { slots: [const { AtomicPtr::new(std::ptr::null_mut()) }; N], in_flight: AtomicUsize::new(0) }
    }

    #[cfg(loom)]
    pub fn new() -> Self {
        Registry {
            slots: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Publish `p`; returns its slot, or `None` when every slot is taken.
    pub fn register(&self, p: *const T) -> Option<usize> {
        let p = p as *mut T;
        self.slots
            .iter()
            .position(|s| s.compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire).is_ok())
    }

    /// Withdraw a slot, then wait until no handler can still be looking at its pointer.
    /// After this returns, the pointee may be freed.
    pub fn unregister(&self, slot: usize) {
        self.slots[slot].store(std::ptr::null_mut(), Ordering::SeqCst);
        fence(Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            crate::sync::spin_yield();
        }
    }

    /// Call `f` on each published pointee until it returns `Some`. The pointees stay alive
    /// for the duration (see [`Registry::unregister`]).
    pub fn find<R>(&self, mut f: impl FnMut(&T) -> Option<R>) -> Option<R> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let mut found = None;
        for slot in &self.slots {
            let p = slot.load(Ordering::SeqCst);
            if p.is_null() {
                continue;
            }
            // SAFETY: `p` was published by `register` and is freed only after `unregister`
            // saw `in_flight == 0`; we announced ourselves (and fenced) before loading it.
            if let Some(r) = f(unsafe { &*p }) {
                found = Some(r);
                break;
            }
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        found
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;

    struct Arena {
        freed: AtomicBool,
    }

    /// A handler racing with the arena's teardown never sees a freed arena.
    #[test]
    fn registry_handler_never_uses_a_freed_arena() {
        loom::model(|| {
            let reg: Arc<Registry<Arena, 2>> = Arc::new(Registry::new());
            let arena = Arc::new(Arena { freed: AtomicBool::new(false) });
            let slot = reg.register(Arc::as_ptr(&arena)).unwrap();
            let handler = {
                let reg = reg.clone();
                loom::thread::spawn(move || {
                    reg.find(|a: &Arena| {
                        assert!(!a.freed.load(Ordering::SeqCst), "handler used a freed arena");
                        Some(())
                    })
                })
            };
            reg.unregister(slot);
            arena.freed.store(true, Ordering::SeqCst);
            handler.join().unwrap();
        });
    }

    /// Two arenas registering at once get distinct slots; a full registry refuses.
    #[test]
    fn registry_slots_are_exclusive() {
        loom::model(|| {
            let reg: Arc<Registry<u8, 2>> = Arc::new(Registry::new());
            let (a, b) = (Box::into_raw(Box::new(1u8)), Box::into_raw(Box::new(2u8)));
            let (pa, pb) = (a as usize, b as usize);
            let t = {
                let reg = reg.clone();
                loom::thread::spawn(move || reg.register(pa as *const u8))
            };
            let sb = reg.register(pb as *const u8);
            let sa = t.join().unwrap();
            assert!(sa.is_some() && sb.is_some() && sa != sb);
            assert_eq!(reg.register(pa as *const u8), None);
            // SAFETY: both boxes were leaked above and are freed once.
            unsafe {
                drop(Box::from_raw(a));
                drop(Box::from_raw(b));
            }
        });
    }
}
