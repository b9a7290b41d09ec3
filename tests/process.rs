//! An arena in a `fork(2)` child (issue 11, items 2 and 3). The child inherits the arena's
//! memory and its userfaultfd — which still acts on the *parent's* address space — but no
//! view (they are `MADV_DONTFORK`) and no engine thread. So every fallible call in the
//! child returns `Error::ForkedProcess` and does nothing, dropping inherited handles does
//! nothing, and the parent keeps serving: before the fix a child's `Space::write` landed in
//! the parent's view, and a child dropping its arena stopped the parent's fault engine.

mod common;

use std::time::Duration;

use common::{assert_nothing_left, Watchdog, PAGE, TABLE};
use cowarena::{Arena, Error, FaultMode, Space};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fork; run `child` in the child (it must only call code that neither blocks on a lock
/// another thread may hold nor needs threads) and `_exit` with its code. Returns the
/// child's exit code, or panics if it died of a signal.
fn in_child(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs `child` and `_exit`s; cowarena's entry points check the pid
    // before touching any lock, and glibc keeps malloc usable after fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(99);
        // SAFETY: ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "the child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

fn forked(r: cowarena::Result<impl Sized>) -> bool {
    matches!(r, Err(Error::ForkedProcess { .. }))
}

#[test]
fn a_fork2_child_cannot_touch_the_parent() {
    let _g = serial();
    let _wd = Watchdog::new("a_fork2_child_cannot_touch_the_parent", Duration::from_secs(120));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut s = arena.space(TABLE).unwrap();
        s.write(0, &[0xAA; 4 * PAGE]).unwrap();
        let keep = s.fork().unwrap();
        let _ = keep.as_slice()[0];
        s.as_mut_slice()[5 * PAGE] = 0xBB; // a page written after the fork, mapped in s
        let code = in_child(|| {
            let mut ok = 0;
            // Every fallible call is refused, typed, and touches nothing.
            ok += forked(s.write(0, b"child was here")) as i32;
            ok += forked(s.write(8 * PAGE, b"child")) as i32;
            let mut b = [0u8; 4];
            ok += forked(s.read(0, &mut b)) as i32;
            ok += forked(s.fork()) as i32;
            ok += forked(s.populate(9 * PAGE, PAGE, true)) as i32;
            ok += forked(s.discard(0, PAGE)) as i32;
            ok += forked(s.clean(0, TABLE)) as i32;
            ok += forked(s.migrate(0, PAGE)) as i32;
            ok += forked(s.clear_referenced(0, TABLE)) as i32;
            ok += forked(arena.space(PAGE)) as i32;
            ok += forked(arena.compact()) as i32;
            ok += matches!(s.write(0, b"x"), Err(ref e) if e.to_string().contains("fork(2) child")) as i32;
            ok
        });
        assert_eq!(code, 12, "{mode:?}: every call in the child must return ForkedProcess");
        // The parent's view, API and forks all still see its own bytes.
        let mut b = vec![0u8; 10 * PAGE];
        s.read(0, &mut b).unwrap();
        assert!(b[..4 * PAGE].iter().all(|&x| x == 0xAA), "{mode:?}: API read after the child");
        assert_eq!(b[5 * PAGE], 0xBB);
        assert!(b[8 * PAGE..].iter().all(|&x| x == 0), "{mode:?}: the child's write reached the parent");
        assert!(s.as_slice()[..4 * PAGE].iter().all(|&x| x == 0xAA), "{mode:?}: view after the child");
        assert!(s.as_slice()[8 * PAGE..9 * PAGE].iter().all(|&x| x == 0), "{mode:?}: view page 8");
        let f = s.fork().unwrap();
        assert!(f.as_slice()[..4 * PAGE].iter().all(|&x| x == 0xAA));
        assert!(f.as_slice()[8 * PAGE..9 * PAGE].iter().all(|&x| x == 0), "{mode:?}: a new fork");
        arena.check_invariants().unwrap();
        drop((s, keep, f));
        assert_nothing_left(&arena, "fork(2) child");
    }
}

/// A child that drops its inherited spaces and arena (as any child returning normally
/// does) must not stop the parent's engine: the parent keeps faulting and forking
/// (a freezing fork blocks until the engine's reader thread reads the REMAP event).
#[test]
fn a_fork2_child_dropping_its_arena_leaves_the_parent_served() {
    let _g = serial();
    let _wd = Watchdog::new("a_fork2_child_dropping_its_arena", Duration::from_secs(120));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut s = arena.space(TABLE).unwrap();
        s.write(0, &vec![1u8; TABLE]).unwrap();
        // Handles the child owns outright: an arena of its own (its last references) and a
        // fork in the parent's arena.
        let side = Arena::builder().fault_mode(mode).build().unwrap();
        let side_space = side.space(PAGE).unwrap();
        let victim = s.fork().unwrap();
        let side_for_child = side.clone();
        let code = in_child(move || {
            drop(victim);
            drop(side_space);
            drop(side_for_child);
            drop(side); // the last handle of `side` in the child: its Inner drops here
            0
        });
        assert_eq!(code, 0);
        // The parent: faults served, a freezing fork returns, data intact.
        for p in 0..64 {
            s.as_mut_slice()[p * PAGE] = 2;
        }
        let f = s.fork_with(cowarena::ForkStrategy::Freeze).unwrap();
        assert!(f.as_slice()[..64 * PAGE].chunks(PAGE).all(|c| c[0] == 2 && c[1] == 1), "{mode:?}");
        assert!(f.as_slice()[64 * PAGE..].iter().all(|&x| x == 1), "{mode:?}");
        drop((f, s));
        assert_nothing_left(&arena, "after a child dropped its arena");
    }
}

/// A child dropping some of its inherited handles (a space, an arena clone) changes
/// nothing in the parent either.
#[test]
fn a_fork2_child_dropping_some_handles_leaves_the_parent_served() {
    let _g = serial();
    let _wd = Watchdog::new("child drops last handles", Duration::from_secs(120));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut s: Space = arena.space(8 * PAGE).unwrap();
        s.as_mut_slice()[0] = 7;
        let (a2, s2) = (arena.clone(), s.fork().unwrap());
        let code = in_child(move || {
            drop(s2);
            drop(a2);
            0
        });
        assert_eq!(code, 0);
        let mut t = s.fork_with(cowarena::ForkStrategy::Freeze).unwrap();
        t.as_mut_slice()[PAGE] = 9;
        s.as_mut_slice()[2 * PAGE] = 3;
        assert_eq!((t.as_slice()[0], t.as_slice()[PAGE], t.as_slice()[2 * PAGE]), (7, 9, 0), "{mode:?}");
        assert_eq!((s.as_slice()[0], s.as_slice()[PAGE], s.as_slice()[2 * PAGE]), (7, 0, 3), "{mode:?}");
        drop((s, t));
        assert_nothing_left(&arena, "child dropped clones");
    }
}

fn block_sigbus_in_this_thread() {
    // SAFETY: builds a set holding SIGBUS and adds it to this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGBUS);
        assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()), 0);
    }
}

/// A thread that blocks SIGBUS (the "all signals to one thread" pattern) would die
/// silently at its first view fault in signal mode: the library refuses where it can see
/// the mask — space creation, fork, populate — with an error naming the remedy (issue 11).
#[test]
fn a_thread_blocking_sigbus_is_told_before_it_faults() {
    let _g = serial();
    let arena = Arena::builder().fault_mode(FaultMode::Signal).build().unwrap();
    let threaded = Arena::builder().fault_mode(FaultMode::Thread).build().unwrap();
    let s = arena.space(4 * PAGE).unwrap();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            block_sigbus_in_this_thread();
            let e = arena.space(PAGE).unwrap_err();
            assert!(matches!(e, Error::SigbusBlocked), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains("SIGBUS is blocked") && msg.contains("FaultMode::Thread"), "{msg}");
            assert!(matches!(s.fork(), Err(Error::SigbusBlocked)));
            assert!(matches!(s.populate(0, PAGE, false), Err(Error::SigbusBlocked)));
            // The API that never faults still works, and thread mode is unaffected.
            let mut b = [1u8; 4];
            s.read(0, &mut b).unwrap();
            assert_eq!(b, [0; 4]);
            let mut t = threaded.space(4 * PAGE).unwrap();
            t.as_mut_slice()[PAGE] = 5;
            let f = t.fork().unwrap();
            assert_eq!(f.as_slice()[PAGE], 5);
        });
    });
    // Unblocked threads are unaffected.
    let mut ok = arena.space(PAGE).unwrap();
    ok.as_mut_slice()[0] = 1;
}

/// Runs in a child process: touch a view from a thread that blocks SIGBUS.
#[test]
fn child_blocked_sigbus_entry() {
    if std::env::var_os("COWARENA_BLOCKED_SIGBUS_CHILD").is_none() {
        return;
    }
    let arena = Arena::builder().fault_mode(FaultMode::Signal).build().unwrap();
    // A fork's view is served by userfaultfd (a never-forked space is plain kernel memory
    // and never faults to us: see `plain_until_fork`).
    let root = arena.space(PAGE).unwrap();
    let mut s = root.fork().unwrap();
    block_sigbus_in_this_thread();
    let v = std::hint::black_box(&mut s.as_mut_slice()[0]);
    *v = 1;
    println!("SURVIVED");
}

/// What the kernel does to such a thread (documented on `FaultMode::Signal`): the process
/// dies of SIGBUS — loudly for its parent — never reading a zero page.
#[test]
fn a_view_fault_with_sigbus_blocked_kills_the_process() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_blocked_sigbus_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env("COWARENA_BLOCKED_SIGBUS_CHILD", "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(!String::from_utf8_lossy(&out.stdout).contains("SURVIVED"));
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{:?}", out.status);
}
