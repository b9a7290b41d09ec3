//! The main demo: fork a fully written 1 GiB space, write to parent and child, verify both,
//! and compare the fork with the kernel's `fork(2)` of the same memory, measured in the
//! same run.
//!
//! ```text
//! cargo run --release --example demo            # 1 GiB
//! cargo run --release --example demo -- --quick # 64 MiB
//! ```

#[path = "bench/baselines.rs"]
mod baselines;

use std::process::ExitCode;
use std::time::Instant;

use cowarena::Arena;

const PAGE: usize = 4096;

fn pattern(gen: u64, page: usize) -> u64 {
    (gen << 48) ^ (page as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let size: usize = if quick { 64 << 20 } else { 1 << 30 };
    let pages = size / PAGE;
    let arena = Arena::new()?;
    println!(
        "cowarena demo: {} MiB space, fault mode {:?}, userfaultfd {:?}",
        size >> 20,
        arena.fault_mode(),
        arena.uffd_access()
    );

    // 1. Populate every page of the root through plain stores.
    let mut root = arena.space(size)?;
    let t = Instant::now();
    {
        let view = root.as_mut_slice();
        for p in 0..pages {
            view[p * PAGE..p * PAGE + 8].copy_from_slice(&pattern(1, p).to_le_bytes());
        }
    }
    let populate = t.elapsed();
    println!("populated {pages} pages through the view in {:.1} ms", populate.as_secs_f64() * 1e3);

    // 2. Fork, and the kernel's fork(2) of the same amount of written memory.
    let t = Instant::now();
    let mut child = root.fork()?;
    let fork = t.elapsed();
    let t = Instant::now();
    let again = root.fork()?;
    let fork_again = t.elapsed();
    drop(again);
    let kernel = baselines::kernel_fork_latency(size, 3)?;
    println!(
        "fork: {:.3} ms (first, freezes the written view), {:.3} ms (again, nothing written since)",
        fork.as_secs_f64() * 1e3,
        fork_again.as_secs_f64() * 1e3
    );
    println!(
        "kernel fork(2) of {} MiB written: {:.3} ms  ->  cowarena is {:.1}x faster",
        size >> 20,
        kernel.as_secs_f64() * 1e3,
        kernel.as_secs_f64() / fork.as_secs_f64()
    );

    // 3. Write 1 % of the pages of each, differently.
    let mut rng = baselines::Rng::new(42);
    let touched: Vec<usize> = (0..pages / 100).map(|_| rng.below(pages)).collect();
    let t = Instant::now();
    for &p in &touched {
        root.as_mut_slice()[p * PAGE..p * PAGE + 8].copy_from_slice(&pattern(2, p).to_le_bytes());
        child.as_mut_slice()[p * PAGE + 8..p * PAGE + 16].copy_from_slice(&pattern(3, p).to_le_bytes());
    }
    let writes = t.elapsed();
    println!(
        "{} copy-on-write faults in parent and child: {:.2} µs each",
        2 * touched.len(),
        writes.as_secs_f64() * 1e6 / (2 * touched.len()) as f64
    );

    // 4. Verify every page of both: through the explicit API, and a sample through views.
    let mut want_root: Vec<[u64; 2]> = (0..pages).map(|p| [pattern(1, p), 0]).collect();
    let mut want_child = want_root.clone();
    for &p in &touched {
        want_root[p][0] = pattern(2, p);
        want_child[p][1] = pattern(3, p);
    }
    let t = Instant::now();
    let mut bad = 0usize;
    let mut buf = [0u8; 16];
    for (space, want) in [(&root, &want_root), (&child, &want_child)] {
        for (p, w) in want.iter().enumerate() {
            space.read(p * PAGE, &mut buf)?;
            let got = [u64::from_le_bytes(buf[..8].try_into()?), u64::from_le_bytes(buf[8..].try_into()?)];
            if got != *w {
                bad += 1;
            }
            if p % 97 == 0 {
                let v = &space.as_slice()[p * PAGE..p * PAGE + 16];
                if v != buf {
                    bad += 1;
                }
            }
        }
    }
    println!("verified {} pages in {:.1} ms: {bad} mismatches", 2 * pages, t.elapsed().as_secs_f64() * 1e3);
    if bad != 0 {
        return Err(format!("{bad} pages hold wrong data").into());
    }

    println!("stats: {:#?}", arena.stats());
    drop(child);
    drop(root);
    let s = arena.stats();
    println!(
        "after dropping both: frames {} tables {} views {} frozen regions {}",
        s.frames_in_use, s.tables_in_use, s.views_in_use, s.frozen_regions
    );
    if s.frames_in_use + s.tables_in_use + s.views_in_use + s.frozen_regions != 0 {
        return Err("memory leaked".into());
    }
    Ok(())
}
