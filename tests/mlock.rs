//! `mlockall(MCL_FUTURE)` (issue 11, item 1): with it in effect every new mapping is
//! locked and populated at mmap time. A view populated with zero pages before its
//! userfaultfd registration never faults: API reads return 0 for bytes written through the
//! view and forks read zeros (silent wrong data). cowarena maps its memory so that the
//! populate does not happen; this test pins that, in both fault modes, with
//! `MCL_CURRENT|MCL_FUTURE` and `MCL_FUTURE|MCL_ONFAULT`.
//!
//! mlockall is process-wide and cannot be undone for mappings already made, so each case
//! runs in a re-executed copy of this test binary (`child` below, selected by an
//! environment variable): nothing leaks into other tests.
//!
//! RLIMIT_MEMLOCK: as root (how the suite runs) it does not apply. Unprivileged, under
//! `MCL_FUTURE` the kernel refuses (EAGAIN) any mapping that would take the locked total
//! past the limit, before cowarena can unlock it: the arena then fails with "mmap view
//! failed", and so would this test, for that reason and not for cowarena's.

use std::process::Command;

use cowarena::{Arena, FaultMode, Space};

const ENV: &str = "COWARENA_MLOCK_CHILD";
const PAGE: usize = 4096;
const SIZE: usize = 4 << 20;

/// Resident pages of `[p, p+len)` according to mincore(2).
fn resident(p: *const u8, len: usize) -> usize {
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `p` is page aligned (views are 2 MiB aligned) and `vec` has one byte per page.
    let r = unsafe { libc::mincore(p as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|b| **b & 1 != 0).count()
}

/// `Space::write` (through `&mut`, whether the method takes `&self` or `&mut self`).
fn api_write(s: &mut Space, offset: usize, data: &[u8]) {
    s.write(offset, data).expect("Space::write");
}

fn scenario(mode: FaultMode) {
    let arena = Arena::builder().fault_mode(mode).build().expect("arena");
    let mut root = arena.space(SIZE).expect("space");
    // Nothing populated before the first access: a populated view would never fault.
    assert_eq!(resident(root.as_ptr(), SIZE), 0, "{mode:?}: a fresh view is populated (mlockall populated it)");

    // Write through the view; the API must see the bytes.
    root.as_mut_slice()[..5].copy_from_slice(b"hello");
    root.as_mut_slice()[100 * PAGE + 7] = 0x5a;
    let mut buf = [0u8; 5];
    root.read(0, &mut buf).expect("read");
    assert_eq!(&buf, b"hello", "{mode:?}: Space::read of bytes written through the view");
    let mut one = [0u8; 1];
    root.read(100 * PAGE + 7, &mut one).expect("read");
    assert_eq!(one[0], 0x5a, "{mode:?}: Space::read of a byte written through the view");

    // A fork sees them, through the API and through its view.
    let mut child = root.fork().expect("fork");
    child.read(0, &mut buf).expect("child read");
    assert_eq!(&buf, b"hello", "{mode:?}: the fork reads zeros where the parent wrote");
    assert_eq!(&child.as_slice()[..5], b"hello", "{mode:?}: the fork's view");
    assert_eq!(child.as_slice()[100 * PAGE + 7], 0x5a, "{mode:?}: the fork's view");

    // Space::write works and is seen through views and the API; the parent is unchanged.
    api_write(&mut child, 2 * PAGE + 3, b"world");
    assert_eq!(&child.as_slice()[2 * PAGE + 3..2 * PAGE + 8], b"world", "{mode:?}: view after Space::write");
    child.read(2 * PAGE + 3, &mut buf).expect("read");
    assert_eq!(&buf, b"world", "{mode:?}: Space::read after Space::write");
    assert_eq!(&root.as_slice()[2 * PAGE + 3..2 * PAGE + 8], &[0; 5], "{mode:?}: the parent changed");
    api_write(&mut root, 0, b"HELLO");
    assert_eq!(&root.as_slice()[..5], b"HELLO");
    assert_eq!(&child.as_slice()[..5], b"hello", "{mode:?}: the fork changed with its parent");

    // A second generation, and an untouched page still reads zero in both.
    let grandchild = child.fork().expect("fork");
    assert_eq!(&grandchild.as_slice()[2 * PAGE + 3..2 * PAGE + 8], b"world");
    assert_eq!(grandchild.as_slice()[1000 * PAGE / 4], 0);
}

/// The body run in the re-executed binary; a no-op in a normal test run.
#[test]
fn child() {
    let Ok(spec) = std::env::var(ENV) else { return };
    let (flags, mode) = spec.split_once(',').expect("spec");
    let flags = match flags {
        "future" => libc::MCL_CURRENT | libc::MCL_FUTURE,
        "onfault" => libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT,
        f => panic!("unknown flags {f}"),
    };
    let mode = if mode == "signal" { FaultMode::Signal } else { FaultMode::Thread };
    // Lock limits: as root the hard limit can be raised; elsewhere this may fail (harmless).
    use rustix::process::{setrlimit, Resource, Rlimit};
    let _ = setrlimit(Resource::Memlock, Rlimit { current: None, maximum: None });
    // SAFETY: mlockall takes flags only; it changes no memory of ours.
    if unsafe { libc::mlockall(flags) } != 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::EPERM)) {
            // A container without CAP_IPC_LOCK and with the default 8 MiB RLIMIT_MEMLOCK.
            println!("SKIP: mlockall refused ({e}): no CAP_IPC_LOCK and RLIMIT_MEMLOCK too low to lock this process");
            return;
        }
        panic!("mlockall: {e}");
    }
    scenario(mode);
}

#[test]
fn views_work_under_mlockall() {
    let exe = std::env::current_exe().unwrap();
    let mut failed = Vec::new();
    for flags in ["future", "onfault"] {
        for mode in ["signal", "thread"] {
            let spec = format!("{flags},{mode}");
            let out = Command::new(&exe)
                .args(["child", "--exact", "--nocapture", "--test-threads=1"])
                .env(ENV, &spec)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && stdout.contains("SKIP:") {
                // Says why (and our CI host, root with CAP_IPC_LOCK, never skips).
                let why = stdout.lines().find(|l| l.contains("SKIP:")).unwrap_or_default();
                eprintln!("{spec}: skipped — {why}");
                continue;
            }
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let stdout = String::from_utf8_lossy(&out.stdout);
                eprintln!("--- {spec}: {}\n{stdout}\n{stderr}", out.status);
                failed.push(spec);
            }
        }
    }
    assert!(failed.is_empty(), "failed under mlockall: {failed:?}");
}
