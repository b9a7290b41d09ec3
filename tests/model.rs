//! Model-based test (issues 2 and 3): random sequences of space creation, fork (nested,
//! many children, each fork strategy), writes and reads through views and through the
//! API, populate, drops in random order, and the seed's rule set (discard, migrate,
//! compact, clean, clear referenced bits, reset), checked byte for byte against a plain
//! `Vec<u8>` per space. A third of the roots, and half the explicit-strategy forks, are
//! served in the fault mode other than the arena's (`space_in`, `fork_in_with`).
//!
//! Defaults: 40 seeds × 400 operations per fault mode. More with
//! `COWARENA_MODEL_SEEDS=N COWARENA_MODEL_OPS=M`; replay one seed with
//! `COWARENA_MODEL_SEED=S` (a failure prints the seed, the fault mode and the last ops).

mod common;

use std::collections::VecDeque;
use std::fmt::Write as _;

use common::{assert_nothing_left, assert_same, env_u64, Rng, PAGE, TABLE};
use cowarena::{Arena, FaultMode, Space};

const MAX_LIVE: usize = 10;

struct Entry {
    space: Space,
    model: Vec<u8>,
    /// Generation of the space in its fork tree (0: created, n: fork of a fork …).
    depth: u32,
}

/// Prints the seed and the recent history when the run panics.
struct Trail {
    seed: u64,
    mode: FaultMode,
    op: usize,
    log: VecDeque<String>,
}

impl Trail {
    fn note(&mut self, s: String) {
        if self.log.len() == 24 {
            self.log.pop_front();
        }
        self.log.push_back(s);
    }
}

impl Drop for Trail {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut msg = format!(
                "model test FAILED: seed {} ({:?} mode) at op {}; replay with COWARENA_MODEL_SEED={}\nlast ops:\n",
                self.seed, self.mode, self.op, self.seed
            );
            for l in &self.log {
                let _ = writeln!(msg, "  {l}");
            }
            eprintln!("{msg}");
        }
    }
}

fn pick_size(rng: &mut Rng) -> usize {
    match rng.below(8) {
        0 => rng.range(1, 64),                                 // tiny, one partial page
        1 => rng.range(1, 4) * PAGE,                           // page multiples
        2 => rng.range(1, 40) * PAGE + rng.range(1, PAGE - 1), // partial last page
        3 => TABLE,                                            // exactly one table
        4 => TABLE + rng.range(1, 3 * PAGE),                   // just over a table
        5 => rng.range(2, 3) * TABLE + rng.below(TABLE),       // several tables, ragged end
        _ => rng.range(1, 300 * 1024),
    }
}

fn verify_full(e: &Entry, ctx: &str) {
    assert_same(e.space.as_slice(), &e.model, 0, &format_args!("{ctx}: full view compare"));
}

fn other_mode(m: FaultMode) -> FaultMode {
    match m {
        FaultMode::Signal => FaultMode::Thread,
        _ => FaultMode::Signal,
    }
}

/// Which views are async-WP: none, every one (`ArenaBuilder::async_wp`), or the forks'
/// (`ArenaBuilder::async_forks`, the default where the kernel offers it).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Wp {
    Sync,
    All,
    Forks,
}

fn run_seed(seed: u64, mode: FaultMode, wp: Wp, ops: usize) -> u64 {
    let mut rng = Rng::new(seed);
    // Odd seeds register every view from the start; even seeds keep new spaces plain
    // kernel memory until their first fork, clean or clear_referenced (adoption).
    let plain = seed % 2 == 0;
    let arena = Arena::builder()
        .fault_mode(mode)
        .plain_until_fork(plain)
        .async_wp(wp == Wp::All)
        .async_forks(wp == Wp::Forks)
        .build()
        .expect("userfaultfd");
    let mut live: Vec<Entry> = Vec::new();
    let mut trail = Trail { seed, mode, op: 0, log: VecDeque::new() };
    let mut bytes_checked = 0u64;

    for op in 0..ops {
        trail.op = op;
        let choice = if live.is_empty() { 0 } else { rng.below(115) };
        match choice {
            // create
            0..=5 => {
                if live.len() >= MAX_LIVE {
                    continue;
                }
                let len = pick_size(&mut rng);
                // A third of the new roots are served in the arena's other fault mode
                // (a second userfaultfd): families mix modes through forks of them.
                let m = if rng.chance(1, 3) { other_mode(mode) } else { mode };
                trail.note(format!("create len={len:#x} {m:?} -> #{}", live.len()));
                let space = arena.space_in(len, m).expect("space");
                assert_eq!(space.fault_mode(), m);
                assert_eq!(space.len(), len);
                live.push(Entry { space, model: vec![0; len], depth: 0 });
            }
            // fork (of any space: forks of forks arise naturally); sometimes a burst of children
            6..=17 => {
                let i = rng.below(live.len());
                let n = if rng.chance(1, 5) { rng.range(2, 4) } else { 1 };
                for _ in 0..n {
                    if live.len() >= MAX_LIVE {
                        break;
                    }
                    trail.note(format!("fork #{i} (depth {}) -> #{}", live[i].depth, live.len()));
                    let child = live[i].space.fork().expect("fork");
                    assert_eq!(child.len(), live[i].space.len());
                    let model = live[i].model.clone();
                    let depth = live[i].depth + 1;
                    live.push(Entry { space: child, model, depth });
                }
            }
            // write through the view
            18..=37 => {
                let i = rng.below(live.len());
                let e = &mut live[i];
                let (off, len) = rng.span(e.space.len());
                trail.note(format!("view write #{i} {off:#x}+{len:#x}"));
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                e.space.as_mut_slice()[off..off + len].copy_from_slice(&data);
                e.model[off..off + len].copy_from_slice(&data);
            }
            // write one byte / one u64 through the view (read-modify-write faults)
            38..=43 => {
                let i = rng.below(live.len());
                let e = &mut live[i];
                let off = rng.offset(e.space.len());
                trail.note(format!("view rmw #{i} {off:#x}"));
                let v = e.space.as_slice()[off];
                assert_eq!(v, e.model[off], "seed {seed}: view byte {off:#x} of #{i} before rmw");
                let nv = v.wrapping_add(1 + rng.below(250) as u8);
                e.space.as_mut_slice()[off] = nv;
                e.model[off] = nv;
            }
            // write through the API
            44..=58 => {
                let i = rng.below(live.len());
                let e = &mut live[i];
                let (off, len) = rng.span(e.space.len());
                trail.note(format!("api write #{i} {off:#x}+{len:#x}"));
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                e.space.write(off, &data).expect("write");
                e.model[off..off + len].copy_from_slice(&data);
            }
            // read through the view
            59..=73 => {
                let i = rng.below(live.len());
                let e = &live[i];
                let (off, len) = rng.span(e.space.len());
                trail.note(format!("view read #{i} {off:#x}+{len:#x}"));
                assert_same(
                    &e.space.as_slice()[off..off + len],
                    &e.model[off..off + len],
                    off,
                    &format_args!("seed {seed} {mode:?} op {op}: view read of #{i}"),
                );
                bytes_checked += len as u64;
            }
            // read through the API
            74..=85 => {
                let i = rng.below(live.len());
                let e = &live[i];
                let (off, len) = rng.span(e.space.len());
                trail.note(format!("api read #{i} {off:#x}+{len:#x}"));
                let mut buf = vec![0xA5u8; len];
                e.space.read(off, &mut buf).expect("read");
                assert_same(
                    &buf,
                    &e.model[off..off + len],
                    off,
                    &format_args!("seed {seed} {mode:?} op {op}: api read of #{i}"),
                );
                bytes_checked += len as u64;
            }
            // populate (read or write), then the view must still match
            86..=88 => {
                let i = rng.below(live.len());
                let e = &live[i];
                let (off, len) = rng.span(e.space.len());
                let w = rng.chance(1, 2);
                trail.note(format!("populate #{i} {off:#x}+{len:#x} write={w}"));
                e.space.populate(off, len, w).expect("populate");
                assert_same(
                    &e.space.as_slice()[off..off + len],
                    &e.model[off..off + len],
                    off,
                    &format_args!("seed {seed} {mode:?} op {op}: after populate of #{i}"),
                );
                bytes_checked += len as u64;
            }
            // API write from view memory of another space (the source may fault), and API read into a view
            89..=90 => {
                if live.len() < 2 {
                    continue;
                }
                let (a, b) = (rng.below(live.len()), rng.below(live.len()));
                if a == b {
                    continue;
                }
                let n = rng.range(1, 3 * PAGE).min(live[a].space.len()).min(live[b].space.len());
                let src_off = rng.below(live[a].space.len() - n + 1);
                let dst_off = rng.below(live[b].space.len() - n + 1);
                trail.note(format!("api write #{b} {dst_off:#x}+{n:#x} from view of #{a} at {src_off:#x}"));
                let (ea, eb) = if a < b {
                    let (l, r) = live.split_at_mut(b);
                    (&l[a], &mut r[0])
                } else {
                    let (l, r) = live.split_at_mut(a);
                    (&r[0], &mut l[b])
                };
                eb.space.write(dst_off, &ea.space.as_slice()[src_off..src_off + n]).expect("write from view");
                eb.model[dst_off..dst_off + n].copy_from_slice(&ea.model[src_off..src_off + n]);
                // and read back into a's view: a's model changes accordingly
                trail.note(format!("api read #{b} {dst_off:#x}+{n:#x} into view of #{a} at {src_off:#x}"));
                let (ea, eb) = if a < b {
                    let (l, r) = live.split_at_mut(b);
                    (&mut l[a], &r[0])
                } else {
                    let (l, r) = live.split_at_mut(a);
                    (&mut r[0], &l[b])
                };
                eb.space.read(dst_off, &mut ea.space.as_mut_slice()[src_off..src_off + n]).expect("read into view");
                let chunk = eb.model[dst_off..dst_off + n].to_vec();
                ea.model[src_off..src_off + n].copy_from_slice(&chunk);
            }
            // full compare of one space
            91..=93 => {
                let i = rng.below(live.len());
                trail.note(format!("verify #{i}"));
                verify_full(&live[i], &format!("seed {seed} {mode:?} op {op}: #{i}"));
                bytes_checked += live[i].model.len() as u64;
            }
            // stream a space out (issue 15): exactly its model's bytes
            94..=95 => {
                let i = rng.below(live.len());
                trail.note(format!("write_to #{i}"));
                let mut out = Vec::new();
                let n = live[i].space.write_to(&mut out).expect("write_to");
                assert_eq!(n as usize, live[i].model.len());
                assert_same(&out, &live[i].model, 0, &format_args!("seed {seed} {mode:?} op {op}: write_to of #{i}"));
                bytes_checked += n;
            }
            // save a space and load it back as a new one (its own family)
            96 => {
                if live.len() >= MAX_LIVE {
                    continue;
                }
                let i = rng.below(live.len());
                let path = std::env::temp_dir().join(format!(
                    "cowarena-model-{}-{seed}-{op}-{:?}.img",
                    std::process::id(),
                    std::thread::current().id()
                ));
                trail.note(format!("save #{i}, load -> #{}", live.len()));
                live[i].space.save(&path).expect("save");
                let space = arena.load(&path).expect("load");
                std::fs::remove_file(&path).expect("remove image");
                let model = live[i].model.clone();
                verify_full(
                    &Entry { space: space.fork().expect("fork of a loaded space"), model: model.clone(), depth: 1 },
                    &format!("seed {seed} op {op}: fork of loaded #{i}"),
                );
                live.push(Entry { space, model, depth: 0 });
            }
            // the seed's rule set (issue 3): discard a page-aligned range
            100..=102 => {
                let i = rng.below(live.len());
                let len = live[i].model.len();
                let off = rng.below(len.div_ceil(PAGE)) * PAGE;
                let n = rng.range(1, (len - off).min(3 * TABLE));
                trail.note(format!("discard #{i} off={off:#x} len={n:#x}"));
                live[i].space.discard(off, n).expect("discard");
                let end = (off + n).div_ceil(PAGE) * PAGE;
                live[i].model[off..end.min(len)].fill(0);
            }
            103 => {
                let i = rng.below(live.len());
                let len = live[i].model.len();
                let off = rng.below(len);
                let n = rng.range(1, len - off);
                trail.note(format!("migrate #{i} off={off:#x} len={n:#x}"));
                live[i].space.migrate(off, n).expect("migrate");
            }
            104 => {
                trail.note("compact".into());
                arena.compact().expect("compact");
            }
            105 => {
                let i = rng.below(live.len());
                let len = live[i].model.len();
                trail.note(format!("clean #{i}"));
                live[i].space.clean(0, len).expect("clean");
                assert!(live[i].space.dirty_pages(0, len).unwrap().is_empty());
            }
            106 => {
                trail.note("clear_referenced".into());
                arena.clear_referenced().expect("clear_referenced");
            }
            // reset a space to another space of its family and size
            107..=108 => {
                let (a, b) = (rng.below(live.len()), rng.below(live.len()));
                trail.note(format!("reset_to #{a} <- #{b}"));
                // A space cannot be reset to itself (the borrow checker rejects it).
                if a == b {
                    continue;
                }
                let (dst, src) = if a < b {
                    let (l, r) = live.split_at_mut(b);
                    (&mut l[a], &r[0])
                } else {
                    let (l, r) = live.split_at_mut(a);
                    (&mut r[0], &l[b])
                };
                match dst.space.reset_to(&src.space) {
                    Ok(()) => dst.model = src.model.clone(),
                    Err(cowarena::Error::NotRelated) => {}
                    Err(e) => panic!("seed {seed}: reset_to: {e}"),
                }
            }
            // fork with an explicit strategy
            109..=111 => {
                let i = rng.below(live.len());
                if live.len() >= MAX_LIVE {
                    continue;
                }
                let strategy =
                    if rng.chance(1, 2) { cowarena::ForkStrategy::KeepWarm } else { cowarena::ForkStrategy::Freeze };
                let m =
                    if rng.chance(1, 2) { other_mode(live[i].space.fault_mode()) } else { live[i].space.fault_mode() };
                trail.note(format!("fork_in_with #{i} {m:?} {strategy:?} -> #{}", live.len()));
                let space = live[i].space.fork_in_with(m, strategy).expect("fork_in_with");
                let (model, depth) = (live[i].model.clone(), live[i].depth + 1);
                live.push(Entry { space, model, depth });
            }
            // evict cold frames (some, or all that can go): later accesses bring them back
            112..=114 => {
                let target = if rng.chance(1, 3) { u64::MAX } else { (1 + rng.below(600) as u64) * PAGE as u64 };
                trail.note(format!("evict {target:#x}"));
                let st = arena.evict(target).expect("evict");
                assert!(target == u64::MAX || st.frames_evicted * PAGE as u64 <= target);
            }
            // drop one, in random order (parents before children and the reverse)
            _ => {
                let i = rng.below(live.len());
                trail.note(format!("drop #{i} (depth {})", live[i].depth));
                if rng.chance(1, 2) {
                    verify_full(&live[i], &format!("seed {seed} {mode:?} op {op}: #{i} before drop"));
                    bytes_checked += live[i].model.len() as u64;
                }
                let e = live.swap_remove(i);
                drop(e);
            }
        }
        if op % 50 == 49 {
            arena.check_invariants().unwrap_or_else(|e| panic!("seed {seed} {mode:?} op {op}: invariant broken: {e}"));
            assert_eq!(arena.stats().spaces_in_use, live.len() as u64, "seed {seed}: spaces_in_use");
        }
    }

    // Final: every space still matches its model, then drop all in random order.
    for (i, e) in live.iter().enumerate() {
        verify_full(e, &format!("seed {seed} {mode:?} end: #{i}"));
        bytes_checked += e.model.len() as u64;
    }
    arena.check_invariants().unwrap_or_else(|e| panic!("seed {seed} {mode:?} end: invariant broken: {e}"));
    PAGES_MOVED.with(|m| m.set(m.get() + arena.stats().pages_moved));
    while !live.is_empty() {
        let i = rng.below(live.len());
        drop(live.swap_remove(i));
        if rng.chance(1, 3) {
            arena.check_invariants().unwrap_or_else(|e| panic!("seed {seed} {mode:?} final drops: {e}"));
        }
    }
    assert_nothing_left(&arena, &format!("seed {seed} {mode:?}"));
    bytes_checked
}

// Pages write faults took with UFFDIO_MOVE over all seeds, per test thread (the path must be exercised).
thread_local! { static PAGES_MOVED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) } }

fn run(mode: FaultMode, wp: Wp, first_seed: u64) {
    let ops = env_u64("COWARENA_MODEL_OPS", 400) as usize;
    let seeds: Vec<u64> = match std::env::var("COWARENA_MODEL_SEED") {
        Ok(s) => vec![s.trim().parse().expect("COWARENA_MODEL_SEED")],
        Err(_) => (0..env_u64("COWARENA_MODEL_SEEDS", 40)).map(|i| first_seed + i).collect(),
    };
    let t0 = std::time::Instant::now();
    let mut checked = 0;
    for &seed in &seeds {
        checked += run_seed(seed, mode, wp, ops);
    }
    let moved = PAGES_MOVED.with(|m| m.get());
    println!(
        "model {mode:?} {wp:?}: {} seeds x {ops} ops, {} MiB compared, 0 divergences, {moved} pages taken by UFFDIO_MOVE, {:.1?}",
        seeds.len(),
        checked >> 20,
        t0.elapsed()
    );
    let offered = cowarena::probe::probe().feature("MOVE").and_then(|f| f.present) == Some(true);
    if seeds.len() >= 10 && ops >= 200 && offered {
        assert!(moved > 0, "no write fault took an exclusive page: the UFFDIO_MOVE path went untested");
    }
}

/// The default arena: forks' stores to read-only pages are the kernel's alone
/// (`ArenaBuilder::async_forks`), the other spaces trap.
#[test]
fn model_signal_mode() {
    run(FaultMode::Signal, Wp::Forks, 1);
}

#[test]
fn model_thread_mode() {
    run(FaultMode::Thread, Wp::Forks, 1_000_001);
}

/// Every view traps its first store to a page (`async_forks(false)`; kernels before 6.7).
#[test]
fn model_signal_mode_all_trapping() {
    run(FaultMode::Signal, Wp::Sync, 4_000_001);
}

#[test]
fn model_thread_mode_all_trapping() {
    run(FaultMode::Thread, Wp::Sync, 5_000_001);
}

/// Stores to read-only pages served by the kernel alone in every view (`ArenaBuilder::async_wp`).
#[test]
fn model_signal_mode_async_wp() {
    run(FaultMode::Signal, Wp::All, 2_000_001);
}

#[test]
fn model_thread_mode_async_wp() {
    run(FaultMode::Thread, Wp::All, 3_000_001);
}

/// The model must be able to fail: a deliberately wrong model is detected.
#[test]
fn model_detects_divergence() {
    let arena = Arena::new().unwrap();
    let mut a = arena.space(3 * PAGE + 5).unwrap();
    a.as_mut_slice()[PAGE + 1] = 7;
    let b = a.fork().unwrap();
    a.as_mut_slice()[PAGE + 1] = 8;
    let mut model = vec![0u8; 3 * PAGE + 5];
    model[PAGE + 1] = 8; // wrong for b: b kept 7
    let e = Entry { space: b, model, depth: 1 };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| verify_full(&e, "deliberate")));
    assert!(r.is_err(), "a wrong model was not detected");
    drop(e);
    drop(a);
    assert_nothing_left(&arena, "deliberate");
}
