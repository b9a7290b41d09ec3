//! Bad input at every public entry (issue 6): zero, huge and overflowing sizes and
//! offsets, empty requests at the end, the last partial page; spaces outliving their
//! arena handle (in this and other threads); exhausted capacity.

mod common;

use std::process::Command;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use common::{assert_nothing_left, assert_same, Rng, Watchdog, PAGE, TABLE};
use cowarena::arena::MAX_SPACE;
use cowarena::{Arena, Error, FaultMode, Space};

/// Signal-mode arenas take one of a fixed number of process-wide slots; the test that
/// exhausts them must not overlap the others.
static ARENAS: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ARENAS.lock().unwrap_or_else(|p| p.into_inner())
}

#[track_caller]
fn assert_out_of_range<T: std::fmt::Debug>(r: Result<T, Error>, offset: usize, len: usize, size: usize) {
    match r {
        Err(Error::OutOfRange { offset: o, len: l, size: s }) => {
            assert_eq!((o, l, s), (offset, len, size), "OutOfRange fields");
        }
        other => panic!("want OutOfRange {{ offset: {offset:#x}, len: {len:#x}, size: {size:#x} }}, got {other:?}"),
    }
}

#[track_caller]
fn assert_invalid_size<T: std::fmt::Debug>(r: Result<T, Error>, size: usize) {
    match r {
        Err(e @ Error::InvalidSize { .. }) => {
            let Error::InvalidSize { size: s, .. } = e else { unreachable!() };
            assert_eq!(s, size);
            assert!(!e.to_string().is_empty());
        }
        other => panic!("want InvalidSize for {size:#x}, got {other:?}"),
    }
}

#[test]
fn space_sizes() {
    let _g = serial();
    let arena = Arena::new().unwrap();
    assert_invalid_size(arena.space(0), 0);
    assert_invalid_size(arena.space(MAX_SPACE + 1), MAX_SPACE + 1);
    assert_invalid_size(arena.space(usize::MAX), usize::MAX);
    // Would overflow when rounded up to whole pages.
    assert_invalid_size(arena.space(usize::MAX - PAGE + 2), usize::MAX - PAGE + 2);
    assert_invalid_size(arena.space(1 << 50), 1 << 50);
    // Exactly 1 TiB: allowed by the API; the kernel may or may not grant the address space,
    // but the result is a space that works or a typed OS error, never a crash.
    match arena.space(MAX_SPACE) {
        Ok(mut big) => {
            assert_eq!(big.len(), MAX_SPACE);
            big.as_mut_slice()[MAX_SPACE - 1] = 0x5a;
            big.write(MAX_SPACE / 2 + PAGE - 2, b"mid").unwrap();
            let c = big.fork().unwrap();
            let mut b = [0u8; 3];
            c.read(MAX_SPACE / 2 + PAGE - 2, &mut b).unwrap();
            assert_eq!(&b, b"mid");
            assert_eq!(c.as_slice()[MAX_SPACE - 1], 0x5a);
            assert_eq!(c.as_slice()[MAX_SPACE / 3], 0);
            assert_out_of_range(big.write(MAX_SPACE, b"x"), MAX_SPACE, 1, MAX_SPACE);
        }
        Err(e @ (Error::Os { .. } | Error::MappingLimit { .. })) => {
            println!("1 TiB space refused by the kernel (acceptable): {e}")
        }
        Err(e) => panic!("1 TiB space: unexpected error {e:?}"),
    }
    // One byte works, and its page is otherwise invisible.
    let mut one = arena.space(1).unwrap();
    assert_eq!(one.len(), 1);
    assert!(!one.is_empty());
    assert_eq!(one.as_slice(), &[0]);
    one.as_mut_slice()[0] = 3;
    assert_eq!(one.fork().unwrap().as_slice(), &[3]);
    arena.check_invariants().unwrap();
    drop(one);
    assert_nothing_left(&arena, "space_sizes");
}

#[test]
fn offsets_and_lengths() {
    let _g = serial();
    let arena = Arena::new().unwrap();
    let len = 3 * PAGE + 10; // last page partial
    let mut s = arena.space(len).unwrap();
    let mut buf = [0u8; 8];

    // Empty requests: fine anywhere up to the end, including exactly at the end.
    for off in [0, 1, PAGE, len - 1, len] {
        s.read(off, &mut []).unwrap();
        s.write(off, &[]).unwrap();
        s.populate(off, 0, true).unwrap();
        s.populate(off, 0, false).unwrap();
    }
    // ...but not past it.
    assert_out_of_range(s.read(len + 1, &mut []), len + 1, 0, len);
    assert_out_of_range(s.write(len + 1, &[]), len + 1, 0, len);
    assert_out_of_range(s.populate(len + 1, 0, false), len + 1, 0, len);
    assert_out_of_range(s.read(usize::MAX, &mut []), usize::MAX, 0, len);

    // Past the end, straddling the end, and offset + len overflowing.
    assert_out_of_range(s.read(len, &mut buf[..1]), len, 1, len);
    assert_out_of_range(s.write(len, &buf[..1]), len, 1, len);
    assert_out_of_range(s.read(len - 7, &mut buf), len - 7, 8, len);
    assert_out_of_range(s.write(len - 7, &buf), len - 7, 8, len);
    assert_out_of_range(s.read(usize::MAX, &mut buf), usize::MAX, 8, len);
    assert_out_of_range(s.write(usize::MAX - 3, &buf), usize::MAX - 3, 8, len);
    assert_out_of_range(s.populate(usize::MAX, 1, true), usize::MAX, 1, len);
    assert_out_of_range(s.populate(1, usize::MAX, true), 1, usize::MAX, len);
    assert_out_of_range(s.populate(0, usize::MAX, false), 0, usize::MAX, len);
    assert_out_of_range(s.populate(0, len + 1, false), 0, len + 1, len);
    assert_out_of_range(s.populate(PAGE * 4, 1, false), PAGE * 4, 1, len); // inside the view's last page rounding? no: past len

    // A rejected write changes nothing (no partial write of the in-range prefix).
    assert_out_of_range(s.write(len - 4, b"ABCDEFGH"), len - 4, 8, len);
    assert_eq!(&s.as_slice()[len - 4..], &[0; 4]);
    let mut big = vec![0x77u8; 2 * PAGE];
    assert_out_of_range(s.write(len - PAGE - 5, &big), len - PAGE - 5, 2 * PAGE, len);
    assert!(s.as_slice().iter().all(|&b| b == 0), "a rejected write modified the space");
    // A rejected read leaves the buffer alone.
    assert_out_of_range(s.read(len - PAGE, &mut big), len - PAGE, 2 * PAGE, len);
    assert!(big.iter().all(|&b| b == 0x77), "a rejected read wrote into the buffer");

    // The last partial page, up to the very last byte, through the API and the view.
    s.write(len - 8, b"12345678").unwrap();
    s.read(len - 8, &mut buf).unwrap();
    assert_eq!(&buf, b"12345678");
    assert_eq!(&s.as_slice()[len - 8..], b"12345678");
    s.write(3 * PAGE - 3, b"across").unwrap(); // crosses into the last page
    assert_eq!(&s.as_slice()[3 * PAGE - 3..3 * PAGE + 3], b"across");
    let mut c = s.fork().unwrap();
    let mut all = vec![0u8; len];
    c.read(0, &mut all).unwrap();
    assert_same(&all, s.as_slice(), 0, &"fork of a space with a partial last page");
    c.populate(0, len, true).unwrap();
    c.write(len - 1, b"z").unwrap();
    assert_eq!(c.as_slice()[len - 1], b'z');
    assert_eq!(s.as_slice()[len - 1], b'8');
    arena.check_invariants().unwrap();
    drop((s, c));
    assert_nothing_left(&arena, "offsets_and_lengths");
}

#[test]
fn spaces_outlive_their_arena_handle() {
    let _g = serial();
    let _wd = Watchdog::new("spaces_outlive_their_arena_handle", Duration::from_secs(120));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut a = arena.space(TABLE + 3 * PAGE).unwrap();
        a.as_mut_slice()[..5].copy_from_slice(b"alive");
        let b = a.fork().unwrap();
        let clone = arena.clone();
        drop(arena);
        // The engine is kept alive by the spaces (and the clone).
        drop(clone);
        a.as_mut_slice()[TABLE..TABLE + 4].copy_from_slice(b"more");
        let mut c = b.fork().unwrap();
        assert_eq!(&c.as_slice()[..5], b"alive");
        assert_eq!(&c.as_slice()[TABLE..TABLE + 4], &[0; 4]);
        c.write(1, b"LIVE").unwrap();
        let mut buf = [0u8; 5];
        c.read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"aLIVE");
        assert_eq!(&a.as_slice()[TABLE..TABLE + 4], b"more");
        assert_eq!(&b.as_slice()[..5], b"alive");
        drop((a, b, c));
    }
}

#[test]
fn arena_dropped_while_spaces_live_in_other_threads() {
    let _g = serial();
    let _wd = Watchdog::new("arena_dropped_while_spaces_live_in_other_threads", Duration::from_secs(120));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut root = arena.space(2 * TABLE + 77).unwrap();
        root.write(0, &[1; PAGE]).unwrap();
        let spaces: Vec<Space> = (0..4).map(|_| root.fork().unwrap()).collect();
        drop(root);
        let start = Arc::new(Barrier::new(5));
        let handles: Vec<_> = spaces
            .into_iter()
            .enumerate()
            .map(|(t, mut s)| {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait(); // the arena is being dropped now
                    let mut rng = Rng::new(t as u64);
                    let mut model = vec![0u8; s.len()];
                    model[..PAGE].fill(1);
                    for _ in 0..400 {
                        let (off, n) = rng.span(s.len());
                        let mut d = vec![0u8; n];
                        rng.fill(&mut d);
                        if rng.chance(1, 2) {
                            s.as_mut_slice()[off..off + n].copy_from_slice(&d);
                        } else {
                            s.write(off, &d).unwrap();
                        }
                        model[off..off + n].copy_from_slice(&d);
                        if rng.chance(1, 20) {
                            let f = s.fork().unwrap();
                            assert_same(f.as_slice(), &model, 0, &format_args!("thread {t} fork"));
                        }
                    }
                    assert_same(s.as_slice(), &model, 0, &format_args!("thread {t} end"));
                    // These spaces are the last handles: the last drop stops the engine.
                    drop(s);
                })
            })
            .collect();
        start.wait();
        drop(arena);
        for h in handles {
            h.join().unwrap();
        }
    }
}

#[test]
fn many_arenas() {
    let _g = serial();
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = fds();
    // More live signal-mode arenas than the process-wide registry holds: the extra ones
    // fail with a typed error (or succeed), never crash, and free slots are reused.
    let mut live = Vec::new();
    let mut refused = 0;
    for _ in 0..70 {
        match Arena::new() {
            Ok(a) => live.push(a),
            Err(e @ Error::TooManyArenas { limit: 64 }) => {
                let msg = e.to_string();
                assert!(msg.contains("FaultMode::Thread") && msg.contains("64"), "no limit or remedy: {msg}");
                refused += 1;
            }
            Err(e) => panic!("unexpected error creating many arenas: {e:?}"),
        }
    }
    println!("{} arenas live at once, {refused} refused", live.len());
    // Every live arena serves its own spaces.
    let mut spaces: Vec<Space> = live.iter().map(|a| a.space(PAGE).unwrap()).collect();
    for (i, s) in spaces.iter_mut().enumerate() {
        s.write(0, &[i as u8]).unwrap();
    }
    for (i, s) in spaces.iter().enumerate() {
        assert_eq!(s.fork().unwrap().as_slice()[0], i as u8);
    }
    drop(spaces);
    drop(live);
    for _ in 0..3 {
        let a = Arena::new().expect("slots are freed when arenas drop");
        let mut s = a.space(10).unwrap();
        s.as_mut_slice()[9] = 1;
    }
    // Thread-mode arenas have no slot limit.
    let many: Vec<Arena> = (0..80).map(|_| Arena::builder().fault_mode(FaultMode::Thread).build().unwrap()).collect();
    drop(many);
    let after = fds();
    assert!(after <= before + 2, "file descriptors leaked by arenas: {before} -> {after}");
}

#[test]
fn capacity_exhausted_is_a_typed_error() {
    let _g = serial();
    const FRAMES: usize = 16;
    let arena = Arena::builder().max_memory((FRAMES * PAGE) as u64).build().unwrap();
    let mut s = arena.space(64 * PAGE + 1).unwrap();
    for p in 0..FRAMES {
        s.write(p * PAGE, &[p as u8 + 1; 3]).unwrap();
    }
    assert_eq!(arena.stats().frames_in_use, FRAMES as u64);
    let err = s.write(FRAMES * PAGE, b"x").unwrap_err();
    assert!(matches!(err, Error::CapacityExhausted { limit, .. } if limit == (FRAMES * PAGE) as u64), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("max_memory") && msg.contains("drop"), "message does not name the remedy: {msg}");
    // populate needs a page either way: a frame for writing, a read-only copy for reading.
    assert!(matches!(s.populate(FRAMES * PAGE, 2 * PAGE, true), Err(Error::CapacityExhausted { .. })));
    assert!(matches!(s.populate(FRAMES * PAGE, 2 * PAGE, false), Err(Error::CapacityExhausted { .. })));
    // The explicit read API maps nothing: never refused; the failed page is still zero.
    let mut b = [0xffu8; 3];
    s.read(FRAMES * PAGE, &mut b).unwrap();
    assert_eq!(b, [0; 3]);
    s.read(2 * PAGE, &mut b).unwrap();
    assert_eq!(b, [3; 3]);
    // Forks need no page; a copy-on-write in the child needs one and is refused.
    let mut c = s.fork().unwrap();
    assert!(matches!(c.write(0, b"cow"), Err(Error::CapacityExhausted { .. })));
    c.read(0, &mut b).unwrap();
    assert_eq!(b, [1; 3]);
    assert_eq!(s.as_slice()[0], 1, "the parent's own page is mapped: reading it needs nothing");
    arena.check_invariants().unwrap();
    // Dropping the child makes the parent's frames exclusive again; dropping the parent
    // frees them all and the capacity is available again.
    drop(c);
    drop(s);
    assert_nothing_left(&arena, "capacity");
    let mut t = arena.space(FRAMES * PAGE).unwrap();
    t.write(0, &vec![9u8; FRAMES * PAGE]).unwrap();
    assert!(t.as_slice().iter().all(|&x| x == 9));
    drop(t);
    assert_nothing_left(&arena, "capacity reuse");

    // max_memory(0): nothing can be written or mapped; the API reads zeros.
    let zero = Arena::builder().max_memory(0).build().unwrap();
    let mut z = zero.space(PAGE * 3).unwrap();
    assert!(matches!(z.write(5, b"a"), Err(Error::CapacityExhausted { .. })));
    let mut all = vec![1u8; PAGE * 3];
    z.read(0, &mut all).unwrap();
    assert!(all.iter().all(|&x| x == 0));
    drop(z);
    assert_nothing_left(&zero, "max_memory(0)");
}

/// `max_memory` bounds what the arena makes resident, read-only copies in views included
/// (issue 10: RSS reached 1.2 GiB under a 32 MiB limit when a fork was read through its
/// view). Reading a fork page by page stops at the limit; memory returns on drop.
#[test]
fn capacity_bounds_read_copies_in_views() {
    let _g = serial();
    const LIMIT: usize = 64;
    let arena = Arena::builder().max_memory((LIMIT * PAGE) as u64).build().unwrap();
    let mut s = arena.space(256 * PAGE).unwrap();
    s.write(0, &vec![5u8; 32 * PAGE]).unwrap(); // 32 pages resident
    let c = s.fork().unwrap();
    // The child reads through its view: each page read is a copy. 32 more fit.
    let mut mapped = 0;
    for p in 0..256 {
        match c.populate(p * PAGE, 1, false) {
            Ok(()) => mapped += 1,
            Err(Error::CapacityExhausted { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // The parent's pages may have moved to a frozen region at the fork; either way the
    // arena never holds more than LIMIT pages.
    assert_eq!(mapped, LIMIT - 32, "read copies mapped before the limit");
    assert!(c.as_slice()[..mapped * PAGE].iter().take(32 * PAGE).all(|&x| x == 5));
    let mut b = vec![0u8; 256 * PAGE];
    c.read(0, &mut b).unwrap(); // never refused
    assert!(b[..32 * PAGE].iter().all(|&x| x == 5) && b[32 * PAGE..].iter().all(|&x| x == 0));
    drop(c);
    drop(s);
    assert_nothing_left(&arena, "read copies");
}

/// At the limit, writing a page the space already owns privately needs no new frame and
/// must succeed (through the API and through the view), as must a write that can reuse a
/// frame that has become exclusive again.
#[test]
fn capacity_full_rewrite_of_owned_page() {
    let _g = serial();
    const FRAMES: usize = 4;
    let arena = Arena::builder().max_memory((FRAMES * PAGE) as u64).build().unwrap();
    let mut s = arena.space(8 * PAGE).unwrap();
    for p in 0..FRAMES {
        s.write(p * PAGE, &[1]).unwrap();
    }
    assert_eq!(arena.stats().frames_in_use, FRAMES as u64);
    s.write(0, b"again").expect("rewriting an owned page at the memory limit needs no new frame");
    s.as_mut_slice()[PAGE] = 2; // view write of an owned page
    s.write(2 * PAGE + 10, b"xyz").expect("second rewrite at the limit");
    assert_eq!(&s.as_slice()[..5], b"again");
    // Fork, drop the child: the frames are exclusive again and a write reuses them.
    drop(s.fork().unwrap());
    s.write(3 * PAGE, b"reuse").expect("write_reuse at the limit needs no new frame");
    assert_eq!(&s.as_slice()[3 * PAGE..3 * PAGE + 5], b"reuse");
    drop(s);
    assert_nothing_left(&arena, "capacity_full_rewrite");
}

/// A view write beyond the limit cannot return an error: it must kill the writer loudly
/// (never a silent zero page). Runs in a child process (this binary, one test).
#[test]
fn capacity_exhausted_view_write_dies_loudly() {
    if std::env::var_os("COWARENA_CAPACITY_CHILD").is_some() {
        let mode = if std::env::var("COWARENA_CAPACITY_CHILD").unwrap() == "thread" {
            FaultMode::Thread
        } else {
            FaultMode::Signal
        };
        let arena = Arena::builder().fault_mode(mode).max_memory(2 * PAGE as u64).build().unwrap();
        let mut s = arena.space(4 * PAGE).unwrap();
        s.as_mut_slice()[0] = 1;
        s.as_mut_slice()[PAGE] = 1;
        println!("CHILD: two pages written");
        s.as_mut_slice()[2 * PAGE] = 1; // must not return
        println!("CHILD: third page written beyond the limit: BUG");
        std::process::exit(0);
    }
    let _g = serial(); // `many_arenas` counts file descriptors; our pipes must not overlap it
    for mode in ["signal", "thread"] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "capacity_exhausted_view_write_dies_loudly", "--nocapture", "--test-threads=1"])
            .env("COWARENA_CAPACITY_CHILD", mode)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        use std::os::unix::process::ExitStatusExt;
        let sig = out.status.signal();
        assert!(
            matches!(sig, Some(libc::SIGBUS) | Some(libc::SIGSEGV)),
            "{mode}: the child should die of SIGBUS/SIGSEGV, got {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
        assert!(
            stdout.contains("CHILD: two pages written"),
            "{mode}: child did not get far enough:\n{stdout}\n{stderr}"
        );
        assert!(!stdout.contains("BUG"), "{mode}: {stdout}");
        assert!(
            stderr.contains("capacity") || stderr.contains("max_memory"),
            "{mode}: the reason is not logged:\n{stderr}"
        );
        println!(
            "{mode}: child died of signal {sig:?}; stderr: {}",
            stderr.lines().filter(|l| l.contains("cowarena")).collect::<Vec<_>>().join(" | ")
        );
    }
}
