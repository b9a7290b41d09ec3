//! The cowarena benchmark (issue 4): workloads W1–W5, each run for cowarena and for its
//! baselines (`baselines.rs`: the kernel's `fork(2)` and faults, a naive uffd-wp snapshot, a
//! memcpy snapshot, a fork server, a memfd reset, a dirty-page memcpy reset, the kernel's
//! transparent `UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN` reset) in the same process run, then a
//! table of absolute figures and ratios and a PASS/MISS line per target.
//!
//! ```text
//! cargo run --release --example bench                      # full run (≈ 3 minutes)
//! cargo run --release --example bench -- --quick           # under a minute
//! cargo run --release --example bench -- --json out.json --svg out.svg
//! cargo run --release --example bench -- --only W1,W4      # a subset (for development)
//! ```
//!
//! W4 opens with issue 12's random-order rows (dense and sparse, beside the kernel's same
//! pattern and the same-thread floor), "fork + touch every page" totals against `fork(2)`
//! and the copy floor, and the break-even share; its sequential rows follow.
//!
//! W2 runs `reset_to` and the WP_ASYNC peer in interleaved rounds on the same page sequence
//! (medians compared), then issue 14's dirty-tracking rows: `dirty_pages` and `clean` on a
//! 1 GiB space with 1 % of its pages written, against `PAGEMAP_SCAN` answering the same
//! questions; every side's answer is checked to be exactly the pages written.
//!
//! Ratios are oriented so that **> 1 means cowarena wins**: cowarena ÷ baseline for rates,
//! baseline ÷ cowarena for latencies and memory.
//!
//! Nothing of a cowarena arena is alive while a kernel baseline runs: a baseline's `fork(2)`
//! would otherwise copy the arena's page tables too and look slower than it is.

mod baselines;

use std::fmt::Write as _;
use std::ops::Range;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use baselines::Rng;
use cowarena::{Arena, FaultMode, Space};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

// ---------------------------------------------------------------------------------------
// The one line to change when `Space::reset` lands (W2).
// ---------------------------------------------------------------------------------------

/// W2's in-place reset of `work` (a fork of `snap`) to `snap`'s contents, keeping clean view
/// pages mapped; `None` while the API is not built yet (the row then reads "n/a").
fn reset_in_place(work: &mut Space, snap: &Space) -> Option<cowarena::Result<()>> {
    Some(work.reset_to(snap))
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

struct Config {
    quick: bool,
    json: Option<String>,
    svg: Option<String>,
    only: Option<Vec<String>>,
}

impl Config {
    fn parse() -> Res<Config> {
        let mut c = Config { quick: false, json: None, svg: None, only: None };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => c.quick = true,
                "--json" => c.json = Some(args.next().ok_or("--json needs a path")?),
                "--svg" => c.svg = Some(args.next().ok_or("--svg needs a path")?),
                "--only" => {
                    let list = args.next().ok_or("--only needs a list such as W1,W3")?;
                    c.only = Some(list.split(',').map(|s| s.trim().to_uppercase()).collect());
                }
                "--bench" => {} // passed by `cargo bench --examples`
                "-h" | "--help" => {
                    println!("usage: bench [--quick] [--json PATH] [--svg PATH] [--only W1,W2,...]");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (try --help)").into()),
            }
        }
        Ok(c)
    }

    fn runs(&self, w: &str) -> bool {
        self.only.as_ref().map_or(true, |o| o.iter().any(|x| x == w))
    }
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Unit {
    /// A duration in seconds (lower is better).
    Secs,
    /// Events per second (higher is better).
    PerSec,
    /// Bytes (lower is better).
    Bytes,
    /// A plain factor (higher is better).
    Factor,
    /// A plain factor where lower is better (a slowdown).
    Slowdown,
    /// A share of a whole, 0..=1 (shown as a percentage; higher is better).
    Share,
}

impl Unit {
    fn higher_is_better(self) -> bool {
        matches!(self, Unit::PerSec | Unit::Factor | Unit::Share)
    }

    fn name(self) -> &'static str {
        match self {
            Unit::Secs => "s",
            Unit::PerSec => "1/s",
            Unit::Bytes => "B",
            Unit::Factor | Unit::Slowdown => "x",
            Unit::Share => "share",
        }
    }

    fn fmt(self, v: Option<f64>) -> String {
        let Some(v) = v else { return "n/a (not built yet)".into() };
        if !v.is_finite() {
            return "n/a".into();
        }
        match self {
            Unit::Secs if v >= 1.0 => format!("{v:.2} s"),
            Unit::Secs if v >= 1e-3 => format!("{:.2} ms", v * 1e3),
            Unit::Secs if v >= 1e-6 => format!("{:.2} µs", v * 1e6),
            Unit::Secs => format!("{:.0} ns", v * 1e9),
            Unit::PerSec if v >= 1e6 => format!("{:.2} M/s", v / 1e6),
            Unit::PerSec if v >= 1e3 => format!("{:.1} k/s", v / 1e3),
            Unit::PerSec => format!("{v:.0} /s"),
            Unit::Bytes if v >= GIB as f64 => format!("{:.2} GiB", v / GIB as f64),
            Unit::Bytes => format!("{:.1} MiB", v / MIB as f64),
            Unit::Factor | Unit::Slowdown => format!("{v:.2}x"),
            Unit::Share => format!("{:.2} %", v * 100.0),
        }
    }
}

/// One line of the table: a cowarena figure against one baseline.
struct Row {
    workload: &'static str,
    metric: String,
    unit: Unit,
    cowarena: Option<f64>,
    baseline_name: String,
    baseline: Option<f64>,
}

impl Row {
    /// The baseline's figure; "-" for a row without a baseline (a derived figure).
    fn baseline_text(&self) -> String {
        if self.baseline_name.is_empty() {
            "-".into()
        } else {
            self.unit.fmt(self.baseline)
        }
    }

    /// > 1 means cowarena wins.
    fn ratio(&self) -> Option<f64> {
        let (c, b) = (self.cowarena?, self.baseline?);
        let r = if self.unit.higher_is_better() { c / b } else { b / c };
        r.is_finite().then_some(r)
    }
}

/// A target from the issue, judged on one figure.
struct Target {
    id: &'static str,
    text: String,
    value: Option<f64>,
    threshold: f64,
    /// true: `value >= threshold` passes; false: `value <= threshold` passes.
    at_least: bool,
    unit: Unit,
}

impl Target {
    fn pass(&self) -> Option<bool> {
        let v = self.value.filter(|v| v.is_finite())?;
        Some(if self.at_least { v >= self.threshold } else { v <= self.threshold })
    }
}

/// Fork latency of one size, for the chart (seconds).
#[derive(Clone, Copy, Default)]
struct W1Point {
    size: usize,
    cowarena: f64,
    kernel: f64,
    uffd_wp: f64,
    memcpy: f64,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    targets: Vec<Target>,
    w1: Vec<W1Point>,
    notes: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        workload: &'static str,
        metric: impl Into<String>,
        unit: Unit,
        cow: Option<f64>,
        name: &str,
        base: Option<f64>,
    ) {
        let row =
            Row { workload, metric: metric.into(), unit, cowarena: cow, baseline_name: name.into(), baseline: base };
        println!(
            "  {:<46} cowarena {:>14}   {:<22} {:>14}   ratio {}",
            row.metric,
            unit.fmt(row.cowarena),
            row.baseline_name,
            row.baseline_text(),
            fmt_ratio(row.ratio())
        );
        self.rows.push(row);
    }

    fn target(
        &mut self,
        id: &'static str,
        text: impl Into<String>,
        value: Option<f64>,
        at_least: bool,
        threshold: f64,
        unit: Unit,
    ) {
        self.targets.push(Target { id, text: text.into(), value, threshold, at_least, unit });
    }

    fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        println!("  note: {s}");
        self.notes.push(s);
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 100.0 => format!("{r:.0}x"),
        Some(r) if r >= 10.0 => format!("{r:.1}x"),
        Some(r) => format!("{r:.2}x"),
        None => "n/a".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers: touching view pages, memory figures
// ---------------------------------------------------------------------------------------

fn pages_of(s: &Space) -> usize {
    s.len() / PAGE
}

/// Stores `v` in the first word of page `p` of `s`'s view (a view fault when needed).
#[inline]
fn store(s: &Space, p: usize, v: u64) {
    assert!(p < pages_of(s));
    // SAFETY: page `p` lies inside the view, which `s` keeps mapped; the word is aligned.
    // Concurrent writers write disjoint pages and create no references into the view (the
    // aliasing contract of `Space`).
    unsafe { std::ptr::write_volatile(s.as_mut_ptr().add(p * PAGE).cast::<u64>(), v) }
}

/// Loads the first word of page `p` of `s`'s view (a view fault when needed).
#[inline]
fn load(s: &Space, p: usize) -> u64 {
    assert!(p < pages_of(s));
    // SAFETY: as in `store`; reads race with no writer of the same page in this benchmark.
    unsafe { std::ptr::read_volatile(s.as_ptr().add(p * PAGE).cast::<u64>()) }
}

fn pattern(gen: u64, p: usize) -> u64 {
    ((gen << 48) ^ (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
}

/// Writes every page of `s` once; returns the time taken.
fn fill(s: &Space, gen: u64) -> Duration {
    let t = Instant::now();
    for p in 0..pages_of(s) {
        store(s, p, pattern(gen, p));
    }
    t.elapsed()
}

/// `n` distinct pages of `0..pages` in random order.
fn distinct_pages(rng: &mut Rng, pages: usize, n: usize) -> Vec<usize> {
    let n = n.min(pages);
    let mut all: Vec<usize> = (0..pages).collect();
    for i in 0..n {
        let j = i + rng.below(pages - i);
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

/// Runs `f` on `threads` disjoint contiguous page ranges of `0..pages`, one thread each,
/// released together; returns the wall time from the first thread's start to the last
/// one's end (each thread takes its own timestamps, so a descheduled main thread cannot
/// shorten the measurement).
fn threaded<F: Fn(Range<usize>) + Sync>(pages: usize, threads: usize, f: F) -> Duration {
    let barrier = Barrier::new(threads);
    thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (f, barrier) = (&f, &barrier);
                let r = pages * t / threads..pages * (t + 1) / threads;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    f(r);
                    (start, Instant::now())
                })
            })
            .collect();
        let spans: Vec<(Instant, Instant)> =
            hs.into_iter().map(|h| h.join().expect("worker thread panicked")).collect();
        let first = spans.iter().map(|s| s.0).min().expect("at least one thread");
        let last = spans.iter().map(|s| s.1).max().expect("at least one thread");
        last - first
    })
}

/// The value of a `Key:   N kB` line, in bytes.
fn kb_line(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// `(Rss, Pss)` of this process, bytes.
fn self_rss_pss() -> (u64, u64) {
    let t = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    (kb_line(&t, "Rss").unwrap_or(0), kb_line(&t, "Pss").unwrap_or(0))
}

/// `(VmRSS, VmPTE)` of this process, bytes.
fn self_rss_pte() -> (u64, u64) {
    let t = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    (kb_line(&t, "VmRSS").unwrap_or(0), kb_line(&t, "VmPTE").unwrap_or(0))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn per_sec(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn mib(b: usize) -> usize {
    b / MIB
}

fn size_name(b: usize) -> String {
    if b >= GIB {
        format!("{} GiB", b / GIB)
    } else {
        format!("{} MiB", b / MIB)
    }
}

// ---------------------------------------------------------------------------------------
// W1: fork latency vs size
// ---------------------------------------------------------------------------------------

fn w1(cfg: &Config, rep: &mut Report) -> Res<()> {
    let sizes: &[usize] = if cfg.quick { &[64 * MIB, 256 * MIB] } else { &[64 * MIB, 256 * MIB, GIB, 4 * GIB] };
    for &size in sizes {
        // Medians over several forks: one fork can meet a scheduler hiccup (the reader
        // thread acknowledging the REMAP event), and a median of two would report it.
        let reps = match size {
            s if s <= 256 * MIB => 7,
            _ => 5,
        };
        let kernel = secs(baselines::kernel_fork_latency(size, reps)?);
        let wp = baselines::uffd_wp_snapshot(size, 0.01)?;
        let memcpy = secs(baselines::memcpy_snapshot(size)?);

        let arena = Arena::new()?;
        let space = arena.space(size)?;
        let mut times = Vec::new();
        for r in 0..reps {
            fill(&space, r as u64 + 1);
            let t = Instant::now();
            let child = space.fork()?;
            times.push(t.elapsed());
            if load(&child, pages_of(&child) - 1) != pattern(r as u64 + 1, pages_of(&child) - 1) {
                return Err("W1: the fork does not hold the parent's data".into());
            }
            drop(child);
        }
        let cow = secs(median(times));
        drop(space);
        drop(arena);
        // The first fork of a never-forked space adopts it (registers the plain view,
        // freezes it, PAGEMAP_SCAN, a frame per written page): once per space, O(pages).
        let first = {
            let arena = Arena::new()?;
            let space = arena.space(size)?;
            fill(&space, 1);
            let t = Instant::now();
            let child = space.fork()?;
            let d = t.elapsed();
            if load(&child, pages_of(&child) / 2) != pattern(1, pages_of(&child) / 2) {
                return Err("W1: the first fork does not hold the parent's data".into());
            }
            secs(d)
        };
        rep.row(
            "W1",
            format!("first fork of a never-forked space, {} fully written (adoption)", size_name(size)),
            Unit::Secs,
            Some(first),
            "kernel fork(2)",
            Some(kernel),
        );

        let w = format!("fork latency, {} fully written", size_name(size));
        rep.row("W1", &w, Unit::Secs, Some(cow), "kernel fork(2)", Some(kernel));
        rep.row("W1", &w, Unit::Secs, Some(cow), "uffd-wp protect-all", Some(secs(wp.protect)));
        rep.row("W1", &w, Unit::Secs, Some(cow), "memcpy snapshot", Some(memcpy));
        rep.w1.push(W1Point { size, cowarena: cow, kernel, uffd_wp: secs(wp.protect), memcpy });
        if size >= 256 * MIB {
            rep.target(
                "W1",
                format!("fork of {} fully written >= 20x faster than fork(2)", size_name(size)),
                Some(kernel / cow),
                true,
                20.0,
                Unit::Factor,
            );
        }
        if size == GIB {
            rep.target(
                "W1",
                "fork of 1 GiB fully written: aim 50x faster than fork(2)",
                Some(kernel / cow),
                true,
                50.0,
                Unit::Factor,
            );
        }
    }

    // Repeated forks with 1 % of the pages written between forks.
    let size = if cfg.quick { 256 * MIB } else { GIB };
    let reps = if cfg.quick { 10 } else { 20 };
    let kernel = match rep.w1.iter().find(|p| p.size == size) {
        Some(p) => p.kernel,
        None => secs(baselines::kernel_fork_latency(size, 3)?),
    };
    let arena = Arena::new()?;
    let space = arena.space(size)?;
    fill(&space, 1);
    let mut prev = Some(space.fork()?);
    let pages = pages_of(&space);
    let mut rng = Rng::new(0xb1);
    let mut times = Vec::new();
    for r in 0..reps {
        for p in distinct_pages(&mut rng, pages, pages / 100) {
            store(&space, p, pattern(r + 2, p));
        }
        let t = Instant::now();
        let child = space.fork()?;
        times.push(t.elapsed());
        prev = Some(child); // the previous snapshot lives until the next one exists
    }
    drop(prev);
    let cow = secs(median(times));
    let s = arena.stats();
    drop(space);
    drop(arena);
    rep.row(
        "W1",
        format!("fork latency, {} with 1% written since last fork", size_name(size)),
        Unit::Secs,
        Some(cow),
        "kernel fork(2)",
        Some(kernel),
    );
    rep.note(format!("W1 1% loop: {} forks, {} freezes, {} bytes copied", s.forks, s.freezes, s.bytes_copied));
    rep.target(
        "W1",
        format!("fork of {} with 1% written between forks >= 50x faster than fork(2)", size_name(size)),
        Some(kernel / cow),
        true,
        50.0,
        Unit::Factor,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// W2: fuzz loop
// ---------------------------------------------------------------------------------------

const W2_WRITES: usize = 64;
const W2_READS: usize = 256;
/// The page sequence of W2's cowarena loops, its peer and its oracle.
const W2_SEED: u64 = 0xf2;

/// One fuzz iteration on `s`: 64 random page writes, 256 random page reads.
fn fuzz_iteration(s: &Space, rng: &mut Rng, it: u64) -> u64 {
    let pages = pages_of(s);
    for _ in 0..W2_WRITES {
        store(s, rng.below(pages), it);
    }
    let mut acc = 0u64;
    for _ in 0..W2_READS {
        acc = acc.wrapping_add(load(s, rng.below(pages)));
    }
    acc
}

fn w2(cfg: &Config, rep: &mut Report) -> Res<()> {
    let size = 256 * MIB;
    let scale = if cfg.quick { 1 } else { 4 };
    let fork_server = baselines::fork_server_iters_per_sec(size, W2_WRITES, W2_READS, 100 * scale)?;
    let memfd = baselines::memfd_reset_iters_per_sec(size, W2_WRITES, W2_READS, 500 * scale)?;
    // The self-recorded oracle: three runs on cowarena's page sequence, the median kept.
    let mut oracle: Vec<f64> = (0..3)
        .map(|_| baselines::dirty_memcpy_reset_iters_per_sec(size, W2_WRITES, W2_READS, 2000 * scale, W2_SEED))
        .collect::<Result<_, _>>()?;
    oracle.sort_by(f64::total_cmp);
    let dirty = oracle[1];

    let arena = Arena::new()?;
    let snap = arena.space(size)?;
    fill(&snap, 1);
    drop(snap.fork()?); // freezes the snapshot once, as a fuzzer's first iteration would

    // Fork per iteration.
    let iters = 500 * scale;
    let mut rng = Rng::new(W2_SEED);
    let t = Instant::now();
    for it in 0..iters as u64 {
        let c = snap.fork()?;
        std::hint::black_box(fuzz_iteration(&c, &mut rng, it));
    }
    let fork_rate = per_sec(iters, t.elapsed());

    // Reset in place per iteration, in rounds interleaved with the kernel's transparent
    // peer (WP_ASYNC + PAGEMAP_SCAN) on the same page sequence (same seed, same values):
    // a load spike on this shared machine hits both, and the medians of the rounds are
    // compared. The peer's arena-free region lives beside the arena (it forks nothing).
    let mut work = snap.fork()?;
    let mut peer = match baselines::WpAsyncReset::new(size) {
        Ok(p) => Some(p),
        Err(e) => {
            rep.note(format!("W2: no WP_ASYNC + PAGEMAP_SCAN peer on this kernel (Linux 6.7+): {e}"));
            None
        }
    };
    let (rounds, per_round) = if cfg.quick { (3, 400) } else { (5, 800) };
    let (mut rng, mut peer_rng) = (Rng::new(W2_SEED), Rng::new(W2_SEED));
    let mut reset_rates = Vec::new();
    let mut peer_rounds = Vec::new();
    if reset_in_place(&mut work, &snap).is_some() {
        for round in 0..rounds {
            let it0 = (round * per_round) as u64 + 1;
            let t = Instant::now();
            for it in it0..it0 + per_round as u64 {
                std::hint::black_box(fuzz_iteration(&work, &mut rng, it));
                reset_in_place(&mut work, &snap).ok_or("reset vanished")??;
            }
            reset_rates.push(per_sec(per_round, t.elapsed()));
            if let Some(peer) = peer.as_mut() {
                peer_rounds.push(peer.fuzz_round(&mut peer_rng, W2_WRITES, W2_READS, it0, per_round)?);
            }
        }
        // The reset must really restore the snapshot.
        for p in (0..pages_of(&snap)).step_by(97) {
            if load(&work, p) != pattern(1, p) {
                return Err(format!("W2: page {p} not restored by reset").into());
            }
        }
    } else if let Some(peer) = peer.as_mut() {
        for round in 0..rounds {
            let it0 = (round * per_round) as u64 + 1;
            peer_rounds.push(peer.fuzz_round(&mut peer_rng, W2_WRITES, W2_READS, it0, per_round)?);
        }
    }
    let reset_rate = (!reset_rates.is_empty()).then(|| median_f64(&reset_rates));
    let peer_rate =
        (!peer_rounds.is_empty()).then(|| median_f64(&peer_rounds.iter().map(|r| r.rate()).collect::<Vec<_>>()));
    if !reset_rates.is_empty() {
        rep.note(format!(
            "W2 reset in place, {rounds} rounds of {per_round} iterations: {} it/s (median {:.0})",
            reset_rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" "),
            median_f64(&reset_rates)
        ));
    }
    if let Some(peer) = peer.as_mut() {
        let mid = {
            let mut by_rate = peer_rounds.clone();
            by_rate.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            by_rate[by_rate.len() / 2]
        };
        // Exactness (untimed): each reset lists exactly the pages written, and the region
        // equals the pristine copy afterwards.
        let checked = peer.check_exact(&mut Rng::new(W2_SEED ^ 0xe4ac7), W2_WRITES, W2_READS, 200)?;
        rep.note(format!(
            "W2 WP_ASYNC + PAGEMAP_SCAN peer, {rounds} rounds of {per_round}: {} it/s; median round per iteration: \
             scan {:.1} µs, memcpy {:.1} µs, re-arm (WP_MATCHING walk) {:.1} µs, {:.1} pages restored; \
             exact: 200 checked resets listed exactly the {checked} pages written, region pristine after",
            peer_rounds.iter().map(|r| format!("{:.0}", r.rate())).collect::<Vec<_>>().join(" "),
            secs(mid.per_iter(mid.scan)) * 1e6,
            secs(mid.per_iter(mid.copy)) * 1e6,
            secs(mid.per_iter(mid.rearm)) * 1e6,
            mid.pages as f64 / mid.iters as f64,
        ));
    }
    drop(peer);
    let s = arena.stats();
    drop(work);
    drop(snap);
    drop(arena);
    rep.note(format!(
        "W2 faults: read_copy {} write_cow {} write_reuse {} tables broken {} reused {}",
        s.faults.read_copy, s.faults.write_cow, s.faults.write_reuse, s.tables_broken, s.tables_reused
    ));

    // The same reset loop in an async-WP arena (ArenaBuilder::async_wp): the fuzzer's
    // stores to pages it has mapped read-only are the kernel's alone; each reset syncs.
    // And with every view trapping (async_forks(false): what kernels before 6.7 get).
    let async_reset = w2_reset_loop(rep, Arena::builder().async_wp(true).build(), "async_wp", size, rounds, per_round)?;
    let trapping_reset =
        w2_reset_loop(rep, Arena::builder().async_forks(false).build(), "forks trapping", size, rounds, per_round)?;

    let name = "fuzz iterations, 256 MiB";
    for (how, v) in [
        ("fork per iteration", Some(fork_rate)),
        ("reset in place", reset_rate),
        ("reset in place, async_wp", async_reset),
        ("reset in place, forks trapping", trapping_reset),
    ] {
        let m = format!("{name} ({how})");
        rep.row("W2", &m, Unit::PerSec, v, "kernel fork server", Some(fork_server));
        rep.row("W2", &m, Unit::PerSec, v, "memfd + DONTNEED reset", Some(memfd));
        rep.row("W2", &m, Unit::PerSec, v, "dirty-page memcpy reset", Some(dirty));
        rep.row("W2", &m, Unit::PerSec, v, PEER_RESET, peer_rate);
    }
    let best = Some(reset_rate.unwrap_or(0.0).max(fork_rate));
    rep.target(
        "W2",
        "fuzz loop >= 2x the kernel fork server (best cowarena variant)",
        best.map(|b| b / fork_server),
        true,
        2.0,
        Unit::Factor,
    );
    rep.target(
        "W2",
        "fuzz loop ahead of the memfd reset (best cowarena variant)",
        best.map(|b| b / memfd),
        true,
        1.0,
        Unit::Factor,
    );
    rep.target(
        "W2",
        "reset in place >= 1.0x the WP_ASYNC + PAGEMAP_SCAN peer (issue 14; aim 2x)",
        reset_rate.zip(peer_rate).map(|(r, p)| r / p),
        true,
        1.0,
        Unit::Factor,
    );
    rep.target(
        "W2",
        "reset in place, async_wp >= 1.0x the WP_ASYNC + PAGEMAP_SCAN peer (issue 14; aim 2x)",
        async_reset.zip(peer_rate).map(|(r, p)| r / p),
        true,
        1.0,
        Unit::Factor,
    );
    rep.target(
        "W2",
        "reset in place >= 0.3x the self-recorded dirty-page oracle (issue 14)",
        reset_rate.map(|r| r / dirty),
        true,
        0.3,
        Unit::Factor,
    );
    rep.target(
        "W2",
        "fork per iteration >= 2x the kernel fork server (issue 14)",
        Some(fork_rate / fork_server),
        true,
        2.0,
        Unit::Factor,
    );
    w2_dirty_tracking(cfg, rep)
}

/// The W2 peer's name in the rows.
const PEER_RESET: &str = "kernel WP_ASYNC + PAGEMAP_SCAN reset";

/// cowarena's side of [`w2_dirty_tracking`].
struct DirtyOurs {
    /// Medians of `dirty_pages` and `clean`.
    list: Duration,
    clean: Duration,
    /// Median of a whole round: the stores, one `dirty_pages`, the `clean`.
    cycle: Duration,
    /// Pages written per round.
    written: usize,
    /// The fill and the first clean.
    setup: Duration,
}

fn w2_dirty_ours(arena: Arena, size: usize, rounds: usize) -> Res<DirtyOurs> {
    let s = arena.space(size)?;
    let pages = pages_of(&s);
    let t = Instant::now();
    fill(&s, 1);
    let first = s.clean(0, size)?;
    if first.len() != pages {
        return Err(format!("W2 dirty tracking: the first clean listed {} of {pages} pages", first.len()).into());
    }
    let setup = t.elapsed();
    let mut rng = Rng::new(W2_SEED ^ 0xd1);
    let (mut lists, mut cleans, mut cycles) = (Vec::new(), Vec::new(), Vec::new());
    let mut written = 0;
    for round in 0..rounds {
        let mut targets = distinct_pages(&mut rng, pages, pages / 100);
        written = targets.len();
        let t = Instant::now();
        for &p in &targets {
            store(&s, p, pattern(2 + round as u64, p));
        }
        let stores = t.elapsed();
        targets.sort_unstable();
        let mut one = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let listed = s.dirty_pages(0, size)?;
            one.push(t.elapsed());
            exact("dirty_pages", listed, &targets)?;
        }
        let first_list = one[0];
        lists.push(median(one));
        let t = Instant::now();
        let cleaned = s.clean(0, size)?;
        cleans.push(t.elapsed());
        cycles.push(stores + first_list + t.elapsed());
        exact("clean", cleaned, &targets)?;
        let after = s.dirty_pages(0, size)?;
        if !after.is_empty() {
            return Err(format!("W2 dirty tracking: {} pages still dirty after clean", after.len()).into());
        }
    }
    drop(s);
    drop(arena);
    Ok(DirtyOurs { list: median(lists), clean: median(cleans), cycle: median(cycles), written, setup })
}

/// W2's second half (issue 14 item 3): dirty tracking on a 1 GiB space, every page
/// written, `clean`ed, then 1 % of its pages written at random; `dirty_pages` ("which pages
/// were written?") and `clean` ("list them and re-arm") are timed against the kernel
/// answering the same questions with `PAGEMAP_SCAN` on an async-WP region (`PAGE_IS_WRITTEN`;
/// with `PM_SCAN_WP_MATCHING` for the re-arm). Both sides must report exactly the pages
/// written. Medians over the rounds (each round a fresh random 1 %).
/// The whole round — the stores, whose first write to a page is a trap here or an async
/// write-protect fault in the kernel's region, plus both questions — is timed too.
fn w2_dirty_tracking(cfg: &Config, rep: &mut Report) -> Res<()> {
    let size = GIB;
    let rounds = if cfg.quick { 3 } else { 7 };
    // The default arena: the first `clean` of the never-forked space hands its tracking to
    // the kernel (an async-WP view, where `async_forks` is on). And with every view
    // trapping (`async_forks(false)`: what kernels before 6.7 get).
    let ours = w2_dirty_ours(Arena::new()?, size, rounds)?;
    let trapping = w2_dirty_ours(Arena::builder().async_forks(false).build()?, size, rounds)?;
    let kernel = match baselines::wp_async_dirty_scan(size, 0.01, rounds, W2_SEED ^ 0xd1) {
        Ok(k) => Some(k),
        Err(e) => {
            rep.note(format!("W2 dirty tracking: no WP_ASYNC + PAGEMAP_SCAN peer (Linux 6.7+): {e}"));
            None
        }
    };
    rep.note(format!(
        "W2 dirty tracking, 1 GiB (fill + first clean {:.2} s; trapping {:.2} s), {} pages (1 %) written per round, \
         {rounds} rounds: both sides listed exactly the pages written in every round{}",
        secs(ours.setup),
        secs(trapping.setup),
        ours.written,
        kernel.map_or(String::new(), |k| format!(" (kernel: {} pages in {} rounds)", k.written, k.rounds))
    ));
    for (how, d) in [("", &ours), (", forks trapping", &trapping)] {
        rep.row(
            "W2",
            format!("dirty_pages after clean, 1 GiB, 1 % written{how}"),
            Unit::Secs,
            Some(secs(d.list)),
            "PAGEMAP_SCAN PAGE_IS_WRITTEN",
            kernel.map(|k| secs(k.list)),
        );
        rep.row(
            "W2",
            format!("clean (list + re-arm), 1 GiB, 1 % written{how}"),
            Unit::Secs,
            Some(secs(d.clean)),
            "PAGEMAP_SCAN + WP_MATCHING",
            kernel.map(|k| secs(k.list_rearm)),
        );
        rep.row(
            "W2",
            format!("tracking round (1 % stored at random + dirty_pages + clean), 1 GiB{how}"),
            Unit::Secs,
            Some(secs(d.cycle)),
            "stores + PAGEMAP_SCAN + WP_MATCHING",
            kernel.map(|k| secs(k.cycle)),
        );
    }
    rep.target(
        "W2",
        "dirty_pages (1 GiB, 1 % written) >= 1.0x the PAGEMAP_SCAN peer (peer time / ours; issue 14)",
        kernel.map(|k| secs(k.list) / secs(ours.list)),
        true,
        1.0,
        Unit::Factor,
    );
    rep.target(
        "W2",
        "clean (1 GiB, 1 % written) >= 1.0x the PAGEMAP_SCAN + WP_MATCHING peer (peer time / ours; issue 14)",
        kernel.map(|k| secs(k.list_rearm) / secs(ours.clean)),
        true,
        1.0,
        Unit::Factor,
    );
    rep.target(
        "W2",
        "a whole tracking round (stores + dirty_pages + clean, 1 GiB, 1 %) >= 1.0x the kernel's (issue 14)",
        kernel.map(|k| secs(k.cycle) / secs(ours.cycle)),
        true,
        1.0,
        Unit::Factor,
    );
    Ok(())
}

/// `listed` must be exactly `expected` (sorted, distinct): no page missing, none extra.
fn exact(what: &str, mut listed: Vec<usize>, expected: &[usize]) -> Res<()> {
    listed.sort_unstable();
    if listed != expected {
        let extra = listed.iter().filter(|p| expected.binary_search(p).is_err()).count();
        let missing = expected.iter().filter(|p| listed.binary_search(p).is_err()).count();
        return Err(format!(
            "W2 dirty tracking: {what} listed {} pages for {} written ({extra} never written, {missing} missing)",
            listed.len(),
            expected.len()
        )
        .into());
    }
    Ok(())
}

fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------
// W3: live snapshot
// ---------------------------------------------------------------------------------------

struct LiveCow {
    pause: Duration,
    rate_before: f64,
    rate_during: f64,
    during_pages: usize,
    reader_time: Duration,
    peak_pss: u64,
    peak_rss: u64,
}

/// W2's reset loop (fuzz iteration, `reset_to` the snapshot) in `arena`: the median rate
/// over the rounds, or `None` (noted) when the arena cannot be built here.
fn w2_reset_loop(
    rep: &mut Report,
    arena: cowarena::Result<Arena>,
    label: &str,
    size: usize,
    rounds: usize,
    per_round: usize,
) -> Res<Option<f64>> {
    let arena = match arena {
        Ok(a) => a,
        Err(e) => {
            rep.note(format!("W2: no {label} arena: {e}"));
            return Ok(None);
        }
    };
    let snap = arena.space(size)?;
    fill(&snap, 1);
    drop(snap.fork()?);
    let mut work = snap.fork()?;
    let mut rng = Rng::new(W2_SEED);
    let mut rates = Vec::new();
    for round in 0..rounds {
        let it0 = (round * per_round) as u64 + 1;
        let t = Instant::now();
        for it in it0..it0 + per_round as u64 {
            std::hint::black_box(fuzz_iteration(&work, &mut rng, it));
            work.reset_to(&snap)?;
        }
        rates.push(per_sec(per_round, t.elapsed()));
    }
    for p in (0..pages_of(&snap)).step_by(97) {
        if load(&work, p) != pattern(1, p) {
            return Err(format!("W2 {label}: page {p} not restored by reset").into());
        }
    }
    let st = arena.stats();
    rep.note(format!(
        "W2 reset in place, {label}, {rounds} rounds of {per_round}: {} it/s; write faults {} (zero {} cow {} reuse {}), stores served by the kernel alone {}, read faults {}",
        rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" "),
        st.faults.write_zero + st.faults.write_cow + st.faults.write_reuse,
        st.faults.write_zero,
        st.faults.write_cow,
        st.faults.write_reuse,
        st.writes_async,
        st.faults.read_copy + st.faults.read_zero,
    ));
    Ok(Some(median_f64(&rates)))
}

fn w3_cowarena(size: usize) -> Res<LiveCow> {
    let arena = Arena::new()?;
    let heap = arena.space(size)?;
    fill(&heap, 1);
    let pages = pages_of(&heap);
    let n = pages / 10;
    let mut rng = Rng::new(0x5eed_0003);
    let before = distinct_pages(&mut rng, pages, n);
    let during = distinct_pages(&mut rng, pages, n);

    let t = Instant::now();
    for (k, &p) in before.iter().enumerate() {
        store(&heap, p, k as u64);
    }
    let rate_before = per_sec(n, t.elapsed());
    // What the snapshot must show for a few pages the owner overwrites after the fork.
    let expect: Vec<(usize, u64)> = during.iter().take(64).map(|&p| (p, load(&heap, p))).collect();

    let stop = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let peak_pss = AtomicU64::new(0);
    let peak_rss = AtomicU64::new(0);
    let sample = || {
        let (r, p) = self_rss_pss();
        peak_rss.fetch_max(r, Ordering::Relaxed);
        peak_pss.fetch_max(p, Ordering::Relaxed);
    };
    let t = Instant::now();
    let snap = heap.fork()?;
    let pause = t.elapsed();
    let snap = &snap;
    let out = thread::scope(|s| -> Res<LiveCow> {
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                sample();
                thread::sleep(Duration::from_millis(10));
            }
        });
        let done = &done;
        let reader = s.spawn(move || -> cowarena::Result<(Duration, u64)> {
            let t = Instant::now();
            let mut buf = vec![0u8; MIB];
            let mut sum = 0u64;
            let mut off = 0;
            while off < snap.len() {
                let n = buf.len().min(snap.len() - off);
                snap.read(off, &mut buf[..n])?;
                for w in buf[..n].chunks_exact(64) {
                    sum = sum.wrapping_add(u64::from_le_bytes(w[..8].try_into().expect("8 bytes")));
                }
                off += n;
            }
            done.store(true, Ordering::Release);
            Ok((t.elapsed(), sum))
        });
        let t = Instant::now();
        let (mut during_pages, mut during_time) = (0, Duration::ZERO);
        for chunk in during.chunks(64) {
            if done.load(Ordering::Acquire) {
                break;
            }
            for &p in chunk {
                store(&heap, p, 0xdead);
            }
            during_pages += chunk.len();
            during_time = t.elapsed();
        }
        sample();
        for &p in &during[during_pages..] {
            store(&heap, p, 0xdead);
        }
        let (reader_time, sum) = reader.join().expect("reader panicked")?;
        std::hint::black_box(sum);
        sample();
        stop.store(true, Ordering::Release);
        for &(p, v) in &expect {
            let mut b = [0u8; 8];
            snap.read(p * PAGE, &mut b)?;
            if u64::from_le_bytes(b) != v {
                return Err(format!("W3: snapshot page {p} changed under the reader").into());
            }
        }
        Ok(LiveCow {
            pause,
            rate_before,
            rate_during: if during_pages == 0 { f64::NAN } else { per_sec(during_pages, during_time) },
            during_pages,
            reader_time,
            peak_pss: 0,
            peak_rss: 0,
        })
    })?;
    Ok(LiveCow { peak_pss: peak_pss.load(Ordering::Relaxed), peak_rss: peak_rss.load(Ordering::Relaxed), ..out })
}

fn w3(cfg: &Config, rep: &mut Report) -> Res<()> {
    let size = if cfg.quick { 256 * MIB } else { GIB };
    let k = baselines::kernel_fork_live_snapshot(size, 0.10)?;
    let c = w3_cowarena(size)?;
    let sz = size_name(size);
    rep.row(
        "W3",
        format!("owner pause at snapshot, {sz}"),
        Unit::Secs,
        Some(secs(c.pause)),
        "kernel fork(2)",
        Some(secs(k.fork_pause)),
    );
    rep.row(
        "W3",
        "owner write rate before snapshot",
        Unit::PerSec,
        Some(c.rate_before),
        "kernel (same writes)",
        Some(k.write_rate_before),
    );
    rep.row(
        "W3",
        "owner write rate while snapshot is read",
        Unit::PerSec,
        Some(c.rate_during),
        "kernel fork(2), child reads",
        Some(k.write_rate_during),
    );
    rep.row(
        "W3",
        "owner slowdown (before / during)",
        Unit::Slowdown,
        Some(c.rate_before / c.rate_during),
        "kernel fork(2)",
        Some(k.slowdown),
    );
    rep.row(
        "W3",
        "snapshot read time (whole heap)",
        Unit::Secs,
        Some(secs(c.reader_time)),
        "kernel child read",
        Some(secs(k.child_read)),
    );
    rep.row(
        "W3",
        "peak memory (Pss, whole process)",
        Unit::Bytes,
        Some(c.peak_pss as f64),
        "kernel owner+child Pss",
        Some(k.peak_pss_total as f64),
    );
    rep.note(format!(
        "W3 writes overlapping the read: cowarena {} of {}, kernel {} of {}; cowarena peak Rss {:.0} MiB, kernel Rss sum {:.0} MiB (counts shared pages twice)",
        c.during_pages,
        size / PAGE / 10,
        k.pages_written_during,
        k.pages_written,
        c.peak_rss as f64 / MIB as f64,
        k.peak_rss_total as f64 / MIB as f64
    ));
    rep.target(
        "W3",
        "owner pause >= 20x shorter than fork(2)",
        Some(secs(k.fork_pause) / secs(c.pause)),
        true,
        20.0,
        Unit::Factor,
    );
    rep.target(
        "W3",
        "peak memory <= kernel's + 10% (cowarena / kernel)",
        Some(c.peak_pss as f64 / k.peak_pss_total as f64),
        false,
        1.10,
        Unit::Factor,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// W4, random order (issue 12): what users do — hash tables, heaps, B-trees
// ---------------------------------------------------------------------------------------

/// Pages per 2 MiB page table.
const TABLE_PAGES: usize = 512;

/// Every page of `0..pages`, shuffled.
fn dense_order(rng: &mut Rng, pages: usize) -> Vec<usize> {
    distinct_pages(rng, pages, pages)
}

/// One random page of each 2 MiB table of `0..pages`, the tables in shuffled order.
fn sparse_order(rng: &mut Rng, pages: usize) -> Vec<usize> {
    let tables = pages.div_ceil(TABLE_PAGES);
    distinct_pages(rng, tables, tables)
        .into_iter()
        .map(|t| (t * TABLE_PAGES + rng.below(TABLE_PAGES)).min(pages - 1))
        .collect()
}

/// What a random-order row measures after the first touch.
#[derive(Clone, Copy)]
enum AfterFork {
    /// Loads in the fork.
    Read,
    /// Stores in the fork.
    ChildWrite,
    /// Stores in the parent, the fork alive, forked with this strategy.
    ParentWrite(cowarena::ForkStrategy),
}

/// First-touch writes of a fresh space of `size` in `order`; their time.
fn w4r_first_touch(arena: &Arena, size: usize, order: &[usize]) -> Res<Duration> {
    let s = arena.space(size)?;
    let t = Instant::now();
    for &p in order {
        store(&s, p, pattern(1, p));
    }
    let d = t.elapsed();
    if order.iter().step_by(61).any(|&p| load(&s, p) != pattern(1, p)) {
        return Err("W4 random: a first-touch write was lost".into());
    }
    Ok(d)
}

/// A fresh space of `size`, every page written (sequentially, untimed), forked; then the
/// accesses `what` in `order`, timed.
fn w4r_after_fork(arena: &Arena, size: usize, order: &[usize], what: AfterFork) -> Res<Duration> {
    let root = arena.space(size)?;
    fill(&root, 1);
    let child = match what {
        AfterFork::ParentWrite(s) => root.fork_with(s)?,
        _ => root.fork()?,
    };
    let t = Instant::now();
    match what {
        AfterFork::Read => {
            let mut acc = 0u64;
            for &p in order {
                acc = acc.wrapping_add(load(&child, p));
            }
            std::hint::black_box(acc);
        }
        AfterFork::ChildWrite => order.iter().for_each(|&p| store(&child, p, 2)),
        AfterFork::ParentWrite(_) => order.iter().for_each(|&p| store(&root, p, 3)),
    }
    let d = t.elapsed();
    let p = order[order.len() / 2];
    let ok = match what {
        AfterFork::Read => load(&child, p) == pattern(1, p),
        AfterFork::ChildWrite => load(&child, p) == 2 && load(&root, p) == pattern(1, p),
        AfterFork::ParentWrite(_) => load(&root, p) == 3 && load(&child, p) == pattern(1, p),
    };
    if !ok {
        return Err("W4 random: a fork or its parent holds wrong data".into());
    }
    Ok(d)
}

/// Mean time per page of `f` run once per order (each run on fresh memory).
fn per_page(orders: &[Vec<usize>], mut f: impl FnMut(&[usize]) -> Res<Duration>) -> Res<f64> {
    let (mut t, mut n) = (Duration::ZERO, 0);
    for o in orders {
        t += f(o)?;
        n += o.len();
    }
    Ok(secs(t) / n.max(1) as f64)
}

/// Per-page costs of one pattern: `[first touch, read in a fork, COW write in the fork,
/// write in the parent (KeepWarm), write in the parent (Freeze)]`, seconds per page.
type Pattern = [f64; 5];

fn w4_random_kernel(size: usize, orders: &[Vec<usize>]) -> Res<Pattern> {
    use baselines::Touch;
    let first = per_page(orders, |o| Ok(baselines::kernel_first_touch_order(size, o)?))?;
    let read = per_page(orders, |o| Ok(baselines::kernel_fork_child_touch(size, o, Touch::Read)?.touches))?;
    let child = per_page(orders, |o| Ok(baselines::kernel_fork_child_touch(size, o, Touch::Write)?.touches))?;
    let parent = per_page(orders, |o| Ok(baselines::kernel_fork_parent_write(size, o)?))?;
    // fork(2) has one strategy: the same parent figure stands against both of ours.
    Ok([first, read, child, parent, parent])
}

fn w4_random_cowarena(arena: &Arena, size: usize, orders: &[Vec<usize>]) -> Res<Pattern> {
    use cowarena::ForkStrategy::{Freeze, KeepWarm};
    let arena = arena.clone();
    let r = [
        per_page(orders, |o| w4r_first_touch(&arena, size, o))?,
        per_page(orders, |o| w4r_after_fork(&arena, size, o, AfterFork::Read))?,
        per_page(orders, |o| w4r_after_fork(&arena, size, o, AfterFork::ChildWrite))?,
        per_page(orders, |o| w4r_after_fork(&arena, size, o, AfterFork::ParentWrite(KeepWarm)))?,
        per_page(orders, |o| w4r_after_fork(&arena, size, o, AfterFork::ParentWrite(Freeze)))?,
    ];
    Ok(r)
}

/// "fork + touch every page" with cowarena: a fresh space of `size`, every page written;
/// `(fork, touches)` for one fork and `touch` of every page of `order` in the fork.
fn w4_whole_cowarena(
    arena: &Arena,
    size: usize,
    order: &[usize],
    touch: baselines::Touch,
) -> Res<(Duration, Duration)> {
    let root = arena.space(size)?;
    fill(&root, 1);
    let t = Instant::now();
    let child = root.fork()?;
    let fork = t.elapsed();
    let t = Instant::now();
    match touch {
        baselines::Touch::Read => {
            let mut acc = 0u64;
            for &p in order {
                acc = acc.wrapping_add(load(&child, p));
            }
            std::hint::black_box(acc);
        }
        baselines::Touch::Write => order.iter().for_each(|&p| store(&child, p, 2)),
    }
    let touches = t.elapsed();
    let p = order[order.len() / 3];
    if load(&root, p) != pattern(1, p) {
        return Err("W4 whole workload: the parent's data changed".into());
    }
    Ok((fork, touches))
}

fn w4_random(cfg: &Config, rep: &mut Report) -> Res<()> {
    use baselines::Touch;
    let size = if cfg.quick { 32 * MIB } else { 128 * MIB };
    let pages = size / PAGE;
    let sparse_reps = if cfg.quick { 16 } else { 8 };
    let mut rng = Rng::new(0x12_4a4d);
    let dense = vec![dense_order(&mut rng, pages)];
    let sparse: Vec<Vec<usize>> = (0..sparse_reps).map(|_| sparse_order(&mut rng, pages)).collect();
    let n_sparse: usize = sparse.iter().map(Vec::len).sum();

    // Kernel first (no arena alive: a fork(2) would copy its page tables too), then the
    // same-thread floor (it swaps the SIGBUS action: no arena may fault meanwhile), then us.
    let k_dense = w4_random_kernel(size, &dense)?;
    let k_sparse = w4_random_kernel(size, &sparse)?;
    let (t, n) = baselines::sigbus_copy_floor(size, &dense)?;
    let floor_dense = secs(t) / n as f64;
    let (t, n) = baselines::sigbus_copy_floor(size, &sparse)?;
    let floor_sparse = secs(t) / n as f64;
    // The same floor copying each page's own bytes (a cold source in random order), as a
    // read fault in a fork must: reported beside, to tell the copy's cost from ours.
    let (t, n) = baselines::sigbus_copy_floor_from(size, &dense, true)?;
    let floor_dense_own = secs(t) / n as f64;
    let (t, n) = baselines::sigbus_copy_floor_from(size, &sparse, true)?;
    let floor_sparse_own = secs(t) / n as f64;
    let c_dense = w4_random_cowarena(&Arena::new()?, size, &dense)?;
    let c_sparse = w4_random_cowarena(&Arena::new()?, size, &sparse)?;
    // Every view trapping its first store to a page (async_forks(false); kernels before 6.7).
    let t_dense = w4_random_cowarena(&Arena::builder().async_forks(false).build()?, size, &dense)?;
    // Stores to read-only pages served by the kernel alone (ArenaBuilder::async_wp; 6.7+).
    let async_arena = || Arena::builder().async_wp(true).build();
    let (a_dense, a_sparse) = match async_arena() {
        Ok(a) => {
            (Some(w4_random_cowarena(&a, size, &dense)?), Some(w4_random_cowarena(&async_arena()?, size, &sparse)?))
        }
        Err(e) => {
            rep.note(format!("W4 random: async_wp rows skipped: {e}"));
            (None, None)
        }
    };
    // The user-space first-touch path, for comparison: views registered from the start
    // (what every first touch cost before plain spaces, and what a fork's first touch of a
    // never-written page costs now).
    let registered = Arena::builder().plain_until_fork(false).build()?;
    let r_dense = per_page(&dense, |o| w4r_first_touch(&registered, size, o))?;
    let r_sparse = per_page(&sparse, |o| w4r_first_touch(&registered, size, o))?;
    drop(registered);

    let names: [(&str, &str); 5] = [
        ("first-touch write", "kernel first touch"),
        ("read in a fork", "kernel read in fork(2) child"),
        ("COW write in the fork", "kernel COW in fork(2) child"),
        ("write in the parent after fork (KeepWarm)", "kernel COW in the parent"),
        ("write in the parent after fork (Freeze)", "kernel COW in the parent"),
    ];
    let sz = size_name(size);
    for (kind, c, k) in [("dense", &c_dense, &k_dense), ("sparse", &c_sparse, &k_sparse)] {
        for (i, (what, base)) in names.iter().enumerate() {
            rep.row(
                "W4",
                format!("random {kind} {sz}: {what}, per page"),
                Unit::Secs,
                Some(c[i]),
                &format!("{base}, same order"),
                Some(k[i]),
            );
        }
    }
    for (i, (what, base)) in names.iter().enumerate().skip(1) {
        rep.row(
            "W4",
            format!("random dense {sz}: {what}, forks trapping, per page"),
            Unit::Secs,
            Some(t_dense[i]),
            &format!("{base}, same order"),
            Some(k_dense[i]),
        );
    }
    for (kind, c, k) in [("dense", &a_dense, &k_dense), ("sparse", &a_sparse, &k_sparse)] {
        let Some(c) = c else { continue };
        for (i, (what, base)) in names.iter().enumerate().skip(1) {
            rep.row(
                "W4",
                format!("random {kind} {sz}: {what}, async_wp, per page"),
                Unit::Secs,
                Some(c[i]),
                &format!("{base}, same order"),
                Some(k[i]),
            );
        }
    }
    rep.row(
        "W4",
        format!("random dense {sz}: read in a fork, per page"),
        Unit::Secs,
        Some(c_dense[1]),
        "same-thread floor (SIGBUS+COPY)",
        Some(floor_dense),
    );
    rep.row(
        "W4",
        format!("random sparse {sz}: read in a fork, per page"),
        Unit::Secs,
        Some(c_sparse[1]),
        "same-thread floor (SIGBUS+COPY)",
        Some(floor_sparse),
    );
    rep.row(
        "W4",
        format!("random sparse {sz}: first-touch write, per page"),
        Unit::Secs,
        Some(c_sparse[0]),
        "same-thread floor (SIGBUS+COPY)",
        Some(floor_sparse),
    );
    for (kind, c, floor) in [("dense", c_dense[1], floor_dense_own), ("sparse", c_sparse[1], floor_sparse_own)] {
        rep.row(
            "W4",
            format!("random {kind} {sz}: read in a fork, per page"),
            Unit::Secs,
            Some(c),
            "floor copying each page's own bytes",
            Some(floor),
        );
    }
    for (kind, r, k, floor) in
        [("dense", r_dense, &k_dense, floor_dense), ("sparse", r_sparse, &k_sparse, floor_sparse)]
    {
        let w = format!("random {kind} {sz}: first-touch write, view registered from the start, per page");
        rep.row("W4", &w, Unit::Secs, Some(r), "kernel first touch, same order", Some(k[0]));
        rep.row("W4", &w, Unit::Secs, Some(r), "same-thread floor (SIGBUS+COPY)", Some(floor));
    }
    rep.note(
        "W4 random: first-touch rows without 'registered' write a never-forked space, which is plain kernel memory (ArenaBuilder::plain_until_fork, the default); 'registered' rows use plain_until_fork(false)",
    );
    rep.note(format!(
        "W4 random: dense = all {pages} pages of {sz} shuffled; sparse = one random page per 2 MiB table, tables shuffled, {sparse_reps} fresh spaces ({n_sparse} faults); same-thread floor (SIGBUS + one UFFDIO_COPY in the handler, same orders) {:.2} µs dense, {:.2} µs sparse; the same copying each page's own bytes from a populated region of the same size (cold in these orders, as a fork's homes are) {:.2} µs dense, {:.2} µs sparse",
        floor_dense * 1e6,
        floor_sparse * 1e6,
        floor_dense_own * 1e6,
        floor_sparse_own * 1e6
    ));

    // Whole workloads: fork + touch every page, in random order.
    let wsize = if cfg.quick { 256 * MIB } else { GIB };
    let wpages = wsize / PAGE;
    let worder = dense_order(&mut rng, wpages);
    let k_read = baselines::kernel_fork_child_touch(wsize, &worder, Touch::Read)?;
    let k_write = baselines::kernel_fork_child_touch(wsize, &worder, Touch::Write)?;
    let copy_all = baselines::uffd_copy_all(wsize)?;
    let (c_fork_r, c_read) = w4_whole_cowarena(&Arena::new()?, wsize, &worder, Touch::Read)?;
    let (c_fork_w, c_write) = w4_whole_cowarena(&Arena::new()?, wsize, &worder, Touch::Write)?;
    let a_write = match async_arena() {
        Ok(a) => Some(w4_whole_cowarena(&a, wsize, &worder, Touch::Write)?),
        Err(_) => None,
    };
    let wsz = size_name(wsize);
    let c_total_r = secs(c_fork_r + c_read);
    let floor_total = secs(c_fork_r + copy_all);
    rep.row(
        "W4",
        format!("fork + read every page of {wsz}, random, total"),
        Unit::Secs,
        Some(c_total_r),
        "kernel fork(2) + child reads",
        Some(secs(k_read.fork + k_read.touches)),
    );
    rep.row(
        "W4",
        format!("fork + read every page of {wsz}, random, total"),
        Unit::Secs,
        Some(c_total_r),
        "copy floor: fork + 1 UFFDIO_COPY",
        Some(floor_total),
    );
    rep.row(
        "W4",
        format!("fork + write every page of {wsz}, random, total"),
        Unit::Secs,
        Some(secs(c_fork_w + c_write)),
        "kernel fork(2) + child COW writes",
        Some(secs(k_write.fork + k_write.touches)),
    );
    if let Some((f, w)) = a_write {
        rep.row(
            "W4",
            format!("fork + write every page of {wsz}, random, async_wp, total"),
            Unit::Secs,
            Some(secs(f + w)),
            "kernel fork(2) + child COW writes",
            Some(secs(k_write.fork + k_write.touches)),
        );
    }
    rep.note(format!(
        "W4 whole {wsz}: cowarena fork {:.2} / {:.2} ms, reads {:.1} ms, writes {:.1} ms; kernel fork(2) {:.2} / {:.2} ms, child reads {:.1} ms, child writes {:.1} ms; one UFFDIO_COPY of {wsz} {:.1} ms",
        secs(c_fork_r) * 1e3,
        secs(c_fork_w) * 1e3,
        secs(c_read) * 1e3,
        secs(c_write) * 1e3,
        secs(k_read.fork) * 1e3,
        secs(k_write.fork) * 1e3,
        secs(k_read.touches) * 1e3,
        secs(k_write.touches) * 1e3,
        secs(copy_all) * 1e3
    ));

    // Break-even: fork_c + f·N·t_c = fork_k + f·N·t_k, with the per-page read costs of
    // the dense random rows and the forks of the whole workload (mean of its two forks).
    let fork_c = secs(c_fork_r + c_fork_w) / 2.0;
    let fork_k = secs(k_read.fork + k_write.fork) / 2.0;
    let share = |t_c: f64, t_k: f64| {
        let d = wpages as f64 * (t_c - t_k);
        if d > 0.0 {
            ((fork_k - fork_c) / d).max(0.0)
        } else {
            f64::INFINITY
        }
    };
    let f_dense = share(c_dense[1], k_dense[1]);
    let f_whole = share(secs(c_read) / wpages as f64, secs(k_read.touches) / wpages as f64);
    rep.row(
        "W4",
        format!("break-even: share of {wsz} a fork may read before fork(2) is cheaper"),
        Unit::Share,
        Some(f_dense),
        "",
        None,
    );
    rep.note(format!(
        "W4 break-even ({wsz}): fork_cowarena {:.2} ms + f·N·{:.2} µs = fork(2) {:.2} ms + f·N·{:.3} µs → f = {:.2} % of the pages ({:.2} % from the whole-workload read cost)",
        fork_c * 1e3,
        c_dense[1] * 1e6,
        fork_k * 1e3,
        k_dense[1] * 1e6,
        f_dense * 100.0,
        f_whole * 100.0
    ));

    // Targets of issue 12.
    rep.target(
        "W4",
        "dense random first-touch write >= 0.9x kernel",
        Some(k_dense[0] / c_dense[0]),
        true,
        0.9,
        Unit::Factor,
    );
    rep.target(
        "W4",
        "dense random COW write in the fork >= 1.0x kernel",
        Some(k_dense[2] / c_dense[2]),
        true,
        1.0,
        Unit::Factor,
    );
    for (i, s) in [(3, "KeepWarm"), (4, "Freeze")] {
        rep.target(
            "W4",
            format!("dense random write in the parent after a fork ({s}) >= 1.0x kernel"),
            Some(k_dense[i] / c_dense[i]),
            true,
            1.0,
            Unit::Factor,
        );
    }
    if let Some(a) = &a_dense {
        rep.target(
            "W4",
            "dense random COW write in the fork, async_wp >= 1.0x kernel",
            Some(k_dense[2] / a[2]),
            true,
            1.0,
            Unit::Factor,
        );
        rep.target(
            "W4",
            "dense random write in the parent after a fork, async_wp (forks freeze) >= 1.0x kernel",
            Some(k_dense[4] / a[4]),
            true,
            1.0,
            Unit::Factor,
        );
    }
    rep.target(
        "W4",
        format!("fork + read every page of {wsz} (random) <= 1.3x the copy floor"),
        Some(c_total_r / floor_total),
        false,
        1.3,
        Unit::Slowdown,
    );
    rep.target(
        "W4",
        "sparse random read faults in a fork <= 1.3x the same-thread floor",
        Some(c_sparse[1] / floor_sparse),
        false,
        1.3,
        Unit::Slowdown,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// W4: fault throughput
// ---------------------------------------------------------------------------------------

/// One W4 run of an arena: per phase (first-touch writes, read faults in a fork, COW writes
/// in the fork, COW writes in the parent), the fault rate (pages per second) and what the
/// fault path spent holding the arena lock (`Stats::lock` before and after the phase).
struct W4Run {
    rates: [f64; 4],
    /// Nanoseconds the fault path held the arena lock, per phase.
    held_ns: [u64; 4],
    /// Holds (one per fault served, a fault-around or dense fill included), per phase.
    holds: [u64; 4],
    /// Pages touched per phase.
    pages: usize,
}

/// [`W4Run`] with `threads` threads, pages in order.
fn w4_cowarena(arena: &Arena, size: usize, threads: usize) -> Res<W4Run> {
    w4_cowarena_in(arena, size, threads, false)
}

/// The page order of a W4 phase with `threads` threads on contiguous ranges: each range in
/// order, or (`random`) shuffled within itself — so threads still touch disjoint pages.
fn w4_order(pages: usize, threads: usize, random: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pages).collect();
    if random {
        let mut rng = Rng::new(0x13 + threads as u64);
        for t in 0..threads {
            let (lo, hi) = (pages * t / threads, pages * (t + 1) / threads);
            for i in (lo + 1..hi).rev() {
                order.swap(i, lo + rng.below(i - lo + 1));
            }
        }
    }
    order
}

/// [`W4Run`] with `threads` threads, in order or in random order within each thread's pages.
fn w4_cowarena_in(arena: &Arena, size: usize, threads: usize, random: bool) -> Res<W4Run> {
    let order = w4_order(size / PAGE, threads, random);
    let order = &order;
    let mut held_ns = [0; 4];
    let mut holds = [0; 4];
    let mut phase = |i: usize, f: &mut dyn FnMut() -> Duration| {
        let before = arena.stats().lock;
        let t = f();
        let after = arena.stats().lock;
        held_ns[i] = after.fault_held_ns - before.fault_held_ns;
        holds[i] = after.fault_holds - before.fault_holds;
        t
    };
    let root = arena.space(size)?;
    let pages = pages_of(&root);
    let first =
        phase(0, &mut || threaded(pages, threads, |r| r.for_each(|i| store(&root, order[i], pattern(1, order[i])))));

    let child = root.fork()?;
    let read = phase(1, &mut || {
        threaded(pages, threads, |r| {
            let mut acc = 0u64;
            for i in r {
                acc = acc.wrapping_add(load(&child, order[i]));
            }
            std::hint::black_box(acc);
        })
    });
    drop(child);

    let child = root.fork()?;
    let cow_child = phase(2, &mut || threaded(pages, threads, |r| r.for_each(|i| store(&child, order[i], 2))));
    if load(&root, pages / 2) != pattern(1, pages / 2) {
        return Err("W4: a child's write reached its parent".into());
    }
    drop(child);

    let child = root.fork()?;
    let cow_parent = phase(3, &mut || threaded(pages, threads, |r| r.for_each(|i| store(&root, order[i], 3))));
    drop(child);
    Ok(W4Run {
        rates: [per_sec(pages, first), per_sec(pages, read), per_sec(pages, cow_child), per_sec(pages, cow_parent)],
        held_ns,
        holds,
        pages,
    })
}

/// Issue 13 item 3, sibling spaces: `threads` forks of one written space, thread `t`
/// reading (then writing) every page of fork `t` in random order. Aggregate rates of all
/// threads: [read faults, COW write faults].
fn w4_siblings(arena: &Arena, size: usize, threads: usize) -> Res<[f64; 2]> {
    let root = arena.space(size)?;
    let pages = pages_of(&root);
    threaded(pages, 1, |r| r.for_each(|p| store(&root, p, pattern(1, p))));
    let order = w4_order(pages, 1, true);
    let kids: Vec<Space> = (0..threads).map(|_| root.fork()).collect::<Result<_, _>>()?;
    // `threads` ranges of `pages`: range `t` is fork `t`'s pages.
    let read = threaded(pages * threads, threads, |r| {
        let (kid, base) = (&kids[r.start / pages], r.start);
        let mut acc = 0u64;
        for i in r {
            acc = acc.wrapping_add(load(kid, order[i - base]));
        }
        std::hint::black_box(acc);
    });
    drop(kids);
    let kids: Vec<Space> = (0..threads).map(|_| root.fork()).collect::<Result<_, _>>()?;
    let cow = threaded(pages * threads, threads, |r| {
        let (kid, base) = (&kids[r.start / pages], r.start);
        for i in r {
            store(kid, order[i - base], 2);
        }
    });
    if (0..pages).step_by(101).any(|p| load(&root, p) != pattern(1, p)) {
        return Err("W4: a sibling's write reached its parent".into());
    }
    Ok([per_sec(pages * threads, read), per_sec(pages * threads, cow)])
}

/// Write faults on pages only the parent maps again (its snapshot was dropped): UFFDIO_MOVE
/// takes each page from the frozen region where the fork left it, or (`take` off) copies it.
fn w4_reuse(size: usize, take: bool) -> Res<(f64, u64)> {
    let arena = Arena::builder().uffd_move(take).build()?;
    let root = arena.space(size)?;
    let pages = pages_of(&root);
    threaded(pages, 1, |r| r.for_each(|p| store(&root, p, pattern(1, p))));
    drop(root.fork_with(cowarena::ForkStrategy::Freeze)?);
    let t = threaded(pages, 1, |r| r.for_each(|p| store(&root, p, pattern(2, p))));
    if (0..pages).step_by(97).any(|p| load(&root, p) != pattern(2, p)) {
        return Err("W4: a reused page lost its write".into());
    }
    Ok((per_sec(pages, t), arena.stats().pages_moved))
}

/// CPU time of `clock` (`CLOCK_PROCESS_CPUTIME_ID`, `CLOCK_THREAD_CPUTIME_ID`), seconds.
fn cpu_secs(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a live timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Issue 13 item 2 (no convoys), the waiting side: `faulters` threads keep faulting on one
/// space while this thread holds the arena lock for a long operation (populating `size` of
/// another space). Returns (the populate's wall time, the CPU time every other thread of
/// the process burned meanwhile): waiters that sleep in `FUTEX_WAIT` burn next to nothing;
/// waiters spinning on `try_lock` + `sched_yield` burn a whole vCPU each, up to the cores
/// the holder leaves free.
fn w4_waiters_cpu(size: usize, faulters: usize) -> Res<(f64, f64)> {
    // Registered views: the faulters' faults must reach the fault path (a never-forked
    // default space is plain kernel memory).
    let arena = Arena::builder().plain_until_fork(false).build()?;
    let held = arena.space(size)?;
    let faulted = arena.space(4 * size)?;
    let pages = pages_of(&faulted);
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(faulters + 1);
    thread::scope(|s| {
        for t in 0..faulters {
            let (faulted, stop, barrier) = (&faulted, &stop, &barrier);
            s.spawn(move || {
                barrier.wait();
                let range = pages * t / faulters..pages * (t + 1) / faulters;
                for p in range {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    store(faulted, p, 1);
                }
            });
        }
        barrier.wait();
        thread::sleep(Duration::from_millis(2)); // the faulters are faulting
        let (process, me) = (cpu_secs(libc::CLOCK_PROCESS_CPUTIME_ID), cpu_secs(libc::CLOCK_THREAD_CPUTIME_ID));
        let start = Instant::now();
        let r = held.populate(0, held.len(), true);
        let took = start.elapsed().as_secs_f64();
        let others =
            (cpu_secs(libc::CLOCK_PROCESS_CPUTIME_ID) - process) - (cpu_secs(libc::CLOCK_THREAD_CPUTIME_ID) - me);
        stop.store(true, Ordering::Relaxed);
        r?;
        Ok((took, others.max(0.0)))
    })
}

/// Issue 13 item 5, the projected ceiling: per phase, the time the fault path held the
/// arena lock per page (the serial part of a fault) against the mean time per page, and
/// the rate at which the lock saturates (Amdahl: 1 / held time per page) — what any number
/// of cores could reach at most while one arena-wide lock serves every fault.
fn w4_lock_rows(rep: &mut Report, t: &str, run: &W4Run) {
    let names = ["first-touch write", "read in a fork", "COW write in the fork", "COW write in the parent"];
    let mut note = format!("W4 {t}, arena lock held by the fault path (per page; holds):");
    for (i, name) in names.iter().enumerate() {
        if run.holds[i] == 0 {
            continue;
        }
        let held = run.held_ns[i] as f64 * 1e-9 / run.pages as f64;
        let fault = 1.0 / run.rates[i];
        let ceiling = 1.0 / held;
        // The 1- and 4-thread rows carry the figures; every count gets the note.
        if t.starts_with("1 ") || t.starts_with("4 ") {
            rep.row(
                "W4",
                format!("{name}: arena lock held per page, {t}"),
                Unit::Secs,
                Some(held),
                "mean time per page",
                Some(fault),
            );
            rep.row(
                "W4",
                format!("{name}: lock-saturation ceiling (1/held), {t}"),
                Unit::PerSec,
                Some(ceiling),
                "measured rate",
                Some(run.rates[i]),
            );
        }
        let _ = write!(
            note,
            " {name} {:.2} µs of {:.2} µs = serial fraction {:.0} %, ceiling {:.0} k/s ({} holds, {:.2} µs each);",
            held * 1e6,
            fault * 1e6,
            100.0 * held / fault,
            ceiling / 1e3,
            run.holds[i],
            run.held_ns[i] as f64 / run.holds[i] as f64 / 1e3,
        );
    }
    rep.note(note);
}

fn w4(cfg: &Config, rep: &mut Report) -> Res<()> {
    w4_random(cfg, rep)?;
    let size = if cfg.quick { 64 * MIB } else { 256 * MIB };
    let kreuse = baselines::kernel_reuse_fault_rate(size)?;
    let (moved, n_moved) = w4_reuse(size, true)?;
    let (copied, _) = w4_reuse(size, false)?;
    for (what, rate) in [("UFFDIO_MOVE", moved), ("copy, move off", copied)] {
        rep.row(
            "W4",
            format!("write faults after the snapshot dropped ({what}), 1 thread"),
            Unit::PerSec,
            Some(rate),
            "kernel reuse fault",
            Some(kreuse),
        );
    }
    rep.note(format!("W4 reuse: {n_moved} pages taken by UFFDIO_MOVE; move/copy = {:.2}x", moved / copied));
    // Per thread count: (threads, [first, read, cow_child, cow_parent], kernel first touch, kernel COW).
    let mut by_threads: Vec<(usize, [f64; 4], f64, f64)> = Vec::new();
    for threads in [1, 2, 4] {
        let touch = baselines::kernel_first_touch_rate(size, threads)?;
        let kcow = baselines::kernel_cow_fault_rate(size, threads)?;
        // Registered from the start: a never-forked default space is plain kernel memory,
        // and these rows measure cowarena's fault path (and its lock) at every phase.
        let arena = Arena::builder().plain_until_fork(false).build()?;
        let run = w4_cowarena(&arena, size, threads)?;
        let rates = run.rates;
        let [first, read, cow_child, cow_parent] = rates;
        let s = arena.stats();
        drop(arena);
        let t = format!("{threads} thread{}", if threads > 1 { "s" } else { "" });
        rep.row(
            "W4",
            format!("first-touch write faults (registered view), {t}"),
            Unit::PerSec,
            Some(first),
            "kernel first touch",
            Some(touch),
        );
        rep.row(
            "W4",
            format!("read faults in a fork, {t}"),
            Unit::PerSec,
            Some(read),
            "kernel first touch",
            Some(touch),
        );
        rep.row(
            "W4",
            format!("COW write faults in the fork, {t}"),
            Unit::PerSec,
            Some(cow_child),
            "kernel COW fault",
            Some(kcow),
        );
        rep.row(
            "W4",
            format!("COW write faults in the parent, {t}"),
            Unit::PerSec,
            Some(cow_parent),
            "kernel COW fault",
            Some(kcow),
        );
        rep.note(format!(
            "W4 {t}: write_zero {} read_copy {} write_cow {} write_reuse {} spurious {} failed {}",
            s.faults.write_zero,
            s.faults.read_copy,
            s.faults.write_cow,
            s.faults.write_reuse,
            s.faults.spurious,
            s.faults.failed
        ));
        w4_lock_rows(rep, &t, &run);
        by_threads.push((threads, rates, touch, kcow));
    }
    // Issue 13 item 3: scaling in random page order, disjoint pages of one space and two
    // sibling spaces (views registered from the start, as above).
    {
        let run = |threads| -> Res<W4Run> {
            let arena = Arena::builder().plain_until_fork(false).build()?;
            w4_cowarena_in(&arena, size, threads, true)
        };
        let sib = |threads| -> Res<[f64; 2]> {
            let arena = Arena::builder().plain_until_fork(false).build()?;
            w4_siblings(&arena, size, threads)
        };
        let (one, two) = (run(1)?.rates, run(2)?.rates);
        let (s1, s2) = (sib(1)?, sib(2)?);
        let kernel = |i: usize| {
            let (k1, k2) = (by_threads.iter().find(|r| r.0 == 1), by_threads.iter().find(|r| r.0 == 2));
            match (k1, k2) {
                (Some(a), Some(b)) if i == 0 || i == 1 => Some(b.2 / a.2),
                (Some(a), Some(b)) => Some(b.3 / a.3),
                _ => None,
            }
        };
        for (i, what, base) in [
            (0, "first-touch write faults", "kernel first touch 2t/1t (sequential)"),
            (1, "read faults in a fork", "kernel first touch 2t/1t (sequential)"),
            (2, "COW write faults in the fork", "kernel COW 2t/1t (sequential)"),
        ] {
            let ratio = two[i] / one[i];
            rep.row(
                "W4",
                format!("random order, one space: {what}, 2 threads / 1 thread"),
                Unit::Factor,
                Some(ratio),
                base,
                kernel(i),
            );
            rep.target(
                "W4",
                format!("random order, one space: {what}, 2 threads >= 1.6x one (issue 13)"),
                Some(ratio),
                true,
                1.6,
                Unit::Factor,
            );
        }
        for (i, what, base) in [
            (0, "read faults in a fork", "kernel first touch 2t/1t (sequential)"),
            (1, "COW write faults in the fork", "kernel COW 2t/1t (sequential)"),
        ] {
            let ratio = s2[i] / s1[i];
            rep.row(
                "W4",
                format!("random order, two sibling spaces: {what}, 2 threads / 1 thread"),
                Unit::Factor,
                Some(ratio),
                base,
                kernel(i + 1),
            );
            rep.target(
                "W4",
                format!("random order, sibling spaces: {what}, 2 threads >= 1.6x one (issue 13)"),
                Some(ratio),
                true,
                1.6,
                Unit::Factor,
            );
        }
        rep.note(format!(
            "W4 random order, one space, 1 / 2 threads (k/s): first touch {:.0} / {:.0}, read in fork {:.0} / {:.0}, COW {:.0} / {:.0}; sibling spaces: read {:.0} / {:.0}, COW {:.0} / {:.0}",
            one[0] / 1e3, two[0] / 1e3, one[1] / 1e3, two[1] / 1e3, one[2] / 1e3, two[2] / 1e3, s1[0] / 1e3, s2[0] / 1e3, s1[1] / 1e3, s2[1] / 1e3
        ));
    }
    // The same two-thread read phase with the fault path's fills kept under the lock
    // (`ArenaBuilder::unlocked_fills(false)`): what releasing it around the copies buys.
    let locked_read2 = {
        let arena = Arena::builder().plain_until_fork(false).unlocked_fills(false).build()?;
        w4_cowarena(&arena, size, 2)?.rates[1]
    };
    if let Some(&(_, rates, touch, _)) = by_threads.iter().find(|r| r.0 == 2) {
        rep.row(
            "W4",
            "read faults in a fork, 2 threads, fills under the lock",
            Unit::PerSec,
            Some(locked_read2),
            "kernel first touch",
            Some(touch),
        );
        rep.note(format!(
            "W4 2 threads: read faults with unlocked fills / under the lock = {:.2}x",
            rates[1] / locked_read2
        ));
    }
    // Forks trapping every first store, as every view does before Linux 6.7
    // (async_forks(false)); the rows above use the default arena.
    {
        let arena = Arena::builder().plain_until_fork(false).async_forks(false).build()?;
        let run = w4_cowarena(&arena, size, 1)?;
        let kcow = by_threads.first().map(|r| r.3).unwrap_or_default();
        for (i, what) in [(2, "fork"), (3, "parent")] {
            rep.row(
                "W4",
                format!("COW write faults in the {what}, 1 thread, forks trapping"),
                Unit::PerSec,
                Some(run.rates[i]),
                "kernel COW fault",
                Some(kcow),
            );
        }
    }
    if let Ok(arena) = Arena::builder().plain_until_fork(false).async_wp(true).build() {
        let run = w4_cowarena(&arena, size, 1)?;
        let s = arena.stats();
        let (kcow, touch) = by_threads.first().map(|r| (r.3, r.2)).unwrap_or_default();
        rep.row(
            "W4",
            "read faults in a fork, 1 thread, async_wp",
            Unit::PerSec,
            Some(run.rates[1]),
            "kernel first touch",
            Some(touch),
        );
        for (i, what) in [(2, "fork"), (3, "parent")] {
            rep.row(
                "W4",
                format!("COW write faults in the {what}, 1 thread, async_wp"),
                Unit::PerSec,
                Some(run.rates[i]),
                "kernel COW fault",
                Some(kcow),
            );
        }
        rep.note(format!(
            "W4 1 thread async_wp: write_zero {} write_cow {} write_reuse {} writes served by the kernel alone {}",
            s.faults.write_zero, s.faults.write_cow, s.faults.write_reuse, s.writes_async
        ));
    }
    let at = |n: usize| by_threads.iter().find(|r| r.0 == n).copied();
    if let Some((_, [_, _, cow_child, _], _, kcow)) = at(1) {
        rep.target(
            "W4",
            "COW write faults, 1 thread >= 1.0x kernel COW",
            Some(cow_child / kcow),
            true,
            1.0,
            Unit::Factor,
        );
        rep.target(
            "W4",
            "COW write faults, 1 thread: aim 2x kernel COW",
            Some(cow_child / kcow),
            true,
            2.0,
            Unit::Factor,
        );
    }
    if let (Some(one), Some(two)) = (at(1), at(2)) {
        rep.row(
            "W4",
            "COW write faults, 2 threads / 1 thread",
            Unit::Factor,
            Some(two.1[2] / one.1[2]),
            "kernel COW 2t/1t",
            Some(two.3 / one.3),
        );
        rep.row(
            "W4",
            "read faults in a fork, 2 threads / 1 thread",
            Unit::Factor,
            Some(two.1[1] / one.1[1]),
            "kernel first touch 2t/1t",
            Some(two.2 / one.2),
        );
        rep.target(
            "W4",
            "COW write faults, 2 threads >= 1.6x one thread",
            Some(two.1[2] / one.1[2]),
            true,
            1.6,
            Unit::Factor,
        );
    }
    // Issue 13 item 2 (no convoys): more faulting threads than cores must not lose
    // throughput to spinning on a lock whose holder is descheduled.
    if let (Some(two), Some(four)) = (at(2), at(4)) {
        for (i, what, kernel, k2, k4) in [
            (0, "first-touch write faults", "kernel first touch 4t/2t", two.2, four.2),
            (1, "read faults in a fork", "kernel first touch 4t/2t", two.2, four.2),
            (2, "COW write faults in the fork", "kernel COW 4t/2t", two.3, four.3),
        ] {
            rep.row(
                "W4",
                format!("{what}, 4 threads / 2 threads"),
                Unit::Factor,
                Some(four.1[i] / two.1[i]),
                kernel,
                Some(k4 / k2),
            );
            rep.target(
                "W4",
                format!("{what}: 4 faulting threads aggregate >= 0.9x of 2 threads"),
                Some(four.1[i] / two.1[i]),
                true,
                0.9,
                Unit::Factor,
            );
        }
    }
    let (populate, burned) = w4_waiters_cpu(size, 3)?;
    rep.row(
        "W4",
        format!("CPU burned by 3 faulting threads waiting for the lock ({} MiB populate)", size / MIB),
        Unit::Secs,
        Some(burned),
        "the populate holding the lock",
        Some(populate),
    );
    // The handler-thread engine, for reference (a cross-thread wake-up per fault).
    let small = 32 * MIB;
    let kcow = baselines::kernel_cow_fault_rate(small, 1)?;
    let arena = Arena::builder().fault_mode(FaultMode::Thread).build()?;
    let [_, read, cow_child, _] = w4_cowarena(&arena, small, 1)?.rates;
    drop(arena);
    rep.row("W4", "read faults, FaultMode::Thread, 1 thread", Unit::PerSec, Some(read), "kernel COW fault", Some(kcow));
    rep.row(
        "W4",
        "COW write faults, FaultMode::Thread, 1 thread",
        Unit::PerSec,
        Some(cow_child),
        "kernel COW fault",
        Some(kcow),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// W5: fan-out
// ---------------------------------------------------------------------------------------

fn w5(cfg: &Config, rep: &mut Report) -> Res<()> {
    let size = GIB;
    let forks = if cfg.quick { 100 } else { 1000 };
    let probe = if cfg.quick { 4 } else { 8 };
    let pte_per_child = baselines::kernel_fork_pagetable_bytes(size, probe)?;
    let kernel_fork = match rep.w1.iter().find(|p| p.size == size) {
        Some(p) => p.kernel,
        None => secs(baselines::kernel_fork_latency(size, 3)?),
    };

    let (rss0, pte0) = self_rss_pte();
    let arena = Arena::new()?;
    let root = arena.space(size)?;
    fill(&root, 1);
    drop(root.fork()?); // the first fork freezes the written root (measured in W1)
    let pages = pages_of(&root);
    let mut kids = Vec::with_capacity(forks);
    let mut fork_time = Duration::ZERO;
    let t = Instant::now();
    for k in 0..forks {
        let f = Instant::now();
        let c = root.fork()?;
        fork_time += f.elapsed();
        store(&c, (k * 4099) % pages, k as u64);
        kids.push(c);
    }
    let total = t.elapsed();
    let (rss1, pte1) = self_rss_pte();
    let (_, pss1) = self_rss_pss();
    let s = arena.stats();
    for (k, c) in kids.iter().enumerate().step_by(97) {
        let p = (k * 4099) % pages;
        if load(c, p) != k as u64 || load(c, (p + 1) % pages) != pattern(1, (p + 1) % pages) {
            return Err(format!("W5: fork {k} holds wrong data").into());
        }
    }
    let t = Instant::now();
    drop(kids);
    let drop_time = t.elapsed();
    drop(root);
    drop(arena);

    let used = rss1.saturating_sub(rss0) + pte1.saturating_sub(pte0);
    let kernel_total = (size as u64 + forks as u64 * (pte_per_child + PAGE as u64)) as f64;
    rep.row(
        "W5",
        format!("forks/s of {}, {forks} alive, 1 page written each", size_name(size)),
        Unit::PerSec,
        Some(per_sec(forks, total)),
        "kernel fork(2) (1/latency)",
        Some(1.0 / kernel_fork),
    );
    rep.row(
        "W5",
        "forks/s, fork alone",
        Unit::PerSec,
        Some(per_sec(forks, fork_time)),
        "kernel fork(2) (1/latency)",
        Some(1.0 / kernel_fork),
    );
    rep.row(
        "W5",
        format!("resident memory with {forks} forks alive (RSS + page tables)"),
        Unit::Bytes,
        Some(used as f64),
        "kernel: 1 GiB + children's PTEs",
        Some(kernel_total),
    );
    rep.note(format!(
        "W5: kernel page tables per child {:.0} KiB (mean of {probe}); cowarena VmPTE grew {:.1} MiB, RSS {:.1} MiB, process Pss {:.1} MiB; tables in use {}, frames in use {}, dropping {forks} forks took {:.1} ms",
        pte_per_child as f64 / 1024.0,
        pte1.saturating_sub(pte0) as f64 / MIB as f64,
        rss1.saturating_sub(rss0) as f64 / MIB as f64,
        pss1 as f64 / MIB as f64,
        s.tables_in_use,
        s.frames_in_use,
        secs(drop_time) * 1e3
    ));
    rep.target(
        "W5",
        format!("{forks} forks of 1 GiB (one page written each) >= 1000 forks/s"),
        Some(per_sec(forks, total)),
        true,
        1000.0,
        Unit::PerSec,
    );
    rep.target(
        "W5",
        format!("resident memory with {forks} forks alive <= 1.1 GiB"),
        Some(used as f64),
        false,
        1.1 * GIB as f64,
        Unit::Bytes,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Output: table, targets, JSON, SVG
// ---------------------------------------------------------------------------------------

fn print_summary(rep: &Report, header: &str) {
    println!("\n{header}");
    println!(
        "ratio = cowarena ÷ baseline for rates, baseline ÷ cowarena for times and memory: > 1 means cowarena wins\n"
    );
    let w = rep.rows.iter().map(|r| r.metric.chars().count()).max().unwrap_or(10).max(6);
    let b = rep.rows.iter().map(|r| r.baseline_name.chars().count()).max().unwrap_or(10).max(8);
    println!(
        "| {:<3} | {:<w$} | {:>14} | {:<b$} | {:>14} | {:>8} |",
        "W", "metric", "cowarena", "baseline", "baseline value", "ratio"
    );
    println!(
        "|{}|{}|{}|{}|{}|{}|",
        "-".repeat(5),
        "-".repeat(w + 2),
        "-".repeat(16),
        "-".repeat(b + 2),
        "-".repeat(16),
        "-".repeat(10)
    );
    for r in &rep.rows {
        println!(
            "| {:<3} | {:<w$} | {:>14} | {:<b$} | {:>14} | {:>8} |",
            r.workload,
            r.metric,
            r.unit.fmt(r.cowarena),
            r.baseline_name,
            r.baseline_text(),
            fmt_ratio(r.ratio())
        );
    }
    println!("\nTargets (issues 4, 12 and 14):");
    for t in &rep.targets {
        let verdict = match t.pass() {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a ",
        };
        let op = if t.at_least { ">=" } else { "<=" };
        println!(
            "  [{verdict}] {} {}: {} (target {op} {})",
            t.id,
            t.text,
            t.unit.fmt(t.value),
            t.unit.fmt(Some(t.threshold))
        );
    }
}

/// The report as JSON (serde_json with `preserve_order`: keys in the order written here).
/// Non-finite numbers become `null`.
fn to_json(rep: &Report, meta: &[(&str, String)]) -> String {
    use serde_json::{json, Map, Value};
    let mut o = Map::new();
    for (k, v) in meta {
        o.insert((*k).to_owned(), Value::from(v.as_str()));
    }
    o.insert(
        "ratio_orientation".into(),
        "> 1 means cowarena wins (cowarena/baseline for rates, baseline/cowarena for times and memory)".into(),
    );
    let rows = rep.rows.iter().map(|r| {
        json!({
            "workload": r.workload,
            "metric": r.metric,
            "unit": r.unit.name(),
            "cowarena": r.cowarena,
            "baseline": r.baseline_name,
            "baseline_value": r.baseline,
            "ratio": r.ratio(),
        })
    });
    o.insert("rows".into(), rows.collect());
    let targets = rep.targets.iter().map(|t| {
        json!({
            "workload": t.id,
            "target": t.text,
            "value": t.value,
            "threshold": t.threshold,
            "comparison": if t.at_least { ">=" } else { "<=" },
            "unit": t.unit.name(),
            "pass": t.pass(),
        })
    });
    o.insert("targets".into(), targets.collect());
    let w1 = rep.w1.iter().map(|p| {
        json!({
            "size_mib": mib(p.size),
            "cowarena": p.cowarena,
            "kernel_fork": p.kernel,
            "uffd_wp": p.uffd_wp,
            "memcpy": p.memcpy,
        })
    });
    o.insert("w1_fork_latency_seconds".into(), w1.collect());
    o.insert("notes".into(), rep.notes.iter().map(|n| Value::from(n.as_str())).collect());
    let mut text = serde_json::to_string_pretty(&Value::Object(o)).expect("a JSON value serialises");
    text.push('\n');
    text
}

fn time_label(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.0} s")
    } else if s >= 1e-3 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

/// Fork latency vs size: log-scale y axis, sizes evenly spaced (they grow by 4x).
fn to_svg(rep: &Report, subtitle: &str) -> String {
    let (w, h) = (760.0, 460.0);
    let (l, r, t, b) = (90.0, 200.0, 50.0, 70.0);
    let (pw, ph) = (w - l - r, h - t - b);
    type Series = (&'static str, &'static str, fn(&W1Point) -> f64);
    let series: [Series; 3] = [
        ("cowarena fork", "#1b9e77", |p| p.cowarena),
        ("kernel fork(2)", "#d95f02", |p| p.kernel),
        ("uffd-wp protect-all", "#7570b3", |p| p.uffd_wp),
    ];
    let vals: Vec<f64> = rep
        .w1
        .iter()
        .flat_map(|p| series.iter().map(move |s| (s.2)(p)))
        .filter(|v| *v > 0.0 && v.is_finite())
        .collect();
    let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min).log10().floor();
    let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max).log10().ceil();
    let (lo, hi) = if lo.is_finite() && hi.is_finite() && hi > lo { (lo, hi) } else { (-6.0, 0.0) };
    let n = rep.w1.len().max(1);
    let x = |i: usize| l + if n == 1 { pw / 2.0 } else { pw * i as f64 / (n - 1) as f64 };
    let y = |v: f64| t + ph * (hi - v.log10()) / (hi - lo);

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">Fork latency of a fully written space (lower is better)</text>"#,
        l + pw / 2.0
    );
    let _ = writeln!(
        o,
        r##"<text x="{}" y="38" text-anchor="middle" fill="#555">{}</text>"##,
        l + pw / 2.0,
        svg_esc(subtitle)
    );
    // Decade grid and y labels.
    let mut d = lo;
    while d <= hi + 1e-9 {
        let yy = y(10f64.powf(d));
        let _ = writeln!(o, r##"<line x1="{l}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#ddd"/>"##, l + pw);
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            l - 8.0,
            yy + 4.0,
            time_label(10f64.powf(d))
        );
        d += 1.0;
    }
    // X ticks.
    for (i, p) in rep.w1.iter().enumerate() {
        let xx = x(i);
        let _ = writeln!(o, r##"<line x1="{xx:.1}" y1="{}" x2="{xx:.1}" y2="{}" stroke="#ddd"/>"##, t, t + ph);
        let _ =
            writeln!(o, r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"#, t + ph + 18.0, size_name(p.size));
    }
    let _ = writeln!(o, r#"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">space size (fully written, 4 KiB pages; log scale)</text>"#,
        l + pw / 2.0,
        h - 22.0
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(24 {}) rotate(-90)" text-anchor="middle">fork latency (log scale)</text>"#,
        t + ph / 2.0
    );
    // Series and legend.
    for (k, (name, color, f)) in series.iter().enumerate() {
        let pts: Vec<String> =
            rep.w1.iter().enumerate().map(|(i, p)| format!("{:.1},{:.1}", x(i), y(f(p).max(1e-12)))).collect();
        let _ =
            writeln!(o, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2.5"/>"#, pts.join(" "));
        for pt in &pts {
            let (px, py) = pt.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(o, r#"<circle cx="{px}" cy="{py}" r="4" fill="{color}"/>"#);
        }
        let ly = t + 20.0 + 24.0 * k as f64;
        let lx = l + pw + 16.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2.5"/><circle cx="{}" cy="{ly}" r="4" fill="{color}"/>"#,
            lx + 24.0,
            lx + 12.0
        );
        let _ = writeln!(o, r#"<text x="{}" y="{}">{}</text>"#, lx + 32.0, ly + 4.0, svg_esc(name));
    }
    o.push_str("</svg>\n");
    o
}

fn svg_esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn uname_r() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The 1-minute load average: other work on the machine skews every figure.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

fn today() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------

/// W6 (issue 15): a snapshot of a fully written space streamed to a file with
/// `Space::write_to` while two threads keep storing random words into the parent, against
/// `fork(2)` and the child `write(2)`ing the same memory: the time from the fork to the
/// last byte, and the writers' stores over that window. Medians of `reps` runs.
fn w6(cfg: &Config, rep: &mut Report) -> Res<()> {
    let size = if cfg.quick { 256 * MIB } else { GIB };
    let reps = if cfg.quick { 3 } else { 5 };
    // tmpfs where there is one: disk writeback throttling would time the disk, on both
    // sides, not the snapshot.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let path = dir.join(format!("cowarena-bench-w6-{}.img", std::process::id()));
    let mut kernel = Vec::new();
    let mut ours = Vec::new();
    let mut ours_async = Vec::new();
    for r in 0..reps * 2 {
        let async_wp = r % 2 == 1;
        if !async_wp {
            kernel.push(baselines::kernel_fork_stream(size, &path)?);
        }
        let Ok(arena) = Arena::builder().async_wp(async_wp).build() else {
            continue; // no async_wp before Linux 6.7
        };
        let parent = arena.space(size)?;
        fill(&parent, r as u64 + 1);
        drop(parent.fork()?); // adopt the plain space: the parent's stores now fault to us
        let file = std::fs::File::create(&path)?;
        let (res, time, stores) = baselines::with_writers(parent.as_mut_ptr() as usize, size, 2, || -> Res<u64> {
            let snap = parent.fork()?;
            let mut f = &file;
            Ok(snap.write_to(&mut f)?)
        });
        if res? != size as u64 || std::fs::metadata(&path)?.len() != size as u64 {
            return Err("W6: write_to did not write the whole space".into());
        }
        if async_wp { &mut ours_async } else { &mut ours }.push(baselines::Streamed { time, stores });
        drop(file);
    }
    let _ = std::fs::remove_file(&path);
    let med = |v: &[baselines::Streamed]| {
        let t: Vec<f64> = v.iter().map(|s| secs(s.time)).collect();
        let w: Vec<f64> = v.iter().map(|s| s.stores as f64 / secs(s.time)).collect();
        (median_f64(&t), median_f64(&w))
    };
    let ((ct, cw), (kt, kw)) = (med(&ours), med(&kernel));
    let sz = size_name(size);
    let ms = |v: &[baselines::Streamed]| {
        v.iter().map(|s| format!("{:.0}", secs(s.time) * 1e3)).collect::<Vec<_>>().join(" ")
    };
    let rate = |v: &[baselines::Streamed]| {
        v.iter().map(|s| format!("{:.2e}", s.stores as f64 / secs(s.time))).collect::<Vec<_>>().join(" ")
    };
    rep.note(format!(
        "W6 {sz} to {}: cowarena {} ms (async_wp {} ms), kernel {} ms; writer stores/s cowarena {} (async_wp {}), kernel {}",
        dir.display(),
        ms(&ours),
        ms(&ours_async),
        ms(&kernel),
        rate(&ours),
        rate(&ours_async),
        rate(&kernel),
    ));
    let what = format!("snapshot of {sz} streamed to a file, 2 writers on the parent");
    rep.row("W6", format!("{what}: fork to last byte"), Unit::Secs, Some(ct), "fork(2) + child write(2)", Some(kt));
    rep.row("W6", format!("{what}: writer stores"), Unit::PerSec, Some(cw), "fork(2) + child write(2)", Some(kw));
    if !ours_async.is_empty() {
        let (at, aw) = med(&ours_async);
        rep.row(
            "W6",
            format!("{what}, async_wp: fork to last byte"),
            Unit::Secs,
            Some(at),
            "fork(2) + child write(2)",
            Some(kt),
        );
        rep.row(
            "W6",
            format!("{what}, async_wp: writer stores"),
            Unit::PerSec,
            Some(aw),
            "fork(2) + child write(2)",
            Some(kw),
        );
    }
    rep.target(
        "W6",
        "snapshot streamed out: time >= 1.0x fork(2) + write(2) (issue 15)",
        Some(kt / ct),
        true,
        1.0,
        Unit::Factor,
    );
    rep.target(
        "W6",
        "snapshot streamed out: writer stores >= 1.0x those beside fork(2) + write(2) (issue 15)",
        Some(cw / kw),
        true,
        1.0,
        Unit::Factor,
    );
    w6_images(cfg, rep, &path)
}

/// W7 (issue 16): eviction to the arena's swap file and the fault that brings a page
/// back, per page, in random order through the view — after the eviction dropped the file
/// from the page cache (its default), and with the file's pages cached again — against
/// `pread(2)` of a 4 KiB page of a file in the same state, same order (there is no swap
/// device on our machines for the kernel's own swap-in; where there is one the note says
/// so). The swap file is in the temporary directory (a disk here, not tmpfs). Eviction
/// itself against `pwrite(2)` + `fdatasync` of the same bytes.
fn w7(cfg: &Config, rep: &mut Report) -> Res<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    let size = if cfg.quick { 64 * MIB } else { 256 * MIB };
    let pages = size / PAGE;
    let sz = size_name(size);
    let dir = std::env::temp_dir();
    let swap = dir.join(format!("cowarena-bench-w7-{}.swap", std::process::id()));
    let peer_path = dir.join(format!("cowarena-bench-w7-{}.peer", std::process::id()));
    let mut rng = Rng::new(0x5a9);
    let order = dense_order(&mut rng, pages);
    let arena = Arena::builder().swap_path(&swap).build()?;
    let s = arena.space(size)?;
    fill(&s, 3);
    drop(s.fork()?); // the written pages become the arena's frames (a plain space's are the kernel's)
    let t = Instant::now();
    let st = arena.evict(u64::MAX)?;
    let evict = t.elapsed();
    if st.frames_evicted as usize != pages {
        return Err(format!("W7: {} of {pages} frames evicted", st.frames_evicted).into());
    }
    let fault_back = |s: &Space| -> Res<Duration> {
        let t = Instant::now();
        let mut sum = 0u64;
        for (i, &p) in order.iter().enumerate() {
            let v = load(s, p);
            if i % 4096 == 0 && v != pattern(3, p) {
                return Err(format!("W7: page {p} came back wrong").into());
            }
            sum = sum.wrapping_add(v);
        }
        std::hint::black_box(sum);
        Ok(t.elapsed())
    };
    let cold = fault_back(&s)?;
    // Again with the swap file's pages in the page cache: evict, then read the file.
    arena.evict(u64::MAX)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut f = std::fs::File::open(&swap)?;
    while f.read(&mut buf)? > 0 {}
    let warm = fault_back(&s)?;
    // The peer: a file of the same bytes, written and synced, then read a page at a time.
    let mut data = vec![0u8; size];
    s.read(0, &mut data)?;
    let t = Instant::now();
    {
        let mut pf = std::fs::File::create(&peer_path)?;
        pf.write_all(&data)?;
        pf.sync_data()?;
    }
    let write_peer = t.elapsed();
    drop(data);
    let pf = std::fs::File::open(&peer_path)?;
    let pread_all = |pf: &std::fs::File| -> Res<Duration> {
        let mut page = [0u8; PAGE];
        let t = Instant::now();
        for &p in &order {
            pf.read_exact_at(&mut page, (p * PAGE) as u64)?;
        }
        std::hint::black_box(&page);
        Ok(t.elapsed())
    };
    rustix::fs::fadvise(&pf, 0, None, rustix::fs::Advice::DontNeed)?;
    let peer_cold = pread_all(&pf)?;
    let peer_warm = pread_all(&pf)?;
    drop(pf);
    let _ = std::fs::remove_file(&peer_path);
    let stats = arena.stats();
    drop(s);
    drop(arena);
    let per = |d: Duration| secs(d) / pages as f64;
    rep.note(format!(
        "W7 {sz} in {}: evict {:.0} ms ({} frames, {} view pages unmapped), write(2) + fdatasync of the bytes {:.0} ms; \
         fault-back cold {:.0} ms, warm {:.0} ms; pread cold {:.0} ms, warm {:.0} ms; swapped in {}; no swap device: the \
         peer is a file read",
        dir.display(),
        secs(evict) * 1e3,
        st.frames_evicted,
        st.pages_unmapped,
        secs(write_peer) * 1e3,
        secs(cold) * 1e3,
        secs(warm) * 1e3,
        secs(peer_cold) * 1e3,
        secs(peer_warm) * 1e3,
        stats.frames_swapped_in,
    ));
    rep.row(
        "W7",
        format!("evict {sz} (written out, synced, unmapped)"),
        Unit::Secs,
        Some(secs(evict)),
        "write(2) + fdatasync",
        Some(secs(write_peer)),
    );
    rep.row(
        "W7",
        format!("fault-back of an evicted page of {sz}, random order, file not cached: per page"),
        Unit::Secs,
        Some(per(cold)),
        "pread 4 KiB, file not cached",
        Some(per(peer_cold)),
    );
    rep.row(
        "W7",
        format!("fault-back of an evicted page of {sz}, random order, file cached: per page"),
        Unit::Secs,
        Some(per(warm)),
        "pread 4 KiB, file cached",
        Some(per(peer_warm)),
    );
    Ok(())
}

/// W6, images (issue 15): `Space::save` of a fully written space, `Arena::load` of it
/// (time to the first byte), and every page read through the loaded view — sequentially
/// and in random order — against the floor: reading the file (page cache warm) plus one
/// batched `UFFDIO_COPY` of every page, measured in the same run.
fn w6_images(cfg: &Config, rep: &mut Report, path: &std::path::Path) -> Res<()> {
    use std::io::Read;
    let size = if cfg.quick { 256 * MIB } else { GIB };
    let pages = size / PAGE;
    let sz = size_name(size);
    let arena = Arena::new()?;
    let s = arena.space(size)?;
    fill(&s, 7);
    let t = Instant::now();
    s.save(path)?;
    let save = t.elapsed();
    drop(s);
    let file_len = std::fs::metadata(path)?.len() as usize;
    // Reading the file twice: the faster read is the page-cache floor. The peer of `save`:
    // `write(2)` of the same bytes to a new file of the same directory.
    let mut buf = vec![0u8; file_len];
    let mut file_read = Duration::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        std::fs::File::open(path)?.read_exact(&mut buf)?;
        file_read = file_read.min(t.elapsed());
    }
    let peer_path = path.with_extension("peer");
    let t = Instant::now();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&peer_path)?;
        f.write_all(&buf[..size])?;
        f.sync_all()?;
    }
    let write_peer = t.elapsed();
    let _ = std::fs::remove_file(&peer_path);
    drop(buf);
    // The copy floor: the best of three, each the faster of one batched UFFDIO_COPY and
    // 2 MiB pieces.
    let mut copy_all = Duration::MAX;
    for _ in 0..3 {
        copy_all = copy_all.min(baselines::uffd_copy_all(size)?).min(baselines::uffd_copy_in(size, 2 * MIB)?);
    }
    let mut rng = Rng::new(0x1ea5);
    let mut readies = Vec::new();
    let mut reads = [Duration::ZERO; 2];
    for (i, order) in [(0..pages).collect::<Vec<_>>(), dense_order(&mut rng, pages)].iter().enumerate() {
        let t = Instant::now();
        let l = arena.load(path)?;
        readies.push(t.elapsed());
        let t = Instant::now();
        let mut sum = 0u64;
        for &p in order {
            sum = sum.wrapping_add(load(&l, p));
        }
        reads[i] = t.elapsed();
        std::hint::black_box(sum);
        if load(&l, pages - 1) != pattern(7, pages - 1) {
            return Err("W6: a loaded page reads wrong".into());
        }
    }
    let _ = std::fs::remove_file(path);
    let st = arena.stats();
    let ready = readies.iter().copied().min().unwrap_or_default();
    rep.note(format!(
        "W6 image of {sz} in {}: save {:.0} ms (write(2) + fsync of the bytes {:.0} ms), file {:.0} MiB, load ready {:?}, read through the view sequential {:.0} ms, random {:.0} ms; floor: file read (warm) {:.0} ms + UFFDIO_COPY of {sz} {:.0} ms (best of 3, whole or in 2 MiB pieces); pages verified {}",
        path.parent().map(|p| p.display().to_string()).unwrap_or_default(),
        secs(save) * 1e3,
        secs(write_peer) * 1e3,
        file_len as f64 / MIB as f64,
        readies,
        secs(reads[0]) * 1e3,
        secs(reads[1]) * 1e3,
        secs(file_read) * 1e3,
        secs(copy_all) * 1e3,
        st.pages_verified
    ));
    let floor = secs(file_read + copy_all);
    rep.row(
        "W6",
        format!("save an image of {sz} fully written (synced)"),
        Unit::Secs,
        Some(secs(save)),
        "write(2) of the bytes + fsync",
        Some(secs(write_peer)),
    );
    rep.row("W6", format!("load an image of {sz}: ready"), Unit::Secs, Some(secs(ready)), "target", Some(5e-3));
    for (i, how) in ["sequential", "random"].iter().enumerate() {
        rep.row(
            "W6",
            format!("load an image of {sz}, then read every page through the view, {how}"),
            Unit::Secs,
            Some(secs(reads[i])),
            "file read + UFFDIO_COPY floor",
            Some(floor),
        );
    }
    rep.target(
        "W6",
        format!("load an image of {sz}: ready in < 5 ms (5 ms / ours)"),
        Some(5e-3 / secs(ready)),
        true,
        1.0,
        Unit::Factor,
    );
    for (i, how) in ["sequential", "random"].iter().enumerate() {
        rep.target(
            "W6",
            format!("loaded image, every page read through the view ({how}) <= 1.5x file read + copy floor"),
            Some(secs(reads[i]) / floor),
            false,
            1.5,
            Unit::Slowdown,
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let cfg = Config::parse()?;
    let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let machine = format!("{cpus} CPUs, Linux {}", uname_r());
    // The command line as given (the binary and its arguments): a subset run (`--only`)
    // must not pass for a full one.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = format!(
        "cargo run --release --example bench{}",
        if args.is_empty() { String::new() } else { format!(" -- {}", args.join(" ")) }
    );
    let date = today();
    {
        let a = Arena::new()?;
        println!(
            "cowarena bench ({}) on {machine}, {date}; fault mode {:?}, userfaultfd {:?}",
            if cfg.quick { "quick" } else { "full" },
            a.fault_mode(),
            a.uffd_access()
        );
    }
    let load_start = loadavg();
    println!("command: {command}");
    println!("load average at start: {load_start}");
    let start = Instant::now();
    let mut rep = Report::default();
    type Workload = fn(&Config, &mut Report) -> Res<()>;
    let workloads: [(&str, &str, Workload); 7] = [
        ("W1", "fork latency vs size", w1),
        ("W2", "fuzz loop", w2),
        ("W3", "live snapshot", w3),
        ("W4", "fault throughput", w4),
        ("W5", "fan-out", w5),
        ("W6", "snapshot streamed out", w6),
        ("W7", "eviction", w7),
    ];
    for (id, name, f) in workloads {
        if !cfg.runs(id) {
            continue;
        }
        let t = Instant::now();
        println!("\n{id}: {name}");
        f(&cfg, &mut rep).map_err(|e| format!("{id}: {e}"))?;
        println!("  ({id} took {:.1} s)", t.elapsed().as_secs_f64());
    }
    let elapsed = start.elapsed();
    println!("load average at end: {}", loadavg());
    print_summary(
        &rep,
        &format!(
            "Results ({}, {:.0} s in all) — {command}",
            if cfg.quick { "quick" } else { "full" },
            elapsed.as_secs_f64()
        ),
    );
    let meta = [
        ("date", date.clone()),
        ("machine", machine.clone()),
        ("command", command.clone()),
        ("mode", if cfg.quick { "quick" } else { "full" }.to_string()),
        ("elapsed_seconds", format!("{:.1}", elapsed.as_secs_f64())),
        ("loadavg_1min_start_end", format!("{load_start} {}", loadavg())),
    ];
    if let Some(p) = &cfg.json {
        std::fs::write(p, to_json(&rep, &meta))?;
        println!("\nwrote {p}");
    }
    if let Some(p) = &cfg.svg {
        std::fs::write(p, to_svg(&rep, &format!("{machine}; {date}; {command}")))?;
        println!("wrote {p}");
    }
    Ok(())
}
