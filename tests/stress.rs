//! Concurrency stress (issue 6), bounded in time: a family of spaces descended from one
//! shared root that a writer thread keeps writing, while worker threads fork (the root and
//! their own spaces), write, read, verify, hand spaces to each other and drop them. Every
//! byte the schedule makes deterministic is checked against a per-thread reference model.
//!
//! Default ≈12 s (signal fault mode, in parallel with ≈6 s in thread mode);
//! `COWARENA_STRESS_SECS=N` runs N seconds (thread mode N/2). A watchdog aborts on a hang.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{assert_nothing_left, assert_same, stress_duration, Rng, Watchdog, PAGE, TABLE};
use cowarena::{Arena, FaultMode, Space};

const ROOT_LEN: usize = TABLE + TABLE / 2 + 1234; // two tables, ragged end
const MAX_OWNED: usize = 6;

/// Pages of the root that its writer keeps changing: not deterministic in a fork taken by
/// another thread until that thread overwrites them.
fn hot(page: usize) -> bool {
    page % 5 == 0
}

#[derive(Default)]
struct Totals {
    ops: AtomicU64,
    forks: AtomicU64,
    drops: AtomicU64,
    handoffs: AtomicU64,
    creates: AtomicU64,
    bytes_written: AtomicU64,
    bytes_verified: AtomicU64,
    invariant_checks: AtomicU64,
    evictions: AtomicU64,
}

struct Owned {
    space: Space,
    model: Vec<u8>,
    /// Pages whose content is determined (fully written by us, or never written by anyone
    /// since a deterministic source).
    known: Vec<bool>,
    id: u64,
}

impl Owned {
    fn verify(&self, off: usize, len: usize, via_api: bool, who: &str) -> u64 {
        let mut checked = 0;
        let buf;
        let got: &[u8] = if via_api {
            let mut b = vec![0u8; len];
            self.space.read(off, &mut b).unwrap();
            buf = b;
            &buf
        } else {
            &self.space.as_slice()[off..off + len]
        };
        let mut at = off;
        while at < off + len {
            let page = at / PAGE;
            let end = ((page + 1) * PAGE).min(off + len);
            if self.known[page] {
                assert_same(
                    &got[at - off..end - off],
                    &self.model[at..end],
                    at,
                    &format_args!("{who}: space #{} ({} read)", self.id, if via_api { "api" } else { "view" }),
                );
                checked += (end - at) as u64;
            }
            at = end;
        }
        checked
    }

    fn write(&mut self, off: usize, data: &[u8], via_api: bool) {
        if via_api {
            self.space.write(off, data).unwrap();
        } else {
            self.space.as_mut_slice()[off..off + data.len()].copy_from_slice(data);
        }
        self.model[off..off + data.len()].copy_from_slice(data);
        // Pages wholly covered become known.
        let first = off.div_ceil(PAGE);
        let end = off + data.len();
        let last_full = if end == self.model.len() { end.div_ceil(PAGE) } else { end / PAGE };
        for p in first..last_full.max(first) {
            self.known[p] = true;
        }
        if off % PAGE == 0 && data.len() >= PAGE.min(self.model.len() - off) {
            self.known[off / PAGE] = true;
        }
    }
}

struct Shared {
    root: Space,
    root_init: Vec<u8>,
    stop: AtomicBool,
    totals: Totals,
    next_id: AtomicU64,
}

fn worker(
    arena: &Arena,
    sh: &Shared,
    me: usize,
    seed: u64,
    peers: Vec<Sender<Owned>>,
    inbox: Receiver<Owned>,
    end: &Barrier,
) {
    let who = format!("worker {me} (seed {seed})");
    let mut rng = Rng::new(seed);
    let mut owned: Vec<Owned> = Vec::new();
    let t = &sh.totals;
    let new_id = || sh.next_id.fetch_add(1, Ordering::Relaxed);
    while !sh.stop.load(Ordering::Relaxed) {
        while let Ok(o) = inbox.try_recv() {
            owned.push(o);
        }
        t.ops.fetch_add(1, Ordering::Relaxed);
        let r = if owned.is_empty() { 0 } else { rng.below(100) };
        match r {
            // fork the shared root (which another thread is writing)
            0..=7 => {
                let space = sh.root.fork().unwrap();
                t.forks.fetch_add(1, Ordering::Relaxed);
                let pages = ROOT_LEN.div_ceil(PAGE);
                let mut o = Owned {
                    space,
                    model: sh.root_init.clone(),
                    known: (0..pages).map(|p| !hot(p)).collect(),
                    id: new_id(),
                };
                // Make some hot pages deterministic by overwriting them whole.
                for p in (0..pages).filter(|&p| hot(p)) {
                    if rng.chance(1, 2) {
                        let n = PAGE.min(ROOT_LEN - p * PAGE);
                        let mut d = vec![0u8; n];
                        rng.fill(&mut d);
                        o.write(p * PAGE, &d, rng.chance(1, 2));
                        t.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                t.bytes_verified.fetch_add(o.verify(0, ROOT_LEN, rng.chance(1, 2), &who), Ordering::Relaxed);
                owned.push(o);
            }
            // fork one of ours
            8..=19 => {
                let i = rng.below(owned.len());
                let space = owned[i].space.fork().unwrap();
                t.forks.fetch_add(1, Ordering::Relaxed);
                let o = Owned { space, model: owned[i].model.clone(), known: owned[i].known.clone(), id: new_id() };
                owned.push(o);
            }
            // a fresh space
            20..=22 => {
                let len = match rng.below(3) {
                    0 => rng.range(1, 3 * PAGE),
                    1 => rng.range(1, 2 * TABLE + 5),
                    _ => TABLE,
                };
                let space = arena.space(len).unwrap();
                t.creates.fetch_add(1, Ordering::Relaxed);
                owned.push(Owned { space, model: vec![0; len], known: vec![true; len.div_ceil(PAGE)], id: new_id() });
            }
            // write, through the view or the API
            23..=54 => {
                let i = rng.below(owned.len());
                let (off, n) = rng.span(owned[i].model.len());
                let mut d = vec![0u8; n];
                rng.fill(&mut d);
                owned[i].write(off, &d, rng.chance(1, 2));
                t.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
            }
            // read, through the view or the API
            55..=79 => {
                let i = rng.below(owned.len());
                let (off, n) = rng.span(owned[i].model.len());
                t.bytes_verified.fetch_add(owned[i].verify(off, n, rng.chance(1, 2), &who), Ordering::Relaxed);
            }
            // verify a whole space
            80..=83 => {
                let i = rng.below(owned.len());
                let len = owned[i].model.len();
                t.bytes_verified.fetch_add(owned[i].verify(0, len, rng.chance(1, 2), &who), Ordering::Relaxed);
            }
            // hand a space to another worker (it will write and drop it)
            84..=88 => {
                if !peers.is_empty() {
                    let i = rng.below(owned.len());
                    let o = owned.swap_remove(i);
                    let p = rng.below(peers.len());
                    if let Err(e) = peers[p].send(o) {
                        owned.push(e.0);
                    } else {
                        t.handoffs.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // check every invariant (takes the arena lock for a while), or evict cold frames
            // while the other threads fault, fork, write the root and drop (issue 16)
            89 => {
                if rng.chance(1, 2) {
                    let target = if rng.chance(1, 4) { u64::MAX } else { (1 + rng.below(2048) as u64) * PAGE as u64 };
                    arena.evict(target).unwrap_or_else(|e| panic!("{who}: evict: {e}"));
                    t.evictions.fetch_add(1, Ordering::Relaxed);
                } else {
                    arena.check_invariants().unwrap_or_else(|e| panic!("{who}: invariant broken: {e}"));
                    t.invariant_checks.fetch_add(1, Ordering::Relaxed);
                }
            }
            // drop one
            _ => {
                let i = rng.below(owned.len());
                let o = owned.swap_remove(i);
                if rng.chance(1, 4) {
                    let len = o.model.len();
                    t.bytes_verified.fetch_add(o.verify(0, len, false, &who), Ordering::Relaxed);
                }
                drop(o);
                t.drops.fetch_add(1, Ordering::Relaxed);
            }
        }
        while owned.len() > MAX_OWNED {
            let i = rng.below(owned.len());
            drop(owned.swap_remove(i));
            t.drops.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Nobody sends after this barrier; take what is in flight, verify everything, drop.
    drop(peers);
    end.wait();
    owned.extend(inbox.try_iter());
    for o in owned {
        let len = o.model.len();
        t.bytes_verified.fetch_add(o.verify(0, len, false, &who), Ordering::Relaxed);
        drop(o);
        t.drops.fetch_add(1, Ordering::Relaxed);
    }
}

/// The root's only writer: writes hot pages (view and API), and forks the root for itself,
/// which it can check entirely since it alone knows every byte of the root.
fn root_writer(sh: &Shared, seed: u64) {
    let who = format!("root writer (seed {seed})");
    let mut rng = Rng::new(seed);
    let mut model = sh.root_init.clone();
    let t = &sh.totals;
    let hot_pages: Vec<usize> = (0..ROOT_LEN.div_ceil(PAGE)).filter(|&p| hot(p)).collect();
    let base = sh.root.as_mut_ptr();
    let mut mine: Vec<(Space, Vec<u8>)> = Vec::new();
    while !sh.stop.load(Ordering::Relaxed) {
        t.ops.fetch_add(1, Ordering::Relaxed);
        let p = hot_pages[rng.below(hot_pages.len())];
        let plen = PAGE.min(ROOT_LEN - p * PAGE);
        let off = p * PAGE + rng.below(plen);
        let n = rng.range(1, p * PAGE + plen - off);
        let mut d = vec![0u8; n];
        rng.fill(&mut d);
        if rng.chance(1, 2) {
            // SAFETY: this thread is the root's only writer and holds no reference into the
            // written range; `d` is not view memory.
            unsafe { sh.root.write_unchecked(off, &d) }.unwrap();
        } else {
            // SAFETY: this thread is the root's only writer and the range is in bounds; no
            // reference into the view exists while it copies.
            unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), base.add(off), n) };
        }
        model[off..off + n].copy_from_slice(&d);
        t.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
        match rng.below(40) {
            0 => {
                let f = sh.root.fork().unwrap();
                t.forks.fetch_add(1, Ordering::Relaxed);
                assert_same(f.as_slice(), &model, 0, &format_args!("{who}: fork of the root"));
                t.bytes_verified.fetch_add(ROOT_LEN as u64, Ordering::Relaxed);
                mine.push((f, model.clone()));
            }
            1 if !mine.is_empty() => {
                let i = rng.below(mine.len());
                let (s, m) = mine.swap_remove(i);
                assert_same(s.as_slice(), &m, 0, &format_args!("{who}: an old fork of the root changed"));
                t.bytes_verified.fetch_add(ROOT_LEN as u64, Ordering::Relaxed);
                drop(s);
                t.drops.fetch_add(1, Ordering::Relaxed);
            }
            2 => {
                let mut b = vec![0u8; ROOT_LEN];
                sh.root.read(0, &mut b).unwrap();
                assert_same(&b, &model, 0, &format_args!("{who}: the root (api)"));
                t.bytes_verified.fetch_add(ROOT_LEN as u64, Ordering::Relaxed);
            }
            _ => {}
        }
        if mine.len() > 3 {
            let (s, m) = mine.remove(0);
            assert_same(s.as_slice(), &m, 0, &format_args!("{who}: an old fork of the root changed"));
            drop(s);
            t.drops.fetch_add(1, Ordering::Relaxed);
        }
    }
    assert_same(sh.root.as_slice(), &model, 0, &format_args!("{who}: the root at the end"));
    for (s, m) in mine {
        assert_same(s.as_slice(), &m, 0, &format_args!("{who}: a fork of the root at the end"));
    }
}

/// With `fork_children`: a thread that keeps `fork(2)`ing the process while everything else
/// runs. Each child tries the API on the shared root (it must be refused with
/// `ForkedProcess`), drops a fork it inherited and an arena of its own, and exits; the
/// parent's threads must not notice (issue 11).
fn process_forker(arena: &Arena, sh: &Shared) -> u64 {
    let mut children = 0;
    while !sh.stop.load(Ordering::Relaxed) {
        let victim = sh.root.fork().unwrap();
        let own = Arena::builder().fault_mode(arena.fault_mode()).build().unwrap();
        let own_space = own.space(PAGE).unwrap();
        // SAFETY: the child only calls cowarena entry points (which check the pid before
        // touching a lock), drops handles and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: no reference into the root's view is held by this (only) thread of
            // the child; the call is refused before it could write anything.
            let api_write = unsafe { sh.root.write_unchecked(0, b"child") };
            let refused = matches!(api_write, Err(cowarena::Error::ForkedProcess { .. }))
                && matches!(sh.root.fork(), Err(cowarena::Error::ForkedProcess { .. }))
                && matches!(arena.space(PAGE), Err(cowarena::Error::ForkedProcess { .. }));
            drop(victim);
            drop(own_space);
            drop(own);
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(if refused { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "fork(2) child: status {status:#x}");
        drop((victim, own_space, own));
        children += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    children
}

fn stress(mode: FaultMode, dur: Duration, workers: usize, seed: u64) {
    stress_with(mode, dur, workers, seed, false)
}

fn stress_with(mode: FaultMode, dur: Duration, workers: usize, seed: u64, fork_children: bool) {
    stress_arena(Arena::builder().fault_mode(mode).build().unwrap(), dur, workers, seed, fork_children)
}

fn stress_arena(arena: Arena, dur: Duration, workers: usize, seed: u64, fork_children: bool) {
    let mode = arena.fault_mode();
    let _wd = Watchdog::new("stress", dur + Duration::from_secs(120));
    let mut root = arena.space(ROOT_LEN).unwrap();
    let mut root_init = vec![0u8; ROOT_LEN];
    Rng::new(seed).fill(&mut root_init);
    root.write(0, &root_init).unwrap();
    let sh =
        Shared { root, root_init, stop: AtomicBool::new(false), totals: Totals::default(), next_id: AtomicU64::new(0) };
    let (txs, rxs): (Vec<Sender<Owned>>, Vec<Receiver<Owned>>) = (0..workers).map(|_| channel()).unzip();
    let end = Barrier::new(workers);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for (me, inbox) in rxs.into_iter().enumerate() {
            let peers: Vec<Sender<Owned>> =
                txs.iter().enumerate().filter(|(i, _)| *i != me).map(|(_, t)| t.clone()).collect();
            let (arena, sh, end) = (&arena, &sh, &end);
            s.spawn(move || worker(arena, sh, me, seed * 100 + me as u64 + 1, peers, inbox, end));
        }
        drop(txs);
        let sh = &sh;
        s.spawn(move || root_writer(sh, seed * 100));
        let forker = fork_children.then(|| {
            let arena = &arena;
            s.spawn(move || process_forker(arena, sh))
        });
        std::thread::sleep(dur);
        sh.stop.store(true, Ordering::Relaxed);
        if let Some(f) = forker {
            let n = f.join().unwrap();
            println!("stress {mode:?}: {n} fork(2) children used and dropped their inherited arena");
            assert!(n > 0);
        }
    });
    let elapsed = t0.elapsed();
    arena.check_invariants().unwrap();
    let Shared { root, totals: t, .. } = sh;
    drop(root);
    let st = arena.stats();
    assert_nothing_left(&arena, "stress");
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "stress {mode:?} seed {seed}: {:.1?}, {} threads: {} ops, {} forks, {} creates, {} drops, {} hand-offs, {} invariant checks, {} evictions ({} frames out, {} back), {} MiB written, {} MiB verified, 0 divergences; faults: {:?}; tables broken {} reused {}; 0 leaks",
        elapsed,
        workers + 1,
        g(&t.ops),
        g(&t.forks),
        g(&t.creates),
        g(&t.drops),
        g(&t.handoffs),
        g(&t.invariant_checks),
        g(&t.evictions),
        st.frames_evicted,
        st.frames_swapped_in,
        g(&t.bytes_written) >> 20,
        g(&t.bytes_verified) >> 20,
        st.faults,
        st.tables_broken,
        st.tables_reused,
    );
    assert!(g(&t.forks) > 0 && g(&t.bytes_verified) > 0, "the stress did nothing");
}

fn seed() -> u64 {
    common::env_u64("COWARENA_STRESS_SEED", std::process::id() as u64)
}

#[test]
fn stress_signal_mode() {
    stress(FaultMode::Signal, stress_duration(12), 3, seed());
}

#[test]
fn stress_with_fork2_children() {
    stress_with(FaultMode::Signal, stress_duration(12) / 2, 2, seed() + 2, true);
    stress_with(FaultMode::Thread, stress_duration(12) / 4, 2, seed() + 3, true);
}

/// Stores to read-only pages served by the kernel alone (`ArenaBuilder::async_wp`), with
/// forks, resets, cleans and aging racing them from other threads.
#[test]
fn stress_signal_mode_async_wp() {
    let arena = Arena::builder().fault_mode(FaultMode::Signal).async_wp(true).build().unwrap();
    stress_arena(arena, stress_duration(12) / 2, 3, seed() + 4, false);
}

#[test]
fn stress_thread_mode() {
    stress(FaultMode::Thread, stress_duration(12) / 2, 2, seed() + 1);
}

/// Every view trapping its first store to a page (`async_forks(false)`, as on kernels
/// before 6.7); the tests above use the default, where forks' stores are the kernel's.
#[test]
fn stress_signal_mode_all_trapping() {
    let arena = Arena::builder().fault_mode(FaultMode::Signal).async_forks(false).build().unwrap();
    stress_arena(arena, stress_duration(12) / 2, 3, seed() + 5, false);
}
