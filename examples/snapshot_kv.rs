//! A live key-value store snapshotted to a file while its writers keep going: once with
//! [`Space::fork`], once with the kernel's `fork(2)`, each image verified against the exact
//! state at the fork.
//!
//! ```text
//! cargo run --release --example snapshot_kv            # 128 MiB table, 2 snapshots per method
//! cargo run --release --example snapshot_kv -- --quick # 32 MiB table, 1 snapshot per method
//! cargo run --release --example snapshot_kv -- --quick --async-wp # stores to read-only
//!                                                     # pages served by the kernel alone
//! ```
//!
//! **The store.** An open-addressing hash table (linear probing) of 64-byte slots fills a
//! space: `key, version, value[5], check`, where `value` and `check` are functions of
//! `(key, version)`, so every record is self-describing. It is loaded to 50 % with
//! version 0 of every key; then `WRITERS` threads update it through [`Space::as_mut_ptr`]:
//! each op picks one of *its own* keys (writer `w` owns the keys `k` with
//! `(k - 1) % WRITERS == w`), looks it up by probing, and rewrites its slot with the next
//! version. Key words never change after loading and every other word has a single
//! writer, so the raw-pointer accesses never race (the aliasing contract of [`Space`]).
//!
//! **The fork point.** A snapshot thread bumps an epoch counter to an odd value; each
//! writer, between two ops, publishes how many ops it has done and spins until the epoch
//! moves on. Once every writer has acknowledged, the snapshot thread forks, bumps the epoch
//! again and the writers resume: that stop-fork-resume interval is the writers' *pause*.
//! The image is then written from the fork with [`Space::read`] (or by the `fork(2)`
//! child with `write(2)`) while the writers run: their ops per second in that window is
//! the *throughput during the snapshot*, next to the same figure without a snapshot.
//!
//! **Verification.** Each writer's ops are a deterministic function of its seed, so the
//! op counts published at the fork point define the exact expected version of every key.
//! The image is read back and every slot is checked: each key present exactly once, with
//! exactly the expected version and an intact record, empty slots all zero. A single write
//! too many or too few is a mismatch; the first image is also checked against the state one
//! write *after* the fork, which must show exactly one mismatch (the verifier is not
//! blind). Any mismatch makes the exit status non-zero.
//!
//! The `fork(2)` baseline holds the same table in plain anonymous memory with 4 KiB pages
//! (`MADV_NOHUGEPAGE`, as cowarena views) and measures the parent's `fork()` call the same
//! way.

#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{mix, ms, Res, Rng};
use cowarena::{Arena, Space};

/// Bytes per slot (one record).
const SLOT: usize = 64;
/// 64-bit words per slot.
const WORDS: usize = SLOT / 8;
/// Writer threads (this project's machines have 2 vCPUs).
const WRITERS: usize = 2;
/// Seed of writer `w`'s op stream is `SEED + w`.
const SEED: u64 = 0x5EED_0000;
/// Bytes copied per `Space::read` when writing the image.
const CHUNK: usize = 1 << 20;

fn main() -> ExitCode {
    common::main_with("snapshot_kv", run)
}

// ---------------------------------------------------------------------------------------
// Records and the table
// ---------------------------------------------------------------------------------------

/// The record of `key` at `version`: `[key, version, value0..value4, check]`.
fn record(key: u64, version: u64) -> [u64; WORDS] {
    let mut r = [0u64; WORDS];
    r[0] = key;
    r[1] = version;
    for (i, w) in r.iter_mut().enumerate().take(WORDS - 1).skip(2) {
        *w = mix(key.rotate_left(20) ^ version.wrapping_mul(0x0100_0000_01B3) ^ i as u64);
    }
    r[WORDS - 1] = r[..WORDS - 1].iter().fold(0xCBF2_9CE4_8422_2325, |h, &x| mix(h ^ x));
    r
}

/// Keys are never 0 (an empty slot's key word is 0).
fn key_of(writer: usize, idx: usize) -> u64 {
    (idx * WRITERS + writer) as u64 + 1
}

/// `(writer, index)` of a key, if it is one of the `per_writer * WRITERS` loaded keys.
fn owner_of(key: u64, per_writer: usize) -> Option<(usize, usize)> {
    let k = usize::try_from(key.checked_sub(1)?).ok()?;
    let (w, idx) = (k % WRITERS, k / WRITERS);
    (idx < per_writer).then_some((w, idx))
}

/// The hash table over raw memory (a space's view, or plain memory for the baseline).
struct Table {
    base: *mut u64,
    slots: usize,
}

// SAFETY: `Table` is a raw view of memory whose owner outlives every thread using it
// (scoped threads). Accesses follow the protocol in the module docs: key words are written
// only by `insert` before any other thread starts, and every other word of a slot is
// written only by the one writer thread that owns the slot's key (`put`'s contract).
unsafe impl Sync for Table {}

impl Table {
    /// A table of `bytes / SLOT` slots at `base`.
    ///
    /// # Safety
    /// `base..base + bytes` must be 8-byte aligned, readable, writable and zero-filled, stay
    /// mapped while the table is used, and be accessed by nobody but the table.
    unsafe fn new(base: *mut u8, bytes: usize) -> Table {
        Table { base: base.cast(), slots: bytes / SLOT }
    }

    fn home(&self, key: u64) -> usize {
        ((u128::from(mix(key)) * self.slots as u128) >> 64) as usize
    }

    fn word(&self, slot: usize, i: usize) -> *mut u64 {
        debug_assert!(slot < self.slots && i < WORDS);
        self.base.wrapping_add(slot * WORDS + i)
    }

    /// Slot of `key`, by linear probing from its home slot.
    fn find(&self, key: u64) -> Option<usize> {
        let mut slot = self.home(key);
        for _ in 0..self.slots {
            // SAFETY: `slot < slots`, inside the live memory (constructor contract); key
            // words are not written while other threads run (`insert`'s contract).
            let k = unsafe { self.word(slot, 0).read() };
            if k == key {
                return Some(slot);
            }
            if k == 0 {
                return None;
            }
            slot = if slot + 1 == self.slots { 0 } else { slot + 1 };
        }
        None
    }

    /// Insert `key` at version 0.
    ///
    /// # Safety
    /// No other thread may use the table during the call.
    unsafe fn insert(&self, key: u64) -> Res {
        let mut slot = self.home(key);
        for _ in 0..self.slots {
            // SAFETY: in bounds, and we are the table's only user (contract above).
            if unsafe { self.word(slot, 0).read() } == 0 {
                for (i, w) in record(key, 0).into_iter().enumerate() {
                    // SAFETY: as above.
                    unsafe { self.word(slot, i).write(w) };
                }
                return Ok(());
            }
            slot = if slot + 1 == self.slots { 0 } else { slot + 1 };
        }
        Err("hash table full".into())
    }

    /// Rewrite `slot` (which holds `key`) with `version`; the key word is left untouched.
    ///
    /// # Safety
    /// The calling thread must be the only one that writes or reads the non-key words of
    /// this slot while the call runs.
    unsafe fn put(&self, slot: usize, key: u64, version: u64) {
        for (i, w) in record(key, version).into_iter().enumerate().skip(1) {
            // SAFETY: in bounds of the live memory; exclusive per the contract above.
            unsafe { self.word(slot, i).write(w) };
        }
    }
}

/// Load version 0 of every key, single-threaded.
fn load(table: &Table, per_writer: usize) -> Res {
    for idx in 0..per_writer {
        for w in 0..WRITERS {
            // SAFETY: no writer thread exists yet.
            unsafe { table.insert(key_of(w, idx))? };
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Writers and the epoch protocol
// ---------------------------------------------------------------------------------------

/// One writer's counters, on its own cache line.
#[repr(align(128))]
#[derive(Default)]
struct Lane {
    /// Ops completed (updated after each op).
    ops: AtomicU64,
    /// The odd epoch this writer last parked for.
    acked: AtomicU64,
    /// Ops completed when it parked for `acked`.
    parked_ops: AtomicU64,
}

#[derive(Default)]
struct Control {
    /// Even: run. Odd: park at the next op boundary.
    epoch: AtomicU64,
    quit: AtomicBool,
    lanes: [Lane; WRITERS],
}

impl Control {
    fn total_ops(&self) -> u64 {
        self.lanes.iter().map(|l| l.ops.load(Ordering::Relaxed)).sum()
    }

    /// Ask every writer to park and wait until they have; their op counts at the park.
    fn pause(&self) -> Res<[u64; WRITERS]> {
        let e = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        debug_assert!(e % 2 == 1);
        let mut ops = [0; WRITERS];
        let mut spins = 0;
        for (w, lane) in self.lanes.iter().enumerate() {
            while lane.acked.load(Ordering::Acquire) != e {
                if self.quit.load(Ordering::Relaxed) {
                    self.resume();
                    return Err("a writer stopped while the snapshot waited for it".into());
                }
                backoff(&mut spins);
            }
            ops[w] = lane.parked_ops.load(Ordering::Relaxed);
        }
        Ok(ops)
    }

    fn resume(&self) {
        self.epoch.fetch_add(1, Ordering::Release);
    }
}

/// Wait a little: yield for about the first millisecond, then sleep in 50 µs steps, so
/// that waiting threads never starve a thread that is serving a fault (on 2 vCPUs a fault
/// may wait for the arena's engine thread to refill its preallocated frames).
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 1000 {
        std::hint::spin_loop();
        thread::yield_now();
    } else {
        thread::sleep(Duration::from_micros(50));
    }
}

/// Writer `w`: update random keys of its own until told to quit; returns its op count.
fn writer(w: usize, table: &Table, ctl: &Control, per_writer: usize) -> Result<u64, String> {
    let lane = &ctl.lanes[w];
    let mut rng = Rng::new(SEED + w as u64);
    let mut versions = vec![0u64; per_writer];
    let mut ops = 0u64;
    let mut seen = 0u64;
    loop {
        let e = ctl.epoch.load(Ordering::Acquire);
        if e != seen {
            seen = e;
            if e % 2 == 1 {
                // Park: every store of ours happens-before the snapshot thread's fork.
                lane.parked_ops.store(ops, Ordering::Relaxed);
                lane.acked.store(e, Ordering::Release);
                let mut spins = 0;
                while ctl.epoch.load(Ordering::Acquire) == e && !ctl.quit.load(Ordering::Relaxed) {
                    backoff(&mut spins);
                }
                continue;
            }
        }
        if ctl.quit.load(Ordering::Relaxed) {
            return Ok(ops);
        }
        let idx = rng.below(per_writer);
        let key = key_of(w, idx);
        versions[idx] += 1;
        let Some(slot) = table.find(key) else {
            ctl.quit.store(true, Ordering::Relaxed);
            return Err(format!("writer {w}: key {key} vanished from the table"));
        };
        // SAFETY: `key` belongs to writer `w` alone, so no other thread touches its slot.
        unsafe { table.put(slot, key, versions[idx]) };
        ops += 1;
        lane.ops.store(ops, Ordering::Relaxed);
    }
}

/// The version of each of writer `w`'s keys after its first `ops` ops (a replay).
fn expected_versions(w: usize, ops: u64, per_writer: usize) -> Vec<u64> {
    let mut rng = Rng::new(SEED + w as u64);
    let mut v = vec![0u64; per_writer];
    for _ in 0..ops {
        v[rng.below(per_writer)] += 1;
    }
    v
}

// ---------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------

/// Where the table lives, and so how it is snapshotted.
#[derive(Clone, Copy)]
enum Store<'a> {
    /// In a cowarena space: `Space::fork`, image written with `Space::read`.
    Cow(&'a Space),
    /// In plain memory: `fork(2)`, image written by the child with `write(2)`.
    Kernel(&'a common::AnonMem),
}

enum Forked {
    Space(Space),
    Child(libc::pid_t),
}

/// Removes the image file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Snap {
    /// Writers stopped: from the park request to the resume.
    pause: Duration,
    /// The fork call alone.
    fork: Duration,
    /// Writing the image after the writers resumed (until the child exited, for fork(2)).
    image: Duration,
    /// Writers' ops per second while the image was being written.
    rate: f64,
    /// Writers' ops per second over a fixed window from the park request (the pause, the
    /// image, and the re-faults after it: the same span for both methods).
    window_rate: f64,
    ops_at_fork: [u64; WRITERS],
}

/// The fork's bytes straight from where the arena keeps them (`Space::write_to`: no view
/// faults, no copy of ours for frozen pages, the arena lock released while `write(2)` runs).
fn write_image(fork: &Space, mut file: File) -> Res {
    fork.write_to(&mut file)?;
    file.flush()?;
    Ok(())
}

fn snapshot(store: Store<'_>, ctl: &Control, path: &Path, window: Duration) -> Res<Snap> {
    let file = File::create(path)?;
    let (t0, ops0) = (Instant::now(), ctl.total_ops());
    let ops_at_fork = ctl.pause()?;
    let tf = Instant::now();
    let forked: Res<Forked> = match store {
        Store::Cow(space) => space.fork().map(Forked::Space).map_err(Into::into),
        Store::Kernel(mem) => {
            let (fd, ptr, len) = (file.as_raw_fd(), mem.as_mut_ptr() as usize, mem.len());
            let child = move || {
                // SAFETY: in the child, which has a single thread, this is its private copy
                // of the (mapped, `len`-byte) table memory: nothing else accesses it.
                let image = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
                if common::write_all_raw(fd, image) {
                    0
                } else {
                    1
                }
            };
            // SAFETY: the child runs only loads and `write(2)` (async-signal-safe) on memory
            // that `fork(2)` copies (plain anonymous memory, not a cowarena view).
            unsafe { common::fork_child(child) }.map(Forked::Child).map_err(Into::into)
        }
    };
    let fork = tf.elapsed();
    ctl.resume();
    let pause = t0.elapsed();
    let forked = forked?;
    let (t1, ops1) = (Instant::now(), ctl.total_ops());
    match forked {
        Forked::Space(f) => {
            write_image(&f, file)?;
            drop(f);
        }
        Forked::Child(pid) => {
            drop(file);
            common::wait_child(pid)?;
        }
    }
    let image = t1.elapsed();
    let rate = (ctl.total_ops() - ops1) as f64 / image.as_secs_f64();
    thread::sleep(window.saturating_sub(t0.elapsed()));
    let window_rate = (ctl.total_ops() - ops0) as f64 / t0.elapsed().as_secs_f64();
    Ok(Snap { pause, fork, image, rate, window_rate, ops_at_fork })
}

/// Count the image's mismatches against the state after `ops_at_fork` ops of each writer;
/// prints the first few.
fn verify(path: &Path, slots: usize, per_writer: usize, ops_at_fork: &[u64; WRITERS]) -> Res<u64> {
    let expect: Vec<Vec<u64>> = (0..WRITERS).map(|w| expected_versions(w, ops_at_fork[w], per_writer)).collect();
    let mut seen = vec![vec![false; per_writer]; WRITERS];
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len != (slots * SLOT) as u64 {
        println!("    image is {len} bytes, expected {}", slots * SLOT);
        return Ok(1);
    }
    let mut rd = BufReader::with_capacity(CHUNK, file);
    let mut bad = 0u64;
    let mut report = |what: String| {
        bad += 1;
        if bad <= 5 {
            println!("    MISMATCH: {what}");
        }
    };
    let mut raw = [0u8; SLOT];
    for slot in 0..slots {
        rd.read_exact(&mut raw)?;
        let mut got = [0u64; WORDS];
        for (i, w) in got.iter_mut().enumerate() {
            *w = u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into()?);
        }
        if got[0] == 0 {
            if got.iter().any(|&w| w != 0) {
                report(format!("slot {slot}: empty slot holds data"));
            }
            continue;
        }
        let Some((w, idx)) = owner_of(got[0], per_writer) else {
            report(format!("slot {slot}: unknown key {}", got[0]));
            continue;
        };
        if std::mem::replace(&mut seen[w][idx], true) {
            report(format!("slot {slot}: key {} appears twice", got[0]));
        }
        let want = record(got[0], expect[w][idx]);
        if got != want {
            report(format!(
                "slot {slot}: key {} version {} (record {}), expected version {}",
                got[0],
                got[1],
                if got == record(got[0], got[1]) { "intact" } else { "torn" },
                want[1]
            ));
        }
    }
    for (w, s) in seen.iter().enumerate() {
        for idx in s.iter().enumerate().filter(|(_, &v)| !v).map(|(i, _)| i) {
            report(format!("key {} missing", key_of(w, idx)));
        }
    }
    Ok(bad)
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

struct Config {
    bytes: usize,
    snaps: usize,
    window: Duration,
}

struct MethodReport {
    base_rate: f64,
    snaps: Vec<Snap>,
}

fn run_method(name: &str, table: &Table, store: Store<'_>, cfg: &Config) -> Res<MethodReport> {
    let slots = cfg.bytes / SLOT;
    let per_writer = slots / 2 / WRITERS;
    let ctl = &Control::default();
    println!("{name}:");
    thread::scope(|s| {
        let handles: Vec<_> = (0..WRITERS).map(|w| s.spawn(move || writer(w, table, ctl, per_writer))).collect();
        let result = drive(store, cfg, ctl, per_writer);
        ctl.quit.store(true, Ordering::Relaxed);
        for h in handles {
            match h.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err("a writer thread panicked".into()),
            }
        }
        result
    })
}

fn drive(store: Store<'_>, cfg: &Config, ctl: &Control, per_writer: usize) -> Res<MethodReport> {
    let slots = cfg.bytes / SLOT;
    thread::sleep(cfg.window / 4);
    let (t0, ops0) = (Instant::now(), ctl.total_ops());
    thread::sleep(cfg.window);
    let base_rate = (ctl.total_ops() - ops0) as f64 / t0.elapsed().as_secs_f64();
    println!("  writers without a snapshot: {:.2} M updates/s", base_rate / 1e6);
    let mut snaps = Vec::new();
    for i in 0..cfg.snaps {
        let path = std::env::temp_dir().join(format!("cowarena-snapshot_kv-{}-{i}.img", std::process::id()));
        let _cleanup = TempFile(path.clone());
        let snap = snapshot(store, ctl, &path, cfg.window)?;
        let tv = Instant::now();
        let bad = verify(&path, slots, per_writer, &snap.ops_at_fork)?;
        println!(
            "  snapshot {}: pause {:.3} ms (fork call {:.3} ms); image of {} MiB written in {:.0} ms while \
             writers did {:.2} M updates/s ({:.2} M/s over the {:.0} ms from the pause); verified at {} \
             updates in {:.0} ms: {}",
            i + 1,
            ms(snap.pause),
            ms(snap.fork),
            cfg.bytes >> 20,
            ms(snap.image),
            snap.rate / 1e6,
            snap.window_rate / 1e6,
            ms(cfg.window.max(snap.image)),
            snap.ops_at_fork.iter().sum::<u64>(),
            ms(tv.elapsed()),
            if bad == 0 { "OK".to_string() } else { format!("{bad} MISMATCHES") }
        );
        if bad != 0 {
            return Err(format!("snapshot {} does not match the state at its fork point", i + 1).into());
        }
        if i == 0 {
            // The verifier must see a single write: check against one write after the fork.
            let mut one_more = snap.ops_at_fork;
            one_more[0] += 1;
            println!("  verifier self-check against the state one write after the fork:");
            let bad = verify(&path, slots, per_writer, &one_more)?;
            if bad != 1 {
                return Err(format!("verifier self-check saw {bad} mismatches instead of 1").into());
            }
        }
        snaps.push(snap);
        thread::sleep(cfg.window / 4);
    }
    Ok(MethodReport { base_rate, snaps })
}

/// Worst pause, mean fork call, mean image time (ms), mean rates during the image and over
/// the window.
fn summarize(r: &MethodReport) -> (f64, f64, f64, f64, f64) {
    let n = r.snaps.len() as f64;
    let max_pause = r.snaps.iter().map(|s| ms(s.pause)).fold(0.0, f64::max);
    let fork = r.snaps.iter().map(|s| ms(s.fork)).sum::<f64>() / n;
    let image = r.snaps.iter().map(|s| ms(s.image)).sum::<f64>() / n;
    let rate = r.snaps.iter().map(|s| s.rate).sum::<f64>() / n;
    let window_rate = r.snaps.iter().map(|s| s.window_rate).sum::<f64>() / n;
    (max_pause, fork, image, rate, window_rate)
}

fn run() -> Res {
    let quick = common::quick();
    let cfg = Config {
        bytes: if quick { 32 << 20 } else { 128 << 20 },
        snaps: if quick { 1 } else { 2 },
        window: Duration::from_millis(if quick { 300 } else { 1000 }),
    };
    let slots = cfg.bytes / SLOT;
    println!(
        "snapshot_kv: {} MiB table, {} slots of {SLOT} B, {} keys, {WRITERS} writer threads, {} snapshot(s) per method",
        cfg.bytes >> 20,
        slots,
        slots / 2,
        cfg.snaps
    );

    // 1. cowarena: the table lives in a space.
    let async_wp = std::env::args().skip(1).any(|a| a == "--async-wp");
    let arena = Arena::builder().async_wp(async_wp).build()?;
    if async_wp {
        println!("arena: ArenaBuilder::async_wp (stores to read-only pages served by the kernel alone)");
    }
    let cow = {
        let root = arena.space(cfg.bytes)?;
        // SAFETY: the view is page-aligned, zero-filled, mapped for `bytes` and outlives
        // `table` (declared after it, dropped before it); only the table touches it.
        let table = unsafe { Table::new(root.as_mut_ptr(), cfg.bytes) };
        let t = Instant::now();
        load(&table, slots / 2 / WRITERS)?;
        println!("loaded the table in a cowarena space in {:.0} ms", ms(t.elapsed()));
        let r = run_method("cowarena (Space::fork, image via Space::write_to)", &table, Store::Cow(&root), &cfg)?;
        // The store saved as a checksummed image and loaded back (lazily): the loaded
        // space must hold exactly the fork it was saved from.
        let snap = root.fork()?;
        let img = std::env::temp_dir().join(format!("snapshot_kv-{}.img", std::process::id()));
        let t = Instant::now();
        snap.save(&img)?;
        let saved = t.elapsed();
        let t = Instant::now();
        let back = arena.load(&img)?;
        let ready = t.elapsed();
        let same = back.as_slice() == snap.as_slice();
        let on_disk = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&img)?.blocks() * 512
        };
        std::fs::remove_file(&img)?;
        if !same {
            return Err("the loaded image differs from the fork it was saved from".into());
        }
        println!(
            "  Space::save: {:.0} ms, {} MiB on disk; Arena::load: ready in {:.2} ms, identical to the fork: OK",
            ms(saved),
            on_disk >> 20,
            ms(ready)
        );
        drop((back, snap));
        let s = arena.stats();
        println!(
            "  arena: {} forks, faults {:?}, {} tables broken, {} MiB copied, {} frames in use",
            s.forks,
            s.faults,
            s.tables_broken,
            s.bytes_copied >> 20,
            s.frames_in_use
        );
        r
    };
    common::check_no_leak(&arena)?;
    drop(arena);

    // 2. fork(2): the same table in plain memory.
    let kernel = {
        let mem = common::AnonMem::new(cfg.bytes)?;
        // SAFETY: the mapping is page-aligned, zero-filled, mapped for `bytes` and outlives
        // `table`; only the table touches it.
        let table = unsafe { Table::new(mem.as_mut_ptr(), cfg.bytes) };
        load(&table, slots / 2 / WRITERS)?;
        run_method("kernel fork(2) (child process writes the image)", &table, Store::Kernel(&mem), &cfg)?
    };

    println!();
    println!(
        "writer throughput in M updates/s: 'base' without a snapshot, 'image' while the image is \
         written, 'window' over the {:.0} ms from the pause (or the image, if longer)",
        ms(cfg.window)
    );
    println!(
        "{:<22} {:>13} {:>13} {:>10} {:>8} {:>8} {:>8}",
        "method", "max pause ms", "fork call ms", "image ms", "base", "image", "window"
    );
    for (name, r) in [("cowarena Space::fork", &cow), ("kernel fork(2)", &kernel)] {
        let (pause, fork, image, rate, window_rate) = summarize(r);
        println!(
            "{name:<22} {pause:>13.3} {fork:>13.3} {image:>10.0} {:>8.2} {:>8.2} {:>8.2}",
            r.base_rate / 1e6,
            rate / 1e6,
            window_rate / 1e6
        );
    }
    let (cp, ..) = summarize(&cow);
    let (kp, ..) = summarize(&kernel);
    println!("writers' worst pause: cowarena {cp:.3} ms vs fork(2) {kp:.3} ms ({:.1}x)", kp / cp);
    println!("every snapshot verified against its fork point: OK");
    Ok(())
}
