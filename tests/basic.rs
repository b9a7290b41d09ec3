//! The walkthrough, end to end through real userfaultfd.

use cowarena::Arena;

#[test]
fn hello_jello() {
    let arena = Arena::new().expect("userfaultfd");
    let mut root = arena.space(1 << 30).unwrap();
    root.as_mut_slice()[..5].copy_from_slice(b"hello");
    let mut child = root.fork().unwrap();
    child.as_mut_slice()[0] = b'j';
    assert_eq!(&root.as_slice()[..5], b"hello");
    assert_eq!(&child.as_slice()[..5], b"jello");
    let mut buf = [0u8; 5];
    child.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"jello");
    child.write(4096 * 3 + 4094, b"span").unwrap();
    assert_eq!(&child.as_slice()[4096 * 3 + 4094..4096 * 3 + 4098], b"span");
    assert_eq!(&root.as_slice()[4096 * 3 + 4094..4096 * 3 + 4098], &[0; 4]);
    let s = arena.stats();
    assert_eq!(s.forks, 1);
    assert_eq!(s.tables_broken, 1);
    arena.check_invariants().unwrap();
    drop(root);
    drop(child);
    let s = arena.stats();
    assert_eq!((s.frames_in_use, s.tables_in_use, s.views_in_use, s.frozen_regions), (0, 0, 0, 0), "{s:?}");
}

#[test]
fn both_fault_modes_serve_views() {
    use cowarena::FaultMode::{Signal, Thread};
    // (mode, every view async-WP, forks async-WP)
    for (mode, async_wp, async_forks) in [
        (Signal, false, false),
        (Thread, false, false),
        (Signal, true, false),
        (Thread, true, false),
        (Signal, false, true),
        (Thread, false, true),
    ] {
        let arena = Arena::builder().fault_mode(mode).async_wp(async_wp).async_forks(async_forks).build().unwrap();
        assert_eq!((arena.fault_mode(), arena.async_wp(), arena.async_forks()), (mode, async_wp, async_forks));
        let mut a = arena.space(8 << 20).unwrap();
        for (i, b) in a.as_mut_slice().iter_mut().enumerate().step_by(4096) {
            *b = (i / 4096) as u8;
        }
        let mut b = a.fork().unwrap();
        let c = b.fork().unwrap();
        for i in (0..8 << 20).step_by(4096) {
            b.as_mut_slice()[i] = b.as_slice()[i].wrapping_add(1);
        }
        for i in (0..8 << 20).step_by(4096) {
            let want = (i / 4096) as u8;
            assert_eq!(a.as_slice()[i], want, "{mode:?} parent page {}", i / 4096);
            assert_eq!(b.as_slice()[i], want.wrapping_add(1), "{mode:?} child page {}", i / 4096);
            assert_eq!(c.as_slice()[i], want, "{mode:?} grandchild page {}", i / 4096);
        }
        arena.check_invariants().unwrap();
        // Every page of `b` (a fork) was written once: a copy-on-write fault each, or (an
        // async-WP fork) the first per fault-around window, the kernel's alone after it.
        assert_eq!(b.dirty_pages(0, 8 << 20).unwrap().len(), 2048, "{mode:?} async_wp={async_wp}");
        let s = arena.stats();
        if async_wp || async_forks {
            assert!(s.faults.write_cow < 2048, "{mode:?}: the kernel served stores alone: {s:?}");
        } else {
            assert!(s.faults.write_cow >= 2048, "{s:?}");
        }
    }
}
