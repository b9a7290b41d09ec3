//! Issue 15: snapshots that leave the process. `Space::write_to` streams a space's bytes
//! in order from where the arena keeps them, without faulting views; checked against a
//! reference `Vec<u8>` for every kind of page (never written, frozen homes, pool homes,
//! the space's own writes, a warm parent's homes, plain spaces, async-WP copies), in both
//! fault modes, with writers, forks and drops racing the stream, and with a failing writer.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{assert_nothing_left, assert_same, Rng};
use cowarena::{Arena, Error, FaultMode, ForkStrategy, Space};

const PAGE: usize = 4096;
const TABLE: usize = 2 << 20;

fn streamed(s: &Space) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let n = s.write_to(&mut out).unwrap();
    assert_eq!(n as usize, s.len());
    assert_eq!(out.len(), s.len());
    out
}

/// A writer that takes at most `chunk` bytes per call, and sleeps now and then: the stream
/// must cope with short writes and keep the homes it handed out valid while it waits.
struct Slow {
    out: Vec<u8>,
    chunk: usize,
    calls: u64,
}

impl Write for Slow {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk);
        self.out.extend_from_slice(&buf[..n]);
        self.calls += 1;
        if self.calls % 64 == 0 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fails once `limit` bytes were accepted.
struct FailAfter {
    taken: usize,
    limit: usize,
}

impl Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.taken >= self.limit {
            return Err(std::io::Error::other("disk full (test)"));
        }
        let n = buf.len().min(self.limit - self.taken);
        self.taken += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn arenas() -> Vec<(String, Arena)> {
    let mut v = Vec::new();
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        for (plain, async_wp) in [(true, false), (false, false), (true, true)] {
            let b = Arena::builder().fault_mode(mode).plain_until_fork(plain).async_wp(async_wp);
            match b.build() {
                Ok(a) => v.push((format!("{mode:?} plain={plain} async_wp={async_wp}"), a)),
                Err(e) if async_wp => eprintln!("skipping async_wp arenas: {e} (Linux 6.7+)"),
                Err(e) => panic!("{e}"),
            }
        }
    }
    v
}

/// Every kind of page, in every arena flavour, against a reference.
#[test]
fn write_to_streams_every_kind_of_page_exactly() {
    for (what, arena) in arenas() {
        // Ragged length: three tables and a partial page.
        let len = 3 * TABLE + 1234;
        let mut rng = Rng::new(0x5eed);
        let mut root = arena.space(len).unwrap();
        let mut want = vec![0u8; len];
        // A plain (or freshly registered) space, sparse writes: zeros between.
        for _ in 0..200 {
            let (off, n) = rng.span(len);
            let n = n.min(3 * PAGE);
            let mut data = vec![0u8; n];
            rng.fill(&mut data);
            root.as_mut_slice()[off..off + n].copy_from_slice(&data);
            want[off..off + n].copy_from_slice(&data);
        }
        assert_same(&streamed(&root), &want, 0, &format_args!("{what}: before any fork"));
        // A frozen snapshot, then the parent keeps writing (its own homes in its view).
        let snap = root.fork_with(ForkStrategy::Freeze).unwrap();
        let at_fork = want.clone();
        for p in (0..len / PAGE).step_by(5) {
            root.as_mut_slice()[p * PAGE + 3] = 0xEE;
            want[p * PAGE + 3] = 0xEE;
        }
        assert_same(&streamed(&snap), &at_fork, 0, &format_args!("{what}: frozen snapshot"));
        assert_same(&streamed(&root), &want, 0, &format_args!("{what}: parent after writes"));
        // A warm fork (homes stay in the parent's view, or move to the pool with async_wp)
        // and a child with writes of its own.
        let warm = root.fork_with(ForkStrategy::KeepWarm).unwrap();
        let at_warm = want.clone();
        let mut child = warm.fork().unwrap();
        let mut want_child = at_warm.clone();
        for p in (1..len / PAGE).step_by(7) {
            child.write(p * PAGE, &[p as u8; 9]).unwrap();
            want_child[p * PAGE..p * PAGE + 9].copy_from_slice(&[p as u8; 9]);
        }
        for p in (0..len / PAGE).step_by(3) {
            root.as_mut_slice()[p * PAGE + 11] = 0x77;
            want[p * PAGE + 11] = 0x77;
        }
        assert_same(&streamed(&warm), &at_warm, 0, &format_args!("{what}: warm fork after parent writes"));
        assert_same(&streamed(&child), &want_child, 0, &format_args!("{what}: child with its own writes"));
        assert_same(&streamed(&root), &want, 0, &format_args!("{what}: parent"));
        // Pages mapped in views (read-only copies) change nothing.
        let _ = std::hint::black_box(snap.as_slice().iter().step_by(PAGE).count());
        assert_same(&streamed(&snap), &at_fork, 0, &format_args!("{what}: snapshot after view reads"));
        // A short, slow writer gets the same bytes.
        let mut slow = Slow { out: Vec::new(), chunk: 1000, calls: 0 };
        assert_eq!(snap.write_to(&mut slow).unwrap() as usize, len);
        assert_same(&slow.out, &at_fork, 0, &format_args!("{what}: slow writer"));
        // A space never written is all zeros; a one-byte space is one byte.
        let empty = arena.space(TABLE + 1).unwrap();
        assert!(streamed(&empty).iter().all(|&b| b == 0), "{what}: empty space");
        let mut tiny = arena.space(1).unwrap();
        tiny.write(0, b"x").unwrap();
        assert_eq!(streamed(&tiny), b"x", "{what}: one byte");
        arena.check_invariants().unwrap();
        drop((snap, warm, child, root, empty, tiny));
        assert_nothing_left(&arena, &what);
    }
}

/// A writer that fails: a typed error with the bytes taken, and the arena is left as it
/// was — the stream is closed (memory released meanwhile is given back once it ends).
#[test]
fn write_to_a_failing_writer_is_a_typed_error_and_closes_the_stream() {
    let arena = Arena::new().unwrap();
    let mut s = arena.space(TABLE).unwrap();
    s.write(0, &vec![1u8; TABLE]).unwrap();
    let snap = s.fork().unwrap();
    let mut w = FailAfter { taken: 0, limit: 10 * PAGE + 17 };
    match snap.write_to(&mut w) {
        Err(e @ Error::WriteFailed { written, .. }) => {
            assert!(written <= (10 * PAGE + 17) as u64, "{e}");
            let msg = e.to_string();
            assert!(msg.contains("disk full") && msg.contains("writing the space out"), "{msg}");
        }
        other => panic!("expected WriteFailed, got {other:?}"),
    }
    // Dropping everything frees everything: the failed stream did not stay open.
    drop(snap);
    drop(s);
    assert_nothing_left(&arena, "after a failed stream");
}

/// The flagship use: a snapshot streamed out while two threads keep writing the parent
/// and a third forks and drops children of it (frames freed, regions emptied while the
/// stream holds homes it has not written yet). The stream equals the fork-time bytes.
#[test]
fn write_to_a_snapshot_while_writers_fork_and_drop_around_it() {
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let len = 16 << 20;
        let root = arena.space(len).unwrap();
        let mut want = vec![0u8; len];
        Rng::new(3).fill(&mut want);
        // SAFETY: the view is `len` bytes; no reference into it is alive.
        unsafe { std::ptr::copy_nonoverlapping(want.as_ptr(), root.as_mut_ptr(), len) };
        drop(root.fork().unwrap()); // adopt: from now on the parent's writes fault to us
        let snap = root.fork().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stores = Arc::new(AtomicU64::new(0));
        let base = root.as_mut_ptr() as usize;
        std::thread::scope(|sc| {
            for t in 0..2usize {
                let (stop, stores) = (stop.clone(), stores.clone());
                sc.spawn(move || {
                    let mut rng = Rng::new(t as u64 + 10);
                    while !stop.load(Ordering::Relaxed) {
                        // Word-aligned stores, thread t owns words ≡ t (mod 2).
                        let w = (rng.below(len / 16) * 2 + t) * 8;
                        // SAFETY: inside the parent's view; each word has one writer and
                        // no reference into the view is alive.
                        unsafe { ((base + w) as *mut u64).write_volatile(rng.next_u64()) };
                        stores.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            let root = &root;
            let stop2 = stop.clone();
            sc.spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    let c = root.fork().unwrap();
                    std::hint::black_box(c.as_slice()[PAGE]);
                    drop(c);
                }
            });
            for round in 0..3 {
                let mut slow = Slow { out: Vec::with_capacity(len), chunk: 64 << 10, calls: 0 };
                snap.write_to(&mut slow).unwrap();
                assert_same(&slow.out, &want, 0, &format_args!("{mode:?} round {round}: streamed snapshot"));
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(stores.load(Ordering::Relaxed) > 0);
        arena.check_invariants().unwrap();
        drop(snap);
        drop(root);
        assert_nothing_left(&arena, "racing stream");
    }
}

/// Streaming into a file with `std::fs::File` (the documented use), read back.
#[test]
fn write_to_a_file_round_trips() {
    let arena = Arena::new().unwrap();
    let mut s = arena.space(4 * TABLE).unwrap();
    let mut want = vec![0u8; 4 * TABLE];
    Rng::new(77).fill(&mut want[TABLE..2 * TABLE]);
    s.write(TABLE, &want[TABLE..2 * TABLE]).unwrap();
    let snap = s.fork().unwrap();
    let path = std::env::temp_dir().join(format!("cowarena-write-to-{}.img", std::process::id()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    assert_eq!(snap.write_to(&mut f).unwrap(), (4 * TABLE) as u64);
    f.flush().unwrap();
    drop(f);
    let back = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_same(&back, &want, 0, &"file");
}

/// The homes a stream has planned but not yet written may be moved meanwhile: here the
/// snapshot's frames sit in a frozen region that a drop leaves sparse, so automatic
/// compaction (run by every fork and drop) copies them to the pool — and would discard
/// the old pages — while the writer holds the stream open with the first batch planned.
/// The moved-from pages must keep their bytes until the stream ends.
#[test]
fn write_to_survives_compaction_of_the_snapshots_homes() {
    /// Blocks in its first call until told to go on.
    struct Gated<'a> {
        out: Vec<u8>,
        started: &'a std::sync::Barrier,
        go: &'a std::sync::Barrier,
        first: bool,
    }
    impl Write for Gated<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.first {
                self.first = false;
                self.started.wait();
                self.go.wait();
            }
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let arena = Arena::new().unwrap();
    let len = 16 << 20;
    let pages = len / PAGE;
    let mut root = arena.space(len).unwrap();
    let mut want = vec![0u8; len];
    Rng::new(5).fill(&mut want);
    root.write(0, &want).unwrap();
    // A shares every frame with root (one frozen region X holds them all).
    let mut a = root.fork_with(ForkStrategy::Freeze).unwrap();
    // A rewrites 90 % of its pages: the snapshot taken now names X for the other 10 %.
    for p in 0..pages {
        if p % 10 != 0 {
            a.write(p * PAGE, &[0xA5; 8]).unwrap();
            want[p * PAGE..p * PAGE + 8].copy_from_slice(&[0xA5; 8]);
        }
    }
    let snap = a.fork_with(ForkStrategy::Freeze).unwrap();
    // Root rewrites everything too: X's frames are now named by A and snap only.
    for p in 0..pages {
        root.write(p * PAGE, &[1]).unwrap();
    }
    let other = arena.space(TABLE).unwrap();
    let (started, go) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
    let (out, rehomed) = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let mut w = Gated { out: Vec::with_capacity(len), started: &started, go: &go, first: true };
            snap.write_to(&mut w).unwrap();
            w.out
        });
        started.wait(); // the first batch is planned, its homes handed out
        let rehomed0 = arena.stats().frames_rehomed;
        // Drop A: X keeps only snap's 10 % — sparse; forks and drops compact it.
        drop(a);
        let want_moved = (pages / 10) as u64;
        let mut n = 0;
        while arena.stats().frames_rehomed - rehomed0 < want_moved && n < 10_000 {
            drop(other.fork().unwrap());
            n += 1;
        }
        let rehomed = arena.stats().frames_rehomed - rehomed0;
        go.wait();
        (h.join().unwrap(), rehomed)
    });
    assert!(rehomed >= (pages / 10) as u64, "only {rehomed} homes moved during the stream: the test proves nothing");
    assert_same(&out, &want, 0, &"snapshot streamed while its homes were compacted");
    arena.check_invariants().unwrap();
    drop((snap, root, other));
    assert_nothing_left(&arena, "compaction under a stream");
}
