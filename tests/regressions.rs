//! Regression tests for defects found by review (issue 10): each failed on the code before
//! its fix. (The soundness defect — a `&[u8]` from `as_slice` seeing `write` change it — is
//! now a compile error; see the `compile_fail` examples on `Space`.)

mod common;

use common::{PAGE, TABLE};
use cowarena::{Arena, FaultMode, ForkStrategy};

fn modes() -> [FaultMode; 2] {
    [FaultMode::Signal, FaultMode::Thread]
}

fn errno() -> i32 {
    // SAFETY: this thread's errno slot is always valid.
    unsafe { *libc::__errno_location() }
}

fn set_errno(v: i32) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = v };
}

/// Write fault-around used to resolve up to 16 pages *ahead* of a write as writes: shared
/// pages were copied and marked dirty though never written, and the detector's start value
/// wrapped, so a one-byte write to page 0 of a fresh fork reported dirty [0, 1, 2] and made
/// three copies. Only pages actually written may be copied or dirtied.
#[test]
fn fault_around_never_dirties_or_copies_unwritten_pages() {
    for mode in modes() {
        for strategy in [ForkStrategy::KeepWarm, ForkStrategy::Freeze] {
            // Counts a trap per first write (async_wp, async_forks: tests/async_wp.rs).
            let arena = Arena::builder().fault_mode(mode).async_wp(false).async_forks(false).build().unwrap();
            let mut parent = arena.space(TABLE).unwrap();
            parent.write(0, &vec![7u8; 128 * PAGE]).unwrap();
            parent.clean(0, TABLE).unwrap();
            let mut child = parent.fork_with(strategy).unwrap();
            assert_eq!(child.dirty_pages(0, TABLE).unwrap(), Vec::<usize>::new());
            let before = arena.stats();
            child.as_mut_slice()[0] = 1;
            let s = arena.stats();
            assert_eq!(child.dirty_pages(0, TABLE).unwrap(), vec![0], "{mode:?} {strategy:?}: one write");
            assert_eq!(s.faults.write_cow - before.faults.write_cow, 1, "{mode:?} {strategy:?}: copies");
            assert_eq!(s.frames_in_use - before.frames_in_use, 1, "{mode:?} {strategy:?}: new frames");
            // A sequential sweep writing every other page: fault-around may map the pages
            // ahead for reading, but only the written ones become private and dirty.
            let written: Vec<usize> = (10..100).step_by(2).collect();
            for &p in &written {
                child.as_mut_slice()[p * PAGE + 1] = 2;
            }
            let mut want = vec![0];
            want.extend(&written);
            assert_eq!(child.dirty_pages(0, TABLE).unwrap(), want, "{mode:?} {strategy:?}: sweep");
            let s = arena.stats();
            assert_eq!(s.faults.write_cow - before.faults.write_cow, want.len() as u64, "{mode:?} {strategy:?}");
            assert_eq!(s.frames_in_use - before.frames_in_use, want.len() as u64, "{mode:?} {strategy:?}");
            // Every page reads right in both spaces.
            let mut expect = vec![0u8; TABLE];
            expect[..128 * PAGE].fill(7);
            assert!(parent.as_slice() == &expect[..], "{mode:?} {strategy:?}: parent");
            expect[0] = 1;
            for &p in &written {
                expect[p * PAGE + 1] = 2;
            }
            assert!(child.as_slice() == &expect[..], "{mode:?} {strategy:?}: child");
            arena.check_invariants().unwrap();
        }
    }
}

/// A fresh space's first sequential writes: one frame per page written, dirty exactly those.
#[test]
fn first_touch_sweep_dirties_only_what_it_writes() {
    for mode in modes() {
        // A view registered from the start: one write fault and one frame per page (a
        // trap per first write; async_wp serves most of them in the kernel).
        let arena = Arena::builder().fault_mode(mode).plain_until_fork(false).async_wp(false).build().unwrap();
        let mut s = arena.space(TABLE).unwrap();
        for p in 0..64 {
            s.as_mut_slice()[p * PAGE] = 1;
        }
        assert_eq!(s.dirty_pages(0, TABLE).unwrap(), (0..64).collect::<Vec<_>>(), "{mode:?}");
        assert_eq!(arena.stats().frames_in_use, 64, "{mode:?}");
        assert_eq!(arena.stats().faults.write_zero, 64, "{mode:?}");

        // A plain space: the kernel serves the writes; dirty from its page tables, exactly
        // (reads of other pages map the zero page and are not "written"); the first fork
        // adopts exactly the pages written.
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut s = arena.space(TABLE).unwrap();
        for p in 0..64 {
            s.as_mut_slice()[p * PAGE] = 1;
        }
        assert_eq!(std::hint::black_box(s.as_slice()[100 * PAGE]), 0);
        assert_eq!(s.dirty_pages(0, TABLE).unwrap(), (0..64).collect::<Vec<_>>(), "{mode:?} plain");
        assert_eq!(s.referenced(0, TABLE).unwrap(), (0..64).chain([100]).collect::<Vec<_>>(), "{mode:?} plain");
        let st = arena.stats();
        assert_eq!((st.frames_in_use, st.faults.write_zero, st.plain_spaces), (0, 0, 1), "{mode:?} plain");
        let child = s.fork().unwrap();
        let st = arena.stats();
        assert_eq!((st.frames_in_use, st.pages_adopted, st.plain_spaces), (64, 64, 0), "{mode:?} adopted");
        assert_eq!(s.dirty_pages(0, TABLE).unwrap(), (0..64).collect::<Vec<_>>(), "{mode:?} adopted");
        assert_eq!(child.dirty_pages(0, TABLE).unwrap(), (0..64).collect::<Vec<_>>(), "{mode:?} child");
        arena.check_invariants().unwrap();
    }
}

/// A zero-length discard at an offset not on a 2 MiB boundary broke the shared table
/// around it (`tables_broken` 0 -> 1). Every range-taking call with an empty range must
/// change nothing.
#[test]
fn empty_ranges_change_nothing() {
    let arena = Arena::new().unwrap();
    let mut a = arena.space(2 * TABLE).unwrap();
    a.write(0, &vec![3u8; 2 * TABLE]).unwrap();
    let mut b = a.fork().unwrap();
    let _ = b.as_slice()[5 * PAGE]; // one read-only copy in b's view
    b.referenced(0, 2 * TABLE).unwrap();
    let before = arena.stats();
    for off in [0, PAGE, 5 * PAGE, 5 * PAGE + 7, TABLE + 3 * PAGE, 2 * TABLE] {
        if off % PAGE == 0 {
            b.discard(off, 0).unwrap();
        } else {
            assert!(matches!(b.discard(off, 0), Err(cowarena::Error::Unaligned { .. })));
        }
        assert_eq!(b.migrate(off, 0).unwrap(), 0, "migrate at {off:#x}");
        assert_eq!(b.clean(off, 0).unwrap(), Vec::<usize>::new(), "clean at {off:#x}");
        assert_eq!(b.clear_referenced(off, 0).unwrap(), 0, "clear_referenced at {off:#x}");
        assert_eq!(b.referenced(off, 0).unwrap(), Vec::<usize>::new(), "referenced at {off:#x}");
        assert_eq!(b.dirty_pages(off, 0).unwrap(), Vec::<usize>::new(), "dirty_pages at {off:#x}");
        b.populate(off, 0, true).unwrap();
        b.write(off, &[]).unwrap();
        b.read(off, &mut []).unwrap();
    }
    let s = arena.stats();
    assert_eq!(s.tables_broken, before.tables_broken, "an empty range broke a table: {s:?}");
    assert_eq!(s.tables_shared_now, before.tables_shared_now);
    assert_eq!(s.frames_migrated, before.frames_migrated);
    assert_eq!(s.tables_dropped, before.tables_dropped);
    assert_eq!(s.aging.referenced_cleared, before.aging.referenced_cleared);
    assert_eq!(s.faults, before.faults);
    assert!(b.as_slice().iter().all(|&x| x == 3));
    arena.check_invariants().unwrap();
}

/// A value in `errno` before a faulting access is still there after it, in both fault
/// modes (the SIGBUS handler's syscalls must not leak theirs into the interrupted code).
#[test]
fn errno_survives_view_faults() {
    for mode in modes() {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut a = arena.space(64 * PAGE).unwrap();
        for p in 0..16 {
            set_errno(1000 + p as i32);
            a.as_mut_slice()[p * 3 * PAGE] = 1; // first-touch write fault
            assert_eq!(errno(), 1000 + p as i32, "{mode:?}: write fault");
        }
        let mut b = a.fork_with(ForkStrategy::Freeze).unwrap();
        for p in 0..16 {
            set_errno(2000 + p as i32);
            let v = std::hint::black_box(b.as_slice()[p * 3 * PAGE]); // read fault (copy)
            assert_eq!((v, errno()), (1, 2000 + p as i32), "{mode:?}: read fault");
            set_errno(3000 + p as i32);
            b.as_mut_slice()[p * 3 * PAGE + 1] = 2; // write-protect fault (COW)
            assert_eq!(errno(), 3000 + p as i32, "{mode:?}: COW fault");
        }
        set_errno(0);
    }
}

/// `Arena::clear_referenced` counts distinct entries: one shared by 4 spaces counts once.
#[test]
fn arena_clear_referenced_counts_distinct_entries_and_aging_is_counted() {
    // Re-arming reads of read-only copies needs a trap per store (ArenaBuilder::async_wp,
    // and async_forks for the forks' copies).
    let arena = Arena::builder().async_wp(false).async_forks(false).build().unwrap();
    let mut root = arena.space(TABLE).unwrap();
    root.write(0, &vec![1u8; 8 * PAGE]).unwrap();
    let kids: Vec<_> = (0..3).map(|_| root.fork().unwrap()).collect();
    arena.clear_referenced().unwrap();
    for k in &kids {
        let _ = std::hint::black_box(k.as_slice()[2 * PAGE]);
    }
    let before = arena.stats().aging;
    assert_eq!(arena.clear_referenced().unwrap(), 1, "one shared entry, referenced by three spaces");
    let after = arena.stats().aging;
    assert_eq!(after.clears - before.clears, 4, "one clear per space");
    assert_eq!(after.referenced_cleared - before.referenced_cleared, 1);
    assert!(after.rearmed - before.rearmed >= 3, "each reader's copy is unmapped to re-arm: {after:?}");
    assert_eq!(arena.stats().tables_broken, 0, "aging never breaks a table");
}

/// `frozen_regions` counted migration and compaction targets too; those are
/// `pool_regions` now, and both return to zero when everything drops.
#[test]
fn frozen_and_pool_regions_are_counted_apart() {
    let arena = Arena::new().unwrap();
    let mut a = arena.space(4 * TABLE).unwrap();
    a.write(0, &vec![1u8; 4 * TABLE]).unwrap();
    let b = a.fork_with(ForkStrategy::Freeze).unwrap();
    let s = arena.stats();
    assert_eq!((s.frozen_regions, s.pool_regions), (1, 0), "a freezing fork leaves one frozen region: {s:?}");
    assert_eq!(b.migrate(0, 8 * PAGE).unwrap(), 8);
    let s = arena.stats();
    assert_eq!((s.frozen_regions, s.pool_regions), (1, 1), "a migration target is a pool: {s:?}");
    drop((a, b));
    let s = arena.stats();
    assert_eq!((s.frozen_regions, s.pool_regions), (0, 0), "{s:?}");
    assert!(s.is_idle());
}

/// Dense read fill (issue 12): once a fork's view maps 32 pages of a 2 MiB table, a read
/// fault maps the rest of the table read-only in batches — without breaking a table,
/// dirtying or copying-on-write anything — and stops at the memory limit.
#[test]
fn dense_read_fill_maps_the_rest_of_a_table_and_changes_nothing_else() {
    for mode in modes() {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let mut parent = arena.space(2 * TABLE).unwrap();
        let mut want = vec![0u8; 2 * TABLE];
        for (i, b) in want.iter_mut().enumerate().take(TABLE + 100 * PAGE) {
            *b = (i / PAGE) as u8 ^ 0x5a;
        }
        parent.write(0, &want).unwrap();
        parent.clean(0, 2 * TABLE).unwrap();
        let child = parent.fork_with(ForkStrategy::Freeze).unwrap();
        let before = arena.stats();
        // 32 scattered reads in table 0 (a stride of 37: never sequential): the 32nd fills it.
        for p in scattered(32) {
            assert_eq!(child.as_slice()[p * PAGE], want[p * PAGE], "{mode:?}: page {p}");
        }
        let s = arena.stats();
        assert_eq!(s.faults.dense_fills - before.faults.dense_fills, 1, "{mode:?}: {s:?}");
        assert_eq!(s.faults.filled - before.faults.filled, 480, "{mode:?}: the 480 pages left");
        let faults = |s: &cowarena::Stats| s.faults.read_copy + s.faults.read_zero;
        let after_fill = faults(&s);
        assert!(child.as_slice()[..TABLE] == want[..TABLE], "{mode:?}: table 0 after the fill");
        assert_eq!(faults(&arena.stats()), after_fill, "{mode:?}: reads after the fill faulted");
        assert_eq!(s.tables_broken, before.tables_broken, "{mode:?}: a read fill broke a table");
        assert_eq!(s.frames_in_use, before.frames_in_use, "{mode:?}: a read fill allocated frames");
        assert_eq!(child.dirty_pages(0, 2 * TABLE).unwrap(), Vec::<usize>::new(), "{mode:?}");
        // Table 1 is untouched by table 0's fill; sparse reads there fill nothing.
        for p in [512 + 3, 512 + 200] {
            assert_eq!(child.as_slice()[p * PAGE], want[p * PAGE]);
        }
        assert_eq!(arena.stats().faults.dense_fills - before.faults.dense_fills, 1);
        assert!(child.as_slice() == &want[..], "{mode:?}: everything");
        arena.check_invariants().unwrap();
    }
    // Off: every read faults on its own.
    let arena = Arena::builder().dense_read_fill(false).build().unwrap();
    let mut s = arena.space(TABLE).unwrap();
    s.write(0, &vec![1u8; TABLE]).unwrap();
    let c = s.fork_with(ForkStrategy::Freeze).unwrap();
    for p in scattered(40) {
        assert_eq!(c.as_slice()[p * PAGE], 1);
    }
    assert_eq!(arena.stats().faults.dense_fills, 0);
    // Under a memory limit the fill stops at the limit: the arena never holds more.
    let arena = Arena::builder().max_memory((600 * PAGE) as u64).build().unwrap();
    let mut s = arena.space(TABLE).unwrap();
    s.write(0, &vec![2u8; 300 * PAGE]).unwrap();
    let c = s.fork_with(ForkStrategy::Freeze).unwrap();
    for p in scattered(32) {
        let _ = std::hint::black_box(c.as_slice()[p * PAGE]);
    }
    let st = arena.stats();
    assert!(st.faults.filled > 0 && st.faults.filled <= 300 - 32, "{st:?}");
}

/// `n` distinct pages of one table, none right after the previous one.
fn scattered(n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(|k| (k * 37 + 5) % 512)
}
