//! Stores served by the kernel alone (`ArenaBuilder::async_wp`): writes to read-only view
//! pages take no user-space fault, yet contents, dirty tracking, forks racing writers,
//! aging and resets stay exact. Each test runs in both fault modes.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{assert_nothing_left, assert_space_is, Rng};
use cowarena::{Arena, FaultMode, ForkStrategy};

const PAGE: usize = 4096;
const TABLE: usize = 2 << 20;

fn modes() -> [FaultMode; 2] {
    [FaultMode::Signal, FaultMode::Thread]
}

/// `0..n` in a random order (Fisher–Yates, seeded).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

fn arena(mode: FaultMode) -> Arena {
    Arena::builder().fault_mode(mode).async_wp(true).build().expect("async-WP arena (Linux 6.7+)")
}

/// A child reads every page of a written parent, then writes some: the writes cost no
/// write fault (the kernel serves them), both sides keep their bytes, and `dirty_pages`
/// lists exactly the pages written (it only asks the kernel; the `clean` after records them,
/// counted as async writes).
#[test]
fn writes_to_read_pages_take_no_fault_and_are_tracked_exactly() {
    for mode in modes() {
        let a = arena(mode);
        let len = 3 * TABLE;
        let mut parent = a.space(len).unwrap();
        let mut rng = Rng::new(7);
        let mut want = vec![0u8; len];
        rng.fill(&mut want);
        parent.as_mut_slice().copy_from_slice(&want);
        let mut child = parent.fork().unwrap();
        child.clean(0, len).unwrap();
        // Read every page (read faults: copies mapped read-only, async write-protected).
        let sum: u64 = child.as_slice().iter().step_by(PAGE).map(|&b| b as u64).sum();
        std::hint::black_box(sum);
        let before = a.stats();
        let mut child_want = want.clone();
        let mut written = BTreeSet::new();
        for _ in 0..300 {
            let p = rng.below(len / PAGE);
            let v = rng.below(255) as u8 + 1;
            child.as_mut_slice()[p * PAGE + 17] = v;
            child_want[p * PAGE + 17] = v;
            written.insert(p);
        }
        let mid = a.stats();
        let writes = |s: &cowarena::Stats| s.faults.write_zero + s.faults.write_cow + s.faults.write_reuse;
        assert_eq!(writes(&mid), writes(&before), "{mode:?}: a write to a read-only page trapped");
        let dirty: BTreeSet<usize> = child.dirty_pages(0, len).unwrap().into_iter().collect();
        assert_eq!(dirty, written, "{mode:?}: dirty pages differ from the pages written");
        assert_eq!(a.stats().writes_async, before.writes_async, "{mode:?}: dirty_pages recorded");
        assert_space_is(&child, &child_want, &format!("{mode:?} child"));
        assert_space_is(&parent, &want, &format!("{mode:?} parent"));
        a.check_invariants().unwrap();
        // clean, write again, the new writes are exactly what is dirty.
        assert_eq!(child.clean(0, len).unwrap().into_iter().collect::<BTreeSet<_>>(), written);
        assert_eq!(a.stats().writes_async - before.writes_async, written.len() as u64, "{mode:?}");
        a.check_invariants().unwrap();
        child.as_mut_slice()[5 * PAGE] = 1;
        child_want[5 * PAGE] = 1;
        assert_eq!(child.dirty_pages(0, len).unwrap(), vec![5]);
        assert_space_is(&child, &child_want, &format!("{mode:?} child after clean"));
        drop((parent, child));
        assert_nothing_left(&a, &format!("{mode:?}"));
    }
}

/// Sequential writes in a fork get fault-around (pages ahead mapped read-only): pages
/// skipped by the writer are never reported dirty, and never copied for writing.
#[test]
fn write_fault_around_keeps_dirty_tracking_exact() {
    for mode in modes() {
        let a = arena(mode);
        let len = 2 * TABLE;
        let mut parent = a.space(len).unwrap();
        parent.as_mut_slice().fill(3);
        let mut child = parent.fork().unwrap();
        child.clean(0, len).unwrap();
        let mut written = Vec::new();
        for p in 0..len / PAGE {
            if p % 7 != 3 {
                child.as_mut_slice()[p * PAGE + 1] = 9;
                written.push(p);
            }
        }
        let s = a.stats();
        assert!(s.faults.around > 0, "{mode:?}: no fault-around for sequential writes");
        assert_eq!(child.dirty_pages(0, len).unwrap(), written, "{mode:?}");
        let mut want = vec![3u8; len];
        for &p in &written {
            want[p * PAGE + 1] = 9;
        }
        assert_space_is(&child, &want, &format!("{mode:?} child"));
        assert_space_is(&parent, &vec![3u8; len], &format!("{mode:?} parent"));
        let traps = s.faults.write_zero + s.faults.write_cow + s.faults.write_reuse;
        assert!(
            traps * 4 < written.len() as u64,
            "{mode:?}: {traps} write faults for {} sequential page writes",
            written.len()
        );
    }
}

/// Writer threads store into pages the parent has mapped read-only while the main thread
/// forks the space again and again (each fork freezes the view and scans the frozen pages
/// for the stores the kernel served alone). No store may be lost: every child holds, for
/// every word, a value between what was stored before its fork began and after it
/// returned; at the end the parent holds the last value of every word.
#[test]
fn forks_racing_writers_lose_no_store() {
    for mode in modes() {
        let a = arena(mode);
        let len = 8 << 20;
        let words = len / 8;
        let root = a.space(len).unwrap();
        const WRITERS: usize = 2;
        let done: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        // Word k belongs to writer k % WRITERS; in round r the writer stores r+1 into each
        // of its words, in a fixed random order.
        let base = root.as_mut_ptr() as usize;
        let mut handles = Vec::new();
        for w in 0..WRITERS {
            let (done, stop) = (done.clone(), stop.clone());
            handles.push(std::thread::spawn(move || {
                let mut mine: Vec<usize> = (w..words).step_by(WRITERS).collect();
                let mut rng = Rng::new(w as u64 + 1);
                for i in (1..mine.len()).rev() {
                    mine.swap(i, rng.below(i + 1));
                }
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) && round < 40 {
                    round += 1;
                    for &k in &mine {
                        let at = (base + k * 8) as *mut u64;
                        // SAFETY: inside the root's view, which outlives the threads; each
                        // word is written by one thread only. Read first: a page not mapped
                        // is mapped read-only, and the store is then the kernel's alone.
                        unsafe {
                            let v = at.read_volatile();
                            assert_eq!(v, round - 1, "word {k} changed under its writer");
                            at.write_volatile(round);
                        }
                    }
                    done[w].store(round, Ordering::Release);
                }
            }));
        }
        let mut forks = 0;
        while handles.iter().any(|h| !h.is_finished()) && forks < 60 {
            let lo: Vec<u64> = done.iter().map(|d| d.load(Ordering::Acquire)).collect();
            let strategy = if forks % 2 == 0 { ForkStrategy::Auto } else { ForkStrategy::KeepWarm };
            let child = root.fork_with(strategy).unwrap();
            let hi: Vec<u64> = done.iter().map(|d| d.load(Ordering::Acquire)).collect();
            let got = child.as_slice();
            for k in (0..words).step_by(97) {
                let v = u64::from_ne_bytes(got[k * 8..k * 8 + 8].try_into().unwrap());
                let w = k % WRITERS;
                assert!(
                    v >= lo[w] && v <= hi[w] + 1,
                    "{mode:?} fork {forks}: word {k} is {v}, writer {w} had finished {}..{} rounds",
                    lo[w],
                    hi[w]
                );
            }
            forks += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().expect("writer");
        }
        let last: Vec<u64> = done.iter().map(|d| d.load(Ordering::Acquire)).collect();
        let got = root.as_slice();
        for k in 0..words {
            let v = u64::from_ne_bytes(got[k * 8..k * 8 + 8].try_into().unwrap());
            assert_eq!(v, last[k % WRITERS], "{mode:?}: word {k} lost a store");
        }
        assert!(forks >= 5, "{mode:?}: only {forks} forks raced the writers");
        // One more fork records the stores made after the last racing one (on a loaded
        // machine the writers may have run only after it).
        drop(root.fork().unwrap());
        assert!(a.stats().writes_async > 0, "{mode:?}: no store went through the kernel alone");
        a.check_invariants().unwrap();
    }
}

/// Aging, resets and the rmap operations see the stores the kernel served alone.
#[test]
fn aging_reset_and_migration_keep_unseen_stores() {
    for mode in modes() {
        let a = arena(mode);
        let len = TABLE + 5 * PAGE;
        let mut snap = a.space(len).unwrap();
        snap.as_mut_slice().fill(1);
        let mut work = snap.fork().unwrap();
        let _ = work.as_slice().iter().step_by(PAGE).count(); // map read-only copies
        let sum: u64 = work.as_slice().iter().step_by(PAGE).map(|&b| b as u64).sum();
        assert_eq!(sum, (len / PAGE) as u64);
        for p in [0, 3, 200, 511, 512] {
            work.as_mut_slice()[p * PAGE] = 5; // served by the kernel alone
        }
        let mut want = vec![1u8; len];
        for p in [0, 3, 200, 511, 512] {
            want[p * PAGE] = 5;
        }
        // Aging must not zap a read-only page holding an unseen store.
        a.clear_referenced().unwrap();
        work.clear_referenced(0, len).unwrap();
        assert_space_is(&work, &want, &format!("{mode:?} after clear_referenced"));
        // Migration moves frames, not the unseen stores.
        work.migrate(0, len).unwrap();
        a.compact().unwrap();
        assert_space_is(&work, &want, &format!("{mode:?} after migrate"));
        // A store after the sync those made, then a reset: every byte back to the snapshot.
        work.as_mut_slice()[7 * PAGE] = 6;
        work.reset_to(&snap).unwrap();
        assert_space_is(&work, &vec![1u8; len], &format!("{mode:?} after reset"));
        assert_space_is(&snap, &vec![1u8; len], &format!("{mode:?} snapshot"));
        // Stores into the snapshot's own read-only pages, then a reset to it: the reset
        // takes the snapshot as it is now.
        let _ = snap.as_slice()[9 * PAGE];
        snap.as_mut_slice()[9 * PAGE] = 8;
        work.reset_to(&snap).unwrap();
        let mut snap_want = vec![1u8; len];
        snap_want[9 * PAGE] = 8;
        assert_space_is(&work, &snap_want, &format!("{mode:?} reset to a written snapshot"));
        a.check_invariants().unwrap();
        drop((snap, work));
        assert_nothing_left(&a, &format!("{mode:?}"));
    }
}

/// `clean` racing stores into read-only pages (it re-protects in one walk, which may catch
/// a store made after its sync): no store is lost — the parent and a fork taken afterwards
/// hold the last value of every word — and the stores after the last clean are dirty.
#[test]
fn clean_racing_stores_loses_none() {
    for mode in modes() {
        let a = arena(mode);
        let len = 4 << 20;
        let pages = len / PAGE;
        let root = a.space(len).unwrap();
        drop(root.fork().unwrap()); // freeze: later reads map read-only copies
        let base = root.as_mut_ptr() as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                let order = shuffled(pages, 11);
                let mut r = 0u64;
                while !stop.load(Ordering::Relaxed) || r < 3 {
                    r += 1;
                    for &p in &order {
                        let at = (base + p * PAGE) as *mut u64;
                        // SAFETY: inside the root's view, which outlives the thread; only
                        // this thread accesses these words.
                        unsafe {
                            assert_eq!(at.read_volatile(), r - 1, "page {p} lost a store");
                            at.write_volatile(r);
                        }
                    }
                    rounds.store(r, Ordering::Release);
                }
                r
            })
        };
        let mut cleans = 0;
        let t0 = std::time::Instant::now();
        while rounds.load(Ordering::Acquire) < 6 || t0.elapsed() < std::time::Duration::from_millis(400) {
            root.clean(0, len).unwrap();
            cleans += 1;
            if cleans % 4 == 0 {
                // A freeze: the writer's next accesses map read-only copies again, whose
                // stores the next cleans race.
                drop(root.fork().unwrap());
            }
        }
        stop.store(true, Ordering::Relaxed);
        let last = writer.join().expect("writer");
        let child = root.fork().unwrap();
        for p in 0..pages {
            let at = p * PAGE;
            let want = last.to_ne_bytes();
            assert_eq!(&root.as_slice()[at..at + 8], &want, "{mode:?}: parent page {p}");
            assert_eq!(&child.as_slice()[at..at + 8], &want, "{mode:?}: fork page {p}");
        }
        a.check_invariants().unwrap();
        println!("{mode:?}: {cleans} cleans raced {last} rounds of stores");
    }
}

/// The first `clean` of a never-forked (plain) space adopts it in place: no freeze, written
/// pages stay mapped as homes, pages only read (the kernel's zero page) stay mapped as
/// zeros, holes stay holes; afterwards stores to all three kinds are tracked exactly.
#[test]
fn clean_adopts_a_plain_space_in_place() {
    for mode in modes() {
        let a = arena(mode);
        let len = 3 * TABLE;
        let pages = len / PAGE;
        let mut s = a.space(len).unwrap();
        let mut want = vec![0u8; len];
        let mut sum = 0u64;
        for p in 0..pages {
            match p % 3 {
                0 => {
                    s.as_mut_slice()[p * PAGE + 5] = (p % 251) as u8 + 1;
                    want[p * PAGE + 5] = (p % 251) as u8 + 1;
                }
                // SAFETY: inside the view; a read maps the kernel's zero page.
                1 => sum += unsafe { (s.as_ptr().add(p * PAGE) as *const u64).read_volatile() },
                _ => {} // a hole
            }
        }
        assert_eq!(sum, 0);
        let before = a.stats();
        let cleaned = s.clean(0, len).unwrap();
        let after = a.stats();
        assert_eq!(cleaned, (0..pages).step_by(3).collect::<Vec<_>>(), "{mode:?}: the written pages are dirty");
        assert_eq!(after.freezes, before.freezes, "{mode:?}: adopted by freezing");
        assert_eq!(after.pages_adopted - before.pages_adopted, pages.div_ceil(3) as u64, "{mode:?}");
        a.check_invariants().unwrap();
        // Reads of all three kinds fault only for holes.
        let r0 = after.faults.read_copy + after.faults.read_zero;
        assert_space_is(&s, &want, &format!("{mode:?} after adoption"));
        let r1 = a.stats().faults.read_copy + a.stats().faults.read_zero;
        assert!(r1 - r0 <= pages as u64 / 3, "{mode:?}: {} read faults for {} holes", r1 - r0, pages / 3);
        // A store to a written page, a zero page and a hole: exactly those are dirty.
        let targets = [3 * 7, 3 * 7 + 1, 3 * 7 + 2, 3 * 300, 3 * 300 + 1, 3 * 300 + 2];
        for &p in &targets {
            s.as_mut_slice()[p * PAGE + 100] = 0xee;
            want[p * PAGE + 100] = 0xee;
        }
        assert_eq!(s.dirty_pages(0, len).unwrap(), targets.to_vec(), "{mode:?}");
        assert_eq!(s.clean(0, len).unwrap(), targets.to_vec(), "{mode:?}");
        assert!(s.dirty_pages(0, len).unwrap().is_empty());
        let child = s.fork().unwrap();
        assert_space_is(&child, &want, &format!("{mode:?} fork"));
        assert_space_is(&s, &want, &format!("{mode:?} parent"));
        a.check_invariants().unwrap();
        drop((s, child));
        assert_nothing_left(&a, &format!("{mode:?}"));
    }
}

/// The in-place adoption of a plain space by `clean` races a thread storing to it (first
/// round: even pages written, odd pages only read, i.e. mapped to the kernel's zero page;
/// later rounds: every page written): no store is lost, in the space or in a fork after.
#[test]
fn in_place_adoption_racing_stores_loses_none() {
    for mode in modes() {
        let a = arena(mode);
        let len = 2 * TABLE;
        let pages = len / PAGE;
        let mut adoptions = 0;
        for trial in 0..12u64 {
            let space = a.space(len).unwrap();
            let base = space.as_mut_ptr() as usize;
            let stop = Arc::new(AtomicBool::new(false));
            let rounds = Arc::new(AtomicU64::new(0));
            let writer = {
                let (stop, rounds) = (stop.clone(), rounds.clone());
                std::thread::spawn(move || {
                    let order = shuffled(pages, 31 + trial);
                    let mut r = 0u64;
                    while !stop.load(Ordering::Relaxed) || r < 3 {
                        r += 1;
                        for &p in &order {
                            let at = (base + p * PAGE) as *mut u64;
                            let prev = if p % 2 == 1 && r <= 2 { 0 } else { r - 1 };
                            // SAFETY: inside the space's view, which outlives the thread;
                            // only this thread accesses these words.
                            unsafe {
                                assert_eq!(at.read_volatile(), prev, "page {p} lost a store (round {r})");
                                if p % 2 == 0 || r > 1 {
                                    at.write_volatile(r);
                                }
                            }
                        }
                        rounds.store(r, Ordering::Release);
                    }
                    r
                })
            };
            // Adopt while the writer is in its first or second round.
            while rounds.load(Ordering::Acquire) < (trial % 2) {
                std::hint::spin_loop();
            }
            let before = a.stats().adoptions;
            space.clean(0, len).unwrap();
            adoptions += a.stats().adoptions - before;
            while rounds.load(Ordering::Acquire) < 4 {
                std::thread::yield_now();
            }
            space.clean(0, len).unwrap();
            stop.store(true, Ordering::Relaxed);
            let last = writer.join().expect("writer");
            let child = space.fork().unwrap();
            for p in 0..pages {
                let want = last.to_ne_bytes();
                let at = p * PAGE;
                assert_eq!(&space.as_slice()[at..at + 8], &want, "{mode:?} trial {trial}: page {p}");
                assert_eq!(&child.as_slice()[at..at + 8], &want, "{mode:?} trial {trial}: fork page {p}");
            }
            a.check_invariants().unwrap();
        }
        assert_eq!(adoptions, 12, "{mode:?}: each clean of a fresh space adopts it");
    }
}

/// A fork of a view holding few homes (pages written since the last fork) keeps it warm:
/// the homes move to pool slots and the view keeps read-only copies, so the parent reads
/// them again with no fault and its next stores are the kernel's alone — while the child
/// keeps the fork-time bytes. Many homes, or `ForkStrategy::Freeze`, freeze the view.
#[test]
fn forks_keep_a_view_with_few_homes_warm() {
    for mode in modes() {
        let a = arena(mode);
        let len = 2 * TABLE;
        let mut p = a.space(len).unwrap();
        // First fork: adopts the plain space (it freezes); from now on the view is ours.
        p.as_mut_slice()[0] = 1;
        drop(p.fork().unwrap());
        // 100 pages written in random order: few, so the next fork evacuates them.
        let pages: Vec<usize> = shuffled(len / PAGE, 9).into_iter().take(100).collect();
        for (i, &pg) in pages.iter().enumerate() {
            p.as_mut_slice()[pg * PAGE + 7] = i as u8 + 2;
        }
        let mut want = p.as_slice().to_vec();
        let before = a.stats();
        let c = p.fork_with(ForkStrategy::Auto).unwrap();
        let s = a.stats();
        assert_eq!(s.freezes, before.freezes, "{mode:?}: a fork of a view with 100 homes froze it");
        assert_eq!(s.frames_rehomed - before.frames_rehomed, 100, "{mode:?}: homes evacuated");
        a.check_invariants().unwrap();
        // The parent reads its pages again without a fault: the view stayed mapped.
        let reads = a.stats().faults;
        assert!(p.as_slice() == &want[..], "{mode:?}: parent after the fork");
        let after = a.stats().faults;
        assert_eq!((after.read_copy, after.read_zero), (reads.read_copy, reads.read_zero), "{mode:?}");
        // Its stores to those pages: no trap, tracked exactly, the child unchanged.
        let mut before_clean: Vec<usize> =
            pages.iter().copied().chain([0]).collect::<BTreeSet<_>>().into_iter().collect();
        let mut cleaned = p.clean(0, len).unwrap();
        cleaned.sort_unstable();
        before_clean.sort_unstable();
        assert_eq!(cleaned, before_clean, "{mode:?}: dirty before the clean");
        let fork_time = want.clone();
        let again: Vec<usize> = pages.iter().copied().step_by(3).collect();
        for &pg in &again {
            p.as_mut_slice()[pg * PAGE + 9] = 0xAB;
            want[pg * PAGE + 9] = 0xAB;
        }
        let mut dirty = again.clone();
        dirty.sort_unstable();
        assert_eq!(p.dirty_pages(0, len).unwrap(), dirty, "{mode:?}: dirty since the clean");
        assert!(p.as_slice() == &want[..], "{mode:?}: parent after its writes");
        assert!(c.as_slice() == &fork_time[..], "{mode:?}: child keeps the fork-time bytes");
        let mut back = vec![0u8; len];
        c.read(0, &mut back).unwrap();
        assert!(back == fork_time, "{mode:?}: child through the API");
        // The next fork records those stores (one each) and keeps the view warm again.
        let w0 = a.stats().writes_async;
        let c2 = p.fork().unwrap();
        assert_eq!(a.stats().writes_async - w0, again.len() as u64, "{mode:?}: stores recorded at the fork");
        assert_eq!(a.stats().freezes, before.freezes, "{mode:?}");
        assert!(c2.as_slice() == &want[..], "{mode:?}: second child");
        assert!(c.as_slice() == &fork_time[..], "{mode:?}: first child after the second fork");
        // Freeze asked for: frozen.
        p.as_mut_slice()[PAGE] = 3;
        drop(p.fork_with(ForkStrategy::Freeze).unwrap());
        assert_eq!(a.stats().freezes, before.freezes + 1, "{mode:?}: Freeze");
        // Many homes (more than max(256, pages/256)): frozen.
        for pg in 0..300 {
            p.as_mut_slice()[pg * PAGE] = 4;
        }
        drop(p.fork_with(ForkStrategy::KeepWarm).unwrap());
        assert_eq!(a.stats().freezes, before.freezes + 2, "{mode:?}: 300 homes");
        a.check_invariants().unwrap();
        drop((c, c2, p));
        assert_nothing_left(&a, "forks_keep_a_view_with_few_homes_warm");
    }
}
