//! A fuzzing loop that resets its target's state for every input by forking a snapshot:
//! thousands of iterations per second, each verified to start from pristine state, next to
//! a `fork(2)` fork server and two memcpy resets running the same inputs.
//!
//! ```text
//! cargo run --release --example fuzz_reset            # 20 000 iterations (cowarena)
//! cargo run --release --example fuzz_reset -- --quick #  2 000 iterations
//! ```
//!
//! **The target** is a small register machine whose whole state lives in an 8 MiB space: a
//! header page (a run counter, eight registers, the last result) and a heap initialised
//! with a pattern, standing for state a real target builds once at start-up (parsed
//! configuration, lookup tables, an allocator's arena). Each input is 64 random
//! instructions (loads, stores, fills, sums, skips over the heap); the target bumps its run
//! counter, runs them, and returns a digest of its registers. It records the pages it
//! wrote, which the checks and the dirty-page reset use.
//!
//! **The loop**: fork the snapshot, check that the pages the previous input wrote (always
//! including the header) read back pristine in the fresh fork, run the input, drop the fork.
//! Every `FULL_EVERY` iterations the whole 8 MiB of the fresh fork is compared with the
//! pristine image as well (timed separately, not counted in the rate). A leak of any write
//! into the next iteration is a failure; so is any input whose result differs from the one
//! the other strategies computed for the same input; the run ends with a self-check that
//! the leakage check does fire on a state that was not reset.
//!
//! The same loop runs a second time with `Space::reset_to` in place of the fork: one working
//! fork, reset to the snapshot after every input.
//!
//! **Comparisons**, all on the same inputs: a kernel *fork server* (`fork(2)` a child per
//! input from a parent holding the pristine state in plain memory, as AFL does), a *full
//! memcpy* reset of the whole state, a *dirty-page memcpy* reset that copies back only
//! the pages the target reports having written (what LibAFL-style snapshot fuzzers do with
//! dirty tracking; here the target reports its writes itself, which real targets do not),
//! and the kernel's *transparent* reset (Linux 6.7+, the peer of issue 14): the state lives
//! in plain memory registered with a userfaultfd in asynchronous write-protect mode
//! (`UFFD_FEATURE_WP_ASYNC`: the kernel marks written pages itself, no fault reaches user
//! space), and each reset lists the written pages with `PAGEMAP_SCAN`, copies them back and
//! re-protects them — the dirty-page reset without the target's help. Its list must be
//! exactly the pages the target recorded. (It reaches the kernel through cowarena's own sys
//! layer, `cowarena::__bench`, which is no public API.)

#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::{mix, Res, Rng};
use cowarena::{Arena, Space};

const PAGE: usize = 4096;
/// The target's state: one header page and the heap.
const STATE: usize = 8 << 20;
/// Instructions per input, 4 bytes each.
const OPS: usize = 64;
const INPUT: usize = OPS * 4;
/// The whole fork is compared with the pristine image every this many iterations.
const FULL_EVERY: usize = 1000;
/// Header words: magic, run counter, eight registers, last result.
const H_MAGIC: usize = 0;
const H_RUNS: usize = 1;
const H_REGS: usize = 2;
const H_RESULT: usize = 10;
const MAGIC: u64 = 0xF022_5EED_0000_0001;

fn main() -> ExitCode {
    common::main_with("fuzz_reset", run)
}

// ---------------------------------------------------------------------------------------
// The target
// ---------------------------------------------------------------------------------------

/// Pages written by one run (at most 1 header + 2 per instruction), allocation-free so a
/// `fork(2)` child may use it.
struct Dirty {
    pages: [u32; 1 + 2 * OPS],
    n: usize,
}

impl Dirty {
    fn new() -> Dirty {
        Dirty { pages: [0; 1 + 2 * OPS], n: 0 }
    }

    fn add(&mut self, page: usize) {
        if !self.pages[..self.n].contains(&(page as u32)) {
            self.pages[self.n] = page as u32;
            self.n += 1;
        }
    }

    fn pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.pages[..self.n].iter().map(|&p| p as usize)
    }
}

/// The target's state, as 64-bit words over a byte slice.
struct Machine<'a> {
    s: &'a mut [u8],
    dirty: &'a mut Dirty,
}

impl Machine<'_> {
    fn get(&self, word: usize) -> u64 {
        let b: [u8; 8] = self.s[word * 8..word * 8 + 8].try_into().unwrap_or_default();
        u64::from_ne_bytes(b)
    }

    fn set(&mut self, word: usize, v: u64) {
        self.s[word * 8..word * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        self.dirty.add(word * 8 / PAGE);
    }

    /// Word index of heap word `addr % heap words`.
    fn heap(&self, addr: u64) -> usize {
        PAGE / 8 + (addr % ((self.s.len() - PAGE) / 8) as u64) as usize
    }
}

/// Pristine contents: header, then a pattern over the heap.
fn init_state(s: &mut [u8]) {
    let words = s.len() / 8;
    for i in 0..words {
        let v = match i {
            H_MAGIC => MAGIC,
            H_RUNS | H_RESULT => 0,
            r if (H_REGS..H_REGS + 8).contains(&r) => mix(r as u64),
            r if r < PAGE / 8 => 0,
            r => mix(r as u64 ^ 0xA5A5),
        };
        s[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

/// Run one input on `state`; returns the digest of the final registers. Allocation-free.
fn execute(state: &mut [u8], input: &[u8; INPUT], dirty: &mut Dirty) -> u64 {
    let mut m = Machine { s: state, dirty };
    let runs = m.get(H_RUNS);
    m.set(H_RUNS, runs + 1);
    let mut r = [0u64; 8];
    for (i, reg) in r.iter_mut().enumerate() {
        *reg = m.get(H_REGS + i) ^ runs.wrapping_mul(0xDEAD_BEEF);
    }
    let mut pc = 0;
    while pc < OPS {
        let [op, ra, rb, c]: [u8; 4] = input[pc * 4..pc * 4 + 4].try_into().unwrap_or_default();
        let (a, b) = (usize::from(ra & 7), usize::from(rb & 7));
        pc += 1;
        match op % 8 {
            0 => r[a] = mix((u64::from(rb) << 8) | u64::from(c)),
            1 => r[a] = m.get(m.heap(r[b])),
            2 => {
                let w = m.heap(r[a]);
                m.set(w, r[b] ^ u64::from(c));
            }
            3 => r[a] = r[a].wrapping_add(r[b] ^ u64::from(c)),
            4 => r[a] = mix(r[a] ^ r[b]),
            5 => {
                // Fill up to 256 words (2 KiB: at most two pages).
                let start = m.heap(r[a]) - PAGE / 8;
                for k in 0..=usize::from(c) {
                    let w = m.heap((start + k) as u64);
                    m.set(w, r[b].rotate_left(k as u32));
                }
            }
            6 => {
                let start = m.heap(r[b]) - PAGE / 8;
                r[a] = (0..64).fold(r[a], |h, k| h.wrapping_add(m.get(m.heap((start + k) as u64))));
            }
            _ => {
                if r[a] & 1 == 1 {
                    pc += usize::from(c % 4);
                }
            }
        }
    }
    let result = r.iter().fold(0u64, |h, &x| mix(h ^ x));
    m.set(H_RESULT, result);
    for (i, reg) in r.iter().enumerate() {
        m.set(H_REGS + i, *reg);
    }
    result
}

/// Input number `i` of the campaign (the same for every strategy).
fn input(i: usize) -> [u8; INPUT] {
    let mut rng = Rng::new(0xF0F0_0000 + i as u64);
    let mut buf = [0u8; INPUT];
    for chunk in buf.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_ne_bytes());
    }
    buf
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

/// Pages among `pages` whose contents in `space` differ from `pristine` (read with
/// `Space::read`, which does not fault the view).
fn leaked_pages(space: &Space, pristine: &[u8], pages: impl Iterator<Item = usize>) -> Res<usize> {
    let mut buf = [0u8; PAGE];
    let mut bad = 0;
    for p in pages {
        space.read(p * PAGE, &mut buf)?;
        if buf[..] != pristine[p * PAGE..(p + 1) * PAGE] {
            bad += 1;
        }
    }
    Ok(bad)
}

/// Compare the whole of `space` with `pristine`; the number of differing pages.
fn full_compare(space: &Space, pristine: &[u8]) -> Res<usize> {
    leaked_pages(space, pristine, 0..pristine.len() / PAGE)
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// How a cowarena run gets a pristine space for the next input.
#[derive(Clone, Copy, PartialEq)]
enum CowReset {
    /// Drop the last fork and fork the snapshot again.
    Fork,
    /// `Space::reset_to` the snapshot: the fork keeps its view and directory across inputs.
    ResetTo,
}

/// A pristine space for the next iteration, given the one the last iteration used.
fn next_pristine(snapshot: &Space, mut prev: Space, how: CowReset) -> cowarena::Result<Space> {
    match how {
        CowReset::Fork => {
            drop(prev);
            snapshot.fork()
        }
        CowReset::ResetTo => {
            prev.reset_to(snapshot)?;
            Ok(prev)
        }
    }
}

struct Outcome {
    rate: f64,
    results: Vec<u64>,
}

fn run_cowarena(arena: &Arena, pristine: &[u8], iters: usize, how: CowReset) -> Res<Outcome> {
    let mut snapshot = arena.space(STATE)?;
    snapshot.as_mut_slice().copy_from_slice(pristine);
    let mut results = Vec::with_capacity(iters);
    let mut prev = Dirty::new();
    let (mut full_time, mut full_checks) = (Duration::ZERO, 0);
    let mut child = snapshot.fork()?;
    let t = Instant::now();
    for i in 0..iters {
        if i > 0 {
            child = next_pristine(&snapshot, child, how)?;
        }
        let leaked = leaked_pages(&child, pristine, prev.pages())?;
        if leaked != 0 {
            return Err(format!("iteration {i}: {leaked} pages written by iteration {} leaked into it", i - 1).into());
        }
        if i % FULL_EVERY == 0 {
            let tf = Instant::now();
            let bad = full_compare(&child, pristine)?;
            full_time += tf.elapsed();
            full_checks += 1;
            if bad != 0 {
                return Err(format!("iteration {i}: {bad} pages of the fresh fork are not pristine").into());
            }
        }
        let mut dirty = Dirty::new();
        results.push(execute(child.as_mut_slice(), &input(i), &mut dirty));
        prev = dirty;
    }
    let elapsed = t.elapsed() - full_time;
    // Self-check: the leakage check must fire on a state that was not reset.
    let leaked = leaked_pages(&child, pristine, prev.pages())?;
    println!(
        "  {full_checks} full 8 MiB comparisons of a fresh {}: all pristine ({:.1} ms each, not counted); \
         self-check: the last state, not reset, shows {leaked} leaked pages",
        if how == CowReset::Fork { "fork" } else { "reset" },
        common::ms(full_time) / full_checks.max(1) as f64
    );
    if leaked == 0 {
        return Err("the leakage check did not notice a state that was not reset".into());
    }
    drop(child);
    let s = arena.stats();
    println!(
        "  arena (so far): {} forks, faults {:?}, {} tables broken, {} frames in use with only the snapshot alive",
        s.forks, s.faults, s.tables_broken, s.frames_in_use
    );
    Ok(Outcome { rate: iters as f64 / elapsed.as_secs_f64(), results })
}

fn run_fork_server(pristine: &[u8], iters: usize) -> Res<Outcome> {
    let mut mem = common::AnonMem::new(STATE)?;
    mem.as_mut_slice().copy_from_slice(pristine);
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: pipe(2) just returned these two descriptors; each is owned exactly once here.
    let (rd, wr) = unsafe { (File::from(OwnedFd::from_raw_fd(fds[0])), OwnedFd::from_raw_fd(fds[1])) };
    let mut rd = rd;
    let (state, wfd) = (mem.as_mut_ptr() as usize, wr.as_raw_fd());
    let mut results = Vec::with_capacity(iters);
    let t = Instant::now();
    for i in 0..iters {
        let inp = input(i);
        let child = move || {
            // SAFETY: in the single-threaded child this is its private copy of the mapped
            // `STATE`-byte state, referenced by nothing else.
            let s = unsafe { std::slice::from_raw_parts_mut(state as *mut u8, STATE) };
            let r = execute(s, &inp, &mut Dirty::new());
            if common::write_all_raw(wfd, &r.to_ne_bytes()) {
                0
            } else {
                1
            }
        };
        // SAFETY: the child runs only the allocation-free target and write(2) on plain
        // anonymous memory that fork(2) copies.
        let pid = unsafe { common::fork_child(child) }?;
        let mut buf = [0u8; 8];
        let got = rd.read_exact(&mut buf);
        common::wait_child(pid)?;
        got?;
        results.push(u64::from_ne_bytes(buf));
    }
    Ok(Outcome { rate: iters as f64 / t.elapsed().as_secs_f64(), results })
}

fn run_memcpy(pristine: &[u8], iters: usize, dirty_only: bool) -> Res<Outcome> {
    let mut mem = common::AnonMem::new(STATE)?;
    let work = mem.as_mut_slice();
    work.copy_from_slice(pristine);
    let mut results = Vec::with_capacity(iters);
    let mut prev = Dirty::new();
    let t = Instant::now();
    for i in 0..iters {
        if i > 0 {
            if dirty_only {
                for p in prev.pages() {
                    work[p * PAGE..(p + 1) * PAGE].copy_from_slice(&pristine[p * PAGE..(p + 1) * PAGE]);
                }
            } else {
                work.copy_from_slice(pristine);
            }
        }
        let leaked = prev.pages().filter(|&p| work[p * PAGE..(p + 1) * PAGE] != pristine[p * PAGE..(p + 1) * PAGE]);
        if leaked.count() != 0 {
            return Err(format!("memcpy reset: iteration {i} does not start pristine").into());
        }
        let mut dirty = Dirty::new();
        results.push(execute(work, &input(i), &mut dirty));
        prev = dirty;
    }
    Ok(Outcome { rate: iters as f64 / t.elapsed().as_secs_f64(), results })
}

/// The kernel's transparent reset (Linux 6.7+): the state in plain memory registered in
/// WP mode with an async-WP userfaultfd and wholly write-protected; before each input the
/// pages the last one wrote are listed (`PAGEMAP_SCAN`, `PAGE_IS_WRITTEN`), copied back
/// from the pristine image and re-protected (a second walk, `PM_SCAN_WP_MATCHING`: doing
/// both in one walk would protect the pages before the copies write them, and the copies
/// would mark them written again). The list must be exactly the pages the target recorded.
/// `None` (with the reason) where the kernel has no `WP_ASYNC` or `PAGEMAP_SCAN`.
fn run_wp_async(pristine: &[u8], iters: usize) -> Res<Option<Outcome>> {
    use cowarena::__bench::{category, Pagemap, Query, Uffd, CHECK_WPASYNC};
    let mut mem = common::AnonMem::new(STATE)?;
    mem.as_mut_slice().copy_from_slice(pristine);
    let (uffd, pagemap) = match (Uffd::open_wp_async(), Pagemap::open()) {
        (Ok(u), Ok(p)) => (u, p),
        (Err(e), _) => return skip_peer(&e),
        (_, Err(e)) => return skip_peer(&e),
    };
    let (start, end) = (mem.as_mut_ptr() as usize, mem.as_mut_ptr() as usize + STATE);
    uffd.register_modes(start, STATE, false, true)?;
    uffd.writeprotect(start, STATE, true)?;
    let written =
        Query { required: category::WRITTEN, report: category::WRITTEN, flags: CHECK_WPASYNC, ..Query::default() };
    let mut runs = Vec::with_capacity(256);
    let mut listed = Vec::with_capacity(256);
    let mut results = Vec::with_capacity(iters);
    let mut prev = Dirty::new();
    let t = Instant::now();
    for i in 0..iters {
        let work = mem.as_mut_slice();
        if i > 0 {
            runs.clear();
            pagemap.scan(start, end, written, &mut runs)?;
            listed.clear();
            for r in &runs {
                let (a, b) = (r.start - start, r.end - start);
                work[a..b].copy_from_slice(&pristine[a..b]);
                listed.extend(a / PAGE..b / PAGE);
            }
            pagemap.protect(start, end, written)?;
            let mut recorded: Vec<usize> = prev.pages().collect();
            recorded.sort_unstable();
            if listed != recorded {
                return Err(format!(
                    "WP_ASYNC reset: iteration {i}: PAGEMAP_SCAN listed {} pages, the target wrote {}",
                    listed.len(),
                    recorded.len()
                )
                .into());
            }
        }
        let leaked = prev.pages().filter(|&p| work[p * PAGE..(p + 1) * PAGE] != pristine[p * PAGE..(p + 1) * PAGE]);
        if leaked.count() != 0 {
            return Err(format!("WP_ASYNC reset: iteration {i} does not start pristine").into());
        }
        let mut dirty = Dirty::new();
        results.push(execute(work, &input(i), &mut dirty));
        prev = dirty;
    }
    let rate = iters as f64 / t.elapsed().as_secs_f64();
    println!("  WP_ASYNC + PAGEMAP_SCAN: every reset listed exactly the pages the target recorded writing");
    drop(mem); // unregistered by the unmap, before the userfaultfd closes
    Ok(Some(Outcome { rate, results }))
}

fn skip_peer(e: &dyn std::fmt::Display) -> Res<Option<Outcome>> {
    println!("  kernel WP_ASYNC + PAGEMAP_SCAN reset skipped: {e} (needs Linux 6.7+)");
    Ok(None)
}

fn run() -> Res {
    let quick = common::quick();
    let scale = if quick { 1 } else { 10 };
    let arena = Arena::new()?;
    println!(
        "fuzz_reset: {} MiB target state, {OPS}-instruction inputs, fault mode {:?}",
        STATE >> 20,
        arena.fault_mode()
    );
    let mut pristine = vec![0u8; STATE];
    init_state(&mut pristine);

    let cow_iters = 2000 * scale;
    println!("cowarena: fork the snapshot per input, drop it after ({cow_iters} iterations)");
    let cow = run_cowarena(&arena, &pristine, cow_iters, CowReset::Fork)?;
    println!("cowarena: one fork, Space::reset_to the snapshot after every input ({cow_iters} iterations)");
    let reset = run_cowarena(&arena, &pristine, cow_iters, CowReset::ResetTo)?;
    common::check_no_leak(&arena)?;
    drop(arena);

    let mut rows = vec![("cowarena Space::fork", cow), ("cowarena Space::reset_to", reset)];
    // Stores to read-only pages served by the kernel alone, restored in place by the reset.
    match Arena::builder().async_wp(true).build() {
        Ok(a) => {
            println!("cowarena (async_wp): one fork, Space::reset_to after every input ({cow_iters} iterations)");
            let out = run_cowarena(&a, &pristine, cow_iters, CowReset::ResetTo)?;
            common::check_no_leak(&a)?;
            rows.push(("cowarena reset_to async_wp", out));
        }
        Err(e) => println!("  async_wp reset skipped: {e} (needs Linux 6.7+)"),
    }
    let plan = [
        ("kernel fork server", 300 * scale),
        ("full memcpy reset", 200 * scale),
        ("dirty-page memcpy", 2000 * scale),
        ("kernel WP_ASYNC reset", 2000 * scale),
    ];
    for (name, iters) in plan {
        let out = match name {
            "kernel fork server" => run_fork_server(&pristine, iters)?,
            "full memcpy reset" => run_memcpy(&pristine, iters, false)?,
            "dirty-page memcpy" => run_memcpy(&pristine, iters, true)?,
            _ => match run_wp_async(&pristine, iters)? {
                Some(out) => out,
                None => continue,
            },
        };
        rows.push((name, out));
    }

    // Every strategy must compute the same result for each input it ran.
    let reference = &rows[0].1.results;
    for (name, out) in &rows[1..] {
        let n = out.results.len().min(reference.len());
        if let Some(i) = (0..n).find(|&i| out.results[i] != reference[i]) {
            return Err(
                format!("input {i}: {name} computed {:#x}, cowarena {:#x}", out.results[i], reference[i]).into()
            );
        }
    }

    println!();
    println!("{:<26} {:>11} {:>14} {:>9} {:>10}", "strategy", "iterations", "iterations/s", "vs fork", "vs reset");
    for (name, out) in &rows {
        println!(
            "{name:<26} {:>11} {:>14.0} {:>8.2}x {:>9.2}x",
            out.results.len(),
            out.rate,
            out.rate / rows[0].1.rate,
            out.rate / rows[1].1.rate
        );
    }
    if let Some((_, peer)) = rows.iter().find(|(n, _)| *n == "kernel WP_ASYNC reset") {
        println!(
            "Space::reset_to ÷ the kernel's transparent reset (WP_ASYNC + PAGEMAP_SCAN): {:.2}x (issue 14: >= 1.0x, aim 2x)",
            rows[1].1.rate / peer.rate
        );
        if let Some((_, a)) = rows.iter().find(|(n, _)| *n == "cowarena reset_to async_wp") {
            println!("Space::reset_to (async_wp) ÷ the kernel's transparent reset: {:.2}x", a.rate / peer.rate);
        }
    }
    println!("every iteration started pristine and every strategy agreed on every shared input: OK");
    Ok(())
}
