//! The arena lock: a futex mutex (Drepper, "Futexes Are Tricky", mutex #3 — the one
//! `std::sync::Mutex` uses on Linux) that the SIGBUS handler may also take, plus the
//! thread id of its holder for the self-deadlock check.
//!
//! Lock word: [`FREE`] (0), [`LOCKED`] (1: held, nobody asleep), [`CONTENDED`] (2: held,
//! someone may be asleep in `FUTEX_WAIT`).
//! * acquire: CAS 0 → 1; failing that, spin a little while the holder runs, then swap
//!   the word to 2 and sleep in `FUTEX_WAIT(word, 2)` until the swap returns 0 (acquired;
//!   the word stays 2, so the next unlock wakes the next sleeper).
//! * release: swap the word to 0; `FUTEX_WAKE` one sleeper only if it was 2.
//!
//! Three ways to take it: [`ArenaLock::lock`] (API and engine threads: spin ~100 `pause`s,
//! then sleep); [`ArenaLock::lock_signal`] (the SIGBUS handler: the same spin, then a few
//! `sched_yield`s — a descheduled holder may get this CPU — then sleep; it refuses when
//! the calling thread is itself the holder, which would sleep forever); and
//! [`ArenaLock::lock_timeout`] (thread mode's worker, which must notice a faulting thread
//! that holds the lock). `futex(2)`, `sched_yield(2)`, `clock_gettime` (vDSO) and atomics
//! are all this needs: async-signal-safe, no allocation.
//!
//! No poisoning: a guard dropped during unwinding releases the lock and the next holder
//! goes on with the state as it is (the views must stay served; see `Core::lock`).
//!
//! Under `--cfg loom` the futex is emulated by a loom `Mutex` + `Condvar` (the waiter
//! checks the word and sleeps atomically with respect to wakers, as the futex hash-bucket
//! lock guarantees) and `loom_tests` check mutual exclusion and that no wake-up is lost.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::sync::{AtomicI32, AtomicU32, Ordering};

/// Lock word: free.
const FREE: u32 = 0;
/// Lock word: held, no sleeper.
const LOCKED: u32 = 1;
/// Lock word: held, sleepers possible.
const CONTENDED: u32 = 2;

/// `pause` hints spun while the lock is held and nobody sleeps, before sleeping (~100
/// as `std`: a few µs, about one fault's critical section).
const SPINS: u32 = if cfg!(loom) { 1 } else { 100 };
/// `sched_yield`s the signal handler tries after spinning, before it sleeps: on a busy
/// machine the holder may be descheduled, and yielding can hand it this CPU.
const SIGNAL_YIELDS: u32 = if cfg!(loom) { 1 } else { 3 };

/// Counters of one lock, for [`LockStats`]. Relaxed: statistics only.
#[derive(Default)]
struct Counters {
    /// Nanoseconds the timed (fault-path) holds lasted.
    held_ns: AtomicU64,
    /// Timed holds.
    holds: AtomicU64,
    /// Sleeps in `FUTEX_WAIT` by any locker.
    sleeps: AtomicU64,
}

/// What the arena lock costs the fault path; see [`Stats::lock`](crate::Stats::lock).
///
/// Every fault served (signal mode: in the SIGBUS handler; thread mode: by the worker)
/// takes the arena lock once (or again after waiting for headroom). The time it holds it is
/// the *serial* part of a fault: however many cores fault at once, the arena serves at
/// most `1 / (held_ns / holds)` faults per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockStats {
    /// Nanoseconds the fault path held the arena lock, summed over [`fault_holds`](Self::fault_holds)
    /// (`CLOCK_MONOTONIC` read after acquiring and before releasing; the two reads add
    /// ~30–60 ns per hold).
    pub fault_held_ns: u64,
    /// Times the fault path held the lock.
    pub fault_holds: u64,
    /// Times any thread (faulting, API or engine) slept in `FUTEX_WAIT` for the lock
    /// instead of spinning.
    pub sleeps: u64,
}

/// A futex lock around `T` that records its holder's thread id.
pub(crate) struct ArenaLock<T> {
    word: AtomicU32,
    /// Thread id of the holder (0: free, or between the acquiring CAS and this store).
    /// Only the holder writes it, so a thread that reads its own id holds the lock.
    owner: AtomicI32,
    counters: Counters,
    park: Park,
    data: UnsafeCell<T>,
}

// SAFETY: the data is only reached through a `Guard`, and a `Guard` exists only while the
// lock word excludes every other guard (acquire on taking, release on dropping), so
// sharing the lock across threads hands `T` from one thread to the next, as a `Mutex<T>`
// does: `T: Send` is what that needs.
unsafe impl<T: Send> Sync for ArenaLock<T> {}

impl<T> ArenaLock<T> {
    pub fn new(data: T) -> Self {
        ArenaLock {
            word: AtomicU32::new(FREE),
            owner: AtomicI32::new(0),
            counters: Counters::default(),
            park: Park::new(),
            data: UnsafeCell::new(data),
        }
    }

    /// The holder's thread id (0: none known).
    pub fn owner(&self) -> i32 {
        self.owner.load(Ordering::Relaxed)
    }

    /// The counters so far.
    pub fn stats(&self) -> LockStats {
        let c = &self.counters;
        LockStats {
            fault_held_ns: c.held_ns.load(Ordering::Relaxed),
            fault_holds: c.holds.load(Ordering::Relaxed),
            sleeps: c.sleeps.load(Ordering::Relaxed),
        }
    }

    /// Take the lock if it is free right now.
    pub fn try_lock(&self, me: i32) -> Option<Guard<'_, T>> {
        self.try_acquire().then(|| self.acquired(me))
    }

    /// Take the lock, sleeping in the kernel while it is busy. (Normal thread context.)
    pub fn lock(&self, me: i32) -> Guard<'_, T> {
        if !self.try_acquire() {
            self.lock_slow(0, None);
        }
        self.acquired(me)
    }

    /// Take the lock from the SIGBUS handler: spin briefly, yield a few times, then sleep
    /// in `FUTEX_WAIT` (async-signal-safe). `None` when thread `me` holds it already (a
    /// fault inside a locked section of its own, which would sleep forever).
    ///
    /// One check suffices: the holder stores its id right after acquiring and clears it
    /// right before releasing, touching no view memory in between, so a synchronous fault
    /// of `me` while `me` holds the lock always finds `owner == me`, and while `me` does not
    /// hold it never does.
    pub fn lock_signal(&self, me: i32) -> Option<Guard<'_, T>> {
        if !self.try_acquire() {
            if self.owner() == me {
                return None;
            }
            self.lock_slow(SIGNAL_YIELDS, None);
        }
        Some(self.acquired(me))
    }

    /// Take the lock, sleeping at most about `timeout` for it; `None` if still busy.
    pub fn lock_timeout(&self, me: i32, timeout: Duration) -> Option<Guard<'_, T>> {
        (self.try_acquire() || self.lock_slow(0, Some(timeout))).then(|| self.acquired(me))
    }

    fn try_acquire(&self) -> bool {
        self.word.compare_exchange(FREE, LOCKED, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    fn acquired(&self, me: i32) -> Guard<'_, T> {
        // Relaxed: only the holder writes its id, and only the holder's own check (same
        // thread, program order) relies on reading it exactly; others only compare.
        self.owner.store(me, Ordering::Relaxed);
        Guard { lock: self, since: 0, _not_send: PhantomData }
    }

    /// Spin while the lock is held: [`SPINS`] `pause`s (~30 ns each here: about one
    /// fault's critical section in all), then `yields` `sched_yield`s. Returns the last word
    /// seen ([`FREE`] when it was released meanwhile).
    ///
    /// Unlike `std`'s mutex this spins on a [`CONTENDED`] word too: critical sections are
    /// a few µs, and on a VM a sleeper's wake-up (an IPI to a halted vCPU) costs more than
    /// that, so a thread that arrives while others sleep should still catch the release.
    fn spin(&self, yields: u32) -> u32 {
        let mut left = SPINS + yields;
        loop {
            let state = self.word.load(Ordering::Relaxed);
            if state == FREE || left == 0 {
                return state;
            }
            if left > yields {
                crate::sync::spin_loop();
            } else {
                crate::sync::spin_yield();
            }
            left -= 1;
        }
    }

    /// The contended path: spin, then mark the word contended and sleep until it is free.
    /// With a `timeout`, gives up (`false`) after one sleep that did not end in the lock.
    ///
    /// Before its first sleep a thread may take a free word as [`LOCKED`] even while others
    /// sleep: every sleeper was put to sleep by a word of 2, and a woken thread always
    /// re-marks the word 2 (the swap below) before it acquires or sleeps again, so the
    /// next unlock still wakes the next sleeper. After a sleep it must take the lock with
    /// that swap: it may be the one carrying the wake-up the other sleepers wait for.
    #[cold]
    fn lock_slow(&self, yields: u32, timeout: Option<Duration>) -> bool {
        let mut state = self.spin(yields);
        if state == FREE {
            match self.word.compare_exchange(FREE, LOCKED, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(s) => state = s,
            }
        }
        let mut slept = false;
        loop {
            // Mark it contended (the holder's unlock will then wake a sleeper), taking it if
            // it was free meanwhile.
            if state != CONTENDED && self.word.swap(CONTENDED, Ordering::Acquire) == FREE {
                return true;
            }
            if slept && timeout.is_some() {
                return false;
            }
            self.counters.sleeps.fetch_add(1, Ordering::Relaxed);
            self.park.wait(&self.word, CONTENDED, timeout);
            slept = true;
            state = self.spin(0);
        }
    }
}

/// The lock, held. Dropping it (also during unwinding) releases the lock.
pub(crate) struct Guard<'a, T> {
    lock: &'a ArenaLock<T>,
    /// `CLOCK_MONOTONIC` nanoseconds at [`Guard::time_hold`] (0: this hold is not timed).
    since: u64,
    /// Released by the thread that took it (its id is the owner), as a `MutexGuard`.
    _not_send: PhantomData<*const ()>,
}

impl<T> Guard<'_, T> {
    /// Count this hold's duration in [`LockStats`] (the fault path's holds).
    pub fn time_hold(&mut self) {
        self.since = now_ns().max(1);
    }

    /// Release the lock, run `f`, take the lock again (as the signal handler does: a
    /// bounded spin, a few yields, then `FUTEX_WAIT`; async-signal-safe). A timed hold
    /// counts the two holds, not the time in between. The caller must assume the data
    /// changed meanwhile.
    pub fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let lock = self.lock;
        let me = lock.owner();
        let timed = self.since != 0;
        self.release();
        let r = f();
        if !lock.try_acquire() {
            lock.lock_slow(SIGNAL_YIELDS, None);
        }
        lock.owner.store(me, Ordering::Relaxed);
        if timed {
            self.time_hold();
        }
        r
    }

    fn release(&mut self) {
        let lock = self.lock;
        if self.since != 0 {
            let held = now_ns().saturating_sub(self.since);
            lock.counters.held_ns.fetch_add(held, Ordering::Relaxed);
            lock.counters.holds.fetch_add(1, Ordering::Relaxed);
            self.since = 0;
        }
        lock.owner.store(0, Ordering::Relaxed);
        if lock.word.swap(FREE, Ordering::Release) == CONTENDED {
            lock.park.wake_one(&lock.word);
        }
    }
}

impl<T> std::ops::Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock (see `ArenaLock`'s `Sync`): no other reference
        // to the data exists until it is dropped.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> std::ops::DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only borrow of the guard.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(not(loom))]
fn now_ns() -> u64 {
    crate::sys::signal::monotonic_ns()
}

#[cfg(loom)]
fn now_ns() -> u64 {
    1
}

/// Sleeping and waking on a word: `futex(2)` (the lock word; the count of fills in
/// flight, `fault::fills`).
#[cfg(not(loom))]
pub(crate) struct Park;

#[cfg(not(loom))]
impl Park {
    pub(crate) fn new() -> Park {
        Park
    }

    pub(crate) fn wait(&self, word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
        crate::sys::futex::wait(word, expected, timeout);
    }

    pub(crate) fn wake_one(&self, word: &AtomicU32) {
        crate::sys::futex::wake(word, 1);
    }

    pub(crate) fn wake_all(&self, word: &AtomicU32) {
        crate::sys::futex::wake(word, u32::MAX);
    }
}

/// The futex, emulated for loom: the check of the word and going to sleep are atomic with
/// respect to wakers (the kernel's hash-bucket lock), a wake with no sleeper is lost (as
/// `FUTEX_WAKE` with no waiter). A timed wait either returns at once, as if it had timed
/// out, or (`timed_sleep`) sleeps until woken, as if the timeout never came: the two
/// extremes of what a real timed wait may do.
#[cfg(loom)]
pub(crate) struct Park {
    m: loom::sync::Mutex<()>,
    cv: loom::sync::Condvar,
    pub(crate) timed_sleep: bool,
}

#[cfg(loom)]
impl Park {
    pub(crate) fn new() -> Park {
        Park { m: loom::sync::Mutex::new(()), cv: loom::sync::Condvar::new(), timed_sleep: false }
    }

    pub(crate) fn wait(&self, word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
        if timeout.is_some() && !self.timed_sleep {
            return;
        }
        let g = self.m.lock().unwrap();
        if word.load(Ordering::SeqCst) == expected {
            drop(self.cv.wait(g).unwrap());
        }
    }

    pub(crate) fn wake_one(&self, _word: &AtomicU32) {
        let _g = self.m.lock().unwrap();
        self.cv.notify_one();
    }

    pub(crate) fn wake_all(&self, _word: &AtomicU32) {
        let _g = self.m.lock().unwrap();
        self.cv.notify_all();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Four threads (more than this machine's cores) incrementing under the lock, half of
    /// them through the signal-handler path: no increment is lost, every sleeper is woken.
    #[test]
    fn lock_excludes_and_wakes_under_oversubscription() {
        let lock = Arc::new(ArenaLock::new(0u64));
        let hs: Vec<_> = (1..=4)
            .map(|t| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let mut g = if t % 2 == 0 { lock.lock_signal(t).unwrap() } else { lock.lock(t) };
                        assert_eq!(lock.owner(), t);
                        let v = *g;
                        std::hint::spin_loop();
                        *g = v + 1;
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*lock.lock(9), 80_000);
        assert_eq!(lock.word.load(Ordering::Relaxed), FREE);
    }

    /// The holder's own signal-path attempt is refused; another thread's waits; the timed
    /// path gives up; timed holds are counted.
    #[test]
    fn lock_refuses_its_holder_and_times_holds() {
        let lock = ArenaLock::new(());
        let mut g = lock.lock(7);
        g.time_hold();
        assert!(lock.lock_signal(7).is_none());
        assert!(lock.try_lock(8).is_none());
        assert!(lock.lock_timeout(8, Duration::from_millis(5)).is_none());
        std::thread::sleep(Duration::from_millis(1));
        drop(g);
        assert_eq!(lock.owner(), 0);
        let s = lock.stats();
        assert_eq!(s.fault_holds, 1);
        assert!(s.fault_held_ns >= 1_000_000, "{s:?}");
        assert!(s.sleeps >= 1, "{s:?}");
        assert!(lock.lock_signal(7).is_some());
        assert!(lock.lock_timeout(8, Duration::from_millis(5)).is_some());
    }

    /// A panic under the lock releases it (no poisoning): the next locker proceeds.
    #[test]
    fn lock_released_by_unwinding() {
        let lock = ArenaLock::new(1);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut g = lock.lock(3);
            *g = 2;
            panic!("under the lock");
        }));
        assert!(r.is_err());
        assert_eq!(lock.owner(), 0);
        assert_eq!(*lock.try_lock(4).expect("released by the unwinding guard"), 2);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::cell::UnsafeCell as Cell;
    use loom::sync::Arc;

    /// Run `threads` lockers, thread `t` taking the lock `rounds` times with
    /// `how(t, round)`; loom fails on a data race on the counter (no mutual exclusion) or
    /// on every thread blocked (a lost wake-up).
    fn model(threads: i32, rounds: usize, timed_sleep: bool, how: fn(i32, usize) -> u8) {
        let mut builder = loom::model::Builder::new();
        // Exhaustive with 2 threads; with 3, every interleaving of up to PREEMPTIONS forced
        // switches (LOOM_MAX_PREEMPTIONS overrides; unbounded runs take hours).
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(PREEMPTIONS);
        }
        builder.check(move || {
            let mut lock = ArenaLock::new(Cell::new(0usize));
            lock.park.timed_sleep = timed_sleep;
            let lock = Arc::new(lock);
            let hs: Vec<_> = (1..threads)
                .map(|t| {
                    let lock = lock.clone();
                    loom::thread::spawn(move || run(&lock, t, rounds, how))
                })
                .collect();
            let mut done = run(&lock, threads, rounds, how);
            for h in hs {
                done += h.join().unwrap();
            }
            let g = lock.lock(99);
            // SAFETY: under the lock; loom checks the access.
            assert_eq!(g.with(|v| unsafe { *v }), done);
            drop(g);
            assert_eq!(lock.word.load(Ordering::SeqCst), FREE);
        });
    }

    /// Preemption bound of the models (loom's advice: 2–3 finds nearly all bugs).
    const PREEMPTIONS: usize = 3;

    /// One thread's rounds; returns how many increments it made.
    fn run(lock: &ArenaLock<Cell<usize>>, t: i32, rounds: usize, how: fn(i32, usize) -> u8) -> usize {
        let mut done = 0;
        for r in 0..rounds {
            let g = match how(t, r) {
                0 => Some(lock.lock(t)),
                1 => lock.lock_signal(t),
                2 => lock.try_lock(t),
                _ => lock.lock_timeout(t, Duration::from_millis(1)),
            };
            if let Some(g) = g {
                assert_eq!(lock.owner(), t);
                // SAFETY: under the lock; loom checks the access.
                g.with_mut(|v| unsafe { *v += 1 });
                done += 1;
            }
        }
        done
    }

    #[test]
    fn lock_two_threads_exclude_and_wake() {
        model(2, 2, false, |_, _| 0);
    }

    #[test]
    fn lock_three_threads_exclude_and_wake() {
        model(3, 1, false, |_, _| 0);
    }

    #[test]
    fn lock_signal_path_with_normal_lockers() {
        model(3, 1, false, |t, _| if t == 1 { 1 } else { 0 });
    }

    /// A try-locker and a timed locker that gives up at once beside a sleeper.
    #[test]
    fn lock_try_and_timed_lockers_never_strand_a_sleeper() {
        model(3, 1, false, |t, _| match t {
            1 => 2,
            2 => 3,
            _ => 0,
        });
    }

    /// A timed locker that sleeps, is woken and may find the lock taken and give up: the
    /// wake-up it consumed must not strand the other sleeper.
    #[test]
    fn lock_timed_locker_consuming_a_wake_never_strands_a_sleeper() {
        model(3, 1, true, |t, _| if t == 1 { 3 } else { 0 });
    }
}
