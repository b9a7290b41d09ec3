//! [`Space`]: one forkable address space, mapped in this process as its view.

use std::sync::Arc;
use std::time::Instant;

use crate::arena::{new_view, Inner};
use crate::error::{Error, Result};
use crate::mm::{SpaceId, Src, PAGE_SIZE};

/// A forkable, zero-initialised address space, mapped in this process.
///
/// Plain loads and stores on its view (`as_slice`, `as_mut_slice`, `as_ptr`) are served by
/// the arena's fault engine; [`Space::read`] and [`Space::write`] reach the same bytes
/// without faulting. [`Space::fork`] returns a second space with identical contents that
/// shares this one's page tables until a write breaks them.
///
/// # Aliasing contract
/// [`Space::as_mut_slice`] takes `&mut self`, so safe code cannot alias it. Threads that
/// write one space concurrently use [`Space::as_mut_ptr`] and must not create overlapping
/// references themselves; the library never creates references into a view, and its own
/// writes ([`Space::write`]) copy through raw pointers under the arena lock. A fork taken
/// while other threads write the parent captures each page either before or after each
/// concurrent store, as with `fork(2)`.
///
/// `Space` is `Send + Sync`; spaces and the arena may be dropped in any order.
pub struct Space {
    inner: Arc<Inner>,
    id: SpaceId,
    base: usize,
    len: usize,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("id", &self.id.0)
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .finish()
    }
}

impl Space {
    pub(crate) fn new(inner: Arc<Inner>, id: SpaceId, base: usize, len: usize) -> Space {
        Space { inner, id, base, len }
    }

    /// Length in bytes, as requested at creation.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a space has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start of the view.
    pub fn as_ptr(&self) -> *const u8 {
        self.base as *const u8
    }

    /// Start of the view, for concurrent writers (see the aliasing contract above).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// The view as a byte slice; first reads of each page fault into the engine.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the view is a live mapping of at least `len` bytes owned by this space
        // until it drops; concurrent raw-pointer writers are covered by the documented
        // aliasing contract.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The view as a mutable byte slice; writes break shared tables and copy shared pages.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` excludes other references through this
        // handle.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size: self.len }),
        }
    }

    /// Fork: a new space with this one's contents. Shares every page table and copies no
    /// page data; when pages were written since the last fork, the view is first frozen
    /// (its pages move to a frozen region in O(page tables)) and re-faulted on demand.
    ///
    /// ```
    /// # fn main() -> Result<(), cowarena::Error> {
    /// let arena = cowarena::Arena::new()?;
    /// let a = arena.space(8192)?;
    /// a.write(0, b"parent")?;
    /// let b = a.fork()?;
    /// b.write(0, b"child!")?;
    /// let mut buf = [0u8; 6];
    /// a.read(0, &mut buf)?;
    /// assert_eq!(&buf, b"parent");
    /// # Ok(()) }
    /// ```
    pub fn fork(&self) -> Result<Space> {
        let core = &self.inner.core;
        let pages = self.len.div_ceil(PAGE_SIZE);
        // Mapping and registering the child's view needs no lock.
        let view = new_view(core, pages)?;
        let base = view.addr();
        let t0 = Instant::now();
        let mut mm = core.lock();
        let froze = mm.needs_freeze(self.id);
        if froze {
            let frozen = mm
                .view_backing(self.id)
                .freeze()
                .map_err(|e| Error::os("mremap(MREMAP_DONTUNMAP) freezing the view", e))?;
            let fbase = frozen.addr();
            mm.freeze_view(self.id, fbase, frozen);
            core.reclaim(&mut mm);
        }
        let child = mm.fork(self.id, base, view);
        drop(mm);
        tracing::debug!(
            parent = self.id.0,
            child = child.0,
            froze,
            elapsed_us = t0.elapsed().as_micros() as u64,
            "fork"
        );
        Ok(Space::new(self.inner.clone(), child, base, self.len))
    }

    /// Copy `buf.len()` bytes at `offset` into `buf`, without faulting the view.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len())?;
        // Bytes go through a bounce page: `buf` may itself be view memory that faults,
        // and nothing may fault while the arena lock is held.
        let mut bounce = [0u8; PAGE_SIZE];
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done;
            let (page, off) = (at / PAGE_SIZE, at % PAGE_SIZE);
            let n = (PAGE_SIZE - off).min(buf.len() - done);
            {
                let mut mm = self.inner.core.lock();
                match mm.read_source(self.id, page) {
                    Src::Zero => bounce[..n].fill(0),
                    // SAFETY: a frame's home is populated memory that stays mapped while we
                    // hold the lock; `off + n <= PAGE_SIZE`.
                    Src::Addr(a) => unsafe { crate::sys::mem::read_raw(a + off, &mut bounce[..n]) },
                }
            }
            buf[done..done + n].copy_from_slice(&bounce[..n]);
            done += n;
        }
        Ok(())
    }

    /// Write `data` at `offset`, without faulting the view (the pages are made private to
    /// this space as a write fault would).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len())?;
        let core = &self.inner.core;
        // As in `read`: `data` may be view memory, so copy it out before taking the lock.
        let mut bounce = [0u8; PAGE_SIZE];
        let mut done = 0;
        while done < data.len() {
            let at = offset + done;
            let (page, off) = (at / PAGE_SIZE, at % PAGE_SIZE);
            let n = (PAGE_SIZE - off).min(data.len() - done);
            bounce[..n].copy_from_slice(&data[done..done + n]);
            let mut mm = core.lock();
            core.fault_in(&mut mm, self.id, page, true)?;
            // SAFETY: after a write fault-in the view page is populated and writable, and
            // stays so while we hold the lock.
            unsafe { crate::sys::mem::write_raw(self.base + at, &bounce[..n]) };
            drop(mm);
            done += n;
        }
        Ok(())
    }

    /// Populate the view pages covering `offset..offset+len` (writable when `write`), so
    /// that syscalls may touch them even where only user-mode faults are served
    /// (see [`crate::UffdAccess::UserModeOnly`]).
    pub fn populate(&self, offset: usize, len: usize, write: bool) -> Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let core = &self.inner.core;
        let mut mm = core.lock();
        for page in offset / PAGE_SIZE..=(offset + len - 1) / PAGE_SIZE {
            core.fault_in(&mut mm, self.id, page, write)?;
        }
        Ok(())
    }
}

impl Drop for Space {
    fn drop(&mut self) {
        let core = &self.inner.core;
        let mut mm = core.lock();
        let view = mm.drop_space(self.id);
        core.reclaim(&mut mm);
        // Unmap under the lock, so the address cannot be handed to a new view while a stale
        // fault on it is being looked up.
        drop(view);
        tracing::debug!(space = self.id.0, "space dropped");
    }
}
