//! Issue 11, item 8: long fork chains degrade gracefully. Every generation writes one page
//! (a different offset each time), forks, and drops its parent. Each dropped ancestor used
//! to leave a frozen region — one mapping the size of the whole space — holding its one
//! page: a 64 GiB chain ran out of address space at generation ~2045, a 512 MiB chain out
//! of `vm.max_map_count` at ~65 486 (then aborted on an allocation). Now the few surviving
//! homes of a dropped view are copied to the pool, sparse frozen regions are compacted
//! automatically, and mappings and address space stay bounded.

mod common;

use std::sync::Mutex;

use common::PAGE;
use cowarena::{Arena, Error, FaultMode, ForkStrategy, Space};

/// The tests here measure the process's mappings: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn maps() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
}

/// Virtual memory size of this process, in bytes.
fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The bytes generation `g` writes at the start of its page (and its last byte).
fn stamp(g: usize) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(g as u64 + 1).to_le_bytes());
    b[8..].copy_from_slice(&(!(g as u64)).to_le_bytes());
    b
}

/// Run a chain of `gens` generations on a space of `len` bytes; generation `g` writes page
/// `page_of(g)` (through the view on even generations, `Space::write` on odd ones), forks
/// with `strategy` and drops its parent. Asserts, every `every` generations, that frozen
/// regions, mappings and address space stay within bounds; at the end, that every byte
/// written is still right through `Space::read` and the view.
fn chain(arena: &Arena, len: usize, gens: usize, strategy: ForkStrategy, page_of: impl Fn(usize) -> usize) {
    // A chain of freezing forks keeps up to the soft bound (128) of sparse frozen regions.
    let frozen_va = if strategy == ForkStrategy::Freeze { 130 * len as u64 } else { 0 };
    let (maps0, vm0) = (maps(), vm_size());
    let mut s: Space = arena.space(len).unwrap();
    // Live pages end up in pool regions of 512 slots (2 MiB, one mapping each); nothing
    // else may grow with the chain.
    let frozen_bound = |g: usize| 160 + g / 512;
    let every = (gens / 20).max(1);
    for g in 0..gens {
        let off = page_of(g) * PAGE;
        let st = stamp(g);
        if g % 2 == 0 {
            s.as_mut_slice()[off..off + 16].copy_from_slice(&st);
            s.as_mut_slice()[off + PAGE - 1] = st[0];
        } else {
            s.write(off, &st).unwrap();
            s.write(off + PAGE - 1, &st[..1]).unwrap();
        }
        let child = s.fork_with(strategy).unwrap_or_else(|e| panic!("generation {g}: fork failed: {e}"));
        drop(std::mem::replace(&mut s, child));
        if g % every == 0 || g + 1 == gens {
            let st = arena.stats();
            let (m, vm) = (maps(), vm_size());
            assert!(
                st.frozen_regions as usize <= frozen_bound(g),
                "generation {g}: {} frozen regions (bound {})",
                st.frozen_regions,
                frozen_bound(g)
            );
            assert!(m <= maps0 + frozen_bound(g) + 16, "generation {g}: {m} mappings (from {maps0})");
            // Two views at most (parent and child during a fork) plus pool memory.
            let vm_bound = vm0 + frozen_va + 3 * len as u64 + (g as u64 + 4096) * PAGE as u64 * 2;
            assert!(vm <= vm_bound, "generation {g}: VmSize {vm} (from {vm0}, bound {vm_bound})");
            assert_eq!(st.drops_pending, 0);
        }
    }
    let st = arena.stats();
    eprintln!(
        "chain of {gens} x {} MiB ({strategy:?}): frozen regions {}, mappings {} (from {maps0}), \
         VmSize +{} MiB, frames re-homed {}, freezes {}",
        len >> 20,
        st.frozen_regions,
        maps(),
        (vm_size().saturating_sub(vm0)) >> 20,
        st.frames_rehomed,
        st.freezes
    );
    assert_eq!(st.broken_by.migrate, 0, "automatic compaction breaks no table");
    let mut buf = [0u8; 16];
    for g in 0..gens {
        let off = page_of(g) * PAGE;
        s.read(off, &mut buf).unwrap();
        assert_eq!(buf, stamp(g), "generation {g}: Space::read");
        assert_eq!(&s.as_slice()[off..off + 16], &stamp(g), "generation {g}: view");
        assert_eq!(s.as_slice()[off + PAGE - 1], stamp(g)[0], "generation {g}: last byte");
    }
    arena.check_invariants().unwrap();
    drop(s);
    assert!(arena.stats().is_idle(), "{:?}", arena.stats());
}

/// 3000 generations of a 64 GiB space: used to exhaust the 128 TiB address space at
/// generation ~2045 (each frozen region reserved 64 GiB).
#[test]
fn chain_3000_generations_of_64_gib() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let arena = Arena::new().unwrap();
    // Pages 5003 apart: a different 2 MiB table nearly every generation.
    chain(&arena, 64 << 30, 3000, ForkStrategy::Auto, |g| g * 5003);
}

/// 100 000 generations of a 512 MiB space (20 000 in debug builds): used to exhaust
/// `vm.max_map_count` (65 530) at generation ~65 486, then abort.
#[test]
fn chain_100000_generations_of_512_mib() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let gens = if cfg!(debug_assertions) { 20_000 } else { 100_000 };
    let arena = Arena::new().unwrap();
    let pages = (512 << 20) / PAGE;
    // An odd stride modulo a power of two: distinct pages for every generation.
    chain(&arena, 512 << 20, gens, ForkStrategy::Auto, |g| (g * 40503) % pages);
}

/// A chain whose forks always freeze (`ForkStrategy::Freeze`): every fork leaves a frozen
/// region holding one page, which no drop can evacuate (the parent's view is empty by
/// then). Past the soft bound, the sparsest are compacted.
#[test]
fn chain_of_freezing_forks_stays_bounded() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let arena = Arena::new().unwrap();
    let gens = if cfg!(debug_assertions) { 600 } else { 2000 };
    chain(&arena, 512 << 20, gens, ForkStrategy::Freeze, |g| g * 3);
}

/// The same chain served by the handler thread.
#[test]
fn chain_in_thread_mode() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let arena = Arena::builder().fault_mode(FaultMode::Thread).build().unwrap();
    let gens = if cfg!(debug_assertions) { 500 } else { 3000 };
    chain(&arena, 1 << 30, gens, ForkStrategy::Auto, |g| g * 3);
}

const CHILD_ENV: &str = "COWARENA_CHAINS_LIMIT_CHILD";

fn set_soft_as_limit(limit: Option<u64>) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let hard = getrlimit(Resource::As).maximum;
    setrlimit(Resource::As, Rlimit { current: limit, maximum: hard }).expect("setrlimit(RLIMIT_AS)");
}

/// At a real limit (here RLIMIT_AS, set in a child process of this test):
/// the error is typed and names the limits and the remedy; a drop whose freeze fails is
/// not leaked silently — it is counted in `drops_deferred`, kept in `drops_pending`, and
/// retried by the next fork once room is back.
#[test]
fn mapping_limit_is_typed_and_a_failed_drop_is_retried() {
    if std::env::var_os(CHILD_ENV).is_none() {
        let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["mapping_limit_is_typed_and_a_failed_drop_is_retried", "--exact", "--test-threads=1", "--nocapture"])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "child failed:\n{text}");
        return;
    }
    // A trap per store: KeepWarm keeps the homes in a's view (async_wp would evacuate or
    // freeze them at the fork).
    let arena = Arena::builder().async_wp(false).build().unwrap();
    let len = 64 << 20;
    let mut a = arena.space(len).unwrap();
    // 2048 pages written: too many to evacuate at drop, so the view must be frozen.
    for p in 0..2048 {
        a.write(p * PAGE, &stamp(p)).unwrap();
    }
    let b = a.fork_with(ForkStrategy::KeepWarm).unwrap(); // homes stay in a's view
                                                          // Room for the heap, not for another 64 MiB mapping.
    set_soft_as_limit(Some(vm_size() + (24 << 20)));
    drop(a); // its freeze (mremap) fails: the drop is deferred, not leaked
    let st = arena.stats();
    assert_eq!((st.drops_deferred, st.drops_pending), (1, 1), "{st:?}");
    match b.fork() {
        Err(e @ Error::MappingLimit { .. }) => {
            let msg = e.to_string();
            for want in ["vm.max_map_count", "RLIMIT_AS", "Arena::compact", "sysctl"] {
                assert!(msg.contains(want), "message lacks {want}: {msg}");
            }
            eprintln!("typed error: {msg}");
        }
        other => panic!("expected Error::MappingLimit, got {other:?}"),
    }
    let mut buf = [0u8; 16];
    b.read(7 * PAGE, &mut buf).unwrap();
    assert_eq!(buf, stamp(7));
    set_soft_as_limit(None);
    let c = b.fork().unwrap(); // retries the deferred drop first
    let st = arena.stats();
    assert_eq!((st.drops_deferred, st.drops_pending), (1, 0), "{st:?}");
    for p in (0..2048).step_by(97) {
        c.read(p * PAGE, &mut buf).unwrap();
        assert_eq!(buf, stamp(p));
        assert_eq!(&b.as_slice()[p * PAGE..p * PAGE + 16], &stamp(p));
    }
    arena.check_invariants().unwrap();
    drop((b, c));
    assert!(arena.stats().is_idle(), "{:?}", arena.stats());
}
