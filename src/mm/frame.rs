//! Frames: 4 KiB of data with a reference count and a home.

use super::RegionId;

/// Index of a frame in the [`FrameStore`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct FrameId(pub(crate) u32);

/// Where a frame's bytes live: page `page` of region `region` (a space's view, or a
/// frozen region left behind by a fork).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Home {
    pub region: RegionId,
    pub page: u32,
}

/// One frame.
///
/// Invariant: `refs` equals the number of tables (not spaces) whose entries name this
/// frame — a shared table holds one reference for all its sharers, which is why `fork`
/// never touches frames (BRIEF invariant 4).
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub refs: u32,
    pub home: Home,
    /// Page index of this frame in every space that maps it (forks keep indices).
    pub index: u32,
    /// Fork family of the spaces that map it (the rmap walk visits them).
    pub family: u32,
}

#[derive(Default)]
pub struct FrameStore {
    slots: Vec<Option<Frame>>,
    free: Vec<u32>,
    in_use: usize,
}

impl FrameStore {
    pub fn alloc(&mut self, home: Home, index: u32, family: u32) -> FrameId {
        let f = Frame { refs: 1, home, index, family };
        self.in_use += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(f);
                FrameId(i)
            }
            None => {
                self.slots.push(Some(f));
                FrameId(self.slots.len() as u32 - 1)
            }
        }
    }

    /// Is a freed slot waiting to be reused by [`FrameStore::alloc`]?
    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Allocate `n` frames with consecutive ids (appended, not taken from the free list:
    /// a bulk adoption fills whole tables in one pass); frame `i` is homed at page
    /// `first_page + i` of `region` and has index `first_index + i`. Returns the first id.
    pub fn alloc_run(&mut self, n: usize, region: RegionId, first_page: u32, first_index: u32, family: u32) -> FrameId {
        let start = self.slots.len() as u32;
        self.slots.extend((0..n as u32).map(|i| {
            Some(Frame { refs: 1, home: Home { region, page: first_page + i }, index: first_index + i, family })
        }));
        self.in_use += n;
        FrameId(start)
    }

    pub fn release(&mut self, id: FrameId) -> Frame {
        let f = self.slots[id.0 as usize].take().expect("release of a free frame");
        self.free.push(id.0);
        self.in_use -= 1;
        f
    }

    pub fn get(&self, id: FrameId) -> &Frame {
        self.slots[id.0 as usize].as_ref().expect("use of a free frame")
    }

    pub fn get_mut(&mut self, id: FrameId) -> &mut Frame {
        self.slots[id.0 as usize].as_mut().expect("use of a free frame")
    }

    /// The frame in slot `id`, if that slot is in use.
    pub fn try_get(&self, id: FrameId) -> Option<&Frame> {
        self.slots.get(id.0 as usize).and_then(|f| f.as_ref())
    }

    /// Slots (in use or free): the range of frame ids.
    pub fn slots_len(&self) -> usize {
        self.slots.len()
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Can `n` frames be allocated without touching the allocator?
    pub fn has_headroom(&self, n: usize) -> bool {
        self.free.len() + (self.slots.capacity() - self.slots.len()) >= n
    }

    /// Preallocate room for `n` more frames; an error (not an abort) when memory is
    /// exhausted.
    pub fn reserve(&mut self, n: usize) -> Result<(), std::collections::TryReserveError> {
        self.slots.try_reserve(n)?;
        self.free.try_reserve(n)
    }

    pub fn iter(&self) -> impl Iterator<Item = (FrameId, &Frame)> {
        self.slots.iter().enumerate().filter_map(|(i, f)| f.as_ref().map(|f| (FrameId(i as u32), f)))
    }
}
