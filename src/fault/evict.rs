//! Eviction and swap-in (`Arena::evict`, `ArenaBuilder::max_resident`): the engine side
//! of `mm/evict.rs`. Cold frames are written to the swap file (`sys::swap`) and re-homed
//! there; the fault path and the API bring a frame back — `pread` into a pool slot — the
//! first time its bytes are needed again. With `max_resident`, an evictor thread (the
//! kswapd of an arena) keeps the resident pages under the limit, and a fault that would
//! pass it waits for the evictor instead of failing.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Core, MmGuard};
use crate::error::{Error, Result};
use crate::mm::{FrameId, Mm, SpaceId, PAGE_SIZE};
use crate::sys::mem::Mapping;
use crate::sys::swap::SwapFile;

/// Slots added to the swap file at a time (16 MiB chunks, each one read-only mapping).
const SWAP_CHUNK_PAGES: usize = 4096;
/// Eviction writes out at most this many pages per batch (one `fdatasync` each, which
/// also bounds the dirty page cache an eviction holds: 8 MiB).
const EVICT_BATCH: usize = 2048;
/// Pages brought back by one swap-in at most (see [`Core::swap_in_page`]).
const SWAP_READAHEAD: usize = 16;
/// How long a fault waits for the evictor (in rounds of 10 ms) before it fails with
/// `Error::CapacityExhausted`.
const EVICT_WAIT_ROUNDS: u32 = 300;

/// What one [`crate::Arena::evict`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EvictStats {
    /// Frames written to the swap file and re-homed there.
    pub frames_evicted: u64,
    /// Bytes written to the swap file.
    pub bytes_written: u64,
    /// View pages unmapped because they mapped an evicted frame.
    pub pages_unmapped: u64,
    /// Frames found referenced and given a second chance (their bits cleared).
    pub frames_aged: u64,
}

impl Core {
    /// The swap file, created on first use.
    fn swap_file(&self) -> Result<&SwapFile> {
        if let Some(s) = self.swap.get() {
            return Ok(s);
        }
        let f = SwapFile::create(self.swap_path.as_deref())
            .map_err(|source| Error::SwapIo { op: "create the swap file", source })?;
        let _ = self.swap.set(f);
        Ok(self.swap.get().expect("just set"))
    }

    /// Grow the swap file until `slots` slots are free (under the lock).
    fn reserve_swap(&self, mm: &mut Mm<Mapping>, slots: usize) -> Result<()> {
        let file = self.swap_file()?;
        while mm.swap_slots_free() < slots {
            let off = self.swap_len.load(Ordering::Relaxed);
            let len = SWAP_CHUNK_PAGES * PAGE_SIZE;
            let m = file.add_chunk(off, len).map_err(|source| Error::SwapIo { op: "grow the swap file", source })?;
            self.swap_len.store(off + len as u64, Ordering::Relaxed);
            mm.add_swap_region(m.addr(), SWAP_CHUNK_PAGES, off, m);
        }
        Ok(())
    }

    /// Evict up to `pages` cold frames (see `mm/evict.rs` for the choice). Under the lock;
    /// the lock is held throughout (faults wait: their pages may be the ones leaving).
    pub fn evict(&self, mm: &mut MmGuard<'_>, pages: usize) -> Result<EvictStats> {
        let mut st = EvictStats::default();
        // Stores the kernel served alone must be in the model first (async-WP arenas), and
        // plain spaces' pages become frames (the kernel's memory is not ours to page out).
        self.sync_all_written(mm)?;
        for sp in mm.space_ids() {
            if mm.space_async(sp) {
                // A page a view maps takes stores without a trap here, so no frame a view
                // maps is evicted (`Mm::evictable`): freeze the views first, as a fork
                // does — their pages become unmapped homes, and the working set faults
                // back in (the cost of eviction in an async-WP arena).
                if mm.is_plain(sp) || mm.view_pages_mapped(sp) > 0 {
                    self.prepare_share(mm, sp, crate::ForkStrategy::Freeze)?;
                }
                // (A view holding only read-only copies is "ready" for a fork and left
                // mapped; here its copies must go too.)
                if mm.view_pages_mapped(sp) > 0 && mm.pinned_in(sp) == 0 {
                    self.freeze_view_now(mm, sp)?;
                }
            } else {
                self.adopt_if_plain(mm, sp, super::adopt::AdoptHow::Auto)?;
            }
        }
        let zaps_before = mm.counters.evict_zaps;
        let mut left = pages;
        while left > 0 {
            let mut ops = Vec::new();
            let aged_before = mm.counters.frames_aged;
            let victims = mm.evict_candidates(left.min(EVICT_BATCH), &mut ops);
            st.frames_aged += mm.counters.frames_aged - aged_before;
            // Re-arming of aged frames, and write-protection of the victims' writable
            // homes: their bytes hold still from here on.
            self.run_ops(mm, &ops)?;
            if victims.is_empty() {
                break;
            }
            self.write_out(mm, &victims)?;
            st.frames_evicted += victims.len() as u64;
            st.bytes_written += (victims.len() * PAGE_SIZE) as u64;
            left -= victims.len();
        }
        st.pages_unmapped = mm.counters.evict_zaps - zaps_before;
        Ok(st)
    }

    /// Write `victims` to swap slots, make them durable, then re-home them and unmap every
    /// view page mapping them. On an I/O error nothing is re-homed (the frames stay where
    /// they were) and the slots are given back.
    fn write_out(&self, mm: &mut Mm<Mapping>, victims: &[FrameId]) -> Result<()> {
        self.reserve_swap(mm, victims.len())?;
        let file = self.swap_file()?;
        let mut slots = Vec::with_capacity(victims.len());
        for _ in victims {
            slots.push(mm.alloc_swap_slot().expect("slots reserved"));
        }
        // Runs of adjacent sources going to adjacent slots: one pwrite each.
        let mut result = Ok(());
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        let mut i = 0;
        while i < victims.len() && result.is_ok() {
            let (src, off) = (mm.frame_addr(victims[i]), slots[i].1);
            let mut j = i + 1;
            while j < victims.len()
                && mm.frame_addr(victims[j]) == src + (j - i) * PAGE_SIZE
                && slots[j].1 == off + ((j - i) * PAGE_SIZE) as u64
            {
                j += 1;
            }
            let len = (j - i) * PAGE_SIZE;
            lo = lo.min(off);
            hi = hi.max(off + len as u64);
            if let Some(errno) = crate::sys::inject::hit(crate::sys::inject::Point::SwapIo) {
                result = Err(std::io::Error::from_raw_os_error(errno));
            } else {
                // SAFETY: frames' homes — pool, frozen, image or (write-protected above)
                // view pages — populated and mapped while we hold the lock; none changes.
                result = unsafe { file.write_from(src, len, off) };
            }
            i = j;
        }
        let result = result.and_then(|()| file.sync_and_drop(lo, hi.saturating_sub(lo)));
        if let Err(source) = result {
            for (home, _) in slots {
                mm.free_swap_slot(home);
            }
            return Err(Error::SwapIo { op: "write evicted pages to the swap file", source });
        }
        let mut ops = Vec::new();
        for (&f, &(home, _)) in victims.iter().zip(&slots) {
            mm.evict_commit(f, home, &mut ops);
        }
        // Unmap the views' pages, then discard the old homes (the reclaim in run_ops).
        self.run_ops(mm, &ops)
    }

    /// If page `page` of `sp` names a frame in the swap, bring it back: read its slot into
    /// a pool slot and re-home it there. Async-signal-safe (the fault path calls it with
    /// headroom: one pool slot); an I/O error is [`Error::SwapIo`], never a zero page.
    ///
    /// Readahead: the pages after it in the same 2 MiB table whose frames sit in the next
    /// slots of the file (a sequential eviction leaves them so) come back in the same
    /// `pread`, up to [`SWAP_READAHEAD`] pages, while the pool has the contiguous slots
    /// (keeping the headroom) and `max_resident` has room for them; a later fault on them
    /// — or the fault-around of this one — finds them in the pool.
    pub fn swap_in_page(&self, mm: &mut Mm<Mapping>, sp: SpaceId, page: usize) -> Result<()> {
        let Some((f, off)) = mm.swapped_at(sp, page) else { return Ok(()) };
        let file = self.swap.get().expect("a frame in the swap implies the file");
        let mut frames = [f; SWAP_READAHEAD];
        let table_end = (page / 512 + 1) * 512;
        let mut cap = SWAP_READAHEAD.min(table_end - page).min(mm.pool_free().saturating_sub(2)).max(1);
        let limit = self.max_resident_pages;
        if limit != 0 {
            cap = cap.min((limit * 15 / 16).saturating_sub(mm.resident_pages() + 2)).max(1);
        }
        let mut n = 1;
        while n < cap {
            match mm.swapped_at(sp, page + n) {
                Some((g, o)) if o == off + (n * PAGE_SIZE) as u64 => {
                    frames[n] = g;
                    n += 1;
                }
                _ => break,
            }
        }
        let Some(dst) = mm.next_pool_slot_addr() else {
            // (No allocation: this may run in a signal handler.)
            return Err(Error::Os {
                op: "bring an evicted page back: no free pool slot (a headroom bug)",
                source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
            });
        };
        let read = if let Some(errno) = crate::sys::inject::hit(crate::sys::inject::Point::SwapIo) {
            Err(std::io::Error::from_raw_os_error(errno))
        } else {
            // SAFETY: the next `n` free slots of the active pool (`n <= pool_free`):
            // mapped, writable, and no frame is homed there until `swap_in` below.
            unsafe { file.read_pages(dst, n * PAGE_SIZE, off) }
        };
        read.map_err(|source| Error::SwapIo { op: "read an evicted page back from the swap file", source })?;
        // (`swap_in` takes the pool's slots in order: frame `i` lands at `dst + i pages`.)
        for &g in &frames[..n] {
            mm.swap_in(g);
        }
        Ok(())
    }

    /// [`Core::swap_in_page`] for the API (`Space::read`, `write_to`): refills the headroom
    /// first when a frame must come back, and at the `max_resident` limit waits for the
    /// evictor first (the lock released meanwhile: the caller must not hold decisions
    /// across this call).
    pub fn swap_in_for_api(&self, mm: &mut MmGuard<'_>, sp: SpaceId, page: usize) -> Result<()> {
        if mm.swapped_at(sp, page).is_none() {
            return Ok(());
        }
        self.make_room(
            mm,
            1,
            "an evicted page read back (nothing left to evict: pinned or loaded pages, or the swap failed)",
        )?;
        self.ensure_headroom(mm)?;
        self.swap_in_page(mm, sp, page)?;
        if self.max_resident_pages != 0 {
            self.note_resident(mm);
        }
        Ok(())
    }

    /// Make room for `need` more resident pages under `max_resident` (none set: nothing to
    /// do): if they would pass the limit, wait for the evictor ([`Core::wait_for_room`]).
    /// `Ok(true)` when the lock was released meanwhile (the caller re-checks what it
    /// decided, headroom included); [`Error::CapacityExhausted`] naming `what` when no room
    /// came.
    pub fn make_room(&self, mm: &mut MmGuard<'_>, need: usize, what: &'static str) -> Result<bool> {
        let limit = self.max_resident_pages;
        if limit == 0 || need == 0 || mm.resident_pages() + need <= limit {
            return Ok(false);
        }
        if !self.wait_for_room(mm, need) {
            return Err(Error::CapacityExhausted { what, limit: (limit * PAGE_SIZE) as u64 });
        }
        Ok(true)
    }

    /// A fault would add `need` resident pages with the arena at its `max_resident` limit:
    /// ask the evictor and wait (the lock released) until it made room, up to ~3 s. Returns
    /// whether there is room now; the caller re-decides the fault either way (the state
    /// changed while the lock was released). Async-signal-safe (`FUTEX_WAIT`).
    pub fn wait_for_room(&self, mm: &mut MmGuard<'_>, need: usize) -> bool {
        for _ in 0..EVICT_WAIT_ROUNDS {
            if mm.resident_pages() + need <= self.max_resident_pages {
                return true;
            }
            let gen = self.evicted_gen.load(Ordering::Acquire);
            self.wake_evictor();
            mm.unlocked(|| {
                crate::sys::futex::wait(&self.evicted_gen, gen, Some(Duration::from_millis(10)));
            });
        }
        mm.resident_pages() + need <= self.max_resident_pages
    }

    /// Ask the evictor thread to run (async-signal-safe).
    pub fn wake_evictor(&self) {
        if self.evict_req.fetch_add(1, Ordering::AcqRel) == 0 {
            crate::sys::futex::wake(&self.evict_req, 1);
        }
    }

    /// After a fault added resident pages: past 15/16 of the limit, start the evictor
    /// early, so that faults seldom wait for it.
    pub fn note_resident(&self, mm: &Mm<Mapping>) {
        let limit = self.max_resident_pages;
        if limit != 0 && mm.resident_pages() * 16 > limit * 15 {
            self.wake_evictor();
        }
    }
}

/// The evictor thread: whenever asked (or every 100 ms), evict until the resident pages
/// are at 7/8 of the limit. Ends when the arena's engine stops.
pub(super) fn evictor_loop(core: &Core) {
    let limit = core.max_resident_pages;
    let low = limit - limit / 8;
    while !core.evict_stop.load(Ordering::Acquire) {
        if core.evict_req.swap(0, Ordering::AcqRel) == 0 {
            crate::sys::futex::wait(&core.evict_req, 0, Some(Duration::from_millis(100)));
        }
        if core.evict_stop.load(Ordering::Acquire) {
            break;
        }
        let mut mm = core.lock();
        let resident = mm.resident_pages();
        let outcome = (resident * 16 > limit * 15).then(|| core.evict(&mut mm, resident - low));
        drop(mm);
        // (Tracing after the lock is released: a subscriber may touch view memory.)
        match outcome {
            Some(Ok(st)) if st.frames_evicted == 0 => {
                tracing::warn!(resident, limit, "max_resident: nothing left to evict (pinned or image pages)")
            }
            Some(Ok(st)) => tracing::debug!(frames = st.frames_evicted, resident, "max_resident: evicted"),
            Some(Err(e)) => tracing::warn!(error = %e, "max_resident: eviction failed"),
            None => {}
        }
        core.evicted_gen.fetch_add(1, Ordering::AcqRel);
        crate::sys::futex::wake(&core.evicted_gen, u32::MAX);
    }
}
