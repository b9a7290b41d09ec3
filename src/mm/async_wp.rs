//! Writes the kernel serves alone (`UFFD_FEATURE_WP_ASYNC`, see
//! `ArenaBuilder::async_wp`), and how they re-enter the model.
//!
//! In such an arena a view page mapped read-only is write-protected *asynchronously*: a
//! store to it is resolved by the kernel at its own write-fault speed (the page becomes
//! writable and is marked written; no trap reaches us). The page was a private copy of its
//! frame — the view never maps a shared frame's home in such an arena, see below — so the
//! store changed only this space's view, never bytes another space reads. The model learns
//! about it later, at a *sync*: `PAGEMAP_SCAN` lists the written pages among those the
//! model holds read-only ([`Mm::unseen_write_candidates`]), and [`Mm::commit_written`]
//! records each as the write fault it would have been, minus the kernel work (the bytes are
//! already in the view page, which becomes the home of a new frame, or of the exclusive
//! frame it copied).
//!
//! What keeps this sound (checked by [`Mm::check`]):
//! * **No view page is the home of a frame that another table or space can see.** A fork
//!   (or a reset to a space) of an async arena never write-protects homes in place: if the
//!   view holds any home, it is frozen ([`Mm::share_plan`]). Homes in a view are therefore
//!   frames of refcount 1 in tables of share 1, and a store to one (after `clean` or aging
//!   protected it) changes only what that one space sees.
//! * **Every operation that reads entries syncs first** (`dirty_pages`, `clean`, aging, a
//!   fork, a reset), and the API read path reads mapped pages from the view itself.
//! * **Nothing zaps a read-only view page that may hold an unseen write.** A freeze moves
//!   the pages (the uffd-wp bits move with them, `UFFD_FEATURE_EVENT_REMAP`), and the frozen
//!   pages are scanned before the model re-homes them; aging does not zap read-only copies
//!   in such an arena (it re-arms only writable homes); a reset or discard of a space drops
//!   that space's own contents, so a store racing it is ordered before it.

use super::*;

/// Candidate runs closer than this (in pages) are scanned in one `PAGEMAP_SCAN` call: a
/// call costs ~1 µs, walking a page ~1 ns.
const SCAN_GAP: usize = PTRS_PER_PTE;

/// How many candidate pages a span must hold per page of its gaps for the kernel's one-bit
/// scan to pay (see [`ScanSpan::one_bit_scan_pays`]).
const CANDIDATES_PER_GAP_PAGE: usize = 8;

/// A span of pages to scan for stores the kernel served alone ([`Mm::unseen_write_candidates`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanSpan {
    /// First page.
    pub first: usize,
    /// One past the last page.
    pub end: usize,
    /// Pages in the span that are not candidates (holes, writable pages).
    pub gap_pages: usize,
}

impl ScanSpan {
    /// The pages of the span, all of them to be walked.
    pub fn pages(&self) -> usize {
        self.end - self.first
    }

    /// Whether to ask the kernel only for pages without the uffd-wp bit — its fast path,
    /// one bit test per PTE — rather than for pages both mapped and without it (a full
    /// classification of each PTE). Measured on 6.18 (`examples/bench` W2): the one-bit
    /// walk costs ~1.5 ns per protected page against ~3.2 ns classified, but the gap
    /// pages (holes and writable pages have no uffd-wp bit either) are each output,
    /// ~12.6 ns against ~1.9 ns classified. So it pays when gaps are under a sixth of the
    /// candidates — a view mapped whole, as in a reset loop — and loses 6× on a sparse
    /// view.
    pub fn one_bit_scan_pays(&self) -> bool {
        self.gap_pages * CANDIDATES_PER_GAP_PAGE < self.pages() - self.gap_pages
    }
}

/// Runs merged into spans where less than [`SCAN_GAP`] apart.
fn spans_of(runs: Vec<(usize, usize)>) -> Vec<ScanSpan> {
    let mut out: Vec<ScanSpan> = Vec::new();
    for (a, b) in runs {
        match out.last_mut() {
            Some(last) if a - last.end < SCAN_GAP => {
                last.gap_pages += a - last.end;
                last.end = b;
            }
            _ => out.push(ScanSpan { first: a, end: b, gap_pages: 0 }),
        }
    }
    out
}

impl<B> Mm<B> {
    /// Views of this arena are registered with an async-WP userfaultfd (see the module
    /// doc): forks freeze views that hold homes, and aging leaves read-only copies mapped.
    pub fn set_async_wp(&mut self, on: bool) {
        self.async_wp = on;
    }

    /// See [`Mm::set_async_wp`].
    pub fn async_wp(&self) -> bool {
        self.async_wp
    }

    /// Mark `sp`'s view as registered with an async-WP userfaultfd (or not), whatever the
    /// arena's default: right after the space is created, before its view maps anything.
    pub fn set_space_async(&mut self, sp: SpaceId, on: bool) {
        debug_assert!(self.space(sp).vs.present.count() == 0, "a view changes its write-protect mode only empty");
        self.space_mut(sp).async_wp = on;
    }

    /// Is `sp`'s view async-WP ([`SpaceMm::async_wp`])?
    pub fn space_async(&self, sp: SpaceId) -> bool {
        self.space(sp).async_wp
    }

    /// Is any live view async-WP?
    pub fn any_async(&self) -> bool {
        self.async_wp || self.spaces.iter().any(|(_, s)| s.async_wp)
    }

    /// Spans of pages in `[first, end)` of `sp` that the kernel may have written without a
    /// trap: runs of pages mapped in the view and not writable in the model, ascending;
    /// runs less than a table apart are merged into one span (its gaps hold no candidate
    /// and are filtered by [`Mm::unseen_written`]).
    pub fn unseen_write_candidates(&self, sp: SpaceId, first: usize, end: usize) -> Vec<ScanSpan> {
        let s = self.space(sp);
        if !s.async_wp || s.plain {
            return Vec::new();
        }
        spans_of(s.vs.present.runs_and_not_in(&s.vs.writable, first, end.min(s.pages)))
    }

    /// Spans of the pages of `[first, end)` of `sp` mapped in its view (the gaps are holes):
    /// what a walk that re-protects every writable page and lists every unseen store must
    /// cover.
    pub fn mapped_spans(&self, sp: SpaceId, first: usize, end: usize) -> Vec<ScanSpan> {
        let s = self.space(sp);
        spans_of(s.vs.present.runs_in(first, end.min(s.pages)))
    }

    /// Pages of `[first, end)` of `sp` writable in the model, and in how many runs.
    pub fn writable_in(&self, sp: SpaceId, first: usize, end: usize) -> (usize, usize) {
        let runs = self.space(sp).vs.writable.runs_in(first, end);
        (runs.iter().map(|(a, b)| b - a).sum(), runs.len())
    }

    /// The pages of `runs` (pages of `sp` the kernel reports without the uffd-wp bit) that
    /// the model holds mapped read-only: those were written by stores the kernel served
    /// alone. The rest are holes or pages the model already holds writable. Ascending.
    pub fn unseen_written(&self, sp: SpaceId, runs: &[(usize, usize)]) -> Vec<usize> {
        let vs = &self.space(sp).vs;
        runs.iter().flat_map(|&(a, b)| a..b).filter(|&p| vs.present.get(p) && !vs.writable.get(p)).collect()
    }

    /// Preallocate the bookkeeping [`Mm::commit_written`] needs for `pages` pages, so that
    /// a sync after a freeze (which cannot be undone) cannot fail on memory.
    pub fn reserve_for_written(&mut self, pages: usize) -> Result<(), std::collections::TryReserveError> {
        let tables = pages.div_ceil(PTRS_PER_PTE) + 2;
        self.tables.reserve(tables)?;
        self.frames.reserve(pages + 2)?;
        let chunks = 3 * tables;
        self.bit_spares.try_reserve(chunks)?;
        while self.bit_spares.len() < chunks {
            self.bit_spares.push(Bits::try_new_chunk()?);
        }
        Ok(())
    }

    /// Record that the kernel served a write to `page` of `sp` on its own: the view page
    /// (mapped read-only in the model) now holds bytes of its own and is writable. Exactly
    /// what the write fault would have committed — a broken table, a new frame homed in the
    /// view page (or the space's exclusive frame re-homed there), `DIRTY` — with no kernel
    /// work left to do. Returns `false` (and changes nothing) for a page that is not mapped
    /// read-only in the model: writable pages are already recorded, and a page not mapped
    /// cannot have been written.
    pub fn commit_written(&mut self, sp: SpaceId, page: usize) -> bool {
        let vs = &self.space(sp).vs;
        if !vs.present.get(page) || vs.writable.get(page) {
            return false;
        }
        let r = self.resolve_fault(sp, page, true);
        if !matches!(r.action, Action::Unprotect { .. }) {
            // Only an evacuation (a shared frame homed in this view page) decides anything
            // else, and no async arena keeps one (see the module doc).
            debug_assert!(false, "unseen write to a shared home: {r:?}");
            return false;
        }
        let kind = self.commit(r);
        let c = &mut self.counters;
        match kind {
            FaultKind::WriteZero => c.faults_write_zero -= 1,
            FaultKind::WriteCow => c.faults_write_cow -= 1,
            FaultKind::WriteReuse => c.faults_write_reuse -= 1,
            _ => unreachable!("a write commit"),
        }
        c.writes_async += 1;
        true
    }

    /// For `clean`, which write-protects `page` again in the same walk that found the
    /// kernel's store to it: when `sp`'s view page is the home of the page's frame — in an
    /// async-WP view, a frame of refcount 1 in a table of share 1 (invariant 7) — recording
    /// the store ([`Mm::commit_written`]: `ACCESSED | DIRTY`, writable) and cleaning it again
    /// would leave the model as it was but for `ACCESSED`, so only that is set and the store
    /// counted; the page belongs in the clean's list. Saves the commit's frame lookups and
    /// table checks (~0.2 µs of cache misses a page over 1 GiB), and the entry is not even
    /// read unless some `ACCESSED` bit was ever cleared (`Mm::accessed_cleared`). Returns
    /// `false`, changing nothing, for any other page.
    pub fn note_rewritten_home(&mut self, sp: SpaceId, page: usize) -> bool {
        let vs = &self.space(sp).vs;
        if !vs.home.get(page) || vs.writable.get(page) || !vs.present.get(page) {
            return false;
        }
        debug_assert!(self.space(sp).async_wp, "a trapping view's stores are never unseen");
        if cfg!(debug_assertions) {
            let t = self.space(sp).dir[page / PTRS_PER_PTE].expect("a home without table");
            let e = self.tables.get(t).entry(page % PTRS_PER_PTE);
            let f = e.frame().expect("a home without frame");
            debug_assert!(self.tables.get(t).share == 1 && self.frames.get(f).refs == 1, "invariant 7");
            debug_assert!(self.accessed_cleared || e.has(Pte::ACCESSED), "a home without ACCESSED, never aged");
        }
        if self.accessed_cleared {
            self.set_entry_bits(sp, page, Pte::ACCESSED); // else set already: spare the cache miss
        }
        self.counters.writes_async += 1;
        true
    }

    /// Where a reset of `sp` to `snap` can restore `page` in place: when `sp`'s entry for
    /// it is still `snap`'s (the page was written only by stores the kernel served alone),
    /// copying the bytes of that frame (or zeros) back into the view page and
    /// write-protecting it again leaves the page exactly as the reset's model says it is —
    /// a read-only copy of `snap`'s frame — with no table broken, replaced or zapped.
    /// `None` when the entries differ: the reset replaces that table and zaps the page.
    pub fn restore_source(&mut self, sp: SpaceId, snap: SpaceId, page: usize) -> Option<Src> {
        let (mine, theirs) = (self.lookup(sp, page), self.lookup(snap, page));
        let vs = &self.space(sp).vs;
        if mine.frame() != theirs.frame() || !vs.present.get(page) || vs.home.get(page) {
            return None;
        }
        self.counters.pages_restored += 1;
        Some(match mine.frame() {
            None => Src::Zero,
            Some(f) => Src::Addr(self.home_addr(self.frames.get(f).home)),
        })
    }

    /// No async-WP view page is the home of a frame that another table or space can see
    /// (see the module doc).
    pub(super) fn check_async_homes(&self) -> Result<(), String> {
        if !self.any_async() {
            return Ok(());
        }
        for (fid, f) in self.frames.iter() {
            let RegionKind::View(sp) = self.region(f.home.region).kind else { continue };
            if !self.space(sp).async_wp {
                continue;
            }
            let page = f.home.page as usize;
            let t = self.space(sp).dir[page / PTRS_PER_PTE];
            let share = t.map(|t| self.tables.get(t).share).unwrap_or(0);
            if f.refs != 1 || share != 1 {
                return Err(format!(
                    "async arena: frame {fid:?} homed in the view of space {} page {page} has refs {} in a table of share {share}",
                    sp.0, f.refs
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_merge_close_runs_and_count_their_gaps() {
        let spans = spans_of(vec![(0, 100), (110, 600), (600 + SCAN_GAP, 700 + SCAN_GAP)]);
        assert_eq!(
            spans,
            vec![
                ScanSpan { first: 0, end: 600, gap_pages: 10 },
                ScanSpan { first: 600 + SCAN_GAP, end: 700 + SCAN_GAP, gap_pages: 0 }
            ]
        );
        // A view mapped whole but for a few holes: the one-bit scan pays.
        assert!(spans[0].one_bit_scan_pays() && spans[1].one_bit_scan_pays());
        // Clusters of 16 mapped pages, 100 apart (a sparse view after fault-around): it loses.
        let sparse = spans_of((0..100).map(|i| (i * 116, i * 116 + 16)).collect());
        assert_eq!(sparse.len(), 1);
        assert_eq!(sparse[0].gap_pages, 99 * 100);
        assert!(!sparse[0].one_bit_scan_pays());
        // At the threshold: gaps an eighth of the candidates do not pay, a little less do.
        assert!(!ScanSpan { first: 0, end: 900, gap_pages: 100 }.one_bit_scan_pays());
        assert!(ScanSpan { first: 0, end: 900, gap_pages: 99 }.one_bit_scan_pays());
    }
}
