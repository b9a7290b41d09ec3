//! `PAGEMAP_SCAN` (Linux 6.7+): ask the kernel which pages of a range of this process are
//! present, swapped, the shared zero page, written since write-protected (userfaultfd
//! `WP_ASYNC`), …, as runs of pages with equal categories — one page-table walk, no
//! 8-bytes-per-page read of `/proc/self/pagemap`.
//!
//! The engine uses it to adopt a *plain* view (kernel memory never registered with
//! userfaultfd) at its first fork: the written pages become frames (see DESIGN.md, "Plain
//! until the first fork").

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use linux_raw_sys::general as g;
use rustix::ioctl::{opcode, Opcode, Updater};

/// `_IOWR('f', 16, struct pm_scan_arg)` (linux-raw-sys 0.12 has the struct, not the number).
const PAGEMAP_SCAN: Opcode = opcode::read_write::<g::pm_scan_arg>(b'f', 16);

/// Page categories (`PAGE_IS_*`), as the kernel reports them.
#[allow(dead_code)] // the full set: the async-WP dirty tracking and the bench peer use more
pub mod category {
    use linux_raw_sys::general as g;
    /// Write-protect allowed (registered with userfaultfd WP).
    pub const WPALLOWED: u64 = g::PAGE_IS_WPALLOWED as u64;
    /// Written since last write-protected (userfaultfd `WP_ASYNC`).
    pub const WRITTEN: u64 = g::PAGE_IS_WRITTEN as u64;
    /// Backed by a file.
    pub const FILE: u64 = g::PAGE_IS_FILE as u64;
    /// Mapped by a present page-table entry.
    pub const PRESENT: u64 = g::PAGE_IS_PRESENT as u64;
    /// Swapped out.
    pub const SWAPPED: u64 = g::PAGE_IS_SWAPPED as u64;
    /// Maps the shared zero page (read, never written).
    pub const PFNZERO: u64 = g::PAGE_IS_PFNZERO as u64;
    /// Part of a huge page.
    pub const HUGE: u64 = g::PAGE_IS_HUGE as u64;
}

/// Write-protect the matching pages in the same walk (`PM_SCAN_WP_MATCHING`; needs a
/// userfaultfd-WP registration of the range).
#[allow(dead_code)]
pub const WP_MATCHING: u64 = g::PM_SCAN_WP_MATCHING as u64;
/// Fail unless the range is registered with an async-WP userfaultfd (`PM_SCAN_CHECK_WPASYNC`).
#[allow(dead_code)]
pub const CHECK_WPASYNC: u64 = g::PM_SCAN_CHECK_WPASYNC as u64;

/// A run of pages `[start, end)` (addresses) with the categories `categories`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// First byte of the run (page-aligned address).
    pub start: usize,
    /// One past its last byte (page-aligned address).
    pub end: usize,
    /// The run's `category::*` bits, masked by [`Query::report`].
    pub categories: u64,
}

/// What to look for: a page matches when it has every category of `required`, none of
/// `excluded`, and (if `any_of` is not empty) at least one of `any_of`; runs are reported
/// with their categories masked by `report` (adjacent pages with equal masked categories
/// form one run).
#[derive(Clone, Copy, Debug, Default)]
pub struct Query {
    /// Categories a page must have, all of them.
    pub required: u64,
    /// Categories a page must not have.
    pub excluded: u64,
    /// Categories of which a page must have one (ignored when empty).
    pub any_of: u64,
    /// Categories reported in [`PageRun::categories`] (and that split runs).
    pub report: u64,
    /// `WP_MATCHING`, `CHECK_WPASYNC`.
    pub flags: u64,
    /// Stop once this many matching pages were found (0: no limit); the last run may
    /// then be cut short.
    pub max_pages: usize,
}

/// `/proc/self/pagemap`, opened once: the file `PAGEMAP_SCAN` is issued on.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

/// Runs fetched per ioctl; the walk resumes where the kernel stopped when they run out.
///
/// Keep it at most 512 (`PAGEMAP_WALK_SIZE >> PAGE_SHIFT`, the kernel's bounce buffer): with
/// a larger output vector, a call whose runs fill the bounce buffer, are flushed, and whose
/// walk then completes returns the `walk_end` of the last flush, not the end of the range
/// (seen on 6.18: 2575 runs of a 1 GiB scan with `vec_len` 4096 came back with `walk_end`
/// at the 2560th). A caller resuming there is handed the last runs twice (15 pages counted
/// twice in that trial); with at most 512 runs per call every call stops at its first flush,
/// whose `walk_end` is right.
const BATCH: usize = 256;
const _: () = assert!(BATCH <= 512, "see BATCH: a larger output vector gets a stale walk_end");

impl Pagemap {
    /// Open `/proc/self/pagemap` and check that the kernel has `PAGEMAP_SCAN` (6.7+):
    /// `Err` when it has not (ENOTTY/EINVAL) or `/proc` is not mounted.
    pub fn open() -> io::Result<Pagemap> {
        let pm = Pagemap { file: File::open("/proc/self/pagemap")? };
        // A scan of one page of our own stack: exercises the ioctl on a real mapping.
        let probe = [0u8; 1];
        let page = (probe.as_ptr() as usize) & !(crate::mm::PAGE_SIZE - 1);
        let mut out = Vec::new();
        pm.scan(page, page + crate::mm::PAGE_SIZE, Query { report: category::PRESENT, ..Query::default() }, &mut out)?;
        Ok(pm)
    }

    /// Append to `out` the runs of pages in `[start, end)` (page-aligned addresses) that
    /// match `q`, in address order.
    pub fn scan(&self, start: usize, end: usize, q: Query, out: &mut Vec<PageRun>) -> io::Result<()> {
        let mut regions = [g::page_region { start: 0, end: 0, categories: 0 }; BATCH];
        let mut at = start;
        let mut found = 0usize;
        while at < end && (q.max_pages == 0 || found < q.max_pages) {
            let mut arg = g::pm_scan_arg {
                size: std::mem::size_of::<g::pm_scan_arg>() as u64,
                flags: q.flags,
                start: at as u64,
                end: end as u64,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: BATCH as u64,
                max_pages: if q.max_pages == 0 { 0 } else { (q.max_pages - found) as u64 },
                // The kernel matches `categories ^ inverted` against the masks: a category
                // that is both inverted and required must be absent.
                category_inverted: q.excluded,
                category_mask: q.required | q.excluded,
                category_anyof_mask: q.any_of,
                return_mask: q.report,
            };
            // SAFETY: `arg` is a valid `pm_scan_arg` whose `vec` points at `BATCH` writable
            // `page_region`s that outlive the call; the kernel writes only those and `arg`,
            // and reads the page tables of `[start, end)`, which need not be mapped.
            let n = unsafe { rustix::ioctl::ioctl(self.file.as_fd(), Updater::<PAGEMAP_SCAN, _>::new(&mut arg)) };
            // The ioctl returns the number of regions filled; rustix's `Updater` discards a
            // non-negative result, so count what the kernel wrote (a region has end > start).
            n.map_err(io::Error::from)?;
            let filled = regions.iter().take_while(|r| r.end > r.start).count();
            for r in &mut regions[..filled] {
                found += ((r.end - r.start) as usize) / crate::mm::PAGE_SIZE;
                out.push(PageRun { start: r.start as usize, end: r.end as usize, categories: r.categories });
                *r = g::page_region { start: 0, end: 0, categories: 0 };
            }
            let walked = arg.walk_end as usize;
            if walked <= at {
                // No progress (cannot happen per the ABI): stop rather than spin.
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            at = walked;
        }
        Ok(())
    }
}

impl Pagemap {
    /// `PAGEMAP_SCAN` with [`WP_MATCHING`] and no output: write-protect every page of
    /// `[start, end)` (page-aligned addresses) that matches `q`, in one walk that reports
    /// nothing (so it is never cut short by a full output buffer). `q.flags` gets
    /// [`WP_MATCHING`] added; `q.report` is ignored. The range must be registered in WP mode
    /// with an async-WP userfaultfd (`EPERM` with [`CHECK_WPASYNC`] otherwise).
    ///
    /// The re-arm half of a transparent reset: list what was written ([`Pagemap::scan`]),
    /// restore it, then re-protect. Doing both in one walk (`scan` with `WP_MATCHING`)
    /// would protect the pages *before* the restore writes them, and those writes would
    /// mark them written again.
    pub fn protect(&self, start: usize, end: usize, q: Query) -> io::Result<()> {
        if start >= end {
            return Ok(());
        }
        let mut arg = g::pm_scan_arg {
            size: std::mem::size_of::<g::pm_scan_arg>() as u64,
            flags: q.flags | WP_MATCHING,
            start: start as u64,
            end: end as u64,
            walk_end: 0,
            vec: 0,
            vec_len: 0,
            max_pages: 0,
            category_inverted: q.excluded,
            category_mask: q.required | q.excluded,
            category_anyof_mask: q.any_of,
            return_mask: q.required | q.excluded | q.any_of,
        };
        // SAFETY: `arg` is a valid `pm_scan_arg` with no output vector (`vec` null,
        // `vec_len` 0): the kernel writes only `arg` (`walk_end`) and changes the page
        // tables of `[start, end)` — write protection, which no Rust reference depends on.
        let r = unsafe { rustix::ioctl::ioctl(self.file.as_fd(), Updater::<PAGEMAP_SCAN, _>::new(&mut arg)) };
        r.map_err(io::Error::from)?;
        if (arg.walk_end as usize) < end {
            // Without an output buffer the walk only stops early on a fatal signal.
            return Err(io::Error::other("PAGEMAP_SCAN (write-protect) stopped before the end of the range"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mem::Mapping;

    const PAGE: usize = crate::mm::PAGE_SIZE;

    fn written() -> Query {
        Query {
            excluded: category::PFNZERO,
            any_of: category::PRESENT | category::SWAPPED,
            report: category::PRESENT | category::SWAPPED,
            ..Query::default()
        }
    }

    #[test]
    fn finds_written_pages_and_not_zero_pages() {
        let Ok(pm) = Pagemap::open() else {
            eprintln!("skipped: this kernel has no PAGEMAP_SCAN (Linux 6.7+)");
            return;
        };
        let m = Mapping::anon(64 * PAGE).unwrap();
        let p = m.addr() as *mut u8;
        // SAFETY: in bounds of our fresh read-write mapping.
        unsafe {
            for i in [1usize, 2, 3, 10, 63] {
                p.add(i * PAGE).write_volatile(1);
            }
            // A read of a never-written page maps the zero page: not written.
            let _ = p.add(20 * PAGE).read_volatile();
        }
        let mut out = Vec::new();
        pm.scan(m.addr(), m.addr() + m.len(), written(), &mut out).unwrap();
        let runs: Vec<_> = out.iter().map(|r| ((r.start - m.addr()) / PAGE, (r.end - m.addr()) / PAGE)).collect();
        assert_eq!(runs, vec![(1, 4), (10, 11), (63, 64)]);
    }

    #[test]
    fn resumes_when_runs_exceed_one_batch() {
        let Ok(pm) = Pagemap::open() else {
            eprintln!("skipped: this kernel has no PAGEMAP_SCAN (Linux 6.7+)");
            return;
        };
        let pages = 4 * BATCH + 8;
        let m = Mapping::anon(pages * PAGE).unwrap();
        let p = m.addr() as *mut u8;
        // SAFETY: in bounds of our fresh read-write mapping.
        unsafe {
            for i in (0..pages).step_by(2) {
                p.add(i * PAGE).write_volatile(1);
            }
        }
        let mut out = Vec::new();
        pm.scan(m.addr(), m.addr() + m.len(), written(), &mut out).unwrap();
        assert_eq!(out.len(), pages / 2);
        assert!(out.iter().enumerate().all(|(k, r)| r.start == m.addr() + 2 * k * PAGE && r.end == r.start + PAGE));
    }

    fn written_only() -> Query {
        Query { required: category::WRITTEN, report: category::WRITTEN, flags: CHECK_WPASYNC, ..Query::default() }
    }

    fn pages_of(out: &[PageRun], base: usize) -> Vec<(usize, usize)> {
        out.iter().map(|r| ((r.start - base) / PAGE, (r.end - base) / PAGE)).collect()
    }

    /// The transparent-reset cycle on an async-WP userfaultfd: protect, write, list the
    /// written pages exactly, rewrite them (a restore), re-arm with [`Pagemap::protect`],
    /// and nothing is listed any more; reads are never reported as writes.
    #[test]
    fn async_wp_lists_exactly_the_written_pages_and_rearms() {
        let (Ok(pm), Ok(uffd)) = (Pagemap::open(), crate::sys::uffd::Uffd::open_wp_async()) else {
            eprintln!("skipped: this kernel has no PAGEMAP_SCAN or UFFD_FEATURE_WP_ASYNC (Linux 6.7+)");
            return;
        };
        let m = Mapping::anon(64 * PAGE).unwrap();
        let (base, end) = (m.addr(), m.addr() + m.len());
        let p = base as *mut u8;
        // SAFETY: in bounds of our fresh read-write mapping (so are the blocks below).
        unsafe {
            for i in 0..32 {
                p.add(i * PAGE).write_volatile(1);
            }
        }
        uffd.register_modes(base, m.len(), false, true).unwrap();
        let mut out = Vec::new();
        // Registered but not yet protected: every page counts as written, even the 32
        // never-populated ones (no pte marker yet).
        pm.scan(base, end, written_only(), &mut out).unwrap();
        assert_eq!(pages_of(&out, base), vec![(0, 64)]);
        uffd.writeprotect(base, m.len(), true).unwrap();
        out.clear();
        pm.scan(base, end, written_only(), &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        // SAFETY: as above.
        unsafe {
            p.add(3 * PAGE).write_volatile(2);
            for i in 7..10 {
                p.add(i * PAGE).write_volatile(2);
            }
            p.add(40 * PAGE).write_volatile(2); // never populated: a marker, then a write
            let _ = p.add(20 * PAGE).read_volatile();
            let _ = p.add(50 * PAGE).read_volatile(); // never populated: the zero page
        }
        out.clear();
        pm.scan(base, end, written_only(), &mut out).unwrap();
        assert_eq!(pages_of(&out, base), vec![(3, 4), (7, 10), (40, 41)]);
        // The restore writes the same pages again; the re-arm comes after it.
        // SAFETY: as above.
        unsafe {
            for r in &out {
                std::ptr::write_bytes(r.start as *mut u8, 0, r.end - r.start);
            }
        }
        pm.protect(base, end, written_only()).unwrap();
        out.clear();
        pm.scan(base, end, written_only(), &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        // SAFETY: as above.
        unsafe { p.add(21 * PAGE).write_volatile(3) };
        out.clear();
        pm.scan(base, end, written_only(), &mut out).unwrap();
        assert_eq!(pages_of(&out, base), vec![(21, 22)]);
    }

    /// `CHECK_WPASYNC` refuses a range that no async-WP userfaultfd covers.
    #[test]
    fn check_wpasync_refuses_an_unregistered_range() {
        let Ok(pm) = Pagemap::open() else {
            eprintln!("skipped: this kernel has no PAGEMAP_SCAN (Linux 6.7+)");
            return;
        };
        let m = Mapping::anon(4 * PAGE).unwrap();
        let mut out = Vec::new();
        let e = pm.scan(m.addr(), m.addr() + m.len(), written_only(), &mut out).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        let e = pm.protect(m.addr(), m.addr() + m.len(), written_only()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    }
}
