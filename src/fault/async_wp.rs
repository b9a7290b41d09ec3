//! The kernel side of async write-protection (see `crate::mm` `async_wp.rs`): find the
//! pages the kernel let stores write without a trap, with `PAGEMAP_SCAN`, and hand them to
//! the core.

use super::Core;
use crate::error::{Error, Result};
use crate::mm::{Mm, ScanSpan, SpaceId, PAGE_SIZE};
use crate::sys::mem::Mapping;
use crate::sys::pagemap::{category, PageRun, Query};

/// Above this many runs to re-protect, `clean` re-protects in one `PAGEMAP_SCAN` walk.
const BATCH_PROTECT_RUNS: usize = 16;

/// Pages a `PM_SCAN_WP_MATCHING` walk covers in the time of one `UFFDIO_WRITEPROTECT` of a
/// short run (~1.1 µs, its TLB flush included, against ~1.5 ns per PTE walked; measured on
/// 6.18 with 64 random pages of 256 MiB: 72 µs by ioctls, 98 µs by one walk). A re-protect
/// of `runs` runs spread over `span` pages walks when `span < runs × this`.
const PAGES_PER_PROTECT_CALL: usize = 730;

/// Pages per `PAGEMAP_SCAN` call of [`Core::clean_async`] (64 tables, 128 MiB): the
/// bookkeeping to record all of them is reserved before each call. (16 tables cost ~10 %
/// more than one walk of 1 GiB; 64 are within noise of it.)
const CLEAN_WALK_PAGES: usize = 64 * crate::mm::PTRS_PER_PTE;

/// Pages written since they were last write-protected: mapped, and without the uffd-wp bit
/// (an async-WP fault cleared it). A page not mapped is reported "written" by the kernel
/// too (no uffd-wp marker), hence PRESENT.
fn written_since_protected() -> Query {
    Query { required: category::WRITTEN | category::PRESENT, report: category::WRITTEN, ..Query::default() }
}

/// Pages without the uffd-wp bit: written since they were last write-protected, or not
/// mapped, or mapped writable. The kernel answers this on its fast path
/// (`category_mask == return_mask == PAGE_IS_WRITTEN`, one bit test per PTE); see
/// [`ScanSpan::one_bit_scan_pays`]. The model tells the written read-only pages from the
/// rest ([`Mm::unseen_written`]).
fn without_uffd_wp() -> Query {
    Query { required: category::WRITTEN, report: category::WRITTEN, ..Query::default() }
}

impl Core {
    /// The candidate pages within `spans` (of a mapping of `sp`'s view size at `base`: the
    /// view itself or the region it was just frozen into) that were written since they were
    /// last write-protected.
    fn scan_written(&self, mm: &Mm<Mapping>, sp: SpaceId, base: usize, spans: &[ScanSpan]) -> Result<Vec<usize>> {
        let pm = self.pagemap.as_ref().ok_or(Error::Internal("an async-WP arena without PAGEMAP_SCAN".into()))?;
        let mut out: Vec<PageRun> = Vec::new();
        for span in spans {
            let q = if span.one_bit_scan_pays() { without_uffd_wp() } else { written_since_protected() };
            pm.scan(base + span.first * PAGE_SIZE, base + span.end * PAGE_SIZE, q, &mut out)
                .map_err(|e| Error::os("PAGEMAP_SCAN", e))?;
        }
        let runs = mm.page_runs(sp, base, out.iter().map(|r| (r.start, r.end)));
        Ok(mm.unseen_written(sp, &runs))
    }

    /// Fold the stores the kernel served alone in pages `[first, end)` of `sp` into the
    /// model (a *sync*; see `crate::mm` `async_wp.rs`). Returns how many pages it recorded.
    /// Nothing to do outside async-WP arenas, for plain spaces, or when no page of the range
    /// is mapped read-only.
    pub fn sync_written(&self, mm: &mut Mm<Mapping>, sp: SpaceId, first: usize, end: usize) -> Result<usize> {
        let candidates = mm.unseen_write_candidates(sp, first, end);
        if candidates.is_empty() {
            return Ok(0);
        }
        let written = self.scan_written(mm, sp, mm.view_base(sp), &candidates)?;
        let mut n = 0;
        for p in written {
            self.ensure_headroom(mm)?;
            n += usize::from(mm.commit_written(sp, p));
        }
        Ok(n)
    }

    /// The pages of `[first, end)` of `sp` the kernel let stores write since they were last
    /// write-protected, found as a sync finds them but not recorded: for `dirty_pages`,
    /// which only asks. (Recording costs a model commit per page; the next sync that needs
    /// the model — a fork, reset, `clean`, aging — finds them again.) Ascending.
    pub fn unseen_written(&self, mm: &Mm<Mapping>, sp: SpaceId, first: usize, end: usize) -> Result<Vec<usize>> {
        let candidates = mm.unseen_write_candidates(sp, first, end);
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        self.scan_written(mm, sp, mm.view_base(sp), &candidates)
    }

    /// `clean` of pages `[first, end)` of `sp` in an async-WP arena: the stores the kernel
    /// served alone are recorded, the dirty bits cleared ([`Mm::mkclean`]), and the pages
    /// that were writable are re-protected. Returns the pages that were dirty.
    ///
    /// One `PAGEMAP_SCAN` walk (`PM_SCAN_WP_MATCHING`) over the mapped pages does both the
    /// finding and the re-protecting — the kernel's own list-and-re-arm — in pieces of
    /// [`CLEAN_WALK_PAGES`], before each of which the bookkeeping for recording every page of
    /// the piece is reserved: a page the walk protected must be recorded, or its store would
    /// be lost. A store racing the walk is either listed by it (then dirty in this clean's
    /// list, and cleaned) or lands after it in a page the model now holds read-only (then
    /// found by the next sync). Without unseen stores to find and with few writable runs,
    /// one `UFFDIO_WRITEPROTECT` per run is cheaper than the walk.
    pub fn clean_async(&self, mm: &mut Mm<Mapping>, sp: SpaceId, first: usize, end: usize) -> Result<Vec<usize>> {
        let (writable, writable_runs) = mm.writable_in(sp, first, end);
        let pm = self.pagemap.as_ref();
        let mut ops = Vec::new();
        if pm.is_none()
            || (writable_runs <= BATCH_PROTECT_RUNS && mm.unseen_write_candidates(sp, first, end).is_empty())
        {
            self.sync_written(mm, sp, first, end)?; // (fails without PAGEMAP_SCAN if it must scan)
            let dirty = mm.mkclean(sp, first, end, &mut ops);
            self.run_ops(mm, &ops)?;
            return Ok(dirty);
        }
        let pm = pm.expect("checked");
        let base = mm.view_base(sp);
        let (mut walked_ok, mut listed_writable) = (true, 0);
        let mut rewritten = Vec::new(); // homes stored to and protected again: dirty, model unchanged
        for span in mm.mapped_spans(sp, first, end) {
            let q = if span.one_bit_scan_pays() { without_uffd_wp() } else { written_since_protected() };
            let q = Query { flags: crate::sys::pagemap::WP_MATCHING | crate::sys::pagemap::CHECK_WPASYNC, ..q };
            let mut at = span.first;
            while at < span.end {
                let to = (at + CLEAN_WALK_PAGES).min(span.end);
                mm.reserve_for_written(to - at).map_err(|_| {
                    Error::os("allocate fault-path bookkeeping", std::io::Error::from_raw_os_error(libc::ENOMEM))
                })?;
                let mut out: Vec<PageRun> = Vec::new();
                let listed = match pm.scan(base + at * PAGE_SIZE, base + to * PAGE_SIZE, q, &mut out) {
                    Ok(()) => mm.page_runs(sp, base, out.iter().map(|r| (r.start, r.end))),
                    Err(e) => {
                        // The walk may have protected pages it did not list: record every
                        // read-only page of the piece as written (contents exact; they are
                        // listed dirty once too often), and re-protect run by run below.
                        tracing::warn!(space = sp.0, error = %e, "PAGEMAP_SCAN (WP_MATCHING) failed; recording the piece as written");
                        walked_ok = false;
                        vec![(at, to)]
                    }
                };
                if cfg!(debug_assertions) && walked_ok {
                    listed_writable += listed.iter().map(|&(a, b)| mm.writable_in(sp, a, b).0).sum::<usize>();
                }
                for p in mm.unseen_written(sp, &listed) {
                    if !walked_ok || !mm.note_rewritten_home(sp, p) {
                        mm.commit_written(sp, p); // reserved above: cannot fail
                    } else {
                        rewritten.push(p);
                    }
                }
                at = to;
            }
        }
        debug_assert!(
            !walked_ok || listed_writable == writable,
            "the walk must list (and protect) every writable page"
        );
        let dirty = mm.mkclean(sp, first, end, &mut ops);
        if !walked_ok {
            self.run_ops(mm, &ops)?;
        }
        Ok(crate::mm::merge_pages(dirty, rewritten))
    }

    /// The first half of a reset of `sp` to `snap` in an async-WP arena: every page the
    /// kernel let a store write since `sp`'s last sync is put back as it was — its bytes
    /// copied from `snap`'s frame (or zeros) and the page write-protected again — where
    /// `sp`'s entry is still `snap`'s; no table is broken for them, and they stay mapped.
    /// Pages whose entries differ are left to [`Mm::reset_to`], which zaps them. O(pages
    /// written) plus one `PAGEMAP_SCAN` of the read-only pages. Returns the pages restored.
    ///
    /// A store racing this (through a raw pointer: `reset_to` takes `&mut Space`) could land
    /// between the copy and the write-protect and go unrecorded; the API excludes it.
    pub fn restore_written(&self, mm: &mut Mm<Mapping>, sp: SpaceId, snap: SpaceId) -> Result<usize> {
        let candidates = mm.unseen_write_candidates(sp, 0, mm.pages(sp));
        if candidates.is_empty() {
            return Ok(0);
        }
        let base = mm.view_base(sp);
        let written = self.scan_written(mm, sp, base, &candidates)?;
        // Each was a store the kernel served alone; the reset undoes it rather than
        // recording it (as `commit_written` would), but it counts all the same.
        mm.counters.writes_async += written.len() as u64;
        let mut restored = 0;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut pairs: Vec<(usize, usize)> = Vec::with_capacity(written.len());
        for p in written {
            let Some(src) = mm.restore_source(sp, snap, p) else { continue };
            let src = match src {
                crate::mm::Src::Zero => super::ZERO_PAGE.0.as_ptr() as usize,
                crate::mm::Src::Addr(a) => {
                    self.verify_src(mm, a)?;
                    a
                }
            };
            pairs.push((base + p * PAGE_SIZE, src));
            restored += 1;
            match runs.last_mut() {
                Some(r) if r.1 == p => r.1 = p + 1,
                _ => runs.push((p, p + 1)),
            }
        }
        // SAFETY: each view page is mapped and writable (the kernel resolved the store
        // that wrote it), each source is a frame's home or the static zero page; both stay
        // mapped while we hold the lock, and nothing else writes the view page (`reset_to`
        // has the space exclusively).
        unsafe { crate::sys::mem::copy_pages(&pairs) };
        match (runs.first(), runs.last(), self.pagemap.as_ref()) {
            (Some(&(lo, _)), Some(&(_, hi)), Some(pm)) if hi - lo < runs.len() * PAGES_PER_PROTECT_CALL => {
                // One walk instead of a write-protect (and TLB flush) per run. It protects
                // every written page of the span: the restored ones, and written pages whose
                // entries differ from the snapshot's, which the reset zaps anyway.
                let q = if candidates.iter().all(ScanSpan::one_bit_scan_pays) {
                    without_uffd_wp()
                } else {
                    written_since_protected()
                };
                let q = Query { flags: crate::sys::pagemap::CHECK_WPASYNC, ..q };
                pm.protect(base + lo * PAGE_SIZE, base + hi * PAGE_SIZE, q)
                    .map_err(|e| Error::os("PAGEMAP_SCAN (WP_MATCHING) restored pages", e))?;
            }
            _ => {
                for &(a, b) in &runs {
                    self.reprotect(self.uffd_of(mm, sp), base, a, b)?;
                }
            }
        }
        Ok(restored)
    }

    fn reprotect(&self, u: &crate::sys::uffd::Uffd, base: usize, a: usize, b: usize) -> Result<()> {
        u.writeprotect(base + a * PAGE_SIZE, (b - a) * PAGE_SIZE, true)
            .map_err(|e| Error::os("UFFDIO_WRITEPROTECT restored pages", e))
    }

    /// [`Core::sync_written`] over every space (the family-wide operations: aging of the
    /// whole arena).
    pub fn sync_all_written(&self, mm: &mut Mm<Mapping>) -> Result<()> {
        if !mm.any_async() {
            return Ok(());
        }
        for sp in mm.space_ids() {
            let pages = mm.pages(sp);
            self.sync_written(mm, sp, 0, pages)?;
        }
        Ok(())
    }

    /// The read-only pages of `sp` that may hold unseen stores, before its view is frozen
    /// (see [`Core::record_frozen_writes`]); the bookkeeping to record all of them is
    /// reserved now, because nothing may fail once the pages have moved.
    pub(super) fn prepare_frozen_writes(&self, mm: &mut Mm<Mapping>, sp: SpaceId) -> Result<Vec<ScanSpan>> {
        let candidates = mm.unseen_write_candidates(sp, 0, mm.pages(sp));
        let pages: usize = candidates.iter().map(ScanSpan::pages).sum();
        if pages > 0 {
            mm.reserve_for_written(pages).map_err(|_| {
                Error::os("allocate fault-path bookkeeping", std::io::Error::from_raw_os_error(libc::ENOMEM))
            })?;
        }
        Ok(candidates)
    }

    /// After `sp`'s view was moved to `frozen_base` and before the model re-homes its
    /// frames: record the stores the kernel served alone in the `candidates` pages (the
    /// uffd-wp bits moved with the pages; the frozen region is not registered, so nothing
    /// writes it any more). Cannot fail: if the scan does, every candidate is recorded as
    /// written (contents exact; `dirty_pages` over-reports until the next `clean`).
    pub(super) fn record_frozen_writes(
        &self,
        mm: &mut Mm<Mapping>,
        sp: SpaceId,
        frozen_base: usize,
        candidates: &[ScanSpan],
    ) {
        if candidates.is_empty() {
            return;
        }
        let written = self.scan_written(mm, sp, frozen_base, candidates).unwrap_or_else(|e| {
            tracing::warn!(space = sp.0, error = %e, "PAGEMAP_SCAN failed; recording every read-only page as written");
            candidates.iter().flat_map(|s| s.first..s.end).collect()
        });
        for p in written {
            mm.commit_written(sp, p);
        }
    }
}
