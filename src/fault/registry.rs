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

/// An immutable, sorted array of address ranges `[base, end)`: one arena's views, as the
/// SIGBUS handler sees them.
pub struct Ranges {
    ranges: Box<[(usize, usize)]>,
    /// Set instead of freeing under loom, so the model can see a use after "free".
    #[cfg(loom)]
    retired: crate::sync::AtomicUsize,
}

impl Ranges {
    /// Does a range contain `addr`? (Binary search; no allocation.)
    fn contains(&self, addr: usize) -> bool {
        #[cfg(loom)]
        assert_eq!(self.retired.load(Ordering::SeqCst), 0, "handler used a freed range array");
        let i = self.ranges.partition_point(|&(base, _)| base <= addr);
        i > 0 && addr < self.ranges[i - 1].1
    }
}

/// What [`RangeIndex::lookup`] knows about an address.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lookup {
    /// In one of the published ranges.
    In,
    /// In none of them.
    Out,
    /// Nothing is published (the last rebuild could not allocate): ask under the lock.
    Unknown,
}

/// The address ranges of one arena's views, readable from a signal handler without any
/// lock: a pointer to an immutable [`Ranges`] array, replaced (under the arena lock) each
/// time a view is added or removed, and a count of readers in flight, so that an old array
/// is freed only once no reader can still hold it.
///
/// The same store-buffering protocol as [`Registry`]: a reader announces itself, fences,
/// then loads the pointer; the writer swaps the pointer, fences, then waits for the count
/// to drain. A reader never waits while announced, so the writer's wait is short.
pub struct RangeIndex {
    current: AtomicPtr<Ranges>,
    readers: AtomicUsize,
}

impl RangeIndex {
    pub fn new() -> Self {
        RangeIndex { current: AtomicPtr::new(std::ptr::null_mut()), readers: AtomicUsize::new(0) }
    }

    /// Is `addr` in one of the published ranges? Async-signal-safe and lock-free.
    pub fn lookup(&self, addr: usize) -> Lookup {
        self.readers.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let p = self.current.load(Ordering::SeqCst);
        let r = if p.is_null() {
            Lookup::Unknown
        } else {
            // SAFETY: `p` was published by `publish` and is freed only after a `publish`
            // that replaced it saw `readers == 0`; we announced ourselves (and fenced)
            // before loading it.
            match unsafe { &*p }.contains(addr) {
                true => Lookup::In,
                false => Lookup::Out,
            }
        };
        self.readers.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Replace the published ranges (sorted by base, disjoint) with `ranges` — or with
    /// nothing (`None`: lookups answer [`Lookup::Unknown`]). Writers must be serialised
    /// (the arena lock). Waits until no reader can hold the old array, then frees it.
    pub fn publish(&self, ranges: Option<Box<[(usize, usize)]>>) {
        let new = match ranges {
            Some(ranges) => Box::into_raw(Box::new(Ranges {
                ranges,
                #[cfg(loom)]
                retired: crate::sync::AtomicUsize::new(0),
            })),
            None => std::ptr::null_mut(),
        };
        let old = self.current.swap(new, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if old.is_null() {
            return;
        }
        while self.readers.load(Ordering::SeqCst) != 0 {
            crate::sync::spin_yield();
        }
        Self::free(old);
    }

    fn free(p: *mut Ranges) {
        #[cfg(loom)]
        {
            // SAFETY: leaked on purpose under loom; `p` came from `Box::into_raw`.
            unsafe { &*p }.retired.store(1, Ordering::SeqCst);
        }
        #[cfg(not(loom))]
        // SAFETY: `p` came from `Box::into_raw` in `publish`, is no longer published, and
        // no reader holds it (the caller waited for `readers == 0` after unpublishing).
        drop(unsafe { Box::from_raw(p) });
    }
}

impl Default for RangeIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RangeIndex {
    fn drop(&mut self) {
        // The owner is unregistered before it is dropped: no handler can reach us.
        let p = self.current.load(Ordering::SeqCst);
        if !p.is_null() {
            Self::free(p);
        }
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
    /// A handler looking an address up while the arena republishes its ranges twice never
    /// reads a freed array, and sees the address either in the old or the new array.
    #[test]
    fn registry_range_index_never_uses_a_freed_array() {
        loom::model(|| {
            let idx = Arc::new(RangeIndex::new());
            idx.publish(Some(vec![(0x1000, 0x3000)].into_boxed_slice()));
            let reader = {
                let idx = idx.clone();
                loom::thread::spawn(move || idx.lookup(0x2000))
            };
            idx.publish(Some(vec![(0x1000, 0x3000), (0x8000, 0x9000)].into_boxed_slice()));
            idx.publish(None);
            let seen = reader.join().unwrap();
            assert!(seen == Lookup::In || seen == Lookup::Unknown, "{seen:?}");
        });
    }
}
