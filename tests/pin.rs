//! Pinning (issue 15 item 4): while a `Pinned` guard lives, the physical page behind each
//! pinned view page stays the same — across forks of every strategy, compaction, migrate,
//! clean, clear_referenced and resets of other spaces to it — so kernel I/O into the range
//! (O_DIRECT here) lands where the program looks, and every fork gets its fork-time bytes.
//! Physical frames are read from `/proc/self/pagemap` (PFNs are visible to root only;
//! without them the tests say so and check contents only).

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{assert_nothing_left, Watchdog, PAGE};
use cowarena::{Arena, Error, FaultMode, ForkStrategy, Space};

/// The physical frame number mapped at `addr`, if present and visible (root).
fn pfn(addr: usize) -> Option<u64> {
    let f = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / PAGE * 8) as u64).ok()?;
    let e = u64::from_ne_bytes(b);
    let pfn = e & ((1 << 55) - 1);
    (e >> 63 == 1 && pfn != 0).then_some(pfn)
}

/// The PFNs of `pages` pages from `addr` (`None` when PFNs are hidden from this process).
fn pfns(addr: usize, pages: usize) -> Option<Vec<u64>> {
    (0..pages).map(|p| pfn(addr + p * PAGE)).collect()
}

fn pfns_visible() -> bool {
    let v = vec![1u8; PAGE];
    let ok = pfn(v.as_ptr() as usize).is_some();
    if !ok {
        println!("SKIP (PFN part): /proc/self/pagemap hides frame numbers from this process (not root)");
    }
    ok
}

fn fill(s: &Space, off: usize, len: usize, v: u8) {
    // SAFETY: within the space's view; no other thread writes it meanwhile.
    unsafe { s.as_mut_ptr().add(off).write_bytes(v, len) };
}

/// Every rule that moves, zaps or protects pages leaves the pinned ones where they are;
/// each fork holds the bytes of its fork time.
#[test]
fn pinned_pages_keep_their_frames_across_every_rule() {
    let _wd = Watchdog::new("pinned_pages_keep_their_frames_across_every_rule", Duration::from_secs(240));
    let check_pfn = pfns_visible();
    for (mode, plain) in [(FaultMode::Signal, true), (FaultMode::Signal, false), (FaultMode::Thread, false)] {
        let a = Arena::builder().fault_mode(mode).plain_until_fork(plain).build().unwrap();
        let len = 1200 * PAGE; // > 2 tables, and more written pages than a fork protects in place
        let mut s = a.space(len).unwrap();
        s.as_mut_slice().fill(1);
        let keep = s.fork().unwrap(); // the written pages now shared or frozen: pin must break
        let (off, n) = (500 * PAGE, 40); // straddles the first table boundary
        let pin = s.pin(off, n * PAGE).unwrap();
        assert_eq!((pin.offset(), pin.len()), (off, n * PAGE));
        let addr = pin.as_ptr() as usize;
        let before = pfns(addr, n).filter(|_| check_pfn);
        let ctx = format!("{mode:?} plain={plain}");
        let same = |what: &str| {
            if let Some(b) = &before {
                assert_eq!(pfns(addr, n).as_ref(), Some(b), "{ctx}: a pinned page's frame changed across {what}");
            }
        };
        assert_eq!(a.stats().pages_pinned, n as u64);
        let mut children = Vec::new();
        for (k, strategy) in [ForkStrategy::Auto, ForkStrategy::Freeze, ForkStrategy::KeepWarm].into_iter().enumerate()
        {
            // Written pages outside the pin make the fork want to freeze.
            fill(&s, 0, len, 10 + k as u8);
            let c = s.fork_with(strategy).unwrap();
            same(&format!("fork ({strategy:?})"));
            fill(&s, off, n * PAGE, 20 + k as u8); // "DMA" after the fork
            assert!(c.as_slice().iter().all(|&b| b == 10 + k as u8), "{ctx}: a fork saw stores after it");
            children.push((c, 10 + k as u8));
        }
        let thread_child = s.fork_in(FaultMode::Thread).unwrap();
        same("fork_in");
        assert!(s.migrate(0, len).unwrap() > 0, "{ctx}: migrate moved nothing");
        same("migrate");
        assert!(a.compact().is_ok());
        same("Arena::compact");
        let dirty = s.clean(0, len).unwrap();
        assert!((500..540).all(|p| dirty.contains(&p)), "{ctx}: clean did not report the pinned pages dirty");
        same("clean");
        assert!((500..540).all(|p| s.dirty_pages(0, len).unwrap().contains(&p)), "{ctx}: pinned pages stay dirty");
        s.clear_referenced(0, len).unwrap();
        a.clear_referenced().unwrap();
        same("clear_referenced");
        assert!((500..540).all(|p| s.referenced(0, len).unwrap().contains(&p)));
        // A sibling reset to the pinned space gets copies of the pinned pages.
        fill(&s, off, n * PAGE, 77);
        let mut sib = keep.fork().unwrap();
        sib.reset_to(&s).unwrap();
        same("a reset of another space to it");
        fill(&s, off, n * PAGE, 78);
        assert!(sib.as_slice()[off..off + n * PAGE].iter().all(|&b| b == 77), "{ctx}: reset copy");
        assert_eq!(sib.as_slice()[0], s.as_slice()[0]);
        // Children of every strategy still hold their fork-time bytes.
        for (c, v) in &children {
            assert!(c.as_slice().iter().all(|b| b == v), "{ctx}: a fork lost its bytes");
        }
        assert!(a.stats().pinned_copied >= 5 * n as u64);
        a.check_invariants().unwrap();
        drop(pin);
        assert_eq!(a.stats().pages_pinned, 0);
        // Unpinned, the pages follow the usual rules again: a fork may freeze them.
        let c = s.fork_with(ForkStrategy::Freeze).unwrap();
        assert!(s.as_slice()[off..off + n * PAGE].iter().all(|&b| b == 78));
        assert!(c.as_slice()[off..off + n * PAGE].iter().all(|&b| b == 78));
        a.check_invariants().unwrap();
        drop((s, keep, sib, children, thread_child, c));
        assert_nothing_left(&a, &ctx);
        println!("{ctx}: pinned frames unchanged across 4 forks, migrate, compact, clean, aging and a reset");
    }
}

/// Pins nest; a zero-length pin pins nothing; an async-WP arena refuses pins.
#[test]
fn pins_nest_and_async_wp_refuses_them() {
    let a = Arena::builder().plain_until_fork(false).build().unwrap();
    let s = a.space(16 * PAGE).unwrap();
    let p1 = s.pin(0, 8 * PAGE).unwrap();
    let p2 = s.pin(4 * PAGE, 8 * PAGE).unwrap();
    assert_eq!(a.stats().pages_pinned, 12);
    drop(p1);
    assert_eq!(a.stats().pages_pinned, 8);
    let empty = s.pin(3 * PAGE, 0).unwrap();
    assert!(empty.is_empty());
    drop(p2);
    assert_eq!((a.stats().pages_pinned, a.stats().pins), (0, 2)); // (the empty pin pins nothing)
    assert!(matches!(s.pin(15 * PAGE, 2 * PAGE), Err(Error::OutOfRange { .. })));
    a.check_invariants().unwrap();

    let offered = cowarena::probe::probe().feature("WP_ASYNC").and_then(|f| f.present) == Some(true);
    if offered {
        let aw = Arena::builder().async_wp(true).build().unwrap();
        let s = aw.space(PAGE).unwrap();
        let e = s.pin(0, PAGE).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("async_wp(false)"), "{e}");
    }
}

/// An `O_DIRECT` read into a pinned range, over and over, while another thread forks the
/// space: the parent always ends with the file's data, the physical pages never change, and
/// every child holds bytes the buffer held at some point up to its fork (each 8-byte word
/// a tag of a read that had started by then — never zeros, never a later read).
#[test]
fn o_direct_reads_into_a_pinned_range_while_forks_happen() {
    let _wd = Watchdog::new("o_direct_reads_into_a_pinned_range_while_forks_happen", Duration::from_secs(240));
    const PAGES: usize = 64;
    const READS: u64 = 200;
    let len = PAGES * PAGE;
    // A file of READS + 1 distinct blocks: word w of block k is (k << 32) | w.
    let path = std::env::temp_dir().join(format!("cowarena-pin-odirect-{}", std::process::id()));
    {
        let f = std::fs::File::create(&path).unwrap();
        let mut block = vec![0u8; len];
        for k in 0..=READS {
            for (w, c) in block.chunks_exact_mut(8).enumerate() {
                c.copy_from_slice(&((k << 32) | w as u64).to_ne_bytes());
            }
            f.write_all_at(&block, k * len as u64).unwrap();
        }
        f.sync_all().unwrap();
    }
    let file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path) {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            println!("SKIP: O_DIRECT is not supported on {} ({e})", std::env::temp_dir().display());
            return;
        }
    };
    let check_pfn = pfns_visible();
    for mode in [FaultMode::Signal, FaultMode::Thread] {
        let a = Arena::builder().fault_mode(mode).build().unwrap();
        let s = a.space(len + 256 * PAGE).unwrap();
        // The buffer starts as block 0; the rest of the space is written, so forks want to
        // freeze.
        let pin = s.pin(0, len).unwrap();
        let buf = pin.as_mut_ptr() as usize;
        // SAFETY: `buf..buf+len` is the pinned range of the space; O_DIRECT needs the
        // alignment it has (page-aligned).
        let read_block = |k: u64| unsafe {
            let n = libc::pread(file.as_raw_fd(), buf as *mut libc::c_void, len, (k * len as u64) as i64);
            assert_eq!(n, len as isize, "{mode:?}: O_DIRECT pread: {}", std::io::Error::last_os_error());
        };
        read_block(0);
        fill(&s, len, 256 * PAGE, 5);
        let frames = pfns(buf, PAGES).filter(|_| check_pfn);
        let started = AtomicU64::new(0); // the block of the read in flight (or last done)
        let done = AtomicBool::new(false);
        let mut forks = 0;
        std::thread::scope(|sc| {
            let reader = sc.spawn(|| {
                for k in 1..=READS {
                    started.store(k, Ordering::SeqCst);
                    read_block(k);
                    // The parent holds exactly the block just read.
                    // SAFETY: the pinned range; only this thread writes it (via the kernel).
                    let got = unsafe { std::slice::from_raw_parts(buf as *const u64, len / 8) };
                    if let Some(w) = got.iter().enumerate().position(|(w, &v)| v != (k << 32) | w as u64) {
                        panic!("{mode:?}: after read {k}, word {w} of the parent is {:#x}", got[w]);
                    }
                }
                done.store(true, Ordering::SeqCst);
            });
            while !done.load(Ordering::SeqCst) {
                let child = s.fork().unwrap();
                let limit = started.load(Ordering::SeqCst);
                forks += 1;
                let words: Vec<u64> = child.as_slice()[..len]
                    .chunks_exact(8)
                    .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
                    .collect();
                for (w, &v) in words.iter().enumerate() {
                    assert!(
                        v & 0xFFFF_FFFF == w as u64 && v >> 32 <= limit,
                        "{mode:?}: a child forked during read {limit} holds {v:#x} at word {w}"
                    );
                }
                assert!(child.as_slice()[len..].iter().all(|&b| b == 5));
            }
            reader.join().unwrap();
        });
        if let Some(f) = &frames {
            assert_eq!(pfns(buf, PAGES).as_ref(), Some(f), "{mode:?}: the pinned frames changed");
        }
        assert!(forks > 0);
        a.check_invariants().unwrap();
        println!("{mode:?}: {READS} O_DIRECT reads into a pinned range under {forks} forks: parent exact, children consistent");
        drop(pin);
        drop(s);
        assert_nothing_left(&a, "O_DIRECT");
    }
    let _ = std::fs::remove_file(&path);
}
