//! Criterion micro-benchmarks of cowarena's hot paths: fork of a 64 MiB written space (with
//! nothing, 1 % and 100 % of its pages written since the last fork), one copy-on-write
//! fault, one read fault, and `Space::read` / `Space::write` of 4 KiB.
//!
//! ```text
//! cargo bench --bench hot_paths
//! cargo bench --bench hot_paths -- fault      # a subset
//! ```
//!
//! The workload benchmarks (W1–W5, with baselines) are `cargo run --release --example bench`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use cowarena::{Arena, Space};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const PAGE: usize = 4096;
const SIZE: usize = 64 << 20;
const PAGES: usize = SIZE / PAGE;

/// Stores `v` in the first word of page `p` of `s`'s view (a view fault when needed).
fn store(s: &Space, p: usize, v: u64) {
    assert!(p < s.len() / PAGE);
    // SAFETY: page `p` lies inside the view, which `s` keeps mapped; the word is aligned;
    // no reference into the view exists (the aliasing contract of `Space`).
    unsafe { std::ptr::write_volatile(s.as_mut_ptr().add(p * PAGE).cast::<u64>(), v) }
}

/// Loads the first word of page `p` of `s`'s view (a view fault when needed).
fn load(s: &Space, p: usize) -> u64 {
    assert!(p < s.len() / PAGE);
    // SAFETY: as in `store`; nothing writes the page concurrently.
    unsafe { std::ptr::read_volatile(s.as_ptr().add(p * PAGE).cast::<u64>()) }
}

/// A 64 MiB space with every page written.
fn written(arena: &Arena) -> Space {
    let s = arena.space(SIZE).expect("space");
    for p in 0..PAGES {
        store(&s, p, p as u64 | 1);
    }
    s
}

fn fork(c: &mut Criterion) {
    let arena = Arena::new().expect("arena");
    let parent = written(&arena);
    drop(parent.fork().expect("fork"));
    let mut g = c.benchmark_group("fork_64MiB_written");
    g.bench_function("nothing_written_since_last_fork", |b| {
        b.iter_with_large_drop(|| parent.fork().expect("fork"));
    });
    let mut next = 0usize;
    g.bench_function("1pct_written_since_last_fork", |b| {
        b.iter_batched(
            || {
                for _ in 0..PAGES / 100 {
                    next = (next + 4099) % PAGES;
                    store(&parent, next, next as u64);
                }
            },
            |()| parent.fork().expect("fork"),
            BatchSize::PerIteration,
        );
    });
    g.bench_function("all_written_since_last_fork", |b| {
        b.iter_batched(
            || {
                for p in 0..PAGES {
                    store(&parent, p, p as u64);
                }
            },
            |()| parent.fork().expect("fork"),
            BatchSize::PerIteration,
        );
    });
    g.finish();
}

/// Times `iters` faults, one per page of forks of a written parent; a new fork is taken
/// (untimed) whenever the current one has no unfaulted page left.
fn faults(c: &mut Criterion) {
    let arena = Arena::new().expect("arena");
    let parent = written(&arena);
    let mut g = c.benchmark_group("fault");
    let mut run = |name: &str, write: bool| {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let child = parent.fork().expect("fork");
                    let n = left.min(PAGES as u64) as usize;
                    let t = Instant::now();
                    for p in 0..n {
                        if write {
                            store(&child, p, 7);
                        } else {
                            black_box(load(&child, p));
                        }
                    }
                    total += t.elapsed();
                    left -= n as u64;
                }
                total
            });
        });
    };
    run("cow_write_one_page", true);
    run("read_one_page", false);
    g.finish();
}

fn read_write(c: &mut Criterion) {
    let arena = Arena::new().expect("arena");
    let parent = written(&arena);
    let child = parent.fork().expect("fork");
    let mut buf = vec![0u8; PAGE];
    let mut g = c.benchmark_group("api_4KiB");
    let mut p = 0usize;
    g.bench_function("Space::read", |b| {
        b.iter(|| {
            p = (p + 4099) % PAGES;
            child.read(p * PAGE, &mut buf).expect("read");
            black_box(buf[0]);
        });
    });
    // Every page of `own` is private after the first pass: this is the steady-state write.
    let mut own = written(&arena);
    let data = vec![0x5au8; PAGE];
    g.bench_function("Space::write", |b| {
        b.iter(|| {
            p = (p + 4099) % PAGES;
            own.write(p * PAGE, black_box(&data)).expect("write");
        });
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(10);
    targets = fork, faults, read_write
}
criterion_main!(benches);
