//! Threads (issue 2): writers on disjoint pages of one space while another thread forks it
//! repeatedly and checks every child is a consistent snapshot; and threads writing
//! different children of one parent at once.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{assert_nothing_left, assert_same, env_u64, Rng, Watchdog, PAGE};
use cowarena::{Arena, FaultMode, ForkStrategy, Space};

const WORDS: usize = PAGE / 8;

/// Word `w` of page `p`, written by thread `t` in generation `g`:
/// `[g:32][t:8][p:16][w:8 of 9 bits]` — every field recoverable, so a word from the wrong
/// place, the wrong thread or a torn store is detected. Generation 0 is the zero page.
fn encode(t: usize, g: u64, p: usize, w: usize) -> u64 {
    debug_assert!(g < 1 << 32 && t < 256 && p < 1 << 16 && w < 512);
    (g << 32) | ((t as u64) << 24) | ((p as u64) << 9) | w as u64
}

/// The generation a word holds, checking that it belongs at (t, p, w).
fn decode(v: u64, t: usize, p: usize, w: usize) -> Result<u64, String> {
    if v == 0 {
        return Ok(0);
    }
    let g = v >> 32;
    if g == 0 || v != encode(t, g, p, w) {
        return Err(format!("word {v:#018x} at page {p} word {w} is not a value thread {t} ever wrote there"));
    }
    Ok(g)
}

struct Writers {
    threads: usize,
    pages: usize,
    /// false: thread t owns pages p ≡ t (mod threads); true: thread t owns words
    /// w ≡ t (mod threads) of every page, so that threads fault the same pages at once.
    interleave: bool,
    /// Generation each writer has finished (every one of its pages fully written).
    done: Vec<AtomicU64>,
    /// Generation each writer has started.
    started: Vec<AtomicU64>,
    stop: AtomicBool,
}

impl Writers {
    /// Thread `t`'s words, in the order it writes them.
    fn seq(&self, t: usize) -> Box<dyn Iterator<Item = (usize, usize)> + '_> {
        if self.interleave {
            Box::new((0..self.pages).flat_map(move |p| (t..WORDS).step_by(self.threads).map(move |w| (p, w))))
        } else {
            Box::new((t..self.pages).step_by(self.threads).flat_map(|p| (0..WORDS).map(move |w| (p, w))))
        }
    }

    fn owner(&self, p: usize, w: usize) -> usize {
        if self.interleave {
            w % self.threads
        } else {
            p % self.threads
        }
    }
}

fn writer(space: &Space, sh: &Writers, t: usize) -> u64 {
    let base = space.as_mut_ptr() as *mut u64;
    let mut g = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        g += 1;
        sh.started[t].store(g, Ordering::SeqCst);
        // Pages in increasing order, words in increasing order: program order gives the
        // snapshot checks below their structure.
        for (p, w) in sh.seq(t) {
            // SAFETY: the word is owned by this thread alone; it is in bounds and aligned;
            // the space outlives the writers (scoped threads).
            unsafe { base.add(p * WORDS + w).write_volatile(encode(t, g, p, w)) };
        }
        sh.done[t].store(g, Ordering::SeqCst);
    }
    g
}

/// Check one child against the snapshot rules; returns its per-word generations.
fn check_child(child: &Space, sh: &Writers, lo: &[u64], hi: &[u64], prev: Option<&[u64]>, k: usize) -> Vec<u64> {
    let words = child.as_slice().len() / 8;
    let mut gens = vec![0u64; words];
    let view = child.as_ptr() as *const u64;
    for p in 0..sh.pages {
        for w in 0..WORDS {
            let t = sh.owner(p, w);
            let i = p * WORDS + w;
            // SAFETY: in bounds of the child's view; nobody writes the child.
            let v = unsafe { view.add(i).read_volatile() };
            let g = decode(v, t, p, w).unwrap_or_else(|e| panic!("fork {k}: {e}"));
            // Every word of thread t is at least the generation t had finished before the
            // fork began, and at most the one it had started when the fork returned.
            assert!(
                g >= lo[t] && g <= hi[t],
                "fork {k}: page {p} word {w} (thread {t}) holds generation {g}, outside [{}, {}]",
                lo[t],
                hi[t]
            );
            if let Some(prev) = prev {
                // Snapshots only move forward.
                assert!(g >= prev[i], "fork {k}: page {p} word {w} went back from generation {} to {g}", prev[i]);
            }
            gens[i] = g;
        }
    }
    // Program order of each writer: within one thread's sequence (its pages in order, the
    // words of each page in order) generations never increase — a consistent cut.
    for t in 0..sh.threads {
        let mut last = u64::MAX;
        for (p, w) in sh.seq(t) {
            let g = gens[p * WORDS + w];
            assert!(
                g <= last,
                "fork {k}: thread {t}: page {p} word {w} has generation {g} after a word of generation {last}: the fork is not a consistent cut of the writer's program order"
            );
            last = g;
        }
        // ...and at most two generations are visible per thread (g and g-1).
        let (mx, mn) =
            sh.seq(t).map(|(p, w)| gens[p * WORDS + w]).fold((0, u64::MAX), |(a, b), g| (a.max(g), b.min(g)));
        assert!(mx - mn <= 1, "fork {k}: thread {t} shows generations {mn}..={mx} in one snapshot");
    }
    gens
}

fn forks_of_a_written_space(mode: FaultMode, pages: usize, threads: usize, interleave: bool, dur: Duration) {
    forks_of_a_written(mode, pages, threads, interleave, false, ForkStrategy::Auto, dur)
}

/// The same, with `of_fork`: the space written and forked is itself a fork (an async-WP
/// view in the default arena: the writers' stores are the kernel's alone, and each fork
/// must be a consistent cut of them all the same).
fn forks_of_a_written(
    mode: FaultMode,
    pages: usize,
    threads: usize,
    interleave: bool,
    of_fork: bool,
    strategy: ForkStrategy,
    dur: Duration,
) {
    let _wd = Watchdog::new("forks_of_a_written_space", dur + Duration::from_secs(120));
    let arena = Arena::builder().fault_mode(mode).build().unwrap();
    let root = arena.space(pages * PAGE).unwrap();
    let (space, root) = if of_fork { (root.fork().unwrap(), Some(root)) } else { (root, None) };
    let sh = Writers {
        threads,
        pages,
        interleave,
        done: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        started: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        stop: AtomicBool::new(false),
    };
    let (mut forks, mut kept_checks) = (0u64, 0u64);
    let gens_written = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn({
                    let (space, sh) = (&space, &sh);
                    move || writer(space, sh, t)
                })
            })
            .collect();
        let t0 = Instant::now();
        let mut prev: Option<Vec<u64>> = None;
        // A few old children are kept alive and re-checked later: a snapshot must not
        // change while its parent keeps being written.
        let mut kept: Vec<(Space, Vec<u8>)> = Vec::new();
        let mut k = 0usize;
        while t0.elapsed() < dur || k < 20 {
            let lo: Vec<u64> = sh.done.iter().map(|d| d.load(Ordering::SeqCst)).collect();
            let child = space.fork_with(strategy).unwrap();
            let hi: Vec<u64> = sh.started.iter().map(|d| d.load(Ordering::SeqCst)).collect();
            let gens = check_child(&child, &sh, &lo, &hi, prev.as_deref(), k);
            prev = Some(gens);
            forks += 1;
            if k % 7 == 0 {
                kept.push((child, Vec::new()));
                let last = kept.last_mut().unwrap();
                last.1 = last.0.as_slice().to_vec();
                if kept.len() > 4 {
                    let (old, copy) = kept.remove(0);
                    assert_same(old.as_slice(), &copy, 0, &format_args!("kept child re-check at fork {k}"));
                    kept_checks += 1;
                }
            }
            k += 1;
        }
        sh.stop.store(true, Ordering::Relaxed);
        let g: Vec<u64> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        for (old, copy) in &kept {
            assert_same(old.as_slice(), copy, 0, &"kept child final re-check");
            kept_checks += 1;
        }
        g
    });
    // The parent itself holds every writer's last generation everywhere.
    let view = space.as_ptr() as *const u64;
    for p in 0..pages {
        for w in 0..WORDS {
            let t = sh.owner(p, w);
            // SAFETY: in bounds; the writers have stopped.
            let v = unsafe { view.add(p * WORDS + w).read_volatile() };
            assert_eq!(v, encode(t, gens_written[t], p, w), "parent page {p} word {w} after the writers stopped");
        }
    }
    arena.check_invariants().unwrap();
    println!(
        "{mode:?}: {forks} forks of a {pages}-page space (itself a fork: {of_fork}) under {threads} writers (interleaved words: {interleave}) (generations {gens_written:?}), {kept_checks} kept-child re-checks"
    );
    if let Some(root) = &root {
        assert!(root.as_slice().iter().all(|&b| b == 0), "the root never changes");
    }
    drop(space);
    drop(root);
    assert_nothing_left(&arena, "forks_of_a_written_space");
}

fn secs() -> Duration {
    Duration::from_millis(env_u64("COWARENA_STRESS_SECS", 2) * 1000)
}

#[test]
fn forks_of_a_written_space_signal_mode() {
    // 600 pages: two tables, the second partly used.
    forks_of_a_written_space(FaultMode::Signal, 600, 3, false, secs());
}

#[test]
fn forks_of_a_written_space_thread_mode() {
    forks_of_a_written_space(FaultMode::Thread, 300, 2, false, secs());
}

/// Every page written by every thread at once: racing faults (read and write, COW and
/// reuse) on the same page while forks freeze it.
#[test]
fn forks_of_a_space_written_word_interleaved_signal_mode() {
    forks_of_a_written_space(FaultMode::Signal, 520, 3, true, secs());
}

#[test]
fn forks_of_a_space_written_word_interleaved_thread_mode() {
    forks_of_a_written_space(FaultMode::Thread, 200, 3, true, secs());
}

/// The space written is a fork (async-WP in the default signal-mode arena:
/// `ArenaBuilder::async_forks`; trapping in thread mode, where it is opt-in).
#[test]
fn forks_of_a_written_fork_signal_mode() {
    let offered = cowarena::probe::probe().feature("WP_ASYNC").and_then(|f| f.present) == Some(true);
    assert_eq!(Arena::new().unwrap().async_forks(), offered, "async forks are the default where offered");
    forks_of_a_written(FaultMode::Signal, 520, 3, true, true, ForkStrategy::Auto, secs());
}

#[test]
fn forks_of_a_written_fork_thread_mode() {
    forks_of_a_written(FaultMode::Thread, 300, 2, false, true, ForkStrategy::Auto, secs());
}

/// A root forked with `ForkStrategy::Freeze` while threads write it: its frozen (empty)
/// view moves to the async-WP userfaultfd at the first such fork (`async_forks`), with
/// the writers trapping in one context or the other meanwhile.
#[test]
fn freezing_forks_of_a_written_root_signal_mode() {
    forks_of_a_written(FaultMode::Signal, 520, 3, true, false, ForkStrategy::Freeze, secs());
}

#[test]
fn freezing_forks_of_a_written_root_thread_mode() {
    forks_of_a_written(FaultMode::Thread, 300, 3, true, false, ForkStrategy::Freeze, secs());
}

/// Threads write different children of one parent at once (views and API), each verifying
/// its own child afterwards; the parent never changes.
#[test]
fn children_written_concurrently() {
    let _wd = Watchdog::new("children_written_concurrently", Duration::from_secs(180));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let len = (5 << 20) + 1234; // three tables, ragged end
        let mut parent = arena.space(len).unwrap();
        let mut want_parent = vec![0u8; len];
        Rng::new(7).fill(&mut want_parent);
        parent.as_mut_slice().copy_from_slice(&want_parent);
        let children: Vec<Space> = (0..4).map(|_| parent.fork().unwrap()).collect();
        let barrier = Barrier::new(children.len());
        let parent = Arc::new(parent);
        std::thread::scope(|s| {
            for (c, mut child) in children.into_iter().enumerate() {
                let (barrier, want_parent, parent) = (&barrier, &want_parent, parent.clone());
                s.spawn(move || {
                    let mut rng = Rng::new(100 + c as u64);
                    let mut model = want_parent.clone();
                    barrier.wait();
                    for round in 0..300 {
                        let (off, n) = rng.span(len);
                        let mut data = vec![0u8; n];
                        rng.fill(&mut data);
                        if round % 2 == 0 {
                            child.as_mut_slice()[off..off + n].copy_from_slice(&data);
                        } else {
                            child.write(off, &data).unwrap();
                        }
                        model[off..off + n].copy_from_slice(&data);
                        // A grandchild now and then, written too, then dropped.
                        if round % 50 == 25 {
                            let mut g = child.fork().unwrap();
                            g.as_mut_slice()[off] ^= 0xFF;
                            assert_same(
                                &child.as_slice()[off..off + n],
                                &model[off..off + n],
                                off,
                                &format_args!("child {c} after grandchild write"),
                            );
                        }
                        if round % 10 == 0 {
                            let (o, m) = rng.span(len);
                            assert_same(
                                &child.as_slice()[o..o + m],
                                &model[o..o + m],
                                o,
                                &format_args!("child {c} round {round}"),
                            );
                            let (o, m) = rng.span(len);
                            assert_same(
                                &parent.as_slice()[o..o + m],
                                &want_parent[o..o + m],
                                o,
                                &format_args!("parent seen from child thread {c}"),
                            );
                        }
                    }
                    assert_same(child.as_slice(), &model, 0, &format_args!("{mode:?} child {c} final"));
                    let mut back = vec![0u8; len];
                    child.read(0, &mut back).unwrap();
                    assert_same(&back, &model, 0, &format_args!("{mode:?} child {c} final (API)"));
                });
            }
        });
        assert_same(parent.as_slice(), &want_parent, 0, &format_args!("{mode:?} parent after children wrote"));
        arena.check_invariants().unwrap();
        drop(parent);
        assert_nothing_left(&arena, "children_written_concurrently");
    }
}

/// The checks above must be able to fail: a word from the wrong thread is rejected.
#[test]
fn snapshot_check_rejects_foreign_words() {
    assert!(decode(encode(1, 5, 3, 7), 1, 3, 7).is_ok());
    assert!(decode(encode(2, 5, 3, 7), 1, 3, 7).is_err());
    assert!(decode(encode(1, 5, 4, 7), 1, 3, 7).is_err());
    assert!(decode(0xdead_beef, 1, 3, 7).is_err());
}

/// Read windows filled with the arena lock released (`ArenaBuilder::unlocked_fills`)
/// racing the operations that must wait for them: threads read a snapshot sequentially
/// (dense fills, their copies straight from the parent's view pages, kept warm by
/// `KeepWarm` forks) while the parent's writer overwrites every page — each write
/// evacuates a home the readers may be copying from — and forks of other strategies,
/// drops and compaction go on. Every word read must be the snapshot's.
#[test]
fn unlocked_read_fills_race_evacuations_forks_and_drops() {
    let _wd = Watchdog::new("unlocked_read_fills_race_evacuations_forks_and_drops", Duration::from_secs(300));
    const PAGES: usize = 4096; // 16 MiB: 8 tables
    let arena = Arena::builder().fault_mode(FaultMode::Signal).plain_until_fork(false).build().unwrap();
    assert!(arena.stats().pages_filled_unlocked == 0);
    let s = arena.space(PAGES * PAGE).unwrap();
    let write_all = |g: u64| {
        // SAFETY: only this closure's caller writes the parent's view at a time.
        let words = unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u64, PAGES * WORDS) };
        let mut order: Vec<usize> = (0..PAGES).collect();
        let mut rng = Rng::new(g);
        for i in (1..PAGES).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for p in order {
            for w in 0..WORDS {
                words[p * WORDS + w] = encode(0, g, p, w);
            }
        }
    };
    write_all(1);
    let (t0, limit) = (Instant::now(), secs().min(Duration::from_secs(4)));
    let mut round = 0u64;
    while t0.elapsed() < limit || round < 4 {
        let g = round + 1;
        let strategy = if round % 3 == 2 { cowarena::ForkStrategy::Auto } else { cowarena::ForkStrategy::KeepWarm };
        let snap = s.fork_with(strategy).unwrap();
        let other = if round % 2 == 0 { Some(s.fork().unwrap()) } else { None };
        std::thread::scope(|sc| {
            for r in 0..2usize {
                let snap = &snap;
                sc.spawn(move || {
                    let words = snap.as_slice();
                    // Each reader sweeps its half sequentially: fault-around, then dense fills.
                    for p in (r * PAGES / 2)..((r + 1) * PAGES / 2) {
                        for w in [0, WORDS / 2, WORDS - 1] {
                            let at = p * PAGE + w * 8;
                            let v = u64::from_ne_bytes(words[at..at + 8].try_into().unwrap());
                            match decode(v, 0, p, w) {
                                Ok(got) if got == g => {}
                                Ok(got) => {
                                    panic!("round {round}: snapshot page {p} word {w} is generation {got}, not {g}")
                                }
                                Err(e) => panic!("round {round}: {e}"),
                            }
                        }
                    }
                });
            }
            // The parent's writer: every write of a page kept warm evacuates its home.
            sc.spawn(|| write_all(g + 1));
            // The API readers take the lock beside fills in flight (`Space::read`,
            // `write_to`): they must still see the snapshot's bytes.
            let snap = &snap;
            sc.spawn(move || {
                let check = |bytes: &[u8], p: usize, what: &str| {
                    for w in [0, WORDS - 1] {
                        let v = u64::from_ne_bytes(bytes[w * 8..w * 8 + 8].try_into().unwrap());
                        match decode(v, 0, p, w) {
                            Ok(got) if got == g => {}
                            Ok(got) => panic!("round {round}: {what} of page {p} word {w}: generation {got}, not {g}"),
                            Err(e) => panic!("round {round}: {what}: {e}"),
                        }
                    }
                };
                let mut page = vec![0u8; PAGE];
                for p in (0..PAGES).step_by(61) {
                    snap.read(p * PAGE, &mut page).unwrap();
                    check(&page, p, "Space::read");
                }
                let mut image = Vec::with_capacity(PAGES * PAGE);
                assert_eq!(snap.write_to(&mut image).unwrap(), (PAGES * PAGE) as u64);
                for p in (0..PAGES).step_by(7) {
                    check(&image[p * PAGE..(p + 1) * PAGE], p, "write_to");
                }
            });
        });
        drop(other);
        if round % 4 == 3 {
            arena.compact().unwrap();
        }
        drop(snap);
        round += 1;
    }
    let st = arena.stats();
    println!(
        "{round} rounds: {} pages filled with the lock released, {} spurious faults (a page being filled)",
        st.pages_filled_unlocked, st.faults.spurious
    );
    assert!(st.pages_filled_unlocked > 0, "no read window was filled with the lock released");
    arena.check_invariants().unwrap();
    drop(s);
    assert_nothing_left(&arena, "unlocked read fills");
}
