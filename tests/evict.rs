//! Eviction (issue 16): `Arena::evict` pages cold frames out to the swap file and every
//! later touch — view or API, either fault mode — brings them back; memory falls by what
//! was evicted; shared tables stay shared; pinned pages never leave; a swap file that
//! fails is an error from the API and a loud death at a view access, never a zero page.

mod common;

use common::{assert_nothing_left, rss_bytes, Rng, Watchdog, PAGE};
use cowarena::{Arena, Error, FaultMode, Space};

const TABLE: usize = 512 * PAGE;

fn pattern(tag: u8, p: usize) -> u8 {
    (p as u8).wrapping_mul(31).wrapping_add(tag)
}

fn fill(s: &mut Space, tag: u8) {
    for (p, chunk) in s.as_mut_slice().chunks_mut(PAGE).enumerate() {
        chunk.fill(pattern(tag, p));
    }
}

fn check(s: &Space, tag: u8, what: &str) {
    for (p, chunk) in s.as_slice().chunks(PAGE).enumerate() {
        let want = pattern(tag, p);
        if let Some(i) = chunk.iter().position(|&b| b != want) {
            panic!("{what}: page {p} byte {i} is {} not {want}", chunk[i]);
        }
    }
}

/// Is the view page at `addr` resident (`mincore`)?
fn resident(addr: usize) -> bool {
    let mut v = 0u8;
    // SAFETY: `addr` is page-aligned inside a live mapping; `v` receives one byte.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, PAGE, &mut v) };
    assert_eq!(r, 0, "mincore");
    v & 1 != 0
}

fn arenas() -> Vec<(&'static str, Arena)> {
    let mut v = vec![
        ("signal", Arena::builder().fault_mode(FaultMode::Signal).build().unwrap()),
        ("thread", Arena::builder().fault_mode(FaultMode::Thread).build().unwrap()),
    ];
    if let Ok(a) = Arena::builder().async_wp(true).build() {
        v.push(("async_wp", a));
    }
    v
}

/// Evict everything, then read it back through the view, through `Space::read` and
/// `write_to`, and write over it: every byte right, memory given back in between.
#[test]
fn evicted_pages_come_back_through_every_path() {
    let _wd = Watchdog::new("evicted_pages_come_back_through_every_path", std::time::Duration::from_secs(120));
    for (name, arena) in arenas() {
        let mut s = arena.space(16 * TABLE).unwrap(); // 32 MiB
        fill(&mut s, 1);
        let pages = s.len() / PAGE;
        let st = arena.evict(u64::MAX).unwrap();
        assert_eq!(st.frames_evicted as usize, pages, "{name}: every frame goes");
        assert_eq!(st.bytes_written as usize, pages * PAGE);
        let after = arena.stats();
        assert_eq!(after.pages_swapped as usize, pages, "{name}");
        assert_eq!(after.resident_bytes, 0, "{name}: nothing resident");
        assert!((0..pages).step_by(97).all(|p| !resident(s.as_ptr() as usize + p * PAGE)), "{name}: view pages left");
        // Back through the API first (half), then the view.
        let mut buf = vec![0u8; 8 * TABLE];
        s.read(0, &mut buf).unwrap();
        for (p, c) in buf.chunks(PAGE).enumerate() {
            assert!(c.iter().all(|&b| b == pattern(1, p)), "{name}: Space::read of page {p}");
        }
        check(&s, 1, name);
        assert_eq!(arena.stats().frames_swapped_in as usize, pages, "{name}: each frame read back once");
        // Evict again, stream it out, then overwrite half and check.
        arena.evict(u64::MAX).unwrap();
        let mut image = Vec::new();
        s.write_to(&mut image).unwrap();
        for (p, c) in image.chunks(PAGE).enumerate() {
            assert!(c.iter().all(|&b| b == pattern(1, p)), "{name}: write_to page {p}");
        }
        arena.evict(u64::MAX).unwrap();
        s.as_mut_slice()[..8 * TABLE].fill(9);
        assert!(s.as_slice()[..8 * TABLE].iter().all(|&b| b == 9), "{name}");
        for (p, c) in s.as_slice()[8 * TABLE..].chunks(PAGE).enumerate() {
            assert!(c.iter().all(|&b| b == pattern(1, p + 8 * 512)), "{name}: upper half");
        }
        arena.check_invariants().unwrap();
        drop(s);
        assert_nothing_left(&arena, name);
        assert_eq!(arena.stats().pages_swapped, 0, "{name}: swap slots freed");
    }
}

/// Eviction gives the memory back: the process's RSS falls by what was evicted (in a
/// child process, so that other tests' memory does not blur the figure), in each arena.
#[test]
fn eviction_gives_memory_back() {
    const ENV: &str = "COWARENA_EVICT_RSS_CHILD";
    if std::env::var(ENV).is_ok() {
        for (name, arena) in arenas() {
            let mut s = arena.space(32 << 20).unwrap();
            fill(&mut s, 8);
            let before = rss_bytes();
            let st = arena.evict(u64::MAX).unwrap();
            let after = rss_bytes();
            println!("{name}: RSS {} -> {} MiB, {} frames evicted", before >> 20, after >> 20, st.frames_evicted);
            assert!(before.saturating_sub(after) >= (30 << 20), "{name}: RSS {before} -> {after}: memory kept");
            check(&s, 8, name);
        }
        println!("RSS-OK");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["eviction_gives_memory_back", "--exact", "--nocapture", "--test-threads=1"])
        .env(ENV, "1")
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && so.contains("RSS-OK"), "{so}\n{se}");
}

/// The clock spares what was referenced since the last aging pass: after
/// `clear_referenced`, the pages touched again stay, the others go first.
#[test]
fn eviction_takes_cold_pages_first() {
    let arena = Arena::builder().fault_mode(FaultMode::Signal).build().unwrap();
    let mut s = arena.space(4 * TABLE).unwrap();
    fill(&mut s, 2);
    let pages = s.len() / PAGE;
    arena.clear_referenced().unwrap();
    // Touch every 32nd page again, in random order (reads fault: the clear re-armed them;
    // no fault-around, which maps — and so counts referenced — the pages around a
    // sequential run).
    let mut hot: Vec<usize> = (0..pages).step_by(32).collect();
    let mut rng = Rng::new(7);
    for i in (1..hot.len()).rev() {
        hot.swap(i, rng.below(i + 1));
    }
    let mut sum = 0u64;
    for &p in &hot {
        sum += u64::from(s.as_slice()[p * PAGE]);
    }
    std::hint::black_box(sum);
    let cold = pages - hot.len();
    let st = arena.evict((cold * PAGE) as u64).unwrap();
    assert_eq!(st.frames_evicted as usize, cold);
    assert!(st.frames_aged as usize >= hot.len(), "the hot pages got their second chance");
    // Reading the hot pages brings nothing back from the swap; the cold ones come back.
    let swapped_in = || arena.stats().frames_swapped_in as usize;
    let mut b = [0u8; 1];
    for &p in &hot {
        s.read(p * PAGE, &mut b).unwrap();
        assert_eq!(b[0], pattern(2, p));
    }
    assert_eq!(swapped_in(), 0, "a hot page was evicted");
    check(&s, 2, "after a partial eviction");
    assert_eq!(swapped_in(), cold, "the cold pages were evicted");
}

/// A hundred forks share the tables of one 4 MiB space; evicting its frames breaks none of
/// them, writes each frame once, and all hundred read every byte back, each frame read
/// from the swap file once for all of them.
#[test]
fn a_hundred_sharers_keep_their_tables_shared_across_eviction() {
    let arena = Arena::builder().fault_mode(FaultMode::Signal).build().unwrap();
    let mut root = arena.space(2 * TABLE).unwrap();
    fill(&mut root, 3);
    let kids: Vec<Space> = (0..100).map(|_| root.fork().unwrap()).collect();
    // Each sharer maps a few pages read-only (copies that the eviction must unmap).
    for (i, k) in kids.iter().enumerate() {
        std::hint::black_box(k.as_slice()[(i % 1024) * PAGE]);
    }
    let shared = arena.stats().tables_shared_now;
    assert!(shared >= 2, "the forks share the tables");
    let st = arena.evict(u64::MAX).unwrap();
    assert_eq!(st.frames_evicted, 1024, "one write per frame, not per sharer");
    let s = arena.stats();
    assert_eq!(s.tables_shared_now, shared, "eviction broke a shared table");
    assert_eq!(s.broken_by, arena.stats().broken_by);
    for (i, k) in kids.iter().enumerate() {
        check(k, 3, &format!("sharer {i}"));
    }
    check(&root, 3, "root");
    let s = arena.stats();
    assert_eq!(s.frames_swapped_in, 1024, "each frame brought back once for all sharers");
    assert_eq!(s.tables_shared_now, shared, "reads after the eviction broke a shared table");
    arena.check_invariants().unwrap();
    drop(kids);
    drop(root);
    assert_nothing_left(&arena, "sharers");
}

/// Pinned pages are never evicted: their frames stay mapped where they are.
#[test]
fn pinned_pages_are_never_evicted() {
    let arena = Arena::builder().fault_mode(FaultMode::Signal).build().unwrap();
    let mut s = arena.space(TABLE).unwrap();
    fill(&mut s, 4);
    let pin = s.pin(16 * PAGE, 32 * PAGE).unwrap();
    let st = arena.evict(u64::MAX).unwrap();
    assert_eq!(st.frames_evicted, 512 - 32);
    let base = s.as_ptr() as usize;
    assert!((16..48).all(|p| resident(base + p * PAGE)), "a pinned page left its frame");
    assert_eq!(arena.stats().pages_swapped, 512 - 32);
    drop(pin);
    check(&s, 4, "after eviction around a pin");
    // Unpinned, the same pages can go.
    let st = arena.evict(u64::MAX).unwrap();
    assert_eq!(st.frames_evicted, 512);
}

/// Random work on a family of spaces with evictions in between, against a `Vec<u8>` per
/// space (the model test does this too, among everything else; this one is all eviction).
#[test]
fn eviction_interleaved_with_forks_writes_and_drops_matches_a_model() {
    let _wd = Watchdog::new("eviction_interleaved", std::time::Duration::from_secs(120));
    for (name, arena) in arenas() {
        let mut rng = Rng::new(0xe71c7);
        let len = 3 * TABLE + 5 * PAGE;
        let mut live: Vec<(Space, Vec<u8>)> = vec![(arena.space(len).unwrap(), vec![0; len])];
        for op in 0..400 {
            let i = rng.below(live.len());
            match rng.below(10) {
                0 if live.len() < 12 => {
                    let c = live[i].0.fork().unwrap();
                    let m = live[i].1.clone();
                    live.push((c, m));
                }
                1 if live.len() > 1 => drop(live.swap_remove(i)),
                2 | 3 => {
                    let target = if rng.chance(1, 2) { u64::MAX } else { (rng.below(400) * PAGE) as u64 };
                    arena.evict(target).unwrap();
                }
                4..=6 => {
                    let (off, n) = rng.span(len);
                    let v = rng.below(256) as u8;
                    live[i].0.as_mut_slice()[off..off + n].fill(v);
                    live[i].1[off..off + n].fill(v);
                }
                _ => {
                    let (off, n) = rng.span(len);
                    let (s, m) = &live[i];
                    let got = if rng.chance(1, 2) {
                        s.as_slice()[off..off + n].to_vec()
                    } else {
                        let mut b = vec![0; n];
                        s.read(off, &mut b).unwrap();
                        b
                    };
                    assert!(got == m[off..off + n], "{name} op {op}: space {i} [{off:#x}+{n:#x}] differs");
                }
            }
        }
        for (i, (s, m)) in live.iter().enumerate() {
            assert!(s.as_slice() == &m[..], "{name}: space {i} differs at the end");
        }
        arena.check_invariants().unwrap();
        drop(live);
        assert_nothing_left(&arena, name);
    }
}

fn swap_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cowarena-evict-{tag}-{}", std::process::id()))
}

/// A swap file that lost its contents (truncated under the arena): reading an evicted page
/// back through the API is `Error::SwapIo`, never zeros, and other pages still work.
#[test]
fn a_failing_swap_file_is_an_error_from_the_api() {
    let path = swap_path("api");
    let arena = Arena::builder().fault_mode(FaultMode::Signal).swap_path(&path).build().unwrap();
    let mut s = arena.space(TABLE).unwrap();
    fill(&mut s, 5);
    arena.evict(u64::MAX).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len >= TABLE as u64, "the swap file holds the pages");
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    let mut b = [0u8; 16];
    match s.read(PAGE, &mut b) {
        Err(e @ Error::SwapIo { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("swap file") && msg.contains("swap_path"), "{msg}");
        }
        other => panic!("read of an unreadable evicted page: {other:?}"),
    }
    // A write to an evicted page brings the page back first (the rest of its bytes are
    // needed): the same error.
    assert!(matches!(s.write(0, &[1; 8]), Err(Error::SwapIo { .. })));
    drop(s);
    drop(arena);
    assert!(!path.exists(), "the swap file is removed with the arena");
}

/// A view access to an evicted page whose slot cannot be read dies loudly, saying why
/// (in a child process: this binary again), in both fault modes.
#[test]
fn a_failing_swap_file_at_a_view_access_dies_loudly() {
    const ENV: &str = "COWARENA_SWAP_CHILD";
    if let Ok(arg) = std::env::var(ENV) {
        // `mode:path` — the parent names the file, so that it can remove it after our death.
        let (mode, path) = arg.split_once(':').expect("mode:path");
        let mode = if mode == "thread" { FaultMode::Thread } else { FaultMode::Signal };
        let arena = Arena::builder().fault_mode(mode).swap_path(path).build().unwrap();
        let mut s = arena.space(TABLE).unwrap();
        fill(&mut s, 6);
        arena.evict(u64::MAX).unwrap();
        std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(0).unwrap();
        println!("EVICTED");
        let v = s.as_slice()[3 * PAGE];
        println!("READ {v} (an unreadable page was used)");
        return;
    }
    for mode in ["signal", "thread"] {
        let path = swap_path(&format!("view-{mode}"));
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["a_failing_swap_file_at_a_view_access_dies_loudly", "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV, format!("{mode}:{}", path.display()))
            .output()
            .unwrap();
        let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // (The child died with its arena: its swap file is left for us to remove.)
        std::fs::remove_file(&path).expect("the child's swap file");
        assert!(so.contains("EVICTED"), "{mode}: {so}\n{se}");
        assert!(!so.contains("READ"), "{mode}: an unreadable page was read through the view: {so}");
        assert!(!out.status.success(), "{mode}: survived");
        assert!(se.contains("swap file"), "{mode}: the death does not say why:\n{se}");
    }
}

/// Two threads store into a space while another evicts it again and again: no store is
/// lost — in an async-WP arena too, where stores to mapped pages take no trap (which is
/// why eviction there first freezes the views).
#[test]
fn evictions_racing_writers_lose_no_store() {
    let _wd = Watchdog::new("evictions_racing_writers_lose_no_store", std::time::Duration::from_secs(120));
    use std::sync::atomic::{AtomicBool, Ordering};
    for (name, arena) in arenas() {
        let s = arena.space(4 * TABLE).unwrap();
        let words = s.len() / 8;
        let stop = AtomicBool::new(false);
        let base = s.as_mut_ptr() as usize;
        let lasts: Vec<Vec<u64>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..2usize)
                .map(|t| {
                    let stop = &stop;
                    sc.spawn(move || {
                        let mut rng = Rng::new(t as u64 + 1);
                        let mut last = vec![0u64; words / 2];
                        let mut n = 1u64;
                        while !stop.load(Ordering::Relaxed) {
                            for _ in 0..256 {
                                let i = rng.below(words / 2);
                                let w = i * 2 + t; // thread t owns every other word
                                                   // SAFETY: inside the view, which outlives the scope; each
                                                   // word has one writer.
                                unsafe { ((base + w * 8) as *mut u64).write_volatile(n) };
                                last[i] = n;
                                n += 1;
                            }
                        }
                        last
                    })
                })
                .collect();
            let t0 = std::time::Instant::now();
            let mut evictions = 0;
            while t0.elapsed() < std::time::Duration::from_millis(800) || evictions < 5 {
                arena.evict(u64::MAX).unwrap();
                evictions += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let view = s.as_slice();
        for (t, last) in lasts.iter().enumerate() {
            for (i, &want) in last.iter().enumerate() {
                let w = i * 2 + t;
                let got = u64::from_ne_bytes(view[w * 8..w * 8 + 8].try_into().unwrap());
                assert_eq!(got, want, "{name}: word {w} of thread {t} lost a store");
            }
        }
        assert!(arena.stats().frames_swapped_in > 0, "{name}: nothing came back from the swap");
        arena.check_invariants().unwrap();
    }
}

/// `max_resident` with more faulting threads than cores: faults at the limit wait for the
/// evictor (the lock released), other threads use the headroom meanwhile, and every byte
/// still comes back right — in both fault modes; resident memory stays near the limit.
#[test]
fn max_resident_under_four_threads_keeps_every_byte() {
    let _wd = Watchdog::new("max_resident_under_four_threads_keeps_every_byte", std::time::Duration::from_secs(240));
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let limit = 4u64 << 20;
        let arena = Arena::builder().fault_mode(mode).max_resident(limit).build().unwrap();
        let s = arena.space(16 * TABLE).unwrap(); // 32 MiB: 8x the limit
        let pages = s.len() / PAGE;
        let base = s.as_mut_ptr() as usize;
        let peak = std::sync::atomic::AtomicU64::new(0);
        for round in 0..2u64 {
            std::thread::scope(|sc| {
                for t in 0..4usize {
                    let (s, peak, arena) = (&s, &peak, &arena);
                    sc.spawn(move || {
                        let (lo, hi) = (pages * t / 4, pages * (t + 1) / 4);
                        let mut order: Vec<usize> = (lo..hi).collect();
                        let mut rng = Rng::new(round * 10 + t as u64);
                        for i in (1..order.len()).rev() {
                            order.swap(i, rng.below(i + 1));
                        }
                        for (k, &p) in order.iter().enumerate() {
                            let v = (p as u64) << 8 | round;
                            if round == 0 {
                                // SAFETY: page `p` is this thread's; the view outlives the scope.
                                unsafe { ((base + p * PAGE) as *mut u64).write_volatile(v) };
                            } else {
                                let got = u64::from_ne_bytes(s.as_slice()[p * PAGE..p * PAGE + 8].try_into().unwrap());
                                assert_eq!(got, (p as u64) << 8, "{mode:?}: page {p}");
                                // SAFETY: as above.
                                unsafe { ((base + p * PAGE) as *mut u64).write_volatile(v) };
                            }
                            if k % 64 == 0 {
                                let r = arena.stats().resident_bytes;
                                peak.fetch_max(r, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
        }
        for p in 0..pages {
            let got = u64::from_ne_bytes(s.as_slice()[p * PAGE..p * PAGE + 8].try_into().unwrap());
            assert_eq!(got, (p as u64) << 8 | 1, "{mode:?}: page {p} at the end");
        }
        let st = arena.stats();
        assert!(st.frames_evicted > 0 && st.frames_swapped_in > 0, "{mode:?}: {st:?}");
        let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
        assert!(peak <= limit + (64 << 10), "{mode:?}: resident peaked at {peak} over the {limit} limit");
        assert_eq!(st.faults.failed, 0, "{mode:?}");
        arena.check_invariants().unwrap();
    }
}
