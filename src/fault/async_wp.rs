//! The kernel side of async write-protection (see `crate::mm` `async_wp.rs`): find the
//! pages the kernel let stores write without a trap, with `PAGEMAP_SCAN`, and hand them to
//! the core.

use super::Core;
use crate::error::{Error, Result};
use crate::mm::{Mm, SpaceId, PAGE_SIZE};
use crate::sys::mem::Mapping;
use crate::sys::pagemap::{category, PageRun, Query};

/// Pages written since they were last write-protected: mapped, and without the uffd-wp bit
/// (an async-WP fault cleared it). A page not mapped is reported "written" by the kernel
/// too (no uffd-wp marker), hence PRESENT.
fn written_since_protected() -> Query {
    Query { required: category::WRITTEN | category::PRESENT, report: category::WRITTEN, ..Query::default() }
}

impl Core {
    /// The pages within `runs` (page runs of a mapping of `sp`'s view size at `base`: the
    /// view itself or the region it was just frozen into) that were written since they were
    /// last write-protected.
    fn scan_written(&self, mm: &Mm<Mapping>, sp: SpaceId, base: usize, runs: &[(usize, usize)]) -> Result<Vec<usize>> {
        let pm = self.pagemap.as_ref().ok_or(Error::Internal("an async-WP arena without PAGEMAP_SCAN".into()))?;
        let mut out: Vec<PageRun> = Vec::new();
        for &(a, b) in runs {
            pm.scan(base + a * PAGE_SIZE, base + b * PAGE_SIZE, written_since_protected(), &mut out)
                .map_err(|e| Error::os("PAGEMAP_SCAN", e))?;
        }
        let runs = mm.page_runs(sp, base, out.iter().map(|r| (r.start, r.end)));
        Ok(runs.into_iter().flat_map(|(a, b)| a..b).collect())
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

    /// [`Core::sync_written`] over every space (the family-wide operations: aging of the
    /// whole arena).
    pub fn sync_all_written(&self, mm: &mut Mm<Mapping>) -> Result<()> {
        if !mm.async_wp() {
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
    pub(super) fn prepare_frozen_writes(&self, mm: &mut Mm<Mapping>, sp: SpaceId) -> Result<Vec<(usize, usize)>> {
        let candidates = mm.unseen_write_candidates(sp, 0, mm.pages(sp));
        let pages: usize = candidates.iter().map(|(a, b)| b - a).sum();
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
        candidates: &[(usize, usize)],
    ) {
        if candidates.is_empty() {
            return;
        }
        let written = self.scan_written(mm, sp, frozen_base, candidates).unwrap_or_else(|e| {
            tracing::warn!(space = sp.0, error = %e, "PAGEMAP_SCAN failed; recording every read-only page as written");
            candidates.iter().flat_map(|&(a, b)| a..b).collect()
        });
        for p in written {
            mm.commit_written(sp, p);
        }
    }
}
