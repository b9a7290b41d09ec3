//! Plain spaces: a space that has never been forked has nothing to share, so its view is
//! plain kernel memory — not registered with userfaultfd; the kernel serves every fault
//! (first touch at the kernel's speed) and the software tables stay empty. At the first
//! operation that needs the model (a fork, `clean`, `clear_referenced`), the engine
//! registers the view, makes it stable (freezes it, or write-protects it in place) and asks
//! the kernel which pages were written (`PAGEMAP_SCAN`); [`Mm::adopt`] then gives each of
//! them a frame, as if it had been written through faults. From then on the space is like
//! any other.
//!
//! The kernel analogue: a process's private anonymous pages need no `anon_vma` sharing
//! until its first `fork(2)`; there the PTE tables are copied (or, with the COW-PTE series,
//! shared). Adoption is O(written pages) of bookkeeping, paid once per space.

use super::{FrameId, Mm, Pte, RegionId, RegionKind, SpaceId, PAGE_SIZE, PTRS_PER_PTE};

/// Where the written pages of a plain space are when it is adopted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdoptAt {
    /// Still in the view, write-protected (a protecting first fork keeps the view warm):
    /// the view pages become the homes, mapped read-only.
    InPlace,
    /// Moved to this frozen region by [`Mm::freeze_view`] (the view is empty).
    Frozen(RegionId),
}

impl<B> Mm<B> {
    /// A new space whose view is plain kernel memory (see the module doc); it has no
    /// tables until [`Mm::adopt`].
    pub fn new_plain_space(&mut self, pages: usize, view_base: usize, view: B) -> SpaceId {
        let sp = self.new_space(pages, view_base, view);
        self.space_mut(sp).plain = true;
        self.counters.plain_spaces_created += 1;
        sp
    }

    /// Is `sp`'s view still plain kernel memory (never adopted)?
    pub fn is_plain(&self, sp: SpaceId) -> bool {
        self.space(sp).plain
    }

    /// Plain spaces alive now.
    pub fn plain_spaces(&self) -> usize {
        self.spaces.iter().filter(|(_, s)| s.plain).count()
    }

    /// Adopt plain space `sp`: every page in `runs` (ascending, disjoint page ranges of the
    /// view) was written while the kernel owned the view and gets a frame (`DIRTY`,
    /// `ACCESSED`: written since creation), homed where `at` says. Pages outside `runs`
    /// read as zeros. The space is plain no longer.
    ///
    /// `InPlace`: the engine has registered and write-protected the view and zapped the
    /// zero-page mappings; the written pages stay mapped read-only and are the homes.
    /// `Frozen(r)`: the view was frozen into `r` (which holds no homes yet); a frozen
    /// region left without homes is released.
    pub fn adopt(&mut self, sp: SpaceId, runs: &[(usize, usize)], at: AdoptAt) {
        debug_assert!(self.is_plain(sp), "adopt of a space that is not plain");
        debug_assert!(runs.windows(2).all(|w| w[0].1 <= w[1].0), "runs must be ascending and disjoint");
        let (family, view) = (self.space(sp).family, self.space(sp).view);
        let region = match at {
            AdoptAt::InPlace => view,
            AdoptAt::Frozen(r) => {
                debug_assert_eq!(self.region(r).kind, RegionKind::Frozen);
                debug_assert_eq!(self.region(r).homes, 0);
                r
            }
        };
        let total: usize = runs.iter().map(|(a, b)| b - a).sum();
        // One allocation up front rather than doublings (and their copies) as frames come.
        let _ = self.frames.reserve(total);
        debug_assert!(self.frames.slots_len() + total <= u32::MAX as usize);
        let mut adopted = 0usize;
        for &(a, b) in runs {
            debug_assert!(a < b && b <= self.space(sp).pages);
            let mut page = a;
            while page < b {
                let ti = page / PTRS_PER_PTE;
                let t = match self.space(sp).dir[ti] {
                    Some(t) => t,
                    None => {
                        let t = self.tables.alloc(None);
                        self.space_mut(sp).dir[ti] = Some(t);
                        t
                    }
                };
                let stop = b.min((ti + 1) * PTRS_PER_PTE);
                let first = self.frames.alloc_run(stop - page, region, page as u32, page as u32, family);
                let tab = self.tables.get_mut(t);
                for (i, p) in (page..stop).enumerate() {
                    tab.set(p % PTRS_PER_PTE, Pte::new(FrameId(first.0 + i as u32), Pte::ACCESSED | Pte::DIRTY));
                }
                page = stop;
            }
            if at == AdoptAt::InPlace {
                let vs = &mut self.space_mut(sp).vs;
                for p in a..b {
                    vs.present.set(p);
                    vs.home.set(p);
                }
            }
            adopted += b - a;
        }
        let r = self.region_mut(region);
        r.homes += adopted;
        if let AdoptAt::Frozen(fr) = at {
            r.peak = r.homes;
            if adopted == 0 {
                // Nothing was written: the frozen region holds nothing anyone needs.
                let r = self.regions.remove(fr.0);
                self.reclaim.dead.push(r.backing);
            }
        }
        self.space_mut(sp).plain = false;
        self.counters.adoptions += 1;
        self.counters.pages_adopted += adopted as u64;
    }

    /// After an in-place adoption of `sp` (async-WP arenas): `runs` of its view map the
    /// kernel's zero page, write-protected — read-only copies of zeros in the model, with
    /// no frame. Pages already adopted as written are left as they are.
    pub fn map_zero_copies(&mut self, sp: SpaceId, runs: &[(usize, usize)]) {
        let Mm { spaces, bit_spares, .. } = self;
        let vs = &mut spaces.get_mut(sp.0).expect("use of a dropped space").vs;
        for &(a, b) in runs {
            for p in a..b {
                if !vs.present.get(p) {
                    vs.present.set_with(p, bit_spares);
                }
            }
        }
    }

    /// Scan output (address runs `[start, end)` in the view at `base`) as page runs of
    /// `sp` for [`Mm::adopt`]: clamped to its pages, adjacent runs merged.
    pub fn page_runs(
        &self,
        sp: SpaceId,
        base: usize,
        runs: impl IntoIterator<Item = (usize, usize)>,
    ) -> Vec<(usize, usize)> {
        let pages = self.space(sp).pages;
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (start, end) in runs {
            let (a, b) = ((start - base) / PAGE_SIZE, ((end - base) / PAGE_SIZE).min(pages));
            if a >= b {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => out.push((a, b)),
            }
        }
        out
    }
}
