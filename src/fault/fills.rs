//! The gate of fills that run with the arena lock released (`Core::fill_unlocked`).
//!
//! A fault decides its fills under the lock, marks the pages filling in the model
//! (`Mm::begin_fill`), passes the gate ([`FillGate::begin`]) and releases the lock for the
//! `UFFDIO_COPY`s, which read the frames' homes; it takes the lock again to commit, and
//! leaves ([`FillGate::end`]). Everything that would move, free or rewrite a home a fill
//! may be reading — an evacuating write, a freeze, a drop of a frame's last reference,
//! migration, compaction, the reclaim queue — first *drains* the gate
//! ([`FillGate::drain`]): with the lock held it waits, the lock released meanwhile, until
//! no fill is in flight, and while it waits no new fill may leave the lock
//! ([`FillGate::open`]), so the count reaches zero. On return the lock is held and none is
//! in flight, and none can start before the drainer lets go of the lock.
//!
//! The model's count (read under the lock) says when the drain is done; the gate's own
//! count mirrors it so that a drainer can sleep on it (`FUTEX_WAIT`) without the lock, and
//! the last fill out wakes it. Async-signal-safe: atomics and `futex(2)`, no allocation
//! (the SIGBUS handler both fills and drains).
//!
//! `loom_tests` model the protocol with the real lock and gate: a frame's last reference
//! dropped (its home freed) while other faults fill from it never races a fill's read of
//! the home, and no drainer sleeps forever.

use std::time::Duration;

use super::lock::{Guard, Park};
use crate::sync::{AtomicU32, Ordering};

/// How long a drainer sleeps before it looks at the count again: a backstop only, since
/// the last fill out wakes it.
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// See the module doc.
pub(crate) struct FillGate {
    /// Pages in flight: mirrors the model's count (both change under the lock), so that a
    /// drainer can sleep on it without the lock.
    out: AtomicU32,
    /// Drainers waiting. While any waits, no fill leaves the lock.
    drainers: AtomicU32,
    park: Park,
}

impl FillGate {
    pub(crate) fn new() -> FillGate {
        FillGate { out: AtomicU32::new(0), drainers: AtomicU32::new(0), park: Park::new() }
    }

    /// May a fill leave the lock now? (Asked under the lock.) Not while a drainer waits.
    pub(crate) fn open(&self) -> bool {
        // Relaxed: drainers change the count under the lock the caller holds.
        self.drainers.load(Ordering::Relaxed) == 0
    }

    /// `n` pages, marked filling in the model, leave the lock (called under it).
    pub(crate) fn begin(&self, n: u32) {
        self.out.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` pages are back (called under the lock, after the model unmarked them); the last
    /// one out wakes the drainers.
    pub(crate) fn end(&self, n: u32) {
        let left = self.out.fetch_sub(n, Ordering::AcqRel) - n;
        if left == 0 && self.drainers.load(Ordering::SeqCst) > 0 {
            self.park.wake_all(&self.out);
        }
    }

    /// Pages in flight, as the gate counts them.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> u32 {
        self.out.load(Ordering::Acquire)
    }

    /// With `g` held: wait — the lock released meanwhile — until `in_flight` (the model's
    /// count, read under the lock) is zero. Returns with the lock held and no fill in flight.
    pub(crate) fn drain<T>(&self, g: &mut Guard<'_, T>, in_flight: impl Fn(&T) -> usize) {
        if in_flight(g) == 0 {
            return;
        }
        self.drainers.fetch_add(1, Ordering::SeqCst);
        while in_flight(g) != 0 {
            g.unlocked(|| {
                let v = self.out.load(Ordering::Acquire);
                if v != 0 {
                    self.park.wait(&self.out, v, Some(DRAIN_POLL));
                    // (A pause; under loom, a yield: a poll that timed out lets the
                    // fills run.)
                    crate::sync::spin_loop();
                }
            });
        }
        self.drainers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::fault::lock::ArenaLock;
    use std::sync::Arc;

    /// Real threads and futexes: fillers leaving the lock while a dropper drains; every
    /// drain returns with none in flight, and the counts end at zero.
    #[test]
    fn drains_wait_for_every_fill_and_block_new_ones() {
        let lock = Arc::new(ArenaLock::new(0usize));
        let gate = Arc::new(FillGate::new());
        let hs: Vec<_> = (1..=3)
            .map(|t| {
                let (lock, gate) = (lock.clone(), gate.clone());
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        let mut g = lock.lock(t);
                        if t == 3 && i % 8 == 0 {
                            gate.drain(&mut g, |n| *n);
                            assert_eq!((*g, gate.in_flight()), (0, 0), "a drain returned with a fill in flight");
                        } else if gate.open() {
                            *g += 1;
                            gate.begin(1);
                            g.unlocked(std::hint::spin_loop);
                            *g -= 1;
                            gate.end(1);
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!((*lock.lock(9), gate.in_flight()), (0, 0));
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::fault::lock::ArenaLock;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    /// The model's side of one frame: fills in flight, and whether its home still holds
    /// its bytes (a drop of its last reference frees the home; an evacuation or a freeze
    /// moves it — the same for a fill reading the old place).
    struct State {
        fills: usize,
        home_valid: bool,
    }

    struct World {
        lock: ArenaLock<State>,
        gate: FillGate,
        /// The home's bytes: read by fills (without the lock when the gate lets them),
        /// rewritten once the frame is gone. loom reports any read not ordered before
        /// that write.
        home: UnsafeCell<u64>,
    }

    /// A fault filling a page from the frame's home, as `Core::fill_unlocked` does: decide
    /// under the lock, mark, leave the lock for the copy, come back and commit. With the
    /// gate closed, the copy runs under the lock. Returns the bytes copied.
    fn fill(w: &World, me: i32) -> Option<u64> {
        let mut g = w.lock.lock(me);
        if !g.home_valid {
            return None; // resolved against the new state: nothing to copy from here
        }
        // SAFETY: loom's cell; the accesses are what the model checks.
        let read = || w.home.with(|p| unsafe { *p });
        if w.gate.open() {
            g.fills += 1;
            w.gate.begin(1);
            let v = g.unlocked(read);
            g.fills -= 1;
            w.gate.end(1);
            Some(v)
        } else {
            Some(read())
        }
    }

    /// The frame's last reference dropped (or its home moved): drain, then free the home.
    fn drop_frame(w: &World, me: i32) {
        let mut g = w.lock.lock(me);
        w.gate.drain(&mut g, |s| s.fills);
        assert_eq!(g.fills, 0);
        g.home_valid = false;
        // SAFETY: loom's cell; see `World::home`.
        w.home.with_mut(|p| unsafe { *p = 0xdead });
    }

    fn model(fillers: i32, timed_sleep: bool) {
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(3);
        }
        builder.check(move || {
            let mut gate = FillGate::new();
            gate.park.timed_sleep = timed_sleep;
            let w = Arc::new(World {
                lock: ArenaLock::new(State { fills: 0, home_valid: true }),
                gate,
                home: UnsafeCell::new(7),
            });
            let hs: Vec<_> = (1..=fillers)
                .map(|t| {
                    let w = w.clone();
                    loom::thread::spawn(move || fill(&w, t))
                })
                .collect();
            drop_frame(&w, 99);
            for h in hs {
                if let Some(v) = h.join().unwrap() {
                    assert_eq!(v, 7, "a fill copied a freed home");
                }
            }
            assert_eq!(w.gate.in_flight(), 0);
        });
    }

    /// A frame's last reference dropped while a fault fills from it, the drainer's sleep
    /// timing out at once (it polls).
    #[test]
    fn a_drop_waits_for_the_fill_reading_its_home() {
        model(1, false);
    }

    /// The same with the drainer sleeping until woken: the last fill out must wake it
    /// (loom reports a deadlock otherwise).
    #[test]
    fn the_last_fill_out_wakes_the_drainer() {
        model(1, true);
    }

    /// Two faults filling from the frame while it is dropped.
    #[test]
    fn a_drop_waits_for_every_fill() {
        model(2, true);
    }
}
