//! Fault injection (run with `cargo test --features fault-injection --test injection`):
//! failing userfaultfd ioctls (EAGAIN, ENOMEM, EEXIST) and a panic inside the fault path.
//! Each ends in a typed error (API) or a loud death of the faulting access (view), with
//! other spaces unaffected and nothing leaked. EAGAIN is retried.
#![cfg(feature = "fault-injection")]

use std::os::unix::process::ExitStatusExt;
use std::sync::Mutex;

mod common;

use common::Watchdog;
use cowarena::inject::{arm, disarm, Point};
use cowarena::{Arena, Error, FaultMode, Space};

const PAGE: usize = 4096;
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    disarm();
    g
}

fn modes() -> [FaultMode; 2] {
    [FaultMode::Signal, FaultMode::Thread]
}

fn assert_empty(arena: &Arena) {
    let s = arena.stats();
    assert_eq!((s.frames_in_use, s.tables_in_use, s.views_in_use, s.frozen_regions), (0, 0, 0, 0), "{s:?}");
}

fn bystander(arena: &Arena) -> Space {
    let mut b = arena.space(4 * PAGE).unwrap();
    b.write(0, b"bystander").unwrap();
    b
}

#[test]
fn eagain_is_retried() {
    let _g = serial();
    for mode in modes() {
        let arena = Arena::builder().fault_mode(mode).plain_until_fork(false).build().unwrap();
        let mut s = arena.space(8 * PAGE).unwrap();
        arm(Point::UffdCopy, libc::EAGAIN, 5);
        s.write(0, b"api").unwrap();
        arm(Point::UffdCopy, libc::EAGAIN, 5);
        s.as_mut_slice()[PAGE] = 7; // view write: the fault path retries too
        arm(Point::UffdWriteprotect, libc::EAGAIN, 3);
        let mut c = s.fork().unwrap();
        assert_eq!(c.as_slice()[PAGE], 7);
        c.write(PAGE, &[8]).unwrap(); // un-protect of the read-only copy, retried
        assert_eq!((&s.as_slice()[..3], s.as_slice()[PAGE], c.as_slice()[PAGE]), (&b"api"[..], 7, 8));
        drop((s, c));
        assert_empty(&arena);
    }
}

#[test]
fn failing_copy_is_a_typed_error_and_leaks_nothing() {
    let _g = serial();
    for errno in [libc::ENOMEM, libc::EEXIST, libc::EFAULT] {
        let arena = Arena::builder().plain_until_fork(false).build().unwrap();
        let other = bystander(&arena);
        let mut s = arena.space(8 * PAGE).unwrap();
        arm(Point::UffdCopy, errno, 1);
        match s.write(0, b"lost?") {
            Err(Error::Os { op: "UFFDIO_COPY", source }) => assert_eq!(source.raw_os_error(), Some(errno)),
            r => panic!("errno {errno}: expected a UFFDIO_COPY error, got {r:?}"),
        }
        // Nothing was recorded: the page still reads as zero, and a retry works.
        let mut b = [1u8; 5];
        s.read(0, &mut b).unwrap();
        assert_eq!(b, [0; 5]);
        s.write(0, b"again").unwrap();
        assert_eq!(&s.as_slice()[..5], b"again");
        assert_eq!(&other.as_slice()[..9], b"bystander");
        arena.check_invariants().unwrap();
        drop((s, other));
        assert_empty(&arena);
    }
}

/// A refused UFFDIO_MOVE (EBUSY: the page is shared with a fork(2) child, or pinned;
/// EAGAIN is retried) falls back to a copy; a failing fallback is a typed error, and the page
/// stays right.
#[test]
fn refused_move_falls_back_to_a_copy() {
    let _g = serial();
    for mode in modes() {
        let arena = Arena::builder().fault_mode(mode).plain_until_fork(false).build().unwrap();
        let mut s = arena.space(8 * PAGE).unwrap();
        s.write(0, &[3u8; 8 * PAGE]).unwrap();
        let c = s.fork_with(cowarena::ForkStrategy::Freeze).unwrap();
        drop(c); // s's frames are exclusive again, homed in a frozen region
        let before = arena.stats();
        arm(Point::UffdMove, libc::EAGAIN, 2);
        s.write(0, b"retried").unwrap();
        let moved = arena.stats().pages_moved - before.pages_moved;
        assert!(moved >= 1, "{mode:?}: EAGAIN must be retried, then the page moves");
        arm(Point::UffdMove, libc::EBUSY, 1);
        s.as_mut_slice()[5 * PAGE] = 9; // view write: the fault path falls back too
        arm(Point::UffdMove, libc::EBUSY, 1);
        s.write(6 * PAGE, b"copied").unwrap();
        arm(Point::UffdMove, libc::EBUSY, 1);
        arm(Point::UffdCopy, libc::ENOMEM, 1);
        match s.write(7 * PAGE, b"lost?") {
            Err(Error::Os { op, source }) => {
                assert!(op.starts_with("UFFDIO_MOVE"), "{op}");
                assert_eq!(source.raw_os_error(), Some(libc::ENOMEM));
            }
            r => panic!("{mode:?}: expected the fallback copy's error, got {r:?}"),
        }
        disarm();
        let mut want = vec![3u8; 8 * PAGE];
        want[..7].copy_from_slice(b"retried");
        want[5 * PAGE] = 9;
        want[6 * PAGE..6 * PAGE + 6].copy_from_slice(b"copied");
        assert!(s.as_slice() == &want[..], "{mode:?}: contents after refused moves");
        arena.check_invariants().unwrap();
        drop(s);
        assert_empty(&arena);
    }
}

/// The deadlock the W1 benchmark met: the signal handler asks for a refill after the last
/// fault of a fill, the reader thread is scheduled late, and the filling thread meanwhile
/// forks — holding the arena lock inside a freezing `mremap` that waits for the reader to
/// read the REMAP event. A reader that blocked on the lock to refill never read it.
#[test]
fn late_refill_never_deadlocks_a_freezing_fork() {
    let _g = serial();
    let _wd = Watchdog::new("late_refill_never_deadlocks_a_freezing_fork", std::time::Duration::from_secs(60));
    let arena = Arena::builder().fault_mode(FaultMode::Signal).plain_until_fork(false).build().unwrap();
    for round in 0..20u8 {
        let mut s = arena.space(64 * PAGE).unwrap();
        s.as_mut_slice()[..32 * PAGE].fill(round); // page 63 stays beyond fault-around's reach
        arm(Point::RefillDelay, 30, 1);
        arm(Point::AskRefill, 0, 1);
        s.as_mut_slice()[63 * PAGE] = round; // served; asks for a refill the reader takes late
        let c = s.fork_with(cowarena::ForkStrategy::Freeze).unwrap(); // mremap under the lock
        assert_eq!((c.as_slice()[0], c.as_slice()[40 * PAGE], c.as_slice()[63 * PAGE]), (round, 0, round));
        let s = arena.stats();
        assert!(s.freezes > u64::from(round), "the fork must freeze (mremap): {s:?}");
        disarm();
    }
    assert_empty(&arena);
}

#[test]
fn failing_unprotect_on_cow_is_a_typed_error() {
    let _g = serial();
    let arena = Arena::builder().plain_until_fork(false).build().unwrap();
    let mut a = arena.space(8 * PAGE).unwrap();
    a.write(0, b"parent").unwrap();
    let mut b = a.fork().unwrap();
    assert_eq!(&b.as_slice()[..6], b"parent"); // read-only copy in b's view
    arm(Point::UffdWriteprotect, libc::ENOMEM, 1);
    assert!(matches!(b.write(0, b"child!"), Err(Error::Os { op: "UFFDIO_WRITEPROTECT", .. })));
    assert_eq!(&b.as_slice()[..6], b"parent");
    b.write(0, b"child!").unwrap();
    assert_eq!(&a.as_slice()[..6], b"parent");
    assert_eq!(&b.as_slice()[..6], b"child!");
    arena.check_invariants().unwrap();
    drop((a, b));
    assert_empty(&arena);
}

#[test]
fn panic_in_the_fault_path_is_a_typed_error_for_the_api() {
    let _g = serial();
    let arena = Arena::builder().plain_until_fork(false).build().unwrap();
    let other = bystander(&arena);
    let mut s = arena.space(8 * PAGE).unwrap();
    arm(Point::FaultPath, 0, 1);
    assert!(matches!(s.write(0, b"x"), Err(Error::Internal(_))));
    s.write(0, b"fine").unwrap();
    assert_eq!(&s.as_slice()[..4], b"fine");
    assert_eq!(&other.as_slice()[..9], b"bystander");
    drop((s, other));
    assert_empty(&arena);
}

/// Runs in a child process: a view access whose fault cannot be served must kill it.
#[test]
fn child_entry() {
    let Ok(what) = std::env::var("COWARENA_INJECT_CHILD") else { return };
    let (mode, point) = what.split_once(':').unwrap();
    let mode = if mode == "signal" { FaultMode::Signal } else { FaultMode::Thread };
    let arena = Arena::builder().fault_mode(mode).plain_until_fork(false).build().unwrap();
    let mut s = arena.space(4 * PAGE).unwrap();
    match point {
        "copy" => arm(Point::UffdCopy, libc::ENOMEM, 1),
        _ => arm(Point::FaultPath, 0, 1),
    }
    let v = std::hint::black_box(&mut s.as_mut_slice()[0]);
    *v = 1;
    // Reaching this line would mean the access "succeeded" without being served.
    println!("SURVIVED value={}", s.as_slice()[0]);
    std::process::exit(0);
}

#[test]
fn unservable_view_faults_die_loudly() {
    let _g = serial();
    for (what, signal) in [
        ("signal:copy", libc::SIGBUS),
        ("signal:panic", libc::SIGBUS),
        ("thread:copy", libc::SIGSEGV),
        ("thread:panic", libc::SIGSEGV),
    ] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
            .env("COWARENA_INJECT_CHILD", what)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stdout.contains("SURVIVED"), "{what}: the access completed: {stdout}");
        assert_eq!(out.status.signal(), Some(signal), "{what}: {:?}\n{stderr}", out.status);
        assert!(stderr.contains("cowarena: cannot serve"), "{what}: no logged reason: {stderr}");
    }
}

/// The fault path's failing calls (a refused UFFDIO_MOVE, an EAGAIN retried) set `errno`
/// as libc does; the SIGBUS handler must restore the interrupted code's value (issue 10).
/// Thread mode serves faults on another thread, so its errno is untouched by design.
#[test]
fn errno_survives_faults_whose_syscalls_fail() {
    let _g = serial();
    fn errno() -> i32 {
        // SAFETY: this thread's errno slot is always valid.
        unsafe { *libc::__errno_location() }
    }
    fn set_errno(v: i32) {
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = v };
    }
    for mode in modes() {
        let arena = Arena::builder().fault_mode(mode).plain_until_fork(false).build().unwrap();
        let mut s = arena.space(8 * PAGE).unwrap();
        s.write(0, &[3u8; 8 * PAGE]).unwrap();
        drop(s.fork_with(cowarena::ForkStrategy::Freeze).unwrap()); // s's frames: exclusive, frozen
        arm(Point::UffdMove, libc::EBUSY, 1);
        set_errno(4321);
        s.as_mut_slice()[PAGE] = 9; // the move is refused, the fault path copies instead
        assert_eq!(errno(), 4321, "{mode:?}: errno after a fault whose UFFDIO_MOVE failed");
        arm(Point::UffdCopy, libc::EAGAIN, 3);
        set_errno(1234);
        let v = std::hint::black_box(s.as_slice()[3 * PAGE]); // read fill, retried on EAGAIN
        assert_eq!((v, errno()), (3, 1234), "{mode:?}: errno after a retried UFFDIO_COPY");
        disarm();
        set_errno(0);
        drop(s);
        assert_empty(&arena);
    }
}

/// Adopting a plain space (its first fork) write-protects it in place for `KeepWarm`; when
/// that fails, the fork is a typed error and the space is left plain and intact — its view
/// unregistered again, so writes keep going to the kernel — and a later fork adopts it.
#[test]
fn failed_adoption_leaves_the_space_plain_and_intact() {
    let _g = serial();
    for mode in modes() {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut s = arena.space(4 << 20).unwrap();
        for p in (0..1024).step_by(3) {
            s.as_mut_slice()[p * PAGE] = p as u8 | 1;
        }
        arm(Point::UffdWriteprotect, libc::ENOMEM, 1);
        let r = s.fork_with(cowarena::ForkStrategy::KeepWarm);
        disarm();
        assert!(matches!(r, Err(Error::Os { .. })), "{mode:?}: {r:?}");
        let st = arena.stats();
        assert_eq!((st.plain_spaces, st.adoptions, st.frames_in_use), (1, 0, 0), "{mode:?}");
        // Still the kernel's memory: writes to new pages and old ones are served there.
        s.as_mut_slice()[1000 * PAGE + 1] = 9;
        s.as_mut_slice()[3 * PAGE] = 4;
        let c = s.fork().unwrap();
        for p in (0..1024).step_by(3) {
            let want = if p == 3 { 4 } else { p as u8 | 1 };
            assert_eq!((s.as_slice()[p * PAGE], c.as_slice()[p * PAGE]), (want, want), "{mode:?} page {p}");
        }
        assert_eq!(c.as_slice()[1000 * PAGE + 1], 9);
        arena.check_invariants().unwrap();
        drop(c);
        drop(s);
        assert_empty(&arena);
    }
}

/// Swap-file I/O errors (issue 16): a failed write-out moves nothing (the eviction is an
/// error and every page stays where it was); a failed read-back is an error from the API,
/// leaves the page evicted, and the next read — the file being fine — brings it back.
#[test]
fn swap_io_errors_move_nothing_and_lose_nothing() {
    let _g = serial();
    for mode in modes() {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut s = arena.space(64 * PAGE).unwrap();
        s.as_mut_slice().fill(0x3c);
        arm(Point::SwapIo, libc::EIO, 1);
        match arena.evict(u64::MAX) {
            Err(Error::SwapIo { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EIO)),
            other => panic!("{mode:?}: evict with a failing write-out: {other:?}"),
        }
        let st = arena.stats();
        assert_eq!((st.frames_evicted, st.pages_swapped), (0, 0), "{mode:?}: a failed eviction moved frames");
        arena.check_invariants().unwrap();
        assert!(s.as_slice().iter().all(|&b| b == 0x3c), "{mode:?}");
        let st2 = arena.evict(u64::MAX).unwrap();
        assert_eq!(st2.frames_evicted, 64, "{mode:?}");
        arm(Point::SwapIo, libc::EIO, 1);
        let mut b = [0u8; 8];
        assert!(matches!(s.read(5 * PAGE, &mut b), Err(Error::SwapIo { .. })), "{mode:?}: read-back error");
        assert_eq!(arena.stats().frames_swapped_in, 0, "{mode:?}");
        s.read(5 * PAGE, &mut b).unwrap();
        assert_eq!(b, [0x3c; 8], "{mode:?}");
        assert!(s.as_slice().iter().all(|&b| b == 0x3c), "{mode:?}");
        arena.check_invariants().unwrap();
        drop(s);
        assert_empty(&arena);
    }
}
