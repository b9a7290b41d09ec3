//! Lifecycle (issue 6): dropping a space while another thread is inside long read/write
//! loops on a different space of the same family; `fork(2)` of the whole process while an
//! arena is live (the child must die touching a view, never read zeros from it; the parent
//! keeps working).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{assert_nothing_left, assert_same, env_u64, Rng, Watchdog, PAGE, TABLE};
use cowarena::{Arena, FaultMode, Space};

/// `fork(2)` must not run while another test of this file holds locks mid-operation in
/// its own threads more than necessary; serialise the tests of this file.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn drop_relatives_while_another_thread_reads_and_writes() {
    let _g = serial();
    let secs = env_u64("COWARENA_STRESS_SECS", 2);
    let _wd = Watchdog::new("drop_relatives_while_another_thread_reads_and_writes", Duration::from_secs(secs + 120));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let len = 2 * TABLE + 3 * PAGE + 7;
        let mut root = arena.space(len).unwrap();
        let mut model = vec![0u8; len];
        Rng::new(1).fill(&mut model);
        root.as_mut_slice().copy_from_slice(&model);
        let busy = root.fork().unwrap();
        let stop = AtomicBool::new(false);
        let loops = AtomicU64::new(0);
        let (mut forks, mut drops) = (0u64, 0u64);
        std::thread::scope(|s| {
            // The busy thread: long API and view loops over the whole of `busy`.
            let h = s.spawn(|| {
                let mut busy = busy;
                let mut model = model.clone();
                let mut rng = Rng::new(2);
                let mut buf = vec![0u8; len];
                while !stop.load(Ordering::Relaxed) {
                    busy.read(0, &mut buf).unwrap();
                    assert_same(&buf, &model, 0, &format_args!("{mode:?} busy space (api read loop)"));
                    rng.fill(&mut buf);
                    busy.write(0, &buf).unwrap();
                    model.copy_from_slice(&buf);
                    assert_same(busy.as_slice(), &model, 0, &format_args!("{mode:?} busy space (view)"));
                    let (off, n) = rng.span(len);
                    rng.fill(&mut buf[..n]);
                    busy.as_mut_slice()[off..off + n].copy_from_slice(&buf[..n]);
                    model[off..off + n].copy_from_slice(&buf[..n]);
                    loops.fetch_add(1, Ordering::Relaxed);
                }
                assert_same(busy.as_slice(), &model, 0, &format_args!("{mode:?} busy space at the end"));
            });
            // Meanwhile: fork the root and its forks, write them, and drop them (parents
            // before children and the reverse) — each drop releases tables and frames the
            // busy space was sharing.
            let t0 = Instant::now();
            let mut rng = Rng::new(3);
            while t0.elapsed() < Duration::from_secs(secs) || loops.load(Ordering::Relaxed) < 3 {
                let mut fam: Vec<Space> = vec![root.fork().unwrap()];
                for _ in 0..4 {
                    let i = rng.below(fam.len());
                    let mut c = fam[i].fork().unwrap();
                    let off = rng.offset(len);
                    c.as_mut_slice()[off] ^= 0x55;
                    fam.push(c);
                    forks += 1;
                }
                while !fam.is_empty() {
                    drop(fam.swap_remove(rng.below(fam.len())));
                    drops += 1;
                }
                // Sometimes the root itself is replaced by its own fork, dropping the old one.
                if rng.chance(1, 3) {
                    let next = root.fork().unwrap();
                    drop(std::mem::replace(&mut root, next));
                    drops += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            h.join().unwrap();
        });
        assert_same(root.as_slice(), &model, 0, &format_args!("{mode:?} root"));
        println!(
            "{mode:?}: {} busy loops over {len} bytes while {forks} forks and {drops} drops",
            loops.load(Ordering::Relaxed)
        );
        drop(root);
        assert_nothing_left(&arena, "drop_relatives");
    }
}

/// What a forked child did, encoded in its exit status.
const CHILD_READ_ZERO: i32 = 10;
const CHILD_READ_DATA: i32 = 11;

/// In a `fork(2)` child: restore the default SIGSEGV/SIGBUS actions (async-signal-safe),
/// touch `addr`, and report what was read if the touch did not kill us.
fn child_touch(addr: *const u8) -> ! {
    // SAFETY: only async-signal-safe calls (signal, _exit) and a volatile load.
    unsafe {
        libc::signal(libc::SIGSEGV, libc::SIG_DFL);
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        let v = addr.read_volatile();
        libc::_exit(if v == 0 { CHILD_READ_ZERO } else { CHILD_READ_DATA });
    }
}

/// Fork the process; the child touches `addr`. Returns the child's wait status.
fn fork_and_touch(addr: *const u8) -> i32 {
    // SAFETY: the child runs only `child_touch` (async-signal-safe) and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        child_touch(addr);
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    status
}

fn describe(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            CHILD_READ_ZERO => "exited after reading ZERO from the view (silent wrong data)".into(),
            CHILD_READ_DATA => "exited after reading data from the view".into(),
            c => format!("exited with {c}"),
        }
    } else {
        format!("status {status:#x}")
    }
}

#[test]
fn process_fork_child_cannot_read_views() {
    let _g = serial();
    let _wd = Watchdog::new("process_fork_child_cannot_read_views", Duration::from_secs(120));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let len = TABLE + 8 * PAGE;
        let mut a = arena.space(len).unwrap();
        a.as_mut_slice()[..PAGE].fill(0xAB); // populated, writable
        a.write(PAGE, &[0xCD; PAGE]).unwrap(); // populated through the API
        let b = a.fork().unwrap(); // `a` frozen: its view emptied, pages in a frozen region
        let _ = b.as_slice()[0]; // b: read-only copy present
        a.as_mut_slice()[2 * PAGE] = 0xEF; // a: fresh page after the fork
        let probes: [(&str, *const u8); 6] = [
            ("populated page of a (written after the fork)", unsafe_at(&a, 2 * PAGE)),
            ("page of a re-faulted from its frozen region", {
                let _ = a.as_slice()[PAGE];
                unsafe_at(&a, PAGE)
            }),
            ("unpopulated page of a holding data", unsafe_at(&a, 0)),
            ("read-only populated page of b", unsafe_at(&b, 0)),
            ("never-written page of b", unsafe_at(&b, TABLE + PAGE)),
            ("last byte of b", unsafe_at(&b, len - 1)),
        ];
        for (what, addr) in probes {
            let status = fork_and_touch(addr);
            assert!(
                libc::WIFSIGNALED(status) && matches!(libc::WTERMSIG(status), libc::SIGSEGV | libc::SIGBUS),
                "{mode:?}: a fork(2) child touching the {what} must die of SIGSEGV/SIGBUS, but it {}",
                describe(status)
            );
        }
        // The parent keeps working: faults are served, forks work, data is intact.
        assert!(a.as_slice()[..PAGE].iter().all(|&x| x == 0xAB));
        assert!(a.as_slice()[PAGE..2 * PAGE].iter().all(|&x| x == 0xCD));
        assert_eq!(a.as_slice()[2 * PAGE], 0xEF);
        assert_eq!(b.as_slice()[2 * PAGE], 0);
        let mut c = b.fork().unwrap();
        c.as_mut_slice()[len - 1] = 1;
        assert_eq!(b.as_slice()[len - 1], 0);
        assert!(c.as_slice()[PAGE..2 * PAGE].iter().all(|&x| x == 0xCD));
        arena.check_invariants().unwrap();
        drop((a, b, c));
        assert_nothing_left(&arena, "process fork");
    }
}

/// A pointer into a space's view (taken without creating a reference).
fn unsafe_at(s: &Space, off: usize) -> *const u8 {
    assert!(off < s.len());
    s.as_ptr().wrapping_add(off)
}

/// The probe must be able to fail: on plain (non-DONTFORK) memory a forked child reads
/// the data, and `fork_and_touch` reports that as an exit, not a signal.
#[test]
fn process_fork_probe_sees_plain_memory() {
    let _g = serial();
    let v = [7u8; 16];
    let status = fork_and_touch(v.as_ptr());
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == CHILD_READ_DATA, "{}", describe(status));
    let z = [0u8; 16];
    let status = fork_and_touch(z.as_ptr());
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == CHILD_READ_ZERO, "{}", describe(status));
}

/// Syscalls touching view memory (invariant 6): the kernel copying from or into a view
/// page that is not populated either gets the real bytes (thread mode, or after
/// `populate`) or fails with EFAULT (signal mode's documented contract) — never zeros in
/// place of data, never a hang.
#[test]
fn syscalls_on_views_never_see_silent_zeros() {
    let _g = serial();
    let _wd = Watchdog::new("syscalls_on_views_never_see_silent_zeros", Duration::from_secs(120));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut a = arena.space(4 * PAGE).unwrap();
        a.write(0, &[0x5A; 4 * PAGE]).unwrap();
        let b = a.fork().unwrap(); // both views now empty of a's data (a frozen, b fresh)
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }, 0);
        // Kernel reads from an unpopulated view page holding data.
        // SAFETY: the source is the space's view, valid for PAGE bytes.
        let n = unsafe { libc::write(fds[1], b.as_ptr().add(PAGE) as *const libc::c_void, PAGE) };
        let err = std::io::Error::last_os_error();
        if n >= 0 {
            let mut got = vec![0u8; n as usize];
            // SAFETY: reading into our own buffer.
            let r = unsafe { libc::read(fds[0], got.as_mut_ptr() as *mut libc::c_void, got.len()) };
            assert_eq!(r, n);
            assert!(got.iter().all(|&x| x == 0x5A), "{mode:?}: write(2) from a view sent zeros in place of data");
            println!("{mode:?}: write(2) from an unpopulated view page served the data");
        } else {
            // EFAULT is the documented contract where the kernel does not hand syscall
            // faults to us: in signal mode, and with user-mode-only userfaultfd (containers
            // with the shipped seccomp profile). Anywhere else the syscall must be served.
            let user_mode_only = arena.uffd_access() == cowarena::UffdAccess::UserModeOnly;
            assert!(
                mode == FaultMode::Signal || user_mode_only,
                "{mode:?} with {:?}: write(2) from a view failed: {err}",
                arena.uffd_access()
            );
            assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{mode:?}: {err}");
            println!(
                "{mode:?} ({:?}): write(2) from an unpopulated view page: EFAULT (documented)",
                arena.uffd_access()
            );
        }
        // After populate, the syscall works in every mode.
        b.populate(2 * PAGE, PAGE, false).unwrap();
        // SAFETY: as above.
        let n = unsafe { libc::write(fds[1], b.as_ptr().add(2 * PAGE) as *const libc::c_void, PAGE) };
        assert_eq!(
            n,
            PAGE as isize,
            "{mode:?}: write(2) from a populated view page: {}",
            std::io::Error::last_os_error()
        );
        // Kernel writes into the view: a write-protected/unpopulated page of b.
        b.populate(3 * PAGE, PAGE, true).unwrap();
        // SAFETY: the destination is b's view, populated writable for PAGE bytes; no
        // reference into it is alive.
        let r = unsafe { libc::read(fds[0], b.as_ptr().add(3 * PAGE) as *mut libc::c_void, PAGE) };
        assert_eq!(
            r,
            PAGE as isize,
            "{mode:?}: read(2) into a populated view page: {}",
            std::io::Error::last_os_error()
        );
        assert!(b.as_slice()[3 * PAGE..].iter().all(|&x| x == 0x5A));
        // a is unchanged by anything done to b.
        assert!(a.as_slice().iter().all(|&x| x == 0x5A));
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        drop((a, b));
        assert_nothing_left(&arena, "syscalls");
    }
}

const CHAINED_EXIT: i32 = 42;

extern "C" fn app_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: async-signal-safe calls only; `info` is valid for an SA_SIGINFO handler.
    unsafe {
        let addr = (*info).si_addr() as usize;
        let msg = b"app SIGBUS handler reached\n";
        libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
        libc::_exit(if addr != 0 { CHAINED_EXIT } else { CHAINED_EXIT + 1 });
    }
}

/// A SIGBUS handler installed by the application *before* cowarena keeps receiving the
/// SIGBUS that are not cowarena's, while view faults are still served (runs in a child
/// process of this test binary, so that the application's handler comes first).
#[test]
fn pre_existing_sigbus_handler_is_chained() {
    if std::env::var_os("COWARENA_CHAIN_CHILD").is_some() {
        // SAFETY: installing a valid SA_SIGINFO handler.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = app_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()), 0);
        }
        let arena = Arena::builder().fault_mode(FaultMode::Signal).build().unwrap();
        let mut s = arena.space(4 * PAGE).unwrap();
        s.as_mut_slice()[PAGE] = 9; // served by cowarena's handler, not the app's
        let c = s.fork().unwrap();
        assert_eq!(c.as_slice()[PAGE], 9);
        println!("CHILD: view faults served");
        // A genuine SIGBUS outside any view: a page of an empty memfd.
        // SAFETY: memfd_create/mmap with valid arguments; the mapping is ours.
        let p = unsafe {
            let fd = libc::memfd_create(c"chain".as_ptr(), 0);
            assert!(fd >= 0);
            let p = libc::mmap(std::ptr::null_mut(), PAGE, libc::PROT_READ, libc::MAP_SHARED, fd, 0);
            assert_ne!(p, libc::MAP_FAILED);
            p as *const u8
        };
        // SAFETY: the load raises SIGBUS (beyond EOF), which the app's handler ends with _exit.
        let v = unsafe { p.read_volatile() };
        println!("CHILD: read {v} beyond EOF without SIGBUS: BUG");
        std::process::exit(0);
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "pre_existing_sigbus_handler_is_chained", "--nocapture", "--test-threads=1"])
        .env("COWARENA_CHAIN_CHILD", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("CHILD: view faults served"),
        "view faults not served with a prior handler:\n{stdout}\n{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(CHAINED_EXIT),
        "the application's SIGBUS handler was not chained (status {:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

/// A freezing fork holds the arena lock while `mremap` waits for the engine's reader thread
/// to read the REMAP event; the reader must never wait for that lock in turn, even when the
/// signal handler has just asked it to refill the fault path's headroom. Each round fills a
/// fresh space through its view (the handler uses up headroom and asks for a refill) and
/// forks at once. A deadlock here hung the benchmark; the watchdog turns it into a failure.
#[test]
fn freezing_fork_right_after_faults_never_deadlocks() {
    let _g = serial();
    let rounds = env_u64("COWARENA_REFILL_ROUNDS", 300);
    let _wd = Watchdog::new("freezing_fork_right_after_faults_never_deadlocks", Duration::from_secs(180));
    let arena = Arena::builder().fault_mode(FaultMode::Signal).build().unwrap();
    let pages = 1280; // more than the preallocated frames: at least one refill request per round
                      // Busy threads on every CPU, so that the reader thread is often scheduled late: the
                      // forking thread then takes the lock before the reader gets to its refill.
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..std::thread::available_parallelism().map_or(2, |n| n.get()) {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        rounds_of_fill_and_fork(&arena, pages, rounds);
        stop.store(true, Ordering::Relaxed);
    });
    assert_nothing_left(&arena, "after the rounds");
}

fn rounds_of_fill_and_fork(arena: &Arena, pages: usize, rounds: u64) {
    for round in 0..rounds {
        let s = arena.space(pages * PAGE).unwrap();
        for p in 0..pages {
            // SAFETY: in bounds of the view, which `s` keeps mapped; no references into it.
            unsafe { std::ptr::write_volatile(s.as_mut_ptr().add(p * PAGE), (p ^ round as usize) as u8) };
        }
        let c = s.fork_with(cowarena::ForkStrategy::Freeze).unwrap();
        assert_eq!(c.as_slice()[(pages - 1) * PAGE], ((pages - 1) ^ round as usize) as u8);
        drop((s, c));
    }
}
