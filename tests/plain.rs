//! Plain spaces (`ArenaBuilder::plain_until_fork`, the default): a never-forked space is
//! kernel memory; its first fork (each strategy), `clean` or `clear_referenced` adopts the
//! pages written so far. Checked against a reference `Vec<u8>`, with exact dirty tracking,
//! under concurrent writers, and through every API call on a plain space.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{assert_space_is, Rng};
use cowarena::{Arena, FaultMode, ForkStrategy};

const PAGE: usize = 4096;
const TABLE: usize = 2 << 20;

fn modes() -> [FaultMode; 2] {
    [FaultMode::Signal, FaultMode::Thread]
}

/// Random pages written (and others only read) through the view of a plain space, then
/// forked with each strategy: both sides hold the bytes, only written pages were adopted,
/// dirty tracking is exact, and later writes on either side stay private.
#[test]
fn first_fork_of_a_plain_space_with_each_strategy() {
    for mode in modes() {
        for strategy in [ForkStrategy::Auto, ForkStrategy::Freeze, ForkStrategy::KeepWarm] {
            for (dense, seed) in [(false, 1u64), (true, 2)] {
                let what = format!("{mode:?} {strategy:?} dense={dense}");
                let arena = Arena::builder().fault_mode(mode).build().unwrap();
                let len = 3 * TABLE + 5 * PAGE + 123;
                let pages = len.div_ceil(PAGE);
                let mut s = arena.space(len).unwrap();
                let mut model = vec![0u8; len];
                let mut rng = Rng::new(seed);
                let mut written = std::collections::BTreeSet::new();
                let n = if dense { pages * 3 / 4 } else { 40 };
                for _ in 0..n {
                    let p = rng.below(pages);
                    let off = (p * PAGE + rng.below(PAGE)).min(len - 1);
                    let v = 1 + rng.below(255) as u8;
                    s.as_mut_slice()[off] = v;
                    model[off] = v;
                    written.insert(off / PAGE);
                }
                // Reads of never-written pages map the kernel's zero page: not "written".
                for _ in 0..20 {
                    let p = rng.below(pages);
                    assert_eq!(std::hint::black_box(s.as_slice()[p * PAGE]), model[p * PAGE]);
                }
                let want: Vec<usize> = written.iter().copied().collect();
                assert_eq!(s.dirty_pages(0, len).unwrap(), want, "{what}: plain dirty");
                assert_eq!(arena.stats().plain_spaces, 1);

                let mut c = s.fork_with(strategy).unwrap();
                let st = arena.stats();
                assert_eq!((st.plain_spaces, st.adoptions, st.pages_adopted), (0, 1, want.len() as u64), "{what}");
                assert_eq!(st.frames_in_use, want.len() as u64, "{what}: a frame per written page");
                arena.check_invariants().unwrap();
                assert_space_is(&s, &model, &format!("{what}: parent after fork"));
                assert_space_is(&c, &model, &format!("{what}: child after fork"));
                assert_eq!(s.dirty_pages(0, len).unwrap(), want, "{what}: parent dirty after adoption");
                assert_eq!(c.dirty_pages(0, len).unwrap(), want, "{what}: child inherits dirty");

                // Writes after the fork are private to each side, including to pages that
                // were only read (zero-page mappings) before the adoption.
                let mut cm = model.clone();
                for k in 0..64 {
                    let p = rng.below(pages);
                    let off = (p * PAGE + k).min(len - 1);
                    s.as_mut_slice()[off] = 0xA0;
                    model[off] = 0xA0;
                    let q = rng.below(pages);
                    let off = (q * PAGE + k).min(len - 1);
                    c.write(off, &[0xC0]).unwrap();
                    cm[off] = 0xC0;
                }
                assert_space_is(&s, &model, &format!("{what}: parent after writes"));
                assert_space_is(&c, &cm, &format!("{what}: child after writes"));
                arena.check_invariants().unwrap();
                drop(c);
                drop(s);
                assert!(arena.stats().is_idle(), "{what}: {:?}", arena.stats());
            }
        }
    }
}

/// Every API call on a plain space: reads and writes go to the kernel's memory, populate
/// populates, discard zeroes, migrate has nothing to move, referenced and dirty_pages come
/// from the kernel's page tables, clean and clear_referenced adopt first.
#[test]
fn api_calls_on_a_plain_space() {
    for mode in modes() {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        let len = TABLE + 3 * PAGE;
        let mut s = arena.space(len).unwrap();
        s.write(PAGE - 2, b"across").unwrap();
        s.as_mut_slice()[5 * PAGE] = 5;
        let mut buf = [0u8; 6];
        s.read(PAGE - 2, &mut buf).unwrap();
        assert_eq!(&buf, b"across");
        s.populate(10 * PAGE, 2 * PAGE, true).unwrap(); // written (MADV_POPULATE_WRITE)
        s.populate(20 * PAGE, PAGE, false).unwrap(); // read: zero page, not written
        assert_eq!(s.dirty_pages(0, len).unwrap(), vec![0, 1, 5, 10, 11]);
        assert_eq!(s.referenced(0, len).unwrap(), vec![0, 1, 5, 10, 11, 20]);
        assert_eq!(s.migrate(0, len).unwrap(), 0, "a plain space has no frames to migrate");
        s.discard(0, PAGE).unwrap();
        assert_eq!(&s.as_slice()[PAGE - 2..PAGE + 4], b"\0\0ross");
        assert_eq!(s.dirty_pages(0, len).unwrap(), vec![1, 5, 10, 11]);
        assert_eq!(arena.stats().plain_spaces, 1);

        // clean adopts, returns what was written, and from then on tracks writes.
        assert_eq!(s.clean(0, len).unwrap(), vec![1, 5, 10, 11], "{mode:?}");
        assert_eq!(arena.stats().plain_spaces, 0);
        assert_eq!(s.dirty_pages(0, len).unwrap(), Vec::<usize>::new());
        s.as_mut_slice()[7 * PAGE] = 7;
        s.as_mut_slice()[5 * PAGE + 1] = 6;
        assert_eq!(s.dirty_pages(0, len).unwrap(), vec![5, 7]);
        assert_eq!(s.as_slice()[5 * PAGE], 5);
        arena.check_invariants().unwrap();

        // clear_referenced on another plain space adopts it too.
        let mut t = arena.space(4 * PAGE).unwrap();
        t.as_mut_slice()[2 * PAGE] = 2;
        assert_eq!(t.clear_referenced(0, 4 * PAGE).unwrap(), 1);
        assert_eq!(t.referenced(0, 4 * PAGE).unwrap(), Vec::<usize>::new());
        // (Page 2's bytes now live in the view, adopted in place: as for any page written
        // since the last fork, its next write is seen, reads are not — DESIGN.md, aging.)
        t.as_mut_slice()[2 * PAGE] = 3;
        assert_eq!(t.referenced(0, 4 * PAGE).unwrap(), vec![2], "{mode:?}: a write after the clear is seen");
        arena.check_invariants().unwrap();
    }
}

/// Writer threads store increasing counters into their own pages of a plain space while
/// the main thread forks it (the first fork adopts; stores race the registration, the
/// freeze and the scan). No store may be lost: at the end every page holds its writer's
/// last value, and every child holds, for each page, a value its writer had stored.
#[test]
fn concurrent_stores_survive_the_adopting_fork() {
    const THREADS: usize = 2;
    const PAGES: usize = 1024; // 4 MiB: two tables
    for mode in modes() {
        for strategy in [ForkStrategy::Auto, ForkStrategy::Freeze, ForkStrategy::KeepWarm] {
            let arena = Arena::builder().fault_mode(mode).build().unwrap();
            let space = arena.space(PAGES * PAGE).unwrap();
            let base = space.as_mut_ptr() as usize;
            let stop = Arc::new(AtomicBool::new(false));
            let last: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
            let writers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (stop, last) = (stop.clone(), last.clone());
                    std::thread::spawn(move || {
                        let mut v = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            v += 1;
                            // Pages t, t+THREADS, ...: a few at a time, half of them fresh.
                            for p in (t..PAGES).step_by(THREADS).skip((v as usize * 7) % 64).step_by(37) {
                                // SAFETY: inside the view; only this thread writes page p, and
                                // only through this raw pointer (no reference is alive).
                                unsafe { ((base + p * PAGE) as *mut u64).write_volatile(v) };
                                last[p].store(v, Ordering::Relaxed);
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(5));
            let mut children = Vec::new();
            for _ in 0..4 {
                children.push(space.fork_with(strategy).unwrap());
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
            stop.store(true, Ordering::Relaxed);
            for w in writers {
                w.join().unwrap();
            }
            let what = format!("{mode:?} {strategy:?}");
            assert_eq!(arena.stats().adoptions, 1, "{what}");
            for p in 0..PAGES {
                // SAFETY: inside the view; the writers have stopped.
                let got = unsafe { ((base + p * PAGE) as *const u64).read_volatile() };
                assert_eq!(got, last[p].load(Ordering::Relaxed), "{what}: page {p} lost a store");
            }
            for (k, c) in children.iter().enumerate() {
                for p in 0..PAGES {
                    let mut b = [0u8; 8];
                    c.read(p * PAGE, &mut b).unwrap();
                    let got = u64::from_ne_bytes(b);
                    assert!(
                        got <= last[p].load(Ordering::Relaxed),
                        "{what}: child {k} page {p} holds {got}, never stored"
                    );
                    let view = u64::from_ne_bytes(c.as_slice()[p * PAGE..p * PAGE + 8].try_into().unwrap());
                    assert_eq!(view, got, "{what}: child {k} page {p}: view and API differ");
                }
            }
            arena.check_invariants().unwrap();
            drop(children);
            drop(space);
            assert!(arena.stats().is_idle(), "{what}");
        }
    }
}

/// A memory limit counts what the arena makes resident; plain pages are the kernel's, so
/// a limited arena registers every view from the start. So does `plain_until_fork(false)`.
#[test]
fn limited_or_opted_out_arenas_register_from_the_start() {
    for arena in [
        Arena::builder().max_memory(64 << 20).build().unwrap(),
        Arena::builder().plain_until_fork(false).build().unwrap(),
    ] {
        let mut s = arena.space(TABLE).unwrap();
        s.as_mut_slice()[0] = 1;
        let st = arena.stats();
        assert_eq!((st.plain_spaces, st.frames_in_use, st.faults.write_zero), (0, 1, 1));
    }
}
