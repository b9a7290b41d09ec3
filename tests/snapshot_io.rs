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
            // Saved and loaded back meanwhile: the fork-time bytes too.
            let img = tmp_path("racing");
            snap.save(&img).unwrap();
            let back = arena.load(&img).unwrap();
            std::fs::remove_file(&img).unwrap();
            assert_same(&streamed(&back), &want, 0, &format_args!("{mode:?}: saved and loaded under writers"));
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

// ---- save / load ---------------------------------------------------------------------------

fn tmp_path(tag: &str) -> std::path::PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "cowarena-test-{}-{tag}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Blocks the file really occupies (st_blocks is in 512-byte units).
fn disk_bytes(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Save and load round-trip every kind of space exactly; holes take no disk space; a
/// loaded space reads right through the view and the API, forks, resets, streams and
/// saves again; pages are checked once, when first brought in.
#[test]
fn save_and_load_round_trip_in_every_arena() {
    for (what, arena) in arenas() {
        let len = 3 * TABLE + 777;
        let mut s = arena.space(len).unwrap();
        let mut want = vec![0u8; len];
        let mut rng = Rng::new(0xfeed);
        // Sparse: ~40 pages written, the rest zeros.
        for _ in 0..40 {
            let p = rng.below(len / PAGE);
            let mut data = vec![0u8; 100];
            rng.fill(&mut data);
            data[0] |= 1;
            s.write(p * PAGE + 50, &data).unwrap();
            want[p * PAGE + 50..p * PAGE + 150].copy_from_slice(&data);
        }
        let path = tmp_path("rt");
        s.save(&path).unwrap();
        assert!(disk_bytes(&path) < (len / 4) as u64, "{what}: holes took disk space: {} bytes", disk_bytes(&path));
        let before = arena.stats();
        let t = std::time::Instant::now();
        let mut l = arena.load(&path).unwrap();
        let ready = t.elapsed();
        let st = arena.stats();
        assert_eq!(st.spaces_loaded - before.spaces_loaded, 1, "{what}");
        let stored = st.pages_loaded - before.pages_loaded;
        assert!(stored > 0 && stored <= 40, "{what}: {stored} pages stored");
        assert_eq!(st.pages_verified, before.pages_verified, "{what}: nothing checked before use");
        assert_eq!(l.len(), len);
        // Through the API, then the view.
        let mut back = vec![0u8; len];
        l.read(0, &mut back).unwrap();
        assert_same(&back, &want, 0, &format_args!("{what}: loaded, API read"));
        assert_eq!(arena.stats().pages_verified - before.pages_verified, stored, "{what}: each page checked once");
        assert_same(l.as_slice(), &want, 0, &format_args!("{what}: loaded, view"));
        assert_eq!(arena.stats().pages_verified - before.pages_verified, stored, "{what}: and only once");
        // It forks, is written, resets, streams and saves like any other space.
        let snap = l.fork().unwrap();
        l.write(7, b"changed").unwrap();
        l.as_mut_slice()[2 * TABLE] = 9;
        assert_same(&streamed(&snap), &want, 0, &format_args!("{what}: fork of a loaded space"));
        l.reset_to(&snap).unwrap();
        assert_same(l.as_slice(), &want, 0, &format_args!("{what}: reset to the fork"));
        l.write(PAGE, b"second save").unwrap();
        want[PAGE..PAGE + 11].copy_from_slice(b"second save");
        let path2 = tmp_path("rt2");
        l.save(&path2).unwrap();
        let l2 = arena.load(&path2).unwrap();
        assert_same(&streamed(&l2), &want, 0, &format_args!("{what}: saved again and loaded"));
        // An empty space saves to a file of holes and loads as zeros.
        let e = arena.space(TABLE).unwrap();
        let path3 = tmp_path("empty");
        e.save(&path3).unwrap();
        assert!(disk_bytes(&path3) <= 64 << 10, "{what}: empty image uses {} bytes", disk_bytes(&path3));
        assert!(arena.load(&path3).unwrap().as_slice().iter().all(|&b| b == 0));
        eprintln!("{what}: {stored} pages, ready in {ready:?}");
        arena.check_invariants().unwrap();
        drop((s, l, l2, snap, e));
        for p in [&path, &path2, &path3] {
            std::fs::remove_file(p).unwrap();
        }
        assert_nothing_left(&arena, &what);
    }
}

/// Everything wrong with a file before its pages are used is a typed error naming the
/// problem, and leaves nothing mapped.
#[test]
fn load_names_each_problem_and_maps_nothing() {
    use cowarena::ImageProblem;
    let arena = Arena::new().unwrap();
    let mut s = arena.space(TABLE).unwrap();
    s.write(3 * PAGE, &[5; PAGE]).unwrap();
    let good = tmp_path("good");
    s.save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let views = arena.stats().views_in_use;
    let try_load = |b: &[u8]| {
        let p = tmp_path("bad");
        std::fs::write(&p, b).unwrap();
        let r = arena.load(&p);
        std::fs::remove_file(&p).unwrap();
        match r {
            Err(Error::BadImage { problem, path }) => {
                assert_eq!(path, p);
                problem
            }
            Err(e) => panic!("expected BadImage, got {e}"),
            Ok(_) => panic!("a bad image loaded"),
        }
    };
    assert_eq!(try_load(b"#!/bin/sh\necho not an image\n"), ImageProblem::NotAnImage);
    assert_eq!(try_load(&[]), ImageProblem::NotAnImage);
    let mut newer = bytes.clone();
    newer[8] = 9;
    assert_eq!(try_load(&newer), ImageProblem::NewerVersion { found: 9, supported: 1 });
    let mut hdr = bytes.clone();
    hdr[20] ^= 1;
    assert_eq!(try_load(&hdr), ImageProblem::DamagedHeader);
    let n = bytes.len() as u64;
    assert_eq!(try_load(&bytes[..bytes.len() - 4096]), ImageProblem::Truncated { len: n - 4096, expected: n });
    assert!(matches!(try_load(&bytes[..100]), ImageProblem::Truncated { .. }));
    let mut idx = bytes.clone();
    idx[4096] ^= 0x80;
    assert_eq!(try_load(&idx), ImageProblem::DamagedIndex);
    // The messages name the problem and the file.
    let p = tmp_path("msg");
    std::fs::write(&p, &newer).unwrap();
    let msg = arena.load(&p).unwrap_err().to_string();
    std::fs::remove_file(&p).unwrap();
    assert!(msg.contains("version 9") && msg.contains("upgrade") && msg.contains(&*p.to_string_lossy()), "{msg}");
    assert!(matches!(arena.load(tmp_path("missing")), Err(Error::ImageIo { op: "open", .. })));
    assert_eq!(arena.stats().views_in_use, views, "a failed load left a view mapped");
    std::fs::remove_file(&good).unwrap();
}

/// Damaged page data is caught when the page is first brought in: a typed error from the
/// API (the other pages still load), never the damaged bytes.
#[test]
fn damaged_page_data_is_caught_at_first_use() {
    let arena = Arena::new().unwrap();
    let mut s = arena.space(TABLE).unwrap();
    for p in 0..8 {
        s.write(p * PAGE, &[p as u8 + 1; PAGE]).unwrap();
    }
    let path = tmp_path("damaged");
    s.save(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let data = bytes.len() - TABLE; // the data area is the last `pages * 4096` bytes
    bytes[data + 5 * PAGE + 100] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let l = arena.load(&path).unwrap();
    let mut b = [0u8; 16];
    l.read(4 * PAGE, &mut b).unwrap();
    assert_eq!(b, [5; 16]);
    match l.read(5 * PAGE, &mut b) {
        Err(e @ Error::CorruptPage { page: 5 }) => assert!(e.to_string().contains("checksum"), "{e}"),
        other => panic!("expected CorruptPage for page 5, got {other:?}"),
    }
    // Streaming and saving it fail the same way.
    assert!(matches!(l.write_to(&mut Vec::new()), Err(Error::CorruptPage { page: 5 })));
    assert!(matches!(l.save(tmp_path("resave")), Err(Error::CorruptPage { page: 5 })));
    l.read(6 * PAGE, &mut b).unwrap();
    assert_eq!(b, [7; 16]);
    drop((l, s));
    std::fs::remove_file(&path).unwrap();
    assert_nothing_left(&arena, "damaged image");
}

/// A view access to a damaged page dies loudly (in a child process: this binary again).
#[test]
fn damaged_page_at_a_view_access_dies_loudly() {
    const ENV: &str = "COWARENA_DAMAGED_CHILD";
    if let Ok(path) = std::env::var(ENV) {
        let arena = Arena::builder()
            .fault_mode(if path.ends_with("thread") { FaultMode::Thread } else { FaultMode::Signal })
            .build()
            .unwrap();
        let l = arena.load(path.trim_end_matches("thread").trim_end_matches("signal")).unwrap();
        println!("LOADED");
        let v = l.as_slice()[2 * PAGE];
        println!("READ {v} (the damaged page was used)");
        return;
    }
    let arena = Arena::new().unwrap();
    let mut s = arena.space(TABLE).unwrap();
    s.write(2 * PAGE, &[3; PAGE]).unwrap();
    let path = tmp_path("view");
    s.save(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let data = bytes.len() - TABLE;
    bytes[data + 2 * PAGE + 9] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    for mode in ["signal", "thread"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["damaged_page_at_a_view_access_dies_loudly", "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV, format!("{}{mode}", path.display()))
            .output()
            .unwrap();
        let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(so.contains("LOADED"), "{mode}: {so}\n{se}");
        assert!(!so.contains("READ"), "{mode}: a damaged page was read through the view: {so}");
        assert!(!out.status.success(), "{mode}: survived");
        assert!(se.contains("checksum"), "{mode}: the death does not say why:\n{se}");
    }
    std::fs::remove_file(&path).unwrap();
}
