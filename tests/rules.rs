//! The seed's rule table, pinned on the real kernel: which operations break a shared table
//! (migrate, mkclean, partial discard) and which do not (read faults, aging, whole-table
//! discard), counted by cause.

use cowarena::{Arena, ForkStrategy, Space};

const PAGE: usize = 4096;
const TABLE: usize = 2 << 20;

fn byte(s: &Space, off: usize) -> u8 {
    let mut b = [0u8];
    s.read(off, &mut b).unwrap();
    b[0]
}

#[test]
fn migrate_breaks_exactly_the_shared_table_it_walks() {
    let arena = Arena::new().unwrap();
    let mut a = arena.space(2 * TABLE).unwrap();
    a.write(0, b"first table").unwrap();
    a.write(TABLE, b"second table").unwrap();
    let b = a.fork().unwrap();
    let before = arena.stats();
    assert_eq!(before.tables_shared_now, 2);
    assert_eq!(b.migrate(0, PAGE).unwrap(), 1);
    let s = arena.stats();
    assert_eq!(s.broken_by.migrate, 1, "{s:?}");
    assert_eq!(s.tables_broken - before.tables_broken, 1);
    assert_eq!(s.tables_shared_now, 1, "the other table stays shared");
    assert_eq!(s.frames_migrated, 1);
    assert_eq!(&a.as_slice()[..11], b"first table");
    assert_eq!(&b.as_slice()[..11], b"first table");
    assert_eq!(&b.as_slice()[TABLE..TABLE + 12], b"second table");
    arena.check_invariants().unwrap();
}

#[test]
fn mkclean_breaks_the_table_and_tracks_new_writes() {
    let arena = Arena::new().unwrap();
    let mut a = arena.space(2 * TABLE).unwrap();
    a.as_mut_slice()[3 * PAGE] = 1;
    a.as_mut_slice()[TABLE] = 2;
    assert_eq!(a.clean(0, 2 * TABLE).unwrap(), vec![3, 512]);
    assert_eq!(arena.stats().broken_by.mkclean, 0, "exclusive tables are not broken");
    assert!(a.dirty_pages(0, 2 * TABLE).unwrap().is_empty());
    let mut b = a.fork().unwrap();
    // Writes after the clean are seen, through the view (write-protect re-armed) and the API.
    a.as_mut_slice()[5 * PAGE] = 9;
    b.write(7 * PAGE, &[1]).unwrap();
    assert_eq!(a.dirty_pages(0, 2 * TABLE).unwrap(), vec![5]);
    assert_eq!(b.dirty_pages(0, 2 * TABLE).unwrap(), vec![7]);
    // Cleaning b: its table 0 is exclusive now (its write broke it); table 1 is clean.
    let before = arena.stats().tables_broken;
    assert_eq!(b.clean(0, 2 * TABLE).unwrap(), vec![7]);
    assert_eq!(arena.stats().tables_broken, before);
    // A fresh fork shares a table holding a dirty entry: cleaning it breaks exactly that one.
    let c = a.fork().unwrap();
    assert_eq!(c.dirty_pages(0, 2 * TABLE).unwrap(), vec![5], "dirty bits are inherited");
    assert_eq!(c.clean(0, 2 * TABLE).unwrap(), vec![5]);
    let s = arena.stats();
    assert_eq!(s.broken_by.mkclean, 1, "{s:?}");
    assert_eq!(a.dirty_pages(0, 2 * TABLE).unwrap(), vec![5], "the parent keeps its own bit");
    assert_eq!(byte(&c, 5 * PAGE), 9);
    arena.check_invariants().unwrap();
}

#[test]
fn aging_100_sharers_breaks_nothing_and_one_access_is_seen_by_all() {
    // Re-arming reads of read-only copies needs a trap per store (ArenaBuilder::async_wp,
    // and async_forks for the forks' copies).
    let arena = Arena::builder().async_wp(false).async_forks(false).build().unwrap();
    let mut root = arena.space(TABLE).unwrap();
    root.write(0, &[42; PAGE]).unwrap();
    let forks: Vec<Space> = (0..99).map(|_| root.fork().unwrap()).collect();
    // Every fork reads page 0 through its view: read faults do not break.
    for f in &forks {
        assert_eq!(f.as_slice()[0], 42);
    }
    let broken = arena.stats().tables_broken;
    assert!(arena.clear_referenced().unwrap() > 0);
    let s = arena.stats();
    assert_eq!(s.tables_broken, broken, "clearing accessed bits must not break: {s:?}");
    assert_eq!(s.tables_shared_now, 1);
    for f in &forks {
        assert!(f.referenced(0, PAGE).unwrap().is_empty());
    }
    // One access through one sharer's view sets the one shared bit: every sharer sees it.
    assert_eq!(forks[57].as_slice()[0], 42);
    for f in forks.iter().chain([&root]) {
        assert_eq!(f.referenced(0, PAGE).unwrap(), vec![0]);
    }
    assert_eq!(arena.stats().tables_broken, broken);
    arena.check_invariants().unwrap();
}

#[test]
fn discard_drops_whole_tables_and_breaks_partial_ones() {
    let arena = Arena::new().unwrap();
    let mut a = arena.space(2 * TABLE).unwrap();
    a.write(0, &[1; 2 * TABLE]).unwrap();
    let mut b = a.fork().unwrap();
    assert_eq!(b.as_slice()[TABLE + 5], 1);
    b.discard(TABLE, TABLE).unwrap();
    let s = arena.stats();
    assert_eq!((s.tables_dropped, s.tables_broken), (1, 0), "{s:?}");
    b.discard(PAGE, 2 * PAGE).unwrap();
    let s = arena.stats();
    assert_eq!(s.broken_by.discard, 1, "{s:?}");
    assert_eq!(b.as_slice()[TABLE + 5], 0);
    assert_eq!(b.as_slice()[PAGE], 0);
    assert_eq!(b.as_slice()[3 * PAGE - 1], 0);
    assert_eq!(b.as_slice()[0], 1);
    assert_eq!(b.as_slice()[3 * PAGE], 1);
    assert_eq!(a.as_slice()[PAGE], 1);
    assert_eq!(a.as_slice()[TABLE + 5], 1);
    assert!(matches!(b.discard(1, 1), Err(cowarena::Error::Unaligned { offset: 1 })));
    arena.check_invariants().unwrap();
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn dropping_a_family_and_compacting_returns_memory() {
    let arena = Arena::new().unwrap();
    let size = 128 << 20;
    let rss0 = status_kib("VmRSS:");
    let mut root = arena.space(size).unwrap();
    for p in (0..size).step_by(PAGE) {
        root.as_mut_slice()[p] = (p / PAGE) as u8 | 1;
    }
    let mut family: Vec<Space> = (0..16).map(|_| root.fork().unwrap()).collect();
    for (i, f) in family.iter_mut().enumerate() {
        for p in (i * PAGE..size).step_by(64 * PAGE) {
            f.as_mut_slice()[p] = 0xEE;
        }
    }
    let mut survivor = family.pop().unwrap();
    drop(family);
    drop(root);
    // The survivor still needs every frame: nothing can be returned yet but the dead forks.
    let rss_mid = status_kib("VmRSS:");
    survivor.discard(0, size - 4 * TABLE).unwrap();
    let frozen_before = arena.stats().frozen_regions;
    let moved = arena.compact().unwrap();
    let s = arena.stats();
    let rss_end = status_kib("VmRSS:");
    eprintln!(
        "RSS: start {rss0} KiB, family alive+dropped {rss_mid} KiB, after discard+compact {rss_end} KiB; \
         compaction moved {moved} frames, frozen regions {frozen_before} -> {}, bytes reclaimed {}",
        s.frozen_regions, s.bytes_reclaimed
    );
    assert!(moved > 0 && s.frozen_regions <= frozen_before && s.frames_migrated == moved as u64, "{s:?}");
    assert!(rss_end + 64 * 1024 < rss_mid, "memory was not returned: {rss_mid} -> {rss_end} KiB");
    for p in (size - 4 * TABLE..size).step_by(PAGE) {
        let want = if (p - 15 * PAGE) % (64 * PAGE) == 0 { 0xEE } else { (p / PAGE) as u8 | 1 };
        assert_eq!(survivor.as_slice()[p], want, "page {}", p / PAGE);
    }
    assert_eq!(survivor.as_slice()[0], 0);
    drop(survivor);
    let s = arena.stats();
    assert_eq!((s.frames_in_use, s.frozen_regions, s.views_in_use), (0, 0, 0));
}

#[test]
fn reset_to_restores_the_snapshot_and_keeps_clean_pages_mapped() {
    let arena = Arena::new().unwrap();
    let size = 4 * TABLE;
    let mut snap = arena.space(size).unwrap();
    for p in 0..size / PAGE {
        snap.write(p * PAGE, &[(p % 251) as u8 + 1]).unwrap();
    }
    let mut work = snap.fork().unwrap();
    for iter in 0..20u8 {
        // Read 100 pages, write 10, then reset.
        for p in (0..size / PAGE).step_by(size / PAGE / 100) {
            assert_eq!(work.as_slice()[p * PAGE], (p % 251) as u8 + 1, "iteration {iter} page {p}");
        }
        for k in 0..10 {
            let p = (k * 97 + iter as usize * 13) % (size / PAGE);
            work.as_mut_slice()[p * PAGE] = 0;
        }
        let faults_before = arena.stats().faults;
        work.reset_to(&snap).unwrap();
        assert_eq!(arena.stats().faults, faults_before, "reset itself faults nothing");
    }
    // After the first iteration, re-reading the clean pages does not fault again.
    let reads_before = arena.stats().faults.read_copy;
    for p in (0..size / PAGE).step_by(size / PAGE / 100) {
        assert_eq!(work.as_slice()[p * PAGE], (p % 251) as u8 + 1);
    }
    let refaults = arena.stats().faults.read_copy - reads_before;
    assert!(refaults <= 10, "clean pages were re-faulted after reset: {refaults}");
    let other = arena.space(size).unwrap();
    assert!(matches!(work.reset_to(&other), Err(cowarena::Error::NotRelated)));
    arena.check_invariants().unwrap();
}

#[test]
fn fork_strategies_keep_or_freeze_the_parent_view() {
    // Homes write-protected in the view need a trap per store; async_wp forks evacuate a
    // few homes or freeze (tests/async_wp.rs::forks_keep_a_view_with_few_homes_warm).
    let arena = Arena::builder().async_wp(false).build().unwrap();
    for strategy in [cowarena::ForkStrategy::KeepWarm, cowarena::ForkStrategy::Freeze, cowarena::ForkStrategy::Auto] {
        let mut a = arena.space(2 * TABLE).unwrap();
        for p in (0..2 * TABLE).step_by(PAGE) {
            a.as_mut_slice()[p] = 1;
        }
        let freezes = arena.stats().freezes;
        let b = a.fork_with(strategy).unwrap();
        let froze = arena.stats().freezes > freezes;
        assert_eq!(froze, strategy != cowarena::ForkStrategy::KeepWarm, "{strategy:?}");
        // Reading the parent after a warm fork faults nothing; after a freeze it re-faults.
        let reads = arena.stats().faults.read_copy;
        assert!(a.as_slice().iter().step_by(PAGE).all(|&v| v == 1));
        assert_eq!(arena.stats().faults.read_copy > reads, froze, "{strategy:?}");
        // Writes on either side keep both right (evacuation of warm homes to the pool).
        for p in (0..2 * TABLE).step_by(3 * PAGE) {
            a.as_mut_slice()[p] = 2;
        }
        drop(a);
        assert!(b.as_slice().iter().step_by(PAGE).all(|&v| v == 1), "{strategy:?}");
        arena.check_invariants().unwrap();
        drop(b);
        let s = arena.stats();
        assert_eq!((s.frames_in_use, s.views_in_use, s.frozen_regions), (0, 0, 0), "{strategy:?}: {s:?}");
    }
}

/// A write to a page no one else maps any more takes the page (UFFDIO_MOVE from its frozen
/// home), as the kernel reuses an exclusive page in `do_wp_page`; with the move turned off
/// it is copied. Both leave every byte right.
#[test]
fn writing_an_exclusive_page_takes_it_instead_of_copying() {
    for take in [true, false] {
        let arena = Arena::builder().uffd_move(take).build().unwrap();
        let mut a = arena.space(64 * PAGE).unwrap();
        let mut want: Vec<u8> = (0..64 * PAGE).map(|i| (i / PAGE) as u8 ^ (i % 251) as u8).collect();
        a.write(0, &want).unwrap();
        let b = a.fork_with(ForkStrategy::Freeze).unwrap(); // a's pages now live in a frozen region
        assert_eq!(arena.stats().frozen_regions, 1);
        drop(b); // every frame is exclusive to a again, homed in the frozen region
        let before = arena.stats();
        a.as_mut_slice()[5 * PAGE + 1] = 0xEE;
        want[5 * PAGE + 1] = 0xEE;
        a.write(40 * PAGE, b"api write").unwrap();
        want[40 * PAGE..40 * PAGE + 9].copy_from_slice(b"api write");
        let s = arena.stats();
        let (moved, copied) = (s.pages_moved - before.pages_moved, s.bytes_copied - before.bytes_copied);
        if take {
            assert!(moved >= 2, "{s:?}");
            assert_eq!(copied, 0, "a taken page is not copied: {s:?}");
        } else {
            assert_eq!(moved, 0);
            assert!(copied >= 2 * PAGE as u64, "{s:?}");
        }
        assert_eq!(s.faults.write_reuse - before.faults.write_reuse, moved.max(copied / PAGE as u64));
        assert!(a.as_slice() == &want[..], "take={take}: contents differ");
        let mut buf = vec![0u8; 64 * PAGE];
        a.read(0, &mut buf).unwrap();
        assert!(buf == want);
        arena.check_invariants().unwrap();
        drop(a);
        assert!(arena.stats().is_idle(), "{:?}", arena.stats());
    }
}
