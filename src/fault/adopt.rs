//! The kernel side of adopting a plain space (see `crate::mm::adopt`): register its view,
//! make its contents stable, find the written pages with `PAGEMAP_SCAN`, hand them to the
//! core.

use std::time::Instant;

use super::Core;
use crate::error::{Error, Result};
use crate::mm::{AdoptAt, Mm, SpaceId, PAGE_SIZE};
use crate::sys::mem::Mapping;
use crate::sys::pagemap::{category, PageRun, Query};

/// Written pages: present or swapped, and not the shared zero page (a read of a page never
/// written maps the zero page; views are `MADV_NOHUGEPAGE`, so a write populates 4 KiB).
fn written() -> Query {
    Query {
        excluded: category::PFNZERO,
        any_of: category::PRESENT | category::SWAPPED,
        report: category::PRESENT | category::SWAPPED,
        ..Query::default()
    }
}

/// Pages mapping the shared zero page (read, never written).
fn zero_mapped() -> Query {
    Query { required: category::PFNZERO, report: category::PFNZERO, ..Query::default() }
}

/// Pages touched at all (a read maps the zero page): what "referenced" means for a plain
/// space, whose accessed bits only the kernel sees.
fn touched() -> Query {
    Query {
        any_of: category::PRESENT | category::SWAPPED,
        report: category::PRESENT | category::SWAPPED,
        ..Query::default()
    }
}

/// How to adopt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AdoptHow {
    /// Keep the written pages mapped in the view (write-protected): no re-faults later,
    /// but write-protecting costs O(written pages) in the kernel (~15–22 ms per GiB).
    InPlace,
    /// Freeze the view (`mremap`, O(tables)); the space re-faults what it touches later.
    Freeze,
    /// In place when few pages were written (the threshold of a protecting fork), else
    /// freeze.
    Auto,
    /// For dirty tracking (`Space::clean`): where the arena gives forks async-WP views
    /// (`ArenaBuilder::async_forks`), into one as well, in place — from then on the kernel
    /// tracks the space's stores itself (no trap per first write; `clean` is one
    /// `PAGEMAP_SCAN` walk that lists and re-arms). Elsewhere [`AdoptHow::Auto`].
    Track,
}

impl Core {
    /// Runs of pages of `sp`'s view (or of the region at `base` of the view's size) that
    /// match `q`, as page runs.
    fn scan_pages(&self, mm: &Mm<Mapping>, sp: SpaceId, base: usize, q: Query) -> Result<Vec<(usize, usize)>> {
        let pm = self.pagemap.as_ref().ok_or(Error::Internal("a plain space without PAGEMAP_SCAN".into()))?;
        let len = mm.pages(sp) * PAGE_SIZE;
        let mut out: Vec<PageRun> = Vec::new();
        pm.scan(base, base + len, q, &mut out).map_err(|e| Error::os("PAGEMAP_SCAN", e))?;
        Ok(mm.page_runs(sp, base, out.iter().map(|r| (r.start, r.end))))
    }

    /// Pages in `[first, end)` of plain space `sp` written since it was created (exact:
    /// the kernel allocated a page for them), without adopting it.
    pub fn plain_written(&self, mm: &Mm<Mapping>, sp: SpaceId, first: usize, end: usize) -> Result<Vec<usize>> {
        let runs = self.scan_pages(mm, sp, mm.view_base(sp), written())?;
        Ok(pages_in(&runs, first, end))
    }

    /// Pages in `[first, end)` of plain space `sp` touched (read or written) since it was
    /// created.
    pub fn plain_touched(&self, mm: &Mm<Mapping>, sp: SpaceId, first: usize, end: usize) -> Result<Vec<usize>> {
        let runs = self.scan_pages(mm, sp, mm.view_base(sp), touched())?;
        Ok(pages_in(&runs, first, end))
    }

    /// Adopt `sp` if it is still plain: afterwards it is an ordinary space (registered
    /// view, a frame per written page). On error the space is still plain and unchanged.
    pub fn adopt_if_plain(&self, mm: &mut Mm<Mapping>, sp: SpaceId, how: AdoptHow) -> Result<()> {
        if !mm.is_plain(sp) {
            return Ok(());
        }
        // An async-WP arena keeps no home write-protected in a view across a fork (its
        // forks ask to freeze); `clean` and aging adopt in place there whatever the size
        // ([`Core::adopt_in_place_async`]): the pages stay mapped, and stores to them keep
        // costing no trap, where a freeze would make every later touch a fault.
        // A plain view is registered with no context yet, so dirty tracking may pick the
        // async-WP one (the model holds nothing of the space: the switch is free).
        let switched = how == AdoptHow::Track
            && !mm.space_async(sp)
            && !mm.other_uffd(sp)
            && self.async_fork_uffd().ok().flatten().is_some();
        if switched {
            mm.set_space_async(sp, true);
        }
        let how = match how {
            AdoptHow::Auto | AdoptHow::Track if mm.space_async(sp) => AdoptHow::InPlace,
            AdoptHow::Track => AdoptHow::Auto,
            how => how,
        };
        let t0 = Instant::now();
        let (base, len) = (mm.view_base(sp), mm.pages(sp) * PAGE_SIZE);
        // Register first: from here on every access to a page the kernel has not mapped
        // traps to us (and waits for the lock we hold), so no write can slip in unseen
        // between the scan and the adoption.
        let u = self.uffd_of(mm, sp);
        let r = u.register(base, len).map_err(|e| Error::os("UFFDIO_REGISTER view", e)).and_then(|()| {
            self.adopt_registered(mm, sp, how, base, len).inspect_err(|_| {
                // Back to plain: unregistering wakes any thread that trapped meanwhile,
                // and its access retries against the kernel. (Also clears any
                // write-protection.)
                let _ = u.unregister(base, len);
            })
        });
        if r.is_err() && switched {
            mm.set_space_async(sp, false);
        }
        let in_place = r?;
        tracing::debug!(
            space = sp.0,
            in_place,
            async_wp = mm.space_async(sp),
            pages = mm.counters.pages_adopted,
            elapsed_us = t0.elapsed().as_micros() as u64,
            "plain space adopted"
        );
        Ok(())
    }

    /// [`Core::adopt_if_plain`] after the view was registered; returns whether it adopted
    /// in place.
    fn adopt_registered(
        &self,
        mm: &mut Mm<Mapping>,
        sp: SpaceId,
        how: AdoptHow,
        base: usize,
        len: usize,
    ) -> Result<bool> {
        let in_place = match how {
            AdoptHow::InPlace => true,
            AdoptHow::Freeze => false,
            AdoptHow::Auto | AdoptHow::Track => {
                // A count, stopped early: only the threshold matters.
                let limit = mm.protect_limit_for(sp);
                let mut q = written();
                q.max_pages = limit + 1;
                let runs = self.scan_pages(mm, sp, base, q)?;
                runs.iter().map(|(a, b)| b - a).sum::<usize>() <= limit
            }
        };
        if in_place && mm.space_async(sp) {
            self.adopt_in_place_async(mm, sp, base, len)?;
        } else if in_place {
            // Stable contents: every write now traps (present pages are write-protected,
            // absent ones are missing).
            self.uffd_of(mm, sp).writeprotect(base, len, true).map_err(|e| Error::os("UFFDIO_WRITEPROTECT", e))?;
            let runs = self.scan_pages(mm, sp, base, written())?;
            // Zero-page mappings must go: the model says "not mapped", and a write to a
            // mapped zero page would be served by the kernel's own copy-on-write.
            for (a, b) in self.scan_pages(mm, sp, base, zero_mapped())? {
                crate::sys::mem::discard_range(base + a * PAGE_SIZE, (b - a) * PAGE_SIZE)
                    .map_err(|e| Error::os("MADV_DONTNEED zero pages", e))?;
            }
            mm.adopt(sp, &runs, AdoptAt::InPlace);
        } else {
            let frozen = self.freeze(mm, sp)?;
            let fbase = frozen.addr();
            // From here the view is empty and registered; the written pages are in
            // `frozen`, which nothing else touches: scan it.
            let runs = self.scan_pages(mm, sp, fbase, written()).unwrap_or_else(|e| {
                // The pages have moved: adopt every one (never-written pages read as
                // zeros from the frozen region). Contents stay exact; `dirty_pages` then
                // over-reports until the next `clean`.
                tracing::warn!(space = sp.0, error = %e, "PAGEMAP_SCAN failed; adopting every page of the view");
                vec![(0, mm.pages(sp))]
            });
            let region = mm.freeze_view(sp, fbase, frozen);
            mm.adopt(sp, &runs, AdoptAt::Frozen(region));
            self.reclaim(mm);
        }
        Ok(in_place)
    }
}

impl Core {
    /// In-place adoption in an async-WP arena, where write-protecting does not make the
    /// contents stable — a store to a protected page is the kernel's alone — and where
    /// write-protecting the whole view leaves uffd-wp markers in its holes
    /// (`UFFD_FEATURE_WP_UNPOPULATED` comes with WP_ASYNC), which `PAGEMAP_SCAN` reports as
    /// swapped pages. So, the view being registered (a hole now traps and waits for the
    /// lock we hold):
    /// 1. the pages touched so far are listed *before* protecting: exactly the non-holes,
    ///    from here until we let go of the lock — the markers land outside them;
    /// 2. the whole view is write-protected;
    /// 3. the pages mapping the shared zero page are listed, then the written ones (both
    ///    within the touched ones). A store to a zero-page mapping after its listing turns
    ///    it into a written page: listed written too if before that listing (the written
    ///    listing wins), or left a zero copy with its uffd-wp bit cleared, which the next
    ///    sync records. A store to a written page after the protection clears its bit: the
    ///    page is adopted as a home, and the next sync records the store.
    ///
    /// The written pages become frames homed in place (refcount 1, a table of share 1 each:
    /// DESIGN invariant 7 holds), the zero-page mappings read-only copies of zeros.
    fn adopt_in_place_async(&self, mm: &mut Mm<Mapping>, sp: SpaceId, base: usize, len: usize) -> Result<()> {
        let touched_runs = self.scan_pages(mm, sp, base, touched())?;
        self.uffd_of(mm, sp).writeprotect(base, len, true).map_err(|e| Error::os("UFFDIO_WRITEPROTECT", e))?;
        let zeros = intersect(&self.scan_pages(mm, sp, base, zero_mapped())?, &touched_runs);
        let runs = intersect(&self.scan_pages(mm, sp, base, written())?, &touched_runs);
        mm.adopt(sp, &runs, AdoptAt::InPlace);
        mm.map_zero_copies(sp, &zeros);
        Ok(())
    }
}

/// Ascending disjoint runs: the pages in both `a` and `b`.
fn intersect(a: &[(usize, usize)], b: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (lo, hi) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if lo < hi {
            out.push((lo, hi));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The pages of `runs` within `[first, end)`.
fn pages_in(runs: &[(usize, usize)], first: usize, end: usize) -> Vec<usize> {
    runs.iter().flat_map(|&(a, b)| a.max(first)..b.min(end)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn intersect_runs() {
        let a = [(0, 10), (20, 30), (40, 50)];
        let b = [(5, 25), (28, 45), (60, 70)];
        assert_eq!(super::intersect(&a, &b), vec![(5, 10), (20, 25), (28, 30), (40, 45)]);
        assert_eq!(super::intersect(&a, &[]), vec![]);
        assert_eq!(super::intersect(&[(0, 100)], &a), a.to_vec());
    }
}
