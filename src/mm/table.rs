//! PTE tables: 512 entries (2 MiB of a space) and the count of spaces sharing the table.

use super::FrameId;

/// Entries per table, as in an x86-64 PTE table.
pub const PTRS_PER_PTE: usize = 512;

/// A software page-table entry: a frame number plus the kernel's PTE bits.
///
/// Layout: bits 0..8 flags, bits 32..64 the frame id. An entry without `PRESENT` maps
/// nothing (reads as zero).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Pte(u64);

impl Pte {
    pub const NONE: Pte = Pte(0);
    pub const PRESENT: u64 = 1 << 0;
    /// The owning space may write the frame in place (set only when table and frame are
    /// exclusive; a shared entry never carries it — invariant 1/2).
    pub const WRITE: u64 = 1 << 1;
    /// Referenced since the last aging scan. Shared by every sharer of the table.
    pub const ACCESSED: u64 = 1 << 2;
    /// Written since the last `mkclean`.
    pub const DIRTY: u64 = 1 << 3;

    pub fn new(frame: FrameId, flags: u64) -> Pte {
        Pte(((frame.0 as u64) << 32) | flags | Pte::PRESENT)
    }
    pub fn present(self) -> bool {
        self.0 & Pte::PRESENT != 0
    }
    pub fn frame(self) -> Option<FrameId> {
        self.present().then_some(FrameId((self.0 >> 32) as u32))
    }
    pub fn has(self, flag: u64) -> bool {
        self.0 & flag != 0
    }
    pub fn with(self, flag: u64) -> Pte {
        Pte(self.0 | flag)
    }
    pub fn without(self, flag: u64) -> Pte {
        Pte(self.0 & !flag)
    }
}

impl std::fmt::Debug for Pte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.frame() {
            None => write!(f, "-"),
            Some(fr) => write!(
                f,
                "{}{}{}{}",
                fr.0,
                if self.has(Pte::WRITE) { "w" } else { "" },
                if self.has(Pte::ACCESSED) { "a" } else { "" },
                if self.has(Pte::DIRTY) { "d" } else { "" }
            ),
        }
    }
}

/// Index of a table in the [`TableStore`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TableId(pub(crate) u32);

/// One PTE table.
///
/// Invariant (BRIEF 1): while `share > 1`, `entries` changes only in `ACCESSED` bits.
/// Invariant: `share` equals the number of space directories naming this table.
pub struct PteTable {
    pub share: u32,
    /// Set when the table became shared by a fork; a write that finds `share == 1` with
    /// this set *reuses* the table (the kernel's COW-PTE reuse path) and clears it.
    pub cow: bool,
    entries: Box<[Pte; PTRS_PER_PTE]>,
    /// Invariant: bit `i` is set iff `entries[i]` has `DIRTY` (checked by
    /// [`PteTable::dirty_summary_ok`]), so that "which pages are dirty" reads 64 bytes of a
    /// table rather than its 4 KiB of entries.
    dirty: [u64; PTRS_PER_PTE / 64],
}

impl PteTable {
    pub fn entries(&self) -> &[Pte; PTRS_PER_PTE] {
        &self.entries
    }

    pub fn entry(&self, i: usize) -> Pte {
        self.entries[i]
    }

    /// Replace entry `i`.
    pub fn set(&mut self, i: usize, e: Pte) {
        self.entries[i] = e;
        let (w, b) = (i / 64, 1u64 << (i % 64));
        if e.has(Pte::DIRTY) {
            self.dirty[w] |= b;
        } else {
            self.dirty[w] &= !b;
        }
    }

    /// Take entry `i`, leaving it empty.
    pub fn take(&mut self, i: usize) -> Pte {
        let e = self.entries[i];
        self.set(i, Pte::NONE);
        e
    }

    /// Indices in `[lo, hi)` (within the table) of the entries with `DIRTY`, ascending.
    pub fn dirty_in(&self, lo: usize, hi: usize) -> impl Iterator<Item = usize> + '_ {
        (lo / 64..hi.div_ceil(64))
            .flat_map(move |w| super::bits::set_bits_of(self.dirty[w], w * 64))
            .filter(move |&i| i >= lo && i < hi)
    }

    /// Whether the dirty summary matches the entries (the invariant above).
    pub fn dirty_summary_ok(&self) -> bool {
        self.dirty == summarise_dirty(&self.entries)
    }
}

fn summarise_dirty(entries: &[Pte; PTRS_PER_PTE]) -> [u64; PTRS_PER_PTE / 64] {
    let mut d = [0u64; PTRS_PER_PTE / 64];
    for (i, e) in entries.iter().enumerate() {
        d[i / 64] |= u64::from(e.has(Pte::DIRTY)) << (i % 64);
    }
    d
}

/// Slab of tables with a free list (ids are reused; boxes are kept for reuse).
#[derive(Default)]
pub struct TableStore {
    slots: Vec<Option<PteTable>>,
    free: Vec<u32>,
    spare: Vec<Box<[Pte; PTRS_PER_PTE]>>,
    in_use: usize,
}

impl TableStore {
    pub fn alloc(&mut self, entries: Option<&[Pte; PTRS_PER_PTE]>) -> TableId {
        let mut boxed = self.spare.pop().unwrap_or_else(|| Box::new([Pte::NONE; PTRS_PER_PTE]));
        match entries {
            Some(e) => boxed.copy_from_slice(e),
            None => boxed.fill(Pte::NONE),
        }
        let dirty = match entries {
            Some(e) => summarise_dirty(e),
            None => [0; PTRS_PER_PTE / 64],
        };
        let t = PteTable { share: 1, cow: false, entries: boxed, dirty };
        self.in_use += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(t);
                TableId(i)
            }
            None => {
                self.slots.push(Some(t));
                TableId(self.slots.len() as u32 - 1)
            }
        }
    }

    pub fn release(&mut self, id: TableId) {
        let t = self.slots[id.0 as usize].take().expect("release of a free table");
        debug_assert_eq!(t.share, 0);
        if self.spare.len() < 256 {
            self.spare.push(t.entries);
        }
        self.free.push(id.0);
        self.in_use -= 1;
    }

    pub fn get(&self, id: TableId) -> &PteTable {
        self.slots[id.0 as usize].as_ref().expect("use of a free table")
    }

    pub fn get_mut(&mut self, id: TableId) -> &mut PteTable {
        self.slots[id.0 as usize].as_mut().expect("use of a free table")
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Can `n` tables be allocated (and released) without touching the allocator?
    pub fn has_headroom(&self, n: usize) -> bool {
        self.spare.len() >= n
            && self.free.len() + (self.slots.capacity() - self.slots.len()) >= n
            && self.free.capacity() - self.free.len() >= n
    }

    /// Preallocate `n` spare tables and slots; an error (not an abort) when memory is
    /// exhausted.
    pub fn reserve(&mut self, n: usize) -> Result<(), std::collections::TryReserveError> {
        self.spare.try_reserve(n.saturating_sub(self.spare.len()))?;
        while self.spare.len() < n {
            self.spare.push(super::try_box(Pte::NONE)?);
        }
        self.slots.try_reserve(n)?;
        self.free.try_reserve(n)
    }

    pub fn iter(&self) -> impl Iterator<Item = (TableId, &PteTable)> {
        self.slots.iter().enumerate().filter_map(|(i, t)| t.as_ref().map(|t| (TableId(i as u32), t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dirty summary follows every way an entry changes, and lists exactly the dirty
    /// entries of any range.
    #[test]
    fn dirty_summary_follows_the_entries() {
        let mut store = TableStore::default();
        let t = store.alloc(None);
        let tab = store.get_mut(t);
        for i in [0, 1, 63, 64, 200, 511] {
            tab.set(i, Pte::new(crate::mm::FrameId(i as u32), Pte::DIRTY));
        }
        tab.set(1, tab.entry(1).without(Pte::DIRTY));
        tab.set(300, Pte::new(crate::mm::FrameId(7), Pte::ACCESSED));
        assert_eq!(tab.take(200).frame(), Some(crate::mm::FrameId(200)));
        assert!(tab.dirty_summary_ok());
        assert_eq!(tab.dirty_in(0, 512).collect::<Vec<_>>(), vec![0, 63, 64, 511]);
        assert_eq!(tab.dirty_in(1, 64).collect::<Vec<_>>(), vec![63]);
        assert_eq!(tab.dirty_in(64, 65).collect::<Vec<_>>(), vec![64]);
        assert_eq!(tab.dirty_in(65, 511).count(), 0);
        let entries = *store.get(t).entries();
        let copy = store.alloc(Some(&entries));
        assert!(store.get(copy).dirty_summary_ok());
        assert_eq!(store.get(copy).dirty_in(0, 512).collect::<Vec<_>>(), vec![0, 63, 64, 511]);
    }
}
