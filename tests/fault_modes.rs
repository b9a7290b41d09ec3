//! Spaces whose faults are served in a mode other than their arena's default
//! (`Arena::space_in`, `Space::fork_in`; issue 15 item 3): a thread-mode snapshot of a
//! signal-mode space that `write(2)` reads straight from, a thread-mode buffer `read(2)`
//! fills, a signal-mode space in a thread-mode arena, and families mixing both modes under
//! threads (forks freeze views registered with either userfaultfd: the reader must
//! acknowledge REMAP events on both, or the freezing `mremap` never returns).

mod common;

use std::io::{Read, Seek, Write};
use std::time::Duration;

use common::{assert_nothing_left, Rng, Watchdog, PAGE};
use cowarena::{Arena, Error, FaultMode, ForkStrategy, UffdAccess};

fn arena(mode: FaultMode, plain: bool) -> Arena {
    Arena::builder().fault_mode(mode).plain_until_fork(plain).build().expect("userfaultfd")
}

/// Syscalls on thread-mode views are served only where userfaultfd hands kernel-mode
/// faults to us (not with user-mode-only access: containers under the shipped seccomp
/// profile). Says so when it cannot check.
fn syscalls_served(a: &Arena) -> bool {
    let served = a.uffd_access() != UffdAccess::UserModeOnly;
    if !served {
        println!("SKIP: userfaultfd is user-mode-only here; syscalls on views fail with EFAULT in every mode");
    }
    served
}

/// `write(2)` of `len` bytes at `ptr` into a pipe-less sink (a temp file): the bytes the
/// kernel read, or the errno.
fn kernel_reads(ptr: *const u8, len: usize) -> Result<Vec<u8>, i32> {
    let mut f = tempfile();
    // SAFETY: `ptr..ptr+len` is a mapped view of a live space.
    let n = unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&f), ptr as *const libc::c_void, len) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    let mut got = Vec::new();
    f.rewind().unwrap();
    f.read_to_end(&mut got).unwrap();
    Ok(got)
}

fn tempfile() -> std::fs::File {
    let dir = std::env::temp_dir();
    for i in 0.. {
        let p = dir.join(format!("cowarena-modes-{}-{i}", std::process::id()));
        if let Ok(f) = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&p) {
            let _ = std::fs::remove_file(&p);
            return f;
        }
    }
    unreachable!()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / PAGE) as u8 ^ (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// In a signal-mode arena, a fork of a frozen space in thread mode feeds `write(2)` straight
/// from its never-touched view; the same fork in signal mode gets EFAULT (the documented
/// contract), which shows the modes really differ per space.
#[test]
fn a_thread_mode_fork_of_a_signal_space_feeds_write_2() {
    let _wd = Watchdog::new("a_thread_mode_fork_of_a_signal_space_feeds_write_2", Duration::from_secs(120));
    for plain in [false, true] {
        let a = arena(FaultMode::Signal, plain);
        if !syscalls_served(&a) {
            return;
        }
        let len = 600 * PAGE; // more than a table, and past the protect limit: the fork freezes
        let want = pattern(len, 1);
        let mut s = a.space(len).unwrap();
        s.as_mut_slice().copy_from_slice(&want);
        assert_eq!(s.fault_mode(), FaultMode::Signal);
        let snap = s.fork_in(FaultMode::Thread).unwrap();
        assert_eq!(snap.fault_mode(), FaultMode::Thread);
        let sig = s.fork().unwrap();
        assert_eq!(sig.fault_mode(), FaultMode::Signal);
        // The parent keeps writing: the snapshot keeps the fork-time bytes.
        s.as_mut_slice()[..PAGE].fill(0xEE);
        let got = kernel_reads(snap.as_ptr(), len).expect("write(2) from a thread-mode view");
        assert!(got == want, "plain={plain}: write(2) from the thread-mode snapshot sent other bytes");
        assert_eq!(kernel_reads(sig.as_ptr(), len), Err(libc::EFAULT), "plain={plain}: signal-mode fork");
        // Both keep working through plain loads too, and forks keep their parent's mode.
        assert_eq!(sig.as_slice(), &want[..]);
        let grandchild = snap.fork().unwrap();
        assert_eq!(grandchild.fault_mode(), FaultMode::Thread);
        assert_eq!(kernel_reads(grandchild.as_ptr(), len).unwrap(), want);
        a.check_invariants().unwrap();
        drop((s, snap, sig, grandchild));
        assert_nothing_left(&a, "thread-mode fork of a signal space");
    }
}

/// A thread-mode buffer in a signal-mode arena: `read(2)` fills never-touched pages, and a
/// signal-mode fork of it sees what was read.
#[test]
fn read_2_fills_a_thread_mode_buffer_in_a_signal_arena() {
    let _wd = Watchdog::new("read_2_fills_a_thread_mode_buffer_in_a_signal_arena", Duration::from_secs(120));
    for plain in [false, true] {
        let a = arena(FaultMode::Signal, plain);
        if !syscalls_served(&a) {
            return;
        }
        let len = 300 * PAGE + 123;
        let want = pattern(len, 2);
        let mut f = tempfile();
        f.write_all(&want).unwrap();
        f.rewind().unwrap();
        let mut buf = a.space_in(len, FaultMode::Thread).unwrap();
        f.read_exact(buf.as_mut_slice()).expect("read(2) into a thread-mode view");
        assert!(buf.as_slice() == &want[..], "plain={plain}: read(2) left other bytes");
        let child = buf.fork_in(FaultMode::Signal).unwrap();
        assert_eq!(child.fault_mode(), FaultMode::Signal);
        // read(2) again, into the parent whose pages the fork write-protected or froze.
        f.rewind().unwrap();
        let again = pattern(len, 3);
        f.write_all(&again).unwrap();
        f.rewind().unwrap();
        f.read_exact(buf.as_mut_slice()).expect("read(2) into a forked thread-mode view");
        assert!(buf.as_slice() == &again[..]);
        assert!(child.as_slice() == &want[..], "plain={plain}: the signal-mode fork lost its bytes");
        a.check_invariants().unwrap();
        drop((buf, child));
        assert_nothing_left(&a, "read(2) buffer");
    }
}

/// A signal-mode space in a thread-mode arena is served by the SIGBUS handler: its faults
/// work, a syscall on an unpopulated page gets EFAULT (signal mode's contract), and a
/// thread blocking SIGBUS may not create one — but may create and use a thread-mode space
/// in a signal-mode arena.
#[test]
fn signal_mode_spaces_in_a_thread_arena_and_the_sigmask() {
    let _wd = Watchdog::new("signal_mode_spaces_in_a_thread_arena_and_the_sigmask", Duration::from_secs(120));
    let a = arena(FaultMode::Thread, false);
    let len = 64 * PAGE;
    let want = pattern(len, 4);
    let mut s = a.space_in(len, FaultMode::Signal).unwrap();
    s.as_mut_slice().copy_from_slice(&want);
    let c = s.fork_with(ForkStrategy::Freeze).unwrap();
    assert_eq!(c.fault_mode(), FaultMode::Signal);
    assert_eq!(kernel_reads(c.as_ptr(), len), Err(libc::EFAULT), "a signal-mode fork in a thread arena");
    assert_eq!(c.as_slice(), &want[..]);
    let t = c.fork_in(FaultMode::Thread).unwrap();
    if syscalls_served(&a) {
        assert_eq!(kernel_reads(t.as_ptr(), len).unwrap(), want);
    }

    // A thread that blocks SIGBUS.
    let sig_arena = arena(FaultMode::Signal, false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            // SAFETY: blocking a signal in this thread only.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGBUS);
                assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()), 0);
            }
            assert!(matches!(a.space_in(PAGE, FaultMode::Signal), Err(Error::SigbusBlocked)));
            assert!(matches!(sig_arena.space(PAGE), Err(Error::SigbusBlocked)));
            let mut ok = sig_arena.space_in(8 * PAGE, FaultMode::Thread).expect("a thread-mode space");
            ok.as_mut_slice()[5 * PAGE] = 9;
            let f = ok.fork().expect("fork of a thread-mode space");
            ok.as_mut_slice()[5 * PAGE] = 10;
            assert_eq!((f.as_slice()[5 * PAGE], ok.as_slice()[5 * PAGE]), (9, 10));
        });
    });
    a.check_invariants().unwrap();
    drop((s, c, t));
    assert_nothing_left(&a, "signal-mode spaces in a thread arena");
}

/// Writes to frames a thread-mode space (in a signal-mode arena) alone maps take them by
/// `UFFDIO_MOVE`, which the kernel only accepts through the userfaultfd the destination is
/// registered with: a move through the arena's first one fails and falls back to a copy.
#[test]
fn exclusive_pages_move_into_views_of_the_second_userfaultfd() {
    let _wd = Watchdog::new("exclusive_pages_move_into_views_of_the_second_userfaultfd", Duration::from_secs(120));
    let a = arena(FaultMode::Signal, false);
    let offered = cowarena::probe::probe().feature("MOVE").and_then(|f| f.present) == Some(true);
    if !offered {
        println!("SKIP: the kernel offers no UFFDIO_MOVE");
        return;
    }
    let len = 1024 * PAGE;
    let mut s = a.space_in(len, FaultMode::Thread).unwrap();
    s.as_mut_slice().fill(3);
    let c = s.fork_with(ForkStrategy::Freeze).unwrap();
    drop(c); // the frozen frames are s's alone again
    let before = a.stats().pages_moved;
    for p in (0..1024).step_by(7) {
        s.as_mut_slice()[p * PAGE] = 4;
    }
    let moved = a.stats().pages_moved - before;
    assert!(moved > 0, "no write took its exclusive frame by UFFDIO_MOVE in a thread-mode view");
    assert!(s
        .as_slice()
        .iter()
        .enumerate()
        .all(|(i, &b)| b == if i % PAGE == 0 && (i / PAGE) % 7 == 0 { 4 } else { 3 }));
}

/// Families mixing both modes, each thread forking (freezing and protecting in place),
/// writing and checking its own spaces while the others do the same: every byte as a
/// per-space model says, in arenas of either default.
#[test]
fn mixed_mode_families_under_threads() {
    let _wd = Watchdog::new("mixed_mode_families_under_threads", Duration::from_secs(240));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let a = arena(mode, false);
        std::thread::scope(|sc| {
            for t in 0..3u64 {
                let a = &a;
                sc.spawn(move || {
                    let mut rng = Rng::new(t * 7919 + 17);
                    let len = 40 * PAGE + 77;
                    let modes = [FaultMode::Signal, FaultMode::Thread];
                    let mut live = vec![(a.space_in(len, modes[t as usize % 2]).unwrap(), vec![0u8; len])];
                    for round in 0..300 {
                        let i = rng.below(live.len());
                        match rng.below(10) {
                            0..=1 if live.len() < 6 => {
                                let m = modes[rng.below(2)];
                                let strategy =
                                    [ForkStrategy::Auto, ForkStrategy::Freeze, ForkStrategy::KeepWarm][rng.below(3)];
                                let child = live[i].0.fork_in_with(m, strategy).unwrap();
                                assert_eq!(child.fault_mode(), m);
                                let model = live[i].1.clone();
                                live.push((child, model));
                            }
                            2 if live.len() > 1 => {
                                live.swap_remove(i);
                            }
                            3..=7 => {
                                let (off, n) = rng.span(len);
                                let (s, m) = &mut live[i];
                                let mut data = vec![0u8; n];
                                rng.fill(&mut data);
                                s.as_mut_slice()[off..off + n].copy_from_slice(&data);
                                m[off..off + n].copy_from_slice(&data);
                            }
                            _ => {
                                let (s, m) = &live[i];
                                assert!(
                                    s.as_slice() == &m[..],
                                    "{mode:?} arena, thread {t} round {round}: space {i} ({:?}) diverged",
                                    s.fault_mode()
                                );
                            }
                        }
                    }
                    for (s, m) in &live {
                        assert!(s.as_slice() == &m[..], "{mode:?} arena, thread {t}: diverged at the end");
                    }
                });
            }
        });
        a.check_invariants().unwrap();
        assert_nothing_left(&a, "mixed-mode families");
        println!("{mode:?} arena: 3 threads x 300 ops over mixed-mode families, 0 divergences");
    }
}
