//! Spaces loaded from a saved image (`Arena::load`): the image's data area, mapped
//! read-only, is a region of immutable homes like a frozen one, and every page stored in
//! it gets a frame homed there — the loaded space is ready at once, and each page is
//! brought in (copied into a view, read by the API, streamed out) on first use. Before its
//! bytes leave the region the first time, the page's checksum is checked
//! ([`Mm::unverified`]); such regions are never compacted and their frames never migrate
//! or move, so nothing reads them any other way.

use super::{FrameId, Mm, PageChecks, Pte, Region, RegionId, RegionKind, SpaceId, PAGE_SIZE, PTRS_PER_PTE};

impl<B> Mm<B> {
    /// A new (registered) space of `pages` whose stored pages are the pages of an image's
    /// data area mapped at `data_base` (`data` owns that mapping): page `p` stored in
    /// `index` with CRC `c` gets a frame homed at `data_base + p * 4096`, to be checked
    /// against `c` when first used; the others read as zeros. Nothing is accessed or
    /// dirty. If no page is stored the mapping is released at once.
    pub fn new_loaded_space(
        &mut self,
        pages: usize,
        view_base: usize,
        view: B,
        data_base: usize,
        data: B,
        index: crate::image::PageIndex,
    ) -> SpaceId {
        debug_assert_eq!(index.pages(), pages);
        let sp = self.new_space(pages, view_base, view);
        let family = self.space(sp).family;
        let stored = index.count();
        let stored_bits = index.stored;
        let check = PageChecks { crcs: index.crcs, verified: vec![0; pages.div_ceil(64)] };
        let region = RegionId(self.regions.insert(Region {
            base: data_base,
            pages,
            kind: RegionKind::Frozen,
            homes: 0,
            peak: 0,
            queued: false,
            pool: false,
            check: Some(Box::new(check)),
            swap: None,
            backing: data,
        }));
        let is_stored = |p: usize| stored_bits[p / 64] & (1 << (p % 64)) != 0;
        let _ = self.frames.reserve(stored);
        let mut p = 0;
        while p < pages {
            if stored_bits[p / 64] == 0 && p % 64 == 0 {
                p += 64; // a word of holes
                continue;
            }
            if !is_stored(p) {
                p += 1;
                continue;
            }
            // A run of stored pages within one table: one table, one run of frames.
            let ti = p / PTRS_PER_PTE;
            let stop_max = ((ti + 1) * PTRS_PER_PTE).min(pages);
            let mut stop = p;
            while stop < stop_max && is_stored(stop) {
                stop += 1;
            }
            let t = match self.space(sp).dir[ti] {
                Some(t) => t,
                None => {
                    let t = self.tables.alloc(None);
                    self.space_mut(sp).dir[ti] = Some(t);
                    t
                }
            };
            let Mm { frames, tables, .. } = self;
            let tab = tables.get_mut(t);
            // Free slots first (a load after others were dropped reuses their memory),
            // then a run of new ones.
            let mut q = p;
            while q < stop && frames.has_free() {
                let f = frames.alloc(super::Home { region, page: q as u32 }, q as u32, family);
                tab.set(q % PTRS_PER_PTE, Pte::new(f, 0));
                q += 1;
            }
            if q < stop {
                let first = frames.alloc_run(stop - q, region, q as u32, q as u32, family);
                for (i, r) in (q..stop).enumerate() {
                    tab.set(r % PTRS_PER_PTE, Pte::new(FrameId(first.0 + i as u32), 0));
                }
            }
            p = stop;
        }
        let r = self.region_mut(region);
        r.homes = stored;
        r.peak = stored;
        if stored == 0 {
            let r = self.regions.remove(region.0);
            self.reclaim.dead.push(r.backing);
        } else {
            self.file_regions.push(region);
        }
        self.counters.spaces_loaded += 1;
        self.counters.pages_loaded += stored as u64;
        sp
    }

    /// If `addr` (the source of a copy about to happen) is a page of a loaded image not yet
    /// checked: the region, the page's index in the image and its expected checksum. The
    /// caller checksums the page and calls [`Mm::set_verified`], or fails. O(loaded
    /// images alive).
    pub fn unverified(&self, addr: usize) -> Option<(RegionId, usize, u32)> {
        for &r in &self.file_regions {
            let reg = self.region(r);
            if addr < reg.base || addr >= reg.base + reg.pages * PAGE_SIZE {
                continue;
            }
            let page = (addr - reg.base) / PAGE_SIZE;
            let check = reg.check.as_ref().expect("file regions carry checks");
            if check.verified[page / 64] & (1 << (page % 64)) != 0 {
                return None;
            }
            return Some((r, page, check.crcs[page]));
        }
        None
    }

    /// Record that page `page` of loaded region `r` matched its checksum.
    pub fn set_verified(&mut self, r: RegionId, page: usize) {
        let check = self.region_mut(r).check.as_mut().expect("file regions carry checks");
        check.verified[page / 64] |= 1 << (page % 64);
        self.counters.pages_verified += 1;
    }

    /// Is `sp`'s page `page` a frame still homed in a loaded image?
    #[cfg(test)]
    pub fn homed_in_image(&self, sp: SpaceId, page: usize) -> bool {
        self.lookup(sp, page).frame().is_some_and(|f| self.region(self.frames.get(f).home.region).check.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Dropped, Mm, PAGE_SIZE};

    /// A loaded space names a frame per stored page, homed in the image region; pages are
    /// unverified until marked; forks share them; its frames are not migration or
    /// compaction candidates; the region goes when the last frame does.
    #[test]
    fn loaded_space_homes_frames_in_the_image() {
        let mut mm: Mm<()> = Mm::new();
        let pages = 1000;
        let data = 0x7000_0000_0000usize;
        let crcs: Vec<Option<u32>> = (0..pages).map(|p| (p % 3 == 0).then_some(p as u32 + 11)).collect();
        let sp =
            mm.new_loaded_space(pages, 0x1000_0000_0000, (), data, (), crate::image::PageIndex::from_options(&crcs));
        mm.check().unwrap();
        assert!(mm.homed_in_image(sp, 0) && !mm.homed_in_image(sp, 1) && mm.homed_in_image(sp, 999));
        assert_eq!(mm.unverified(data + 3 * PAGE_SIZE + 17).map(|(_, p, c)| (p, c)), Some((3, 14)));
        let (r, p, _) = mm.unverified(data + 3 * PAGE_SIZE).unwrap();
        mm.set_verified(r, p);
        assert_eq!(mm.unverified(data + 3 * PAGE_SIZE), None);
        assert!(mm.unverified(data + pages * PAGE_SIZE).is_none(), "past the image");
        assert!(mm.frames_in(sp, 0, pages).is_empty(), "image frames do not migrate");
        assert!(mm.sparse_frozen_frames().is_empty(), "nor are they compacted");
        let child = mm.fork(sp, 0x2000_0000_0000, (), &mut Vec::new());
        mm.check().unwrap();
        assert!(mm.homed_in_image(child, 333));
        for s in [sp, child] {
            match mm.drop_space(s) {
                Dropped::Unmap(()) => {}
                Dropped::Freeze => panic!("a loaded view holds no homes"),
            }
        }
        mm.check().unwrap();
        assert!(mm.unverified(data).is_none(), "the image region is released with its last frame");
        // A second load reuses the freed frame slots (and some new ones: more pages).
        let more: Vec<Option<u32>> = (0..pages + 600).map(|p| (p % 2 == 0).then_some(7)).collect();
        let sp = mm.new_loaded_space(
            pages + 600,
            0x3000_0000_0000,
            (),
            data,
            (),
            crate::image::PageIndex::from_options(&more),
        );
        mm.check().unwrap();
        assert!((0..pages + 600).all(|p| mm.homed_in_image(sp, p) == (p % 2 == 0)));
        assert_eq!(mm.unverified(data + 800 * PAGE_SIZE).map(|(_, p, c)| (p, c)), Some((800, 7)));
    }
}
