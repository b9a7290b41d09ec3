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
    /// The raw flags and frame (to test many entries at once).
    pub fn bits(self) -> u64 {
        self.0
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
    pub entries: Box<[Pte; PTRS_PER_PTE]>,
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
        let t = PteTable { share: 1, cow: false, entries: boxed };
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
