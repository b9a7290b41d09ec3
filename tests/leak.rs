//! Leaks (issue 2, invariant 5): after every space drops — in varied orders, across
//! threads — frames, tables, views and frozen regions in use are zero, and the memory goes
//! back to the OS (RSS falls after a 256 MiB write-fork-drop cycle).

mod common;

use std::sync::Mutex;

use common::{assert_nothing_left, rss_bytes, Rng, PAGE, TABLE};
use cowarena::{Arena, FaultMode, Space};

/// RSS is per process: keep this file's tests from overlapping.
static SERIAL: Mutex<()> = Mutex::new(());

fn family(arena: &Arena, rng: &mut Rng) -> Vec<Space> {
    let mut v = vec![arena.space(3 * TABLE + 5 * PAGE + 99).unwrap()];
    v[0].as_mut_slice().iter_mut().step_by(PAGE / 2).for_each(|b| *b = 1);
    for _ in 0..12 {
        let i = rng.below(v.len());
        let c = v[i].fork().unwrap();
        v.push(c);
        let j = rng.below(v.len());
        let (off, n) = rng.span(v[j].len());
        let mut data = vec![0u8; n];
        rng.fill(&mut data);
        v[j].write(off, &data).unwrap();
        if rng.chance(1, 2) {
            let off = rng.offset(v[j].len());
            v[j].as_mut_slice()[off] = 9;
        }
    }
    // Read faults everywhere, so that views hold read-only copies too.
    for s in &v {
        let _ = s.as_slice().iter().step_by(PAGE).fold(0u8, |a, b| a ^ b);
    }
    v
}

#[test]
fn drops_in_every_order_leave_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let arena = Arena::builder().fault_mode(mode).build().unwrap();
        for seed in 0..12u64 {
            let mut rng = Rng::new(seed);
            let mut v = family(&arena, &mut rng);
            match seed % 3 {
                0 => v.reverse(), // children first
                1 => {}           // parents first
                _ => {
                    while !v.is_empty() {
                        let i = rng.below(v.len());
                        drop(v.swap_remove(i));
                        arena.check_invariants().unwrap();
                    }
                }
            }
            drop(v);
            assert_nothing_left(&arena, &format!("{mode:?} seed {seed}"));
        }
    }
}

#[test]
fn drops_across_threads_leave_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let arena = Arena::new().unwrap();
    for round in 0..6u64 {
        let mut rng = Rng::new(1000 + round);
        let mut v = family(&arena, &mut rng);
        // Deal the family out to four threads, which write their spaces and drop them in
        // their own orders at the same time.
        let mut hands: Vec<Vec<Space>> = (0..4).map(|_| Vec::new()).collect();
        while let Some(s) = v.pop() {
            hands[rng.below(4)].push(s);
        }
        std::thread::scope(|sc| {
            for (t, mut hand) in hands.into_iter().enumerate() {
                sc.spawn(move || {
                    let mut rng = Rng::new(round * 10 + t as u64);
                    for s in &mut hand {
                        let off = rng.offset(s.len());
                        s.as_mut_slice()[off] = 1;
                    }
                    while !hand.is_empty() {
                        let i = rng.below(hand.len());
                        let s = hand.swap_remove(i);
                        if rng.chance(1, 3) {
                            // a last fork, dropped at once
                            drop(s.fork().unwrap());
                        }
                        drop(s);
                    }
                });
            }
        });
        assert_nothing_left(&arena, &format!("cross-thread round {round}"));
    }
}

#[test]
fn rss_falls_back_after_256mib_cycle() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const LEN: usize = 256 << 20;
    const SLACK: u64 = 48 << 20;
    let arena = Arena::new().unwrap();
    let before = rss_bytes();
    let peak;
    {
        let mut a = arena.space(LEN).unwrap();
        for (i, page) in a.as_mut_slice().chunks_mut(PAGE).enumerate() {
            page.fill(i as u8 | 1);
        }
        let mut b = a.fork().unwrap();
        // Write half of the child (copy-on-write) and a quarter of the parent.
        for page in b.as_mut_slice()[..LEN / 2].chunks_mut(PAGE) {
            page[0] = 0;
        }
        for page in a.as_mut_slice()[LEN / 2..LEN / 2 + LEN / 4].chunks_mut(PAGE) {
            page[1] = 0;
        }
        let c = b.fork().unwrap();
        assert_eq!(c.as_slice()[LEN - 1], ((LEN - 1) / PAGE) as u8 | 1);
        peak = rss_bytes();
        assert!(peak > before + (LEN as u64) / 2, "the cycle did not populate memory? rss {before} -> {peak}");
        drop(a);
        drop(c);
        drop(b);
    }
    assert_nothing_left(&arena, "256 MiB cycle");
    let after = rss_bytes();
    println!("RSS: before {} MiB, peak {} MiB, after {} MiB", before >> 20, peak >> 20, after >> 20);
    assert!(
        after <= before + SLACK,
        "RSS did not fall back: before {} MiB, peak {} MiB, after {} MiB (slack {} MiB)",
        before >> 20,
        peak >> 20,
        after >> 20,
        SLACK >> 20
    );
    drop(arena);
}
