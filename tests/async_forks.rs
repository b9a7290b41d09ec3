//! Forks with async-WP views beside trapping roots (`ArenaBuilder::async_forks`, the
//! default on Linux 6.7+): a fork's stores to read-only pages take no user-space fault,
//! while the root keeps its pages write-protected in place at a fork — one family, two
//! userfaultfds. Contents, dirty tracking, grandchildren, resets, pins and drops stay exact.
//! Each test runs in both fault modes.

mod common;

use std::collections::BTreeSet;

use common::{assert_nothing_left, assert_space_is, Rng};
use cowarena::{Arena, Error, FaultMode, ForkStrategy};

const PAGE: usize = 4096;
const TABLE: usize = 2 << 20;

fn modes() -> [FaultMode; 2] {
    [FaultMode::Signal, FaultMode::Thread]
}

fn arena(mode: FaultMode) -> Option<Arena> {
    match Arena::builder().fault_mode(mode).async_forks(true).build() {
        Ok(a) => Some(a),
        Err(Error::MissingFeature { feature, kernel }) => {
            eprintln!("skipped: async forks need {feature} (Linux 6.7+), kernel {kernel}");
            None
        }
        Err(e) => panic!("arena: {e}"),
    }
}

fn byte_of(p: usize, round: u8) -> u8 {
    (p as u8).wrapping_mul(31).wrapping_add(round)
}

/// A fork reads every page (mapped read-only copies), then stores to some at random: the
/// stores cost no trap, the fork's `dirty_pages` lists exactly them, and the root — still
/// warm, written in place — never sees them; the root's own writes after the fork trap
/// as before and stay out of the fork.
#[test]
fn fork_stores_are_the_kernels_and_exactly_tracked() {
    for mode in modes() {
        let Some(arena) = arena(mode) else { return };
        assert!(arena.async_forks() && !arena.async_wp());
        let len = 4 * TABLE;
        let pages = len / PAGE;
        let mut root = arena.space(len).unwrap();
        let mut want_root: Vec<u8> = (0..len).map(|i| byte_of(i / PAGE, 0)).collect();
        root.as_mut_slice().copy_from_slice(&want_root);
        // A first fork adopts the root as a trapping view (a clean of a never-forked root
        // would hand its tracking to the kernel: `cleaned_roots_are_tracked_by_the_kernel`);
        // the clean then keeps the fork's dirty list to its own stores.
        drop(root.fork_with(ForkStrategy::KeepWarm).unwrap());
        root.clean(0, len).unwrap(); // (a fork inherits its parent's dirty bits)
        let frozen = arena.stats().frozen_regions;
        let mut child = root.fork_with(ForkStrategy::KeepWarm).unwrap();
        assert_eq!(arena.stats().frozen_regions, frozen, "{mode:?}: the root keeps its pages in place");
        // Read every page of the fork: read-only copies (dense fills after the first ones).
        let sum: u64 = child.as_slice().iter().step_by(PAGE).map(|&b| u64::from(b)).sum();
        std::hint::black_box(sum);
        let before = arena.stats();
        let mut rng = Rng::new(0xa5f0);
        let mut written = BTreeSet::new();
        let mut want_child = want_root.clone();
        for _ in 0..300 {
            let p = rng.below(pages);
            written.insert(p);
            child.as_mut_slice()[p * PAGE + 7] = 0xEE;
            want_child[p * PAGE + 7] = 0xEE;
        }
        let traps = arena.stats().faults.write_cow + arena.stats().faults.write_reuse
            - before.faults.write_cow
            - before.faults.write_reuse;
        assert_eq!(traps, 0, "{mode:?}: stores to a fork's read-only copies take no fault");
        assert_eq!(
            child.dirty_pages(0, len).unwrap(),
            written.iter().copied().collect::<Vec<_>>(),
            "{mode:?}: exactly the pages stored to"
        );
        // The root writes after the fork: trapped, copied away from the fork's frames.
        for p in (0..pages).step_by(97) {
            root.as_mut_slice()[p * PAGE] = 0x11;
            want_root[p * PAGE] = 0x11;
        }
        assert_space_is(&child, &want_child, "fork after its stores and the root's");
        assert_space_is(&root, &want_root, "root");
        // A grandchild sees the fork's stores (recorded by its fork's sync).
        let grand = child.fork().unwrap();
        assert_space_is(&grand, &want_child, "grandchild");
        arena.check_invariants().unwrap();
        assert!(arena.stats().writes_async >= written.len() as u64, "{mode:?}: {:?}", arena.stats());
        drop((root, child, grand));
        assert_nothing_left(&arena, "fork_stores_are_the_kernels_and_exactly_tracked");
    }
}

/// The fuzzer's loop on a fork: random stores, then `reset_to` the root, hundreds of
/// times; every byte comes back and nothing is left dirty — as in an arena whose forks
/// trap (the same loop, for comparison).
#[test]
fn reset_loop_of_a_fork_restores_every_byte() {
    for (mode, async_forks) in modes().into_iter().flat_map(|m| [(m, true), (m, false)]) {
        let Some(arena) = arena(mode) else { return };
        let arena =
            if async_forks { arena } else { Arena::builder().fault_mode(mode).async_forks(false).build().unwrap() };
        let len = 2 * TABLE + 3 * PAGE;
        let pages = len.div_ceil(PAGE);
        let mut root = arena.space(len).unwrap();
        let mut pristine = vec![0u8; len];
        Rng::new(3).fill(&mut pristine[..len / 2]); // half written, half never
        root.as_mut_slice().copy_from_slice(&pristine);
        root.clean(0, len).unwrap();
        let mut work = root.fork().unwrap();
        let mut rng = Rng::new(0xf022);
        for round in 0..400 {
            for _ in 0..16 {
                let p = rng.below(pages);
                let at = p * PAGE + rng.below(PAGE.min(len - p * PAGE));
                if round % 3 == 0 {
                    work.write(at, &[round as u8 | 1]).unwrap();
                } else {
                    let _ = std::hint::black_box(work.as_slice()[at]);
                    work.as_mut_slice()[at] = round as u8 | 1;
                }
            }
            work.reset_to(&root).unwrap();
            if round % 50 == 0 {
                assert_space_is(&work, &pristine, "fork after reset");
                let dirty = work.dirty_pages(0, len).unwrap();
                assert!(dirty.is_empty(), "{mode:?} async_forks={async_forks}: dirty after a reset: {dirty:?}");
            }
        }
        assert_space_is(&work, &pristine, "fork after the last reset");
        assert_space_is(&root, &pristine, "root");
        arena.check_invariants().unwrap();
        drop((root, work));
        assert_nothing_left(&arena, "reset_loop_of_a_fork_restores_every_byte");
    }
}

/// Pins: a root can pin (its view traps); a fork cannot (its forks must move every written
/// page), and the error names the builder switch.
#[test]
fn pins_on_roots_work_and_on_forks_are_refused_with_the_remedy() {
    for mode in modes() {
        let Some(arena) = arena(mode) else { return };
        let mut root = arena.space(TABLE).unwrap();
        root.write(0, &[5; PAGE]).unwrap();
        let pin = root.pin(0, PAGE).unwrap();
        let child = root.fork().unwrap();
        drop(pin);
        match child.pin(0, PAGE) {
            Err(Error::Unsupported { what: "Space::pin", why }) => {
                assert!(why.contains("async_forks(false)"), "{mode:?}: the message names the switch: {why}");
            }
            other => panic!("{mode:?}: pinning a fork in an async-forks arena: {:?}", other.map(|_| ())),
        }
        let trapping = Arena::builder().fault_mode(mode).async_forks(false).build().unwrap();
        let mut r2 = trapping.space(TABLE).unwrap();
        r2.write(0, &[6; PAGE]).unwrap();
        let c2 = r2.fork().unwrap();
        drop(c2.pin(0, PAGE).expect("a trapping fork pins"));
    }
}

/// `clean` of a never-forked root hands its dirty tracking to the kernel (the view is
/// adopted in place into an async-WP one): stores to its written pages after the clean
/// take no trap, and `dirty_pages`/`clean` list exactly the pages stored to — also stores
/// to never-written pages (traps: a zero fill) and across forks of every strategy, whose
/// bytes stay the fork-time ones. Such a root cannot pin (it is async-WP); one adopted by
/// a fork first stays trapping.
#[test]
fn cleaned_roots_are_tracked_by_the_kernel() {
    for mode in modes() {
        let Some(arena) = arena(mode) else { return };
        let len = 4 * TABLE;
        let pages = len / PAGE;
        let written_pages = 3 * TABLE / PAGE; // the last table never written before the clean
        let mut root = arena.space(len).unwrap();
        let mut want: Vec<u8> = (0..len).map(|i| if i < 3 * TABLE { byte_of(i / PAGE, 0) } else { 0 }).collect();
        root.as_mut_slice()[..3 * TABLE].copy_from_slice(&want[..3 * TABLE]);
        assert_eq!(root.clean(0, len).unwrap(), (0..written_pages).collect::<Vec<_>>(), "{mode:?}: first clean");
        assert_eq!(root.dirty_pages(0, len).unwrap(), Vec::<usize>::new(), "{mode:?}");
        let mut rng = Rng::new(0x7ac4 ^ mode as u64);
        let mut strategies = [ForkStrategy::Auto, ForkStrategy::KeepWarm, ForkStrategy::Freeze].into_iter().cycle();
        let mut forks = Vec::new();
        for round in 1..=6u8 {
            let before = arena.stats();
            let mut stored = BTreeSet::new();
            for _ in 0..200 {
                let p = rng.below(written_pages);
                stored.insert(p);
                root.as_mut_slice()[p * PAGE + usize::from(round)] = round;
                want[p * PAGE + usize::from(round)] = round;
            }
            let s = arena.stats();
            let traps = s.faults.write_cow + s.faults.write_reuse + s.faults.write_zero
                - before.faults.write_cow
                - before.faults.write_reuse
                - before.faults.write_zero;
            // (After a freezing fork the root re-faults what it touches: a read-only copy
            // first, then its stores are the kernel's too; a store to an unmapped page
            // traps once.)
            if round == 1 {
                assert_eq!(traps, 0, "{mode:?}: stores to a cleaned root's pages take no fault");
            }
            // A few stores to the never-written table: zero fills, tracked as well.
            for k in 0..3 {
                let p = written_pages + rng.below(pages - written_pages);
                stored.insert(p);
                root.as_mut_slice()[p * PAGE + k] = 0xA0 + round;
                want[p * PAGE + k] = 0xA0 + round;
            }
            let stored: Vec<usize> = stored.into_iter().collect();
            assert_eq!(root.dirty_pages(0, len).unwrap(), stored, "{mode:?} round {round}: dirty_pages");
            if round % 2 == 0 {
                // A fork first: it records the stores (the root's dirty bits stay).
                let f = root.fork_with(strategies.next().unwrap()).unwrap();
                forks.push((f, want.clone()));
                assert_eq!(root.dirty_pages(0, len).unwrap(), stored, "{mode:?} round {round}: after a fork");
            }
            assert_eq!(root.clean(0, len).unwrap(), stored, "{mode:?} round {round}: clean lists the stores");
            assert_eq!(root.dirty_pages(0, len).unwrap(), Vec::<usize>::new(), "{mode:?} round {round}");
            assert_space_is(&root, &want, "cleaned root");
            for (f, bytes) in &forks {
                assert_space_is(f, bytes, "fork of a cleaned root");
            }
            arena.check_invariants().unwrap();
        }
        assert!(arena.stats().writes_async > 0, "{mode:?}: the kernel served the stores");
        match root.pin(0, PAGE) {
            Err(Error::Unsupported { what: "Space::pin", why }) => {
                assert!(why.contains("before its first fork"), "{mode:?}: the message says why: {why}");
            }
            other => panic!("{mode:?}: pinning a cleaned root: {:?}", other.map(|_| ())),
        }
        // Adopted by a fork first: trapping, and pins work.
        let mut other = arena.space(TABLE).unwrap();
        other.write(0, &[3; PAGE]).unwrap();
        drop(other.fork().unwrap());
        other.clean(0, TABLE).unwrap();
        drop(other.pin(0, PAGE).expect("a root adopted by a fork stays trapping and pins"));
        drop(other);
        drop(forks);
        drop(root);
        assert_nothing_left(&arena, "cleaned_roots_are_tracked_by_the_kernel");
    }
}

/// A chain of forks, each written a little and forked again (async-WP spaces forking:
/// their few written pages move to the pool, the view stays warm), then dropped in a
/// scrambled order: every generation keeps its bytes, and nothing leaks.
#[test]
fn chains_of_async_forks_keep_every_generation() {
    for mode in modes() {
        let Some(arena) = arena(mode) else { return };
        let len = TABLE + 5 * PAGE; // two tables, the second ragged
        let pages = len / PAGE;
        let mut root = arena.space(len).unwrap();
        root.write(0, &vec![1u8; len]).unwrap();
        let mut gens = vec![(root, vec![1u8; len])];
        let mut rng = Rng::new(0xc4a1);
        for g in 1..16u8 {
            let strategy = if g % 5 == 0 { ForkStrategy::Freeze } else { ForkStrategy::Auto };
            let (parent, parent_bytes) = gens.last().unwrap();
            let mut next = parent.fork_with(strategy).unwrap();
            let mut bytes = parent_bytes.clone();
            for _ in 0..20 {
                let p = rng.below(pages);
                next.as_mut_slice()[p * PAGE + usize::from(g)] = g;
                bytes[p * PAGE + usize::from(g)] = g;
            }
            gens.push((next, bytes));
        }
        for (s, bytes) in &gens {
            assert_space_is(s, bytes, "generation");
        }
        arena.check_invariants().unwrap();
        while !gens.is_empty() {
            let i = rng.below(gens.len());
            gens.remove(i);
            if gens.len() % 3 == 0 {
                for (s, bytes) in gens.iter().step_by(4) {
                    assert_space_is(s, bytes, "survivor");
                }
            }
        }
        assert_nothing_left(&arena, "chains_of_async_forks_keep_every_generation");
    }
}

/// A root forked with `ForkStrategy::Freeze` re-faults its working set after the fork, so
/// its (empty, frozen) view becomes async-WP too: its stores after the fork cost no trap
/// once its pages are read, its bytes and its forks' stay exact, and it can no longer pin.
/// An `Auto` or `KeepWarm` fork leaves it trapping.
#[test]
fn a_freezing_fork_makes_the_root_async_wp() {
    for mode in modes() {
        let Some(arena) = arena(mode) else { return };
        let len = 2 * TABLE;
        let pages = len / PAGE;
        let mut root = arena.space(len).unwrap();
        let mut want: Vec<u8> = (0..len).map(|i| byte_of(i / PAGE, 1)).collect();
        root.as_mut_slice().copy_from_slice(&want);
        let warm = root.fork_with(ForkStrategy::KeepWarm).unwrap();
        drop(root.pin(0, PAGE).expect("still trapping after a KeepWarm fork"));
        let snap = root.fork_with(ForkStrategy::Freeze).unwrap();
        assert!(root.pin(0, PAGE).is_err(), "{mode:?}: async-WP after a freezing fork");
        // Read every page back (copies), then store: the kernel's alone.
        let sum: u64 = root.as_slice().iter().step_by(PAGE).map(|&b| u64::from(b)).sum();
        std::hint::black_box(sum);
        let before = arena.stats().writes_async;
        for p in (0..pages).step_by(3) {
            root.as_mut_slice()[p * PAGE + 1] = 0x77;
            want[p * PAGE + 1] = 0x77;
        }
        let snap2 = root.fork().unwrap(); // syncs the stores
        assert!(arena.stats().writes_async > before, "{mode:?}: {:?}", arena.stats());
        assert_space_is(&root, &want, "root after the freezing fork");
        assert_space_is(&snap2, &want, "fork of the async root");
        let old: Vec<u8> = (0..len).map(|i| byte_of(i / PAGE, 1)).collect();
        assert_space_is(&snap, &old, "the freezing fork");
        assert_space_is(&warm, &old, "the warm fork");
        arena.check_invariants().unwrap();
        drop((root, warm, snap, snap2));
        assert_nothing_left(&arena, "a_freezing_fork_makes_the_root_async_wp");
    }
}

/// Stores right before a long `read` (streamed) or `write_to` of an async-WP view: a page
/// mapped by a fault-around fill still in flight (the lock released) takes the store
/// before the fill is committed, so its home is stale and the read must wait for the
/// fill. (Under load, `write_to` streamed a snapshot's byte for a page just stored to:
/// `tests/snapshot_io.rs` caught it with a stress test running beside; this one rarely
/// does on an idle machine.)
#[test]
fn long_reads_right_after_stores_see_them() {
    for mode in modes() {
        let Some(arena) = arena(mode) else { return };
        let len = 3 * TABLE + 1234;
        let mut root = arena.space(len).unwrap();
        let mut want = vec![0u8; len];
        Rng::new(0x10ad).fill(&mut want[..2 * TABLE]);
        root.as_mut_slice().copy_from_slice(&want);
        for round in 0..12u8 {
            let _snap = root.fork_with(ForkStrategy::Freeze).unwrap();
            for p in (usize::from(round % 5)..len / PAGE).step_by(5) {
                root.as_mut_slice()[p * PAGE + 3] = round | 0x80;
                want[p * PAGE + 3] = round | 0x80;
            }
            let mut back = vec![0u8; len];
            if round % 2 == 0 {
                root.read(0, &mut back).unwrap();
            } else {
                assert_eq!(root.write_to(&mut std::io::Cursor::new(&mut back[..])).unwrap() as usize, len);
            }
            common::assert_same(&back, &want, 0, &format_args!("{mode:?} round {round}"));
        }
    }
}
