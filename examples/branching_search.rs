//! A beam search over a 32 MiB planning state that forks the state at every branch and
//! drops the losing branches, against the same search copying the state (`Vec::clone`):
//! forks per second, memory used, and a check that both reach the same result.
//!
//! ```text
//! cargo run --release --example branching_search            # depth 20: 309 branches each way
//! cargo run --release --example branching_search -- --quick # depth 4: 53 branches each way
//! ```
//!
//! **The state** is a header page (score, depth) and 4 M cells of 64 bits: a stand-in for
//! a simulation or planning state that is large but changes little per step. A *move*
//! rewrites 16 cells: the first in a small hot region every path modifies, each next one
//! chosen by the value just written, so which cells a move touches depends on the path that
//! led to the state. The score is the sum of a function of every cell, kept up to date
//! incrementally in the header.
//!
//! **The search** keeps the best `BEAM` states; at each depth every one of them is branched
//! `BRANCH` ways (one fork, or one clone, per move), the move is applied to the branch, and
//! only the `BEAM` best branches survive: the others and the previous beam are dropped.
//!
//! **Verification**: both strategies must end with the same best path and score, their
//! final states must have the same digest over all 32 MiB, and the incremental score in the
//! header must equal the score recomputed from every cell. The arena must be empty after
//! everything is dropped. Memory is sampled at the widest point of every depth (all
//! branches alive): the arena's frames in use × 4 KiB, and the process RSS.

#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::{mib, mix, Res};
use cowarena::{Arena, Space};

const PAGE: usize = 4096;
/// The state: one header page, then the cells.
const STATE: usize = 32 << 20;
/// First cell word, and the number of cells.
const CELL0: usize = PAGE / 8;
const CELLS: usize = (STATE - PAGE) / 8;
/// Cells of the hot region (one page) every move starts in.
const HOT: usize = PAGE / 8;
/// Cells a move rewrites.
const TOUCH: usize = 16;
/// States kept per depth, and branches per state.
const BEAM: usize = 4;
const BRANCH: usize = 4;

fn main() -> ExitCode {
    common::main_with("branching_search", run)
}

// ---------------------------------------------------------------------------------------
// The state and its moves
// ---------------------------------------------------------------------------------------

fn get(s: &[u8], word: usize) -> u64 {
    u64::from_ne_bytes(s[word * 8..word * 8 + 8].try_into().unwrap_or_default())
}

fn set(s: &mut [u8], word: usize, v: u64) {
    s[word * 8..word * 8 + 8].copy_from_slice(&v.to_ne_bytes());
}

/// A cell's contribution to the score.
fn value(cell: u64) -> i64 {
    (cell >> 54) as i64
}

/// Fill the initial state; returns its score.
fn init(s: &mut [u8]) -> i64 {
    let mut score = 0;
    for c in 0..CELLS {
        let v = mix(c as u64);
        set(s, CELL0 + c, v);
        score += value(v);
    }
    set(s, 0, score as u64);
    set(s, 1, 0);
    score
}

/// Apply move `mv` at `depth`; returns the new score.
fn apply(s: &mut [u8], depth: usize, mv: usize) -> i64 {
    let mut score = get(s, 0) as i64;
    let key = ((depth as u64) << 32) ^ ((mv as u64) << 16);
    let mut cell = (mix(key) % HOT as u64) as usize;
    for j in 0..TOUCH {
        let old = get(s, CELL0 + cell);
        let new = mix(old ^ key ^ j as u64);
        set(s, CELL0 + cell, new);
        score += value(new) - value(old);
        cell = (new % CELLS as u64) as usize;
    }
    set(s, 0, score as u64);
    set(s, 1, depth as u64 + 1);
    score
}

/// The score recomputed from every cell, and a digest of the whole state.
fn audit(s: &[u8]) -> (i64, u64) {
    let score = (0..CELLS).map(|c| value(get(s, CELL0 + c))).sum();
    let digest = s.chunks_exact(8).fold(0u64, |h, w| mix(h ^ u64::from_ne_bytes(w.try_into().unwrap_or_default())));
    (score, digest)
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// A branchable state: forked (cowarena) or copied (`Vec<u8>`).
trait State: Sized {
    fn branch(&self) -> Res<Self>;
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl State for Space {
    fn branch(&self) -> Res<Self> {
        Ok(self.fork()?)
    }
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl State for Vec<u8> {
    fn branch(&self) -> Res<Self> {
        Ok(self.clone())
    }
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

struct Node<S> {
    state: S,
    score: i64,
    path: Vec<u8>,
}

struct Outcome<S> {
    best: Node<S>,
    branches: usize,
    branch_time: Duration,
    total: Duration,
    /// Peak memory samples: (arena frames × 4 KiB, process RSS), bytes.
    peak_frames: u64,
    peak_rss: u64,
}

/// Beam search from `root` to `depth`; `frames()` reports the arena's frame bytes (0 for
/// the copying strategy).
fn search<S: State>(root: &S, depth: usize, frames: impl Fn() -> u64) -> Res<Outcome<S>> {
    let t = Instant::now();
    let mut branch_time = Duration::ZERO;
    let (mut peak_frames, mut peak_rss) = (frames(), common::rss());
    let mut beam = vec![Node { state: root.branch()?, score: get(root.bytes(), 0) as i64, path: Vec::new() }];
    let mut branches = 1;
    for d in 0..depth {
        let mut cands = Vec::with_capacity(beam.len() * BRANCH);
        for (bi, node) in beam.iter().enumerate() {
            for mv in 0..BRANCH {
                let tb = Instant::now();
                let mut st = node.state.branch()?;
                branch_time += tb.elapsed();
                branches += 1;
                let score = apply(st.bytes_mut(), d, mv);
                cands.push((score, bi, mv, st));
            }
        }
        peak_frames = peak_frames.max(frames());
        peak_rss = peak_rss.max(common::rss());
        // Best first; ties broken by the order of generation, so the result is deterministic.
        cands.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        cands.truncate(BEAM); // the losing branches are dropped here
        beam = cands
            .into_iter()
            .map(|(score, bi, mv, state)| {
                let mut path = beam[bi].path.clone();
                path.push(mv as u8);
                Node { state, score, path }
            })
            .collect(); // and the previous beam here
    }
    let best = beam.into_iter().next().ok_or("empty beam")?;
    Ok(Outcome { best, branches, branch_time, total: t.elapsed(), peak_frames, peak_rss })
}

/// Check the winner's incremental score against its cells; returns its digest.
fn check_best<S: State>(name: &str, out: &Outcome<S>) -> Res<u64> {
    let s = out.best.state.bytes();
    let (score, digest) = audit(s);
    if score != out.best.score || get(s, 0) as i64 != score {
        return Err(format!(
            "{name}: best state's incremental score {} (header {}) differs from its cells' {score}",
            out.best.score,
            get(s, 0) as i64
        )
        .into());
    }
    Ok(digest)
}

fn report<S>(name: &str, out: &Outcome<S>, rss_before: u64) {
    println!(
        "  {name}: {} branches in {:.1} ms of branching ({:.0} branches/s, {:.1} µs each); search {:.0} ms \
         ({:.0} branches/s overall)",
        out.branches,
        common::ms(out.branch_time),
        out.branches as f64 / out.branch_time.as_secs_f64(),
        common::us(out.branch_time) / out.branches as f64,
        common::ms(out.total),
        out.branches as f64 / out.total.as_secs_f64()
    );
    println!(
        "  {name}: peak memory with {} branches alive: arena frames {:.1} MiB, process RSS {:.1} MiB \
         ({:+.1} MiB over the root alone)",
        BEAM * BRANCH,
        mib(out.peak_frames),
        mib(out.peak_rss),
        mib(out.peak_rss) - mib(rss_before)
    );
}

fn run() -> Res {
    let quick = common::quick();
    let depth = if quick { 4 } else { 20 };
    println!(
        "branching_search: {} MiB state, beam {BEAM} x {BRANCH} branches, depth {depth}, {TOUCH} cells per move",
        STATE >> 20
    );

    // 1. cowarena: each branch is a fork.
    let arena = Arena::new()?;
    let (cow_path, cow_score, cow_digest, cow_out) = {
        let mut root = arena.space(STATE)?;
        let root_score = init(root.as_mut_slice());
        let rss_before = common::rss();
        let frames = || arena.stats().frames_in_use * PAGE as u64;
        let out = search(&root, depth, frames)?;
        report("cowarena fork", &out, rss_before);
        let s = arena.stats();
        println!(
            "  arena: {} forks ({} froze a written view), faults {:?}, {} tables broken, {:.1} MiB copied",
            s.forks,
            s.freezes,
            s.faults,
            s.tables_broken,
            mib(s.bytes_copied)
        );
        let digest = check_best("cowarena", &out)?;
        println!("  start score {root_score}, best {} via {:?}", out.best.score, out.best.path);
        let r = (
            out.best.path.clone(),
            out.best.score,
            digest,
            (out.branches, out.branch_time, out.peak_frames, out.peak_rss),
        );
        drop(out);
        drop(root);
        r
    };
    common::check_no_leak(&arena)?;
    drop(arena);

    // 2. The same search copying the state.
    let mut root = vec![0u8; STATE];
    init(&mut root);
    let rss_before = common::rss();
    let out = search(&root, depth, || 0)?;
    report("Vec clone", &out, rss_before);
    let vec_digest = check_best("Vec clone", &out)?;

    if (&out.best.path, out.best.score, vec_digest) != (&cow_path, cow_score, cow_digest) {
        return Err(format!(
            "the strategies disagree: fork found {cow_path:?} score {cow_score} digest {cow_digest:#x}, \
             clone found {:?} score {} digest {vec_digest:#x}",
            out.best.path, out.best.score
        )
        .into());
    }

    let (n, bt, pf, pr) = cow_out;
    println!();
    println!(
        "{:<16} {:>10} {:>14} {:>16} {:>16}",
        "strategy", "branches", "branches/s", "peak state MiB", "peak RSS MiB"
    );
    println!(
        "{:<16} {:>10} {:>14.0} {:>16.1} {:>16.1}",
        "cowarena fork",
        n,
        n as f64 / bt.as_secs_f64(),
        mib(pf),
        mib(pr)
    );
    println!(
        "{:<16} {:>10} {:>14.0} {:>16.1} {:>16.1}",
        "Vec clone",
        out.branches,
        out.branches as f64 / out.branch_time.as_secs_f64(),
        mib(((BEAM * BRANCH + BEAM + 1) * STATE) as u64),
        mib(out.peak_rss)
    );
    println!("both strategies found the same path (score {cow_score}) and final state (digest {cow_digest:#018x}): OK");
    Ok(())
}
