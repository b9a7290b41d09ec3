//! The invariant checker ([`Mm::check`]): every rule of DESIGN.md's invariants, checked
//! over the whole state (tests and `Arena::check_invariants`).

use super::*;

impl<B> Mm<B> {
    // ---- invariants ---------------------------------------------------------------------

    /// Check every structural invariant; returns a description of the first violation.
    /// Cost O(everything): for tests and debug assertions.
    pub fn check(&self) -> Result<(), String> {
        use std::collections::HashMap;
        let mut share: HashMap<TableId, u32> = HashMap::new();
        for (i, s) in self.spaces.iter() {
            if s.plain && (s.dir.iter().any(Option::is_some) || s.vs.present.count() > 0) {
                return Err(format!("plain space {i} has tables or mapped view pages"));
            }
            for t in s.dir.iter().flatten() {
                *share.entry(*t).or_default() += 1;
            }
            self.check_pins(SpaceId(i))?;
            let filling = s.filling.count();
            if filling != 0 && self.fills == 0 {
                return Err(format!("space {i}: {filling} pages marked filling with no fill in flight"));
            }
        }
        if self.spaces.iter().map(|(_, s)| s.pin_depth.len()).sum::<usize>() != self.pinned_now {
            return Err("the count of pinned pages disagrees with the spaces' pins".into());
        }
        let mut refs: HashMap<FrameId, u32> = HashMap::new();
        for (id, t) in self.tables.iter() {
            let want = share.get(&id).copied().unwrap_or(0);
            if t.share != want {
                return Err(format!("table {id:?}: share {} but {want} directories name it", t.share));
            }
            if !t.dirty_summary_ok() {
                return Err(format!("table {id:?}: dirty summary out of step with its entries"));
            }
            for f in t.entries().iter().filter_map(|e| e.frame()) {
                *refs.entry(f).or_default() += 1;
            }
        }
        let mut homes: HashMap<RegionId, usize> = HashMap::new();
        for (id, f) in self.frames.iter() {
            let want = refs.get(&id).copied().unwrap_or(0);
            if f.refs != want {
                return Err(format!("frame {id:?}: refs {} but {want} tables name it", f.refs));
            }
            *homes.entry(f.home.region).or_default() += 1;
            let r = self.regions.get(f.home.region.0).ok_or(format!("frame {id:?} homed in a dead region"))?;
            if let RegionKind::View(sp) = r.kind {
                let s = self.space(sp);
                let p = f.home.page as usize;
                if !s.vs.home.get(p) || !s.vs.present.get(p) {
                    return Err(format!("frame {id:?} homed at view page {p} of {sp:?} not marked present+home"));
                }
                if self.lookup(sp, p).frame() != Some(id) && !self.pending_drops.contains(&sp) {
                    return Err(format!("frame {id:?} homed in {sp:?} page {p} whose entry names another frame"));
                }
                if s.vs.writable.get(p) && f.refs != 1 {
                    return Err(format!("frame {id:?} writable in a view but has {} refs", f.refs));
                }
            }
        }
        for (rid, r) in self.regions.iter() {
            let want = homes.get(&RegionId(rid)).copied().unwrap_or(0);
            if r.homes != want {
                return Err(format!("region {rid}: homes {} but {want} frames live there", r.homes));
            }
            if r.kind == RegionKind::Frozen && r.homes == 0 && self.pool != Some(RegionId(rid)) && r.swap.is_none() {
                return Err(format!("frozen region {rid} is empty but not released"));
            }
            let active = self.pool == Some(RegionId(rid));
            let frozen = r.kind == RegionKind::Frozen && !active;
            // (A loaded image's region is never compacted: see `Region::check`.)
            let sparse = frozen && r.check.is_none() && r.swap.is_none() && r.homes * 4 <= r.peak;
            let queue_ok = (!sparse || r.queued) && (!r.queued || frozen);
            if !queue_ok || r.queued != self.sparse.contains(&RegionId(rid)) {
                return Err(format!(
                    "region {rid}: homes {} of peak {}, queued {} (in queue: {})",
                    r.homes,
                    r.peak,
                    r.queued,
                    self.sparse.contains(&RegionId(rid))
                ));
            }
        }
        if let Some(q) = self.sparse.iter().find(|q| self.regions.get(q.0).is_none()) {
            return Err(format!("dead region {q:?} queued for compaction"));
        }
        for (sid, s) in self.spaces.iter() {
            let sp = SpaceId(sid);
            for p in 0..s.pages {
                let (pr, w, h) = (s.vs.present.get(p), s.vs.writable.get(p), s.vs.home.get(p));
                let writable_ok = !w || h;
                let present_ok = pr || !h;
                let consistent = writable_ok && present_ok;
                if !consistent {
                    return Err(format!("{sp:?} page {p}: view bits present={pr} writable={w} home={h}"));
                }
                if w {
                    let t = s.dir[p / PTRS_PER_PTE].ok_or("writable page without table")?;
                    if self.tables.get(t).share != 1 {
                        return Err(format!("{sp:?} page {p}: writable under a shared table (invariant 2)"));
                    }
                }
            }
        }
        self.check_swap()?;
        self.check_async_homes()
    }
}
