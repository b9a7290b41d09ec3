//! [`Space`]: one forkable address space, mapped in this process as its view.

use std::sync::Arc;
use std::time::Instant;

use crate::arena::{new_fork_view, Inner};
use crate::error::{Error, Result};
use crate::fault::{AdoptHow, FaultMode};
use crate::mm::{SpaceId, Src, PAGE_SIZE};
use crate::sys::mem::Advice;

/// Distinguishes the temporary files of concurrent saves.
static SAVE_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// [`Space::read`] streams ranges this long (see `Space::read_streamed`); shorter ones are
/// copied under the lock, 16 pages per hold (a stream costs two more lock holds).
const READ_STREAM_MIN: usize = 64 * PAGE_SIZE;
/// Pages planned per lock hold by a streamed read.
const READ_STREAM_PAGES: usize = 256;

/// An open stream ([`Mm::begin_stream`](crate::mm::Mm::begin_stream)): stable homes keep
/// their bytes and addresses until it is dropped.
struct Stream<'a>(&'a crate::fault::Core);

impl<'a> Stream<'a> {
    fn open(core: &'a crate::fault::Core) -> Self {
        core.lock().begin_stream();
        Stream(core)
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        let mut mm = self.0.lock();
        mm.end_stream();
        self.0.reclaim(&mut mm);
    }
}

/// What a fork does with the parent's pages written since its previous fork (they must
/// stop being writable before their frames are shared).
///
/// In an arena whose stores to read-only pages are the kernel's alone
/// ([`ArenaBuilder::async_wp`](crate::ArenaBuilder::async_wp)), a write-protected page
/// would not stop a store: `Auto` and `KeepWarm` move a few written pages' frames out of
/// the view (one copy each) and freeze it when many were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForkStrategy {
    /// Write-protect them when few, freeze the view when many (default): the fastest fork.
    #[default]
    Auto,
    /// Always write-protect them: the parent's view stays mapped, so it does not fault
    /// again on reads after the fork (like `fork(2)`); the fork costs O(written pages) in
    /// the kernel (~20 ms per GiB written). Best for live snapshots of a busy owner.
    KeepWarm,
    /// Always freeze the view (`mremap`, O(page tables)): the fastest fork of a heavily
    /// written space; the parent re-faults the pages it touches afterwards. In an
    /// [`async_forks`](crate::ArenaBuilder::async_forks) arena (the default on Linux 6.7+)
    /// the parent's emptied view then becomes async-WP as forks' views are — its stores to
    /// the pages it re-reads cost no trap — and it can no longer be pinned.
    Freeze,
}

/// A forkable, zero-initialised address space, mapped in this process.
///
/// Plain loads and stores on its view (`as_slice`, `as_mut_slice`, `as_ptr`) are served by
/// the arena's fault engine; [`Space::read`] and [`Space::write`] reach the same bytes
/// without faulting. [`Space::fork`] returns a second space with identical contents that
/// shares this one's page tables until a write breaks them.
///
/// # Soundness contract
/// A view's bytes change only through `&mut Space` ([`Space::as_mut_slice`],
/// [`Space::write`], [`Space::discard`], [`Space::reset_to`]); `&self` methods (fork,
/// `clean`, `migrate`, aging) may unmap and re-fault pages but never change their bytes. So
/// a `&[u8]` from [`Space::as_slice`] is sound for as long as it lives. Concurrent writers
/// use [`Space::as_mut_ptr`] or [`Space::write_unchecked`] and promise, as `unsafe` code,
/// not to overlap a live reference. The borrow checker rejects the rest:
///
/// ```compile_fail,E0502
/// # fn main() -> Result<(), cowarena::Error> {
/// let arena = cowarena::Arena::new()?;
/// let mut s = arena.space(4096)?;
/// let v = s.as_slice();
/// s.write(0, b"x")?; // error: `s` is borrowed by `v`
/// assert_eq!(v[0], b'x');
/// # Ok(()) }
/// ```
///
/// ```compile_fail,E0502
/// # fn main() -> Result<(), cowarena::Error> {
/// let arena = cowarena::Arena::new()?;
/// let mut s = arena.space(3 * 4096)?;
/// s.write(1, &s.as_slice()[..8192])?; // error: an overlapping copy; use `copy_within`
/// # Ok(()) }
/// ```
///
/// ```compile_fail,E0502
/// # fn main() -> Result<(), cowarena::Error> {
/// let arena = cowarena::Arena::new()?;
/// let mut s = arena.space(4096)?;
/// let v = s.as_slice();
/// s.discard(0, 4096)?; // error: `s` is borrowed by `v`
/// # let _ = v[0];
/// # Ok(()) }
/// ```
///
/// ```compile_fail,E0502
/// # fn main() -> Result<(), cowarena::Error> {
/// let arena = cowarena::Arena::new()?;
/// let mut s = arena.space(4096)?;
/// s.reset_to(&s)?; // error: a space cannot be reset to itself
/// # Ok(()) }
/// ```
///
/// `Space` is `Send + Sync`; spaces and the arena may be dropped in any order.
pub struct Space {
    inner: Arc<Inner>,
    id: SpaceId,
    base: usize,
    len: usize,
    /// How the view's faults are served (fixed for the view's life).
    mode: FaultMode,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("id", &self.id.0)
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .field("mode", &self.mode)
            .finish()
    }
}

impl Space {
    pub(crate) fn new(inner: Arc<Inner>, id: SpaceId, base: usize, len: usize, mode: FaultMode) -> Space {
        Space { inner, id, base, len, mode }
    }

    /// How this space's view faults are served: the arena's default, or the mode given to
    /// [`Arena::space_in`](crate::Arena::space_in) / [`Space::fork_in`] (forks inherit it).
    #[must_use]
    pub fn fault_mode(&self) -> FaultMode {
        self.mode
    }

    /// Length in bytes, as requested at creation.
    #[must_use]
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

    /// Start of the view, for concurrent writers (see the soundness contract above).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// The view as a byte slice; first reads of each page fault into the engine.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the view is a live mapping of at least `len` bytes owned by this space
        // until it drops; concurrent raw-pointer writers are covered by the documented
        // soundness contract.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The view as a mutable byte slice; writes break shared tables and copy shared pages.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` excludes other references through this
        // handle.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }

    /// The arena's core, after checking that this is the process that created it (a
    /// `fork(2)` child gets [`Error::ForkedProcess`] from every fallible call).
    fn core(&self) -> Result<&crate::fault::Core> {
        self.inner.core.check_process()?;
        Ok(&self.inner.core)
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
    /// A fork taken while other threads store through raw pointers captures each page
    /// before or after each concurrent store, as `fork(2)` does.
    ///
    /// ```
    /// # fn main() -> Result<(), cowarena::Error> {
    /// let arena = cowarena::Arena::new()?;
    /// let mut a = arena.space(8192)?;
    /// a.write(0, b"parent")?;
    /// let mut b = a.fork()?;
    /// b.write(0, b"child!")?;
    /// let mut buf = [0u8; 6];
    /// a.read(0, &mut buf)?;
    /// assert_eq!(&buf, b"parent");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Os`] when the child's view cannot be mapped or registered, or the parent's
    /// pages cannot be protected or frozen; the parent is unchanged then.
    pub fn fork(&self) -> Result<Space> {
        self.fork_with(ForkStrategy::Auto)
    }

    /// [`Space::fork`] with an explicit choice of what happens to this space's pages written
    /// since its last fork; see [`ForkStrategy`].
    ///
    /// # Errors
    /// As [`Space::fork`].
    pub fn fork_with(&self, strategy: ForkStrategy) -> Result<Space> {
        self.fork_in_with(self.mode, strategy)
    }

    /// [`Space::fork`], the child's faults served in `mode` — e.g. a [`FaultMode::Thread`]
    /// snapshot of a signal-mode space, whose view `write(2)` and `send(2)` can read
    /// straight from (in signal mode a syscall touching an unpopulated page fails with
    /// EFAULT instead; see [`FaultMode::Signal`]). The child shares this space's tables
    /// as any fork does.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use cowarena::{Arena, FaultMode};
    /// let arena = Arena::builder().fault_mode(FaultMode::Signal).build()?;
    /// let mut s = arena.space(8192)?;
    /// s.as_mut_slice()[..5].copy_from_slice(b"hello");
    /// let snap = s.fork_in(FaultMode::Thread)?;
    /// s.as_mut_slice()[0] = b'j';
    /// // write(2) straight from the snapshot's view, never touched by this thread.
    /// let path = std::env::temp_dir().join(format!("cowarena-doc-fork-in-{}", std::process::id()));
    /// std::fs::write(&path, snap.as_slice())?;
    /// assert_eq!(&std::fs::read(&path)?[..5], b"hello");
    /// # std::fs::remove_file(&path)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Space::fork`], and as [`Arena::space_in`](crate::Arena::space_in) for the
    /// first space in the arena's other mode.
    pub fn fork_in(&self, mode: FaultMode) -> Result<Space> {
        self.fork_in_with(mode, ForkStrategy::Auto)
    }

    /// [`Space::fork_in`] with a [`ForkStrategy`].
    ///
    /// # Errors
    /// As [`Space::fork_in`].
    pub fn fork_in_with(&self, mode: FaultMode, strategy: ForkStrategy) -> Result<Space> {
        let core = self.core()?;
        core.check_sigmask(mode)?;
        let pages = self.len.div_ceil(PAGE_SIZE);
        // Mapping and registering the child's view needs no lock.
        let (view, other, async_wp) = new_fork_view(core, pages, mode)?;
        let base = view.addr();
        let t0 = Instant::now();
        let mut mm = core.lock();
        let froze = core.prepare_share(&mut mm, self.id, strategy)?;
        // Pinned pages are copied for the child (one pool slot each), not shared.
        let pinned = mm.pinned_in(self.id);
        core.ensure_pool(&mut mm, pinned)?;
        let mut ops = Vec::new();
        let child = mm.fork(self.id, base, view, &mut ops);
        mm.set_other_uffd(child, other);
        if async_wp {
            mm.set_space_async(child, true);
        }
        core.run_ops(&mut mm, &ops)?; // copies only (a pinned page is no image page)
        drop(mm);
        tracing::debug!(
            parent = self.id.0,
            child = child.0,
            froze,
            elapsed_us = t0.elapsed().as_micros() as u64,
            "fork"
        );
        Ok(Space::new(self.inner.clone(), child, base, self.len, mode))
    }

    /// Copy `buf.len()` bytes at `offset` into `buf`, without faulting the view. Maps
    /// nothing, so it is never refused by `max_memory`. A long read (64 KiB or more)
    /// copies the pages of frozen snapshots with the arena lock released, as
    /// [`Space::write_to`] does, so faults elsewhere wait only for its plans. A page evicted by
    /// [`Arena::evict`](crate::Arena::evict) is read back from the swap file first (it
    /// becomes resident again: under `max_resident` this may wait for the evictor).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] when the range leaves the space; [`Error::SwapIo`] when an
    /// evicted page cannot be read back; [`Error::CapacityExhausted`] when `max_resident`
    /// leaves no room to bring one back (only pinned or loaded pages left to evict).
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len())?;
        let core = self.core()?;
        if buf.len() >= READ_STREAM_MIN {
            return self.read_streamed(core, offset, buf);
        }
        // Bytes go through a bounce buffer: `buf` may itself be view memory that faults,
        // and nothing may fault while the arena lock is held. Up to 16 pages per lock hold.
        const BATCH: usize = 16 * PAGE_SIZE;
        let mut bounce = vec![0u8; BATCH.min(buf.len() + PAGE_SIZE)];
        let mut done = 0;
        while done < buf.len() {
            let chunk = (buf.len() - done).min(bounce.len() - PAGE_SIZE).max(1);
            let mut filled = 0;
            {
                let mut mm = core.lock_beside_fills(self.id);
                while filled < chunk {
                    let at = offset + done + filled;
                    let (page, off) = (at / PAGE_SIZE, at % PAGE_SIZE);
                    let n = (PAGE_SIZE - off).min(buf.len() - done - filled);
                    let out = &mut bounce[filled..filled + n];
                    core.swap_in_for_api(&mut mm, self.id, page)?;
                    match mm.read_source(self.id, page) {
                        Src::Zero => out.fill(0),
                        Src::Addr(a) => {
                            core.verify_src(&mut mm, a)?;
                            // SAFETY: a frame's home is populated memory that stays mapped
                            // while we hold the lock; `off + n <= PAGE_SIZE`.
                            unsafe { crate::sys::mem::read_raw(a + off, out) }
                        }
                    }
                    filled += n;
                }
            }
            // The bounce must really exist: without this barrier the optimiser may forward
            // the copy and write `buf` (possibly a view that faults) under the lock.
            std::hint::black_box(&mut bounce);
            buf[done..done + filled].copy_from_slice(&bounce[..filled]);
            done += filled;
        }
        Ok(())
    }

    /// [`Space::read`] of a long range, as [`Space::write_to`] reads: under the lock only
    /// the plan of up to [`READ_STREAM_PAGES`] pages (and the copies of pages that live
    /// in a view), the bytes of stable homes — frozen and pool pages, a snapshot's usual
    /// place — copied with the lock released, inside a stream that keeps them in place.
    /// So faults elsewhere (the owner of a snapshot being read, above all) wait for a
    /// plan, not for the copy of a megabyte.
    fn read_streamed(&self, core: &crate::fault::Core, offset: usize, buf: &mut [u8]) -> Result<()> {
        /// Where the bytes of one piece of `buf` come from.
        enum From {
            Zeros,
            /// A stable home's address (readable without the lock while the stream is open).
            Home(usize),
            /// Copied into the bounce buffer under the lock, at this offset.
            Bounce(usize),
        }
        let _stream = Stream::open(core);
        let mut bounce: Vec<u8> = Vec::new();
        let mut plan: Vec<(usize, usize, From)> = Vec::with_capacity(READ_STREAM_PAGES);
        let mut done = 0;
        while done < buf.len() {
            plan.clear();
            {
                let mut mm = core.lock_beside_fills(self.id);
                let mut at = done;
                let mut copied = 0;
                while at < buf.len() && plan.len() < READ_STREAM_PAGES {
                    let (page, off) = ((offset + at) / PAGE_SIZE, (offset + at) % PAGE_SIZE);
                    let n = (PAGE_SIZE - off).min(buf.len() - at);
                    core.swap_in_for_api(&mut mm, self.id, page)?;
                    let src = mm.stream_source(self.id, page);
                    if let Some(Ok(a) | Err(a)) = src {
                        core.verify_src(&mut mm, a)?;
                    }
                    let from = match src {
                        None => From::Zeros,
                        Some(Ok(a)) => From::Home(a + off),
                        Some(Err(a)) => {
                            if bounce.len() < copied + n {
                                bounce.resize(READ_STREAM_PAGES * PAGE_SIZE, 0);
                            }
                            // SAFETY: a view page or a frame's home, mapped and populated
                            // while we hold the lock (`stream_source`); `off + n <= PAGE_SIZE`.
                            unsafe { crate::sys::mem::read_raw(a + off, &mut bounce[copied..copied + n]) };
                            copied += n;
                            From::Bounce(copied - n)
                        }
                    };
                    plan.push((at, n, from));
                    at += n;
                }
            }
            // The copies above must really happen under the lock (see `read`).
            std::hint::black_box(&mut bounce);
            for &(at, n, ref from) in &plan {
                let out = &mut buf[at..at + n];
                match *from {
                    From::Zeros => out.fill(0),
                    // SAFETY: a frozen or pool home, which keeps its bytes and stays mapped
                    // while the stream is open (`Mm::begin_stream`); `n` bytes from there
                    // stay inside its page.
                    From::Home(a) => out.copy_from_slice(unsafe { crate::sys::mem::bytes_at(a, n) }),
                    From::Bounce(b) => out.copy_from_slice(&bounce[b..b + n]),
                }
                done = at + n;
            }
        }
        Ok(())
    }

    /// Write the space's bytes, in order, to `w`; returns the bytes written (`len()`).
    ///
    /// The bytes come straight from where the arena keeps them: no view page is faulted
    /// in, and the pages of a snapshot (frozen or pooled homes, the usual case for a fork)
    /// are handed to `w` in place, in runs of contiguous pages, with the arena lock
    /// released — so a slow writer does not hold up faults elsewhere. Only pages that live
    /// in a view (this space's own writes, a warm parent's pages) are copied first, under
    /// the lock, 256 at most at a time. Never-written pages are written as zeros. While a
    /// stream is open, the arena defers unmapping and discarding released memory and
    /// copies pages it would otherwise move with `UFFDIO_MOVE`, so streaming a large space
    /// keeps dead memory resident until it ends.
    ///
    /// The space is read as through a shared borrow: stores into it from other threads
    /// (through [`Space::as_mut_ptr`]) while the stream runs are a data race the caller
    /// promised not to have. Forks, reads and writes of other spaces go on meanwhile.
    ///
    /// ```
    /// # fn main() -> Result<(), cowarena::Error> {
    /// let arena = cowarena::Arena::new()?;
    /// let mut s = arena.space(3 << 20)?;
    /// s.write(5, b"snapshot")?;
    /// let snap = s.fork()?;
    /// s.write(5, b"changed!")?;
    /// let mut out = Vec::new();
    /// assert_eq!(snap.write_to(&mut out)?, 3 << 20);
    /// assert_eq!(&out[5..13], b"snapshot");
    /// assert!(out[13..].iter().all(|&b| b == 0));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::WriteFailed`] with the bytes written so far when `w` fails;
    /// [`Error::ForkedProcess`] in a `fork(2)` child.
    pub fn write_to<W: std::io::Write + ?Sized>(&self, w: &mut W) -> Result<u64> {
        /// Pages planned per lock hold.
        const BATCH: usize = 256;
        static ZEROS: [u8; 16 * PAGE_SIZE] = [0; 16 * PAGE_SIZE];
        enum Piece {
            Zeros(usize),
            /// A run of stable homes: address, bytes.
            Home(usize, usize),
            /// Bytes copied into the bounce buffer: offset, bytes.
            Copied(usize, usize),
        }
        let core = self.core()?;
        let _stream = Stream::open(core);
        let mut bounce: Vec<u8> = Vec::new();
        let mut plan: Vec<Piece> = Vec::with_capacity(BATCH);
        let pages = self.len.div_ceil(PAGE_SIZE);
        let mut written = 0u64;
        let mut page = 0;
        while page < pages {
            let end = (page + BATCH).min(pages);
            plan.clear();
            {
                let mut mm = core.lock_beside_fills(self.id);
                let mut copied = 0;
                for p in page..end {
                    let n = PAGE_SIZE.min(self.len - p * PAGE_SIZE);
                    core.swap_in_for_api(&mut mm, self.id, p)?;
                    let src = mm.stream_source(self.id, p);
                    if let Some(Ok(a) | Err(a)) = src {
                        core.verify_src(&mut mm, a)?;
                    }
                    match (src, plan.last_mut()) {
                        (None, Some(Piece::Zeros(z))) => *z += n,
                        (None, _) => plan.push(Piece::Zeros(n)),
                        (Some(Ok(a)), Some(Piece::Home(at, len))) if *at + *len == a => *len += n,
                        (Some(Ok(a)), _) => plan.push(Piece::Home(a, n)),
                        (Some(Err(a)), last) => {
                            if bounce.len() < BATCH * PAGE_SIZE {
                                bounce.resize(BATCH * PAGE_SIZE, 0);
                            }
                            // SAFETY: a view page or a frame's home, mapped and populated
                            // while we hold the lock (`stream_source`); `n <= PAGE_SIZE`.
                            unsafe { crate::sys::mem::read_raw(a, &mut bounce[copied..copied + n]) };
                            match last {
                                Some(Piece::Copied(at, len)) if *at + *len == copied => *len += n,
                                _ => plan.push(Piece::Copied(copied, n)),
                            }
                            copied += n;
                        }
                    }
                }
            }
            // As in `read`: the copies must really happen under the lock.
            std::hint::black_box(&mut bounce);
            for piece in &plan {
                let r = match *piece {
                    Piece::Zeros(mut n) => {
                        let mut r = Ok(());
                        while n > 0 && r.is_ok() {
                            let k = n.min(ZEROS.len());
                            r = w.write_all(&ZEROS[..k]);
                            n -= k;
                        }
                        r
                    }
                    // SAFETY: frozen or pool homes, which keep their bytes and stay mapped
                    // while the stream is open (`Mm::begin_stream`); the slice lives for
                    // this call only.
                    Piece::Home(a, n) => w.write_all(unsafe { crate::sys::mem::bytes_at(a, n) }),
                    Piece::Copied(at, n) => w.write_all(&bounce[at..at + n]),
                };
                let n = match *piece {
                    Piece::Zeros(n) | Piece::Home(_, n) | Piece::Copied(_, n) => n,
                };
                r.map_err(|source| Error::WriteFailed { written, source })?;
                written += n as u64;
            }
            page = end;
        }
        Ok(written)
    }

    /// Save the space to `path` as a versioned, checksummed image that
    /// [`Arena::load`](crate::Arena::load) brings back lazily. Pages that are all zeros
    /// (never written, or zeroed) take no disk space: the file is sparse. The image is
    /// written to a temporary file beside `path`, synced, and renamed over it, so `path`
    /// holds either the old file or the complete new image, never a torn one.
    ///
    /// The bytes are read as [`Space::read`] reads them (no view faults); like it, `save`
    /// is not atomic against other threads storing into this space — save a fork of a
    /// space that is being written.
    ///
    /// ```
    /// # fn main() -> Result<(), cowarena::Error> {
    /// let arena = cowarena::Arena::new()?;
    /// let mut s = arena.space(4 << 20)?;
    /// s.write(1 << 20, b"persisted")?;
    /// let path = std::env::temp_dir().join(format!("cowarena-doc-{}.img", std::process::id()));
    /// s.save(&path)?;
    /// let back = arena.load(&path)?;
    /// assert_eq!(back.len(), 4 << 20);
    /// assert_eq!(&back.as_slice()[1 << 20..(1 << 20) + 9], b"persisted");
    /// # std::fs::remove_file(&path).unwrap();
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::ImageIo`] naming the step (create, write, sync, rename) and the file; the
    /// temporary file is removed.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let path = path.as_ref();
        self.core()?;
        let io = |op: &'static str| move |source| Error::ImageIo { op, path: path.to_path_buf(), source };
        let name = path.file_name().ok_or_else(|| {
            io("create")(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"))
        })?;
        let tmp = path.with_file_name(format!(
            ".{}.cowarena-{}-{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            SAVE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let result = (|| {
            let file = std::fs::File::create(&tmp).map_err(io("create"))?;
            let pages = self.len.div_ceil(PAGE_SIZE);
            let data = crate::image::data_offset(pages as u64);
            file.set_len(data + (pages * PAGE_SIZE) as u64).map_err(io("write"))?;
            let mut crcs: Vec<Option<u32>> = vec![None; pages];
            const CHUNK: usize = 256;
            let mut buf = vec![0u8; CHUNK * PAGE_SIZE];
            for first in (0..pages).step_by(CHUNK) {
                let n = CHUNK.min(pages - first);
                let bytes = (n * PAGE_SIZE).min(self.len - first * PAGE_SIZE);
                buf[bytes..].fill(0);
                self.read(first * PAGE_SIZE, &mut buf[..bytes])?;
                // Runs of stored (non-zero) pages, one positioned write each.
                let mut p = 0;
                while p < n {
                    let page = |i: usize| &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                    if page(p).iter().all(|&b| b == 0) {
                        p += 1;
                        continue;
                    }
                    let start = p;
                    while p < n && !page(p).iter().all(|&b| b == 0) {
                        crcs[first + p] = Some(crate::image::crc(page(p)));
                        p += 1;
                    }
                    let at = data + ((first + start) * PAGE_SIZE) as u64;
                    file.write_all_at(&buf[start * PAGE_SIZE..p * PAGE_SIZE], at).map_err(io("write"))?;
                }
            }
            let (index, index_crc) = crate::image::encode_index(&crcs);
            let header = crate::image::Header {
                len: self.len as u64,
                pages: pages as u64,
                stored: crcs.iter().flatten().count() as u64,
                data_offset: data,
                index_crc,
            };
            file.write_all_at(&index, crate::image::HEADER_LEN as u64).map_err(io("write"))?;
            file.write_all_at(&crate::image::encode_header(&header), 0).map_err(io("write"))?;
            file.sync_all().map_err(io("sync"))?;
            std::fs::rename(&tmp, path).map_err(io("rename"))?;
            // The rename itself is durable once the directory is synced.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Write `data` at `offset`, without faulting the view (the pages are made private to
    /// this space as a write fault would).
    ///
    /// ```
    /// # fn main() -> Result<(), cowarena::Error> {
    /// let arena = cowarena::Arena::new()?;
    /// let mut s = arena.space(8192)?;
    /// s.write(4090, b"across a page")?;
    /// assert_eq!(&s.as_slice()[4090..4103], b"across a page");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::OutOfRange`] when the range leaves the space; [`Error::CapacityExhausted`]
    /// at the arena's memory limit; [`Error::Os`] when the kernel refuses a fill.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        // SAFETY: `&mut self` excludes every reference into this view.
        unsafe { self.write_unchecked(offset, data) }
    }

    /// [`Space::write`] through a shared handle, for threads that write one space
    /// concurrently (as [`Space::as_mut_ptr`] stores do). The bytes are copied page by page
    /// under the arena lock, each page atomically with respect to forks.
    ///
    /// # Safety
    /// No reference into `offset..offset + data.len()` of this view (from
    /// [`Space::as_slice`] or made from [`Space::as_ptr`]) may be alive during the call,
    /// and `data` must not overlap that range (the copy is not a `memmove`).
    ///
    /// # Errors
    /// As [`Space::write`].
    pub unsafe fn write_unchecked(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len())?;
        let core = self.core()?;
        // As in `read`: `data` may be view memory, so copy it out before taking the lock.
        let mut bounce = [0u8; PAGE_SIZE];
        let mut done = 0;
        while done < data.len() {
            let at = offset + done;
            let (page, off) = (at / PAGE_SIZE, at % PAGE_SIZE);
            let n = (PAGE_SIZE - off).min(data.len() - done);
            bounce[..n].copy_from_slice(&data[done..done + n]);
            // `data` is a shared reference, so the optimiser may assume it cannot change and
            // read it again later instead of the bounce — under the lock, where a fault on
            // it (a view) would deadlock. The barrier makes the bounce opaque.
            std::hint::black_box(&mut bounce);
            let mut mm = core.lock();
            if !mm.is_plain(self.id) {
                core.fault_in_api(&mut mm, self.id, page, true)?;
            }
            // SAFETY: after a write fault-in the view page is populated and writable, and
            // stays so while we hold the lock; a plain view is unregistered kernel memory
            // (the kernel serves the fault), and stays so while we hold the lock.
            unsafe { crate::sys::mem::write_raw(self.base + at, &bounce[..n]) };
            drop(mm);
            done += n;
        }
        Ok(())
    }

    /// Populate the view pages covering `offset..offset+len` (writable when `write`), so
    /// that syscalls may touch them even where only user-mode faults are served
    /// (see [`crate::UffdAccess::UserModeOnly`]). Under
    /// [`max_resident`](crate::ArenaBuilder::max_resident) pages populated early in a
    /// large range may be evicted again before the call returns: populate no more than
    /// the limit holds, just before the syscall.
    ///
    /// # Errors
    /// [`Error::OutOfRange`]; [`Error::CapacityExhausted`] at the memory limit (reading
    /// maps a copy, writing a frame); [`Error::Os`] when the kernel refuses a fill.
    pub fn populate(&self, offset: usize, len: usize, write: bool) -> Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let core = self.core()?;
        core.check_sigmask(self.mode)?;
        let mut mm = core.lock();
        if mm.is_plain(self.id) {
            // Kernel memory (syscalls are served on it anyway): populate as MAP_POPULATE
            // would, so later accesses do not fault.
            let (first, end) = (offset / PAGE_SIZE, (offset + len).div_ceil(PAGE_SIZE));
            let advice = if write { Advice::LinuxPopulateWrite } else { Advice::LinuxPopulateRead };
            return mm
                .view_backing(self.id)
                .advise(first * PAGE_SIZE, (end - first) * PAGE_SIZE, advice)
                .map_err(|e| Error::os("MADV_POPULATE view pages", e));
        }
        for page in offset / PAGE_SIZE..=(offset + len - 1) / PAGE_SIZE {
            core.fault_in_api(&mut mm, self.id, page, write)?;
        }
        Ok(())
    }
}

/// Pinning: pages the kernel may do I/O into behind the engine's back.
impl Space {
    /// Pin the pages covering `len` bytes at `offset` for I/O the kernel does into or out
    /// of them without faulting (O_DIRECT, io_uring fixed buffers, RDMA registrations):
    /// the covering tables are broken and the pages made exclusive, writable and resident
    /// now, and while the returned guard lives nothing moves, zaps or write-protects them.
    /// So the physical page the kernel pinned stays the one this view maps:
    ///
    /// * a fork (or a reset of another space to this one) **copies** the pinned pages for
    ///   the child — it gets their bytes at the fork — instead of sharing them, as `fork(2)`
    ///   copies pages pinned for DMA; the space's other written pages are write-protected
    ///   in place rather than frozen (whatever the [`ForkStrategy`]);
    /// * `migrate` and `Arena::compact` skip them; `clean` leaves them writable and reports
    ///   them dirty every time (DMA writes leave no trace); `clear_referenced` leaves them
    ///   mapped and referenced;
    /// * `discard`, `reset_to` and writes through `&mut self` wait for the guard: it
    ///   borrows the space. Write through [`Pinned::as_mut_ptr`] (or let the kernel).
    ///
    /// Pins nest; each page is unpinned when the last guard covering it drops.
    /// [`Stats::pages_pinned`](crate::Stats::pages_pinned) counts pinned pages.
    ///
    /// ```
    /// # fn main() -> Result<(), cowarena::Error> {
    /// let arena = cowarena::Arena::new()?;
    /// let s = arena.space(1 << 20)?;
    /// let buf = s.pin(0, 64 << 10)?;
    /// // Hand buf.as_mut_ptr() to O_DIRECT or io_uring; forks meanwhile copy these pages.
    /// // SAFETY: the pinned range is the space's own view memory, 64 KiB long.
    /// unsafe { buf.as_mut_ptr().write_bytes(7, buf.len()) };
    /// let child = s.fork()?;
    /// unsafe { buf.as_mut_ptr().write_bytes(8, buf.len()) };
    /// assert_eq!((child.as_slice()[0], s.as_slice()[0]), (7, 8));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::OutOfRange`]; [`Error::CapacityExhausted`] at the memory limit;
    /// [`Error::Unsupported`] for an async-WP space — every space of an
    /// [`async_wp`](crate::ArenaBuilder::async_wp) arena, and the forks of an
    /// [`async_forks`](crate::ArenaBuilder::async_forks) one (the default on Linux 6.7+),
    /// and a space [`clean`](Space::clean)ed before its first fork there: their forks must
    /// move or freeze every written page; [`Error::Os`] when a page
    /// cannot be made writable.
    pub fn pin(&self, offset: usize, len: usize) -> Result<Pinned<'_>> {
        let (first, end) = self.page_range(offset, len)?;
        let core = self.core()?;
        let mut mm = core.lock();
        if mm.space_async(self.id) {
            return Err(Error::Unsupported {
                what: "Space::pin",
                why: "in an async-WP space (its forks must move or freeze every written page) — a fork, or a \
                      space cleaned before its first fork (the kernel tracks its stores): pin before the first \
                      `clean`, or build the arena with `.async_wp(false).async_forks(false)`",
            });
        }
        if first == end {
            return Ok(Pinned { space: self, first, end });
        }
        // A plain space becomes the engine's in place (its pages stay where they are).
        core.adopt_if_plain(&mut mm, self.id, AdoptHow::InPlace)?;
        // A fault-in may release the lock (waiting for the evictor under `max_resident`,
        // or for fills in flight), and pages made writable before it may have been evicted
        // or protected meanwhile: repeat until every page is writable with the lock held
        // throughout the check, then pin.
        let mut rounds = 0;
        while (first..end).any(|p| !mm.is_writable(self.id, p)) {
            rounds += 1;
            if rounds > 16 {
                return Err(Error::CapacityExhausted {
                    what: "pages to pin (they keep being evicted: max_resident is too small for the range)",
                    limit: (core.max_resident_pages * PAGE_SIZE) as u64,
                });
            }
            for page in first..end {
                if !mm.is_writable(self.id, page) {
                    // The write fault's path: break a shared table, copy or take the frame,
                    // map it writable; the bytes are unchanged.
                    core.fault_in_api(&mut mm, self.id, page, true)?;
                }
            }
        }
        mm.pin(self.id, first, end);
        drop(mm);
        tracing::debug!(space = self.id.0, first, pages = end - first, "pinned");
        Ok(Pinned { space: self, first, end })
    }
}

/// Pages of a space pinned by [`Space::pin`]; unpinned when dropped.
#[must_use = "the pages are unpinned when the guard drops"]
pub struct Pinned<'a> {
    space: &'a Space,
    first: usize,
    end: usize,
}

impl Pinned<'_> {
    /// The first pinned byte (page-aligned).
    #[must_use]
    pub fn as_ptr(&self) -> *const u8 {
        self.as_mut_ptr()
    }

    /// The first pinned byte, for writing (by the kernel, or through raw pointers under
    /// the same contract as [`Space::as_mut_ptr`]).
    #[must_use]
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.space.as_mut_ptr().wrapping_add(self.first * PAGE_SIZE)
    }

    /// Offset of the first pinned byte in the space.
    #[must_use]
    pub fn offset(&self) -> usize {
        self.first * PAGE_SIZE
    }

    /// Bytes pinned: whole pages (the last may extend past [`Space::len`] into the
    /// view's rounding).
    #[must_use]
    pub fn len(&self) -> usize {
        (self.end - self.first) * PAGE_SIZE
    }

    /// Is the pinned range empty (a zero-length pin)?
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.first == self.end
    }
}

impl std::fmt::Debug for Pinned<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned").field("offset", &self.offset()).field("len", &self.len()).finish()
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        if self.first == self.end {
            return;
        }
        let Ok(core) = self.space.core() else { return };
        core.lock().unpin(self.space.id, self.first, self.end);
    }
}

/// The seed's rule set: operations that walk or modify entries (see DESIGN.md, "What
/// breaks a shared table").
impl Space {
    /// Pages `[first, end)` covering the byte range, after a bounds check.
    /// An empty byte range gives an empty page range: it changes nothing (a zero-length
    /// discard at an unaligned offset must not break the table around it).
    fn page_range(&self, offset: usize, len: usize) -> Result<(usize, usize)> {
        self.check_range(offset, len)?;
        let first = offset / PAGE_SIZE;
        if len == 0 {
            return Ok((first, first));
        }
        Ok((first, (offset + len).div_ceil(PAGE_SIZE)))
    }

    /// Discard `len` bytes at page-aligned `offset` (`MADV_DONTNEED`; `len` is rounded up to
    /// whole pages): they read as zero in this space only. A wholly covered 2 MiB table is
    /// dropped from this space without copying it; a partly covered shared one is broken.
    /// An empty range changes nothing.
    ///
    /// # Errors
    /// [`Error::Unaligned`] for an offset that is not a multiple of 4096;
    /// [`Error::OutOfRange`]; [`Error::Os`] when `MADV_DONTNEED` or the pool mapping fails.
    ///
    /// ```
    /// # fn main() -> Result<(), cowarena::Error> {
    /// let arena = cowarena::Arena::new()?;
    /// let mut a = arena.space(4 << 20)?;
    /// a.write(0, &[7; 8192])?;
    /// let mut b = a.fork()?;
    /// b.discard(0, 4096)?;
    /// assert_eq!(b.as_slice()[0], 0);
    /// assert_eq!(a.as_slice()[0], 7);
    /// # Ok(()) }
    /// ```
    pub fn discard(&mut self, offset: usize, len: usize) -> Result<()> {
        if offset % PAGE_SIZE != 0 {
            return Err(Error::Unaligned { offset });
        }
        let (first, end) = self.page_range(offset, len)?;
        if first == end {
            return Ok(());
        }
        let core = self.core()?;
        let mut mm = core.lock();
        if mm.is_plain(self.id) {
            let (addr, len) = (self.base + first * PAGE_SIZE, (end - first) * PAGE_SIZE);
            return crate::sys::mem::discard_range(addr, len).map_err(|e| Error::os("MADV_DONTNEED view pages", e));
        }
        let need = mm.shared_homes(self.id, first, end).len();
        core.ensure_pool(&mut mm, need)?;
        let mut ops = Vec::new();
        mm.discard(self.id, first, end, &mut ops);
        core.run_ops(&mut mm, &ops)
    }

    /// Migrate the frames under the byte range to new memory (as page migration does):
    /// every entry naming them, in every space of the family, is updated through an rmap
    /// walk that breaks shared tables on the way. Contents are unchanged. Returns the number
    /// of frames moved.
    ///
    /// # Errors
    /// [`Error::OutOfRange`]; [`Error::Os`] when the new region cannot be mapped.
    pub fn migrate(&self, offset: usize, len: usize) -> Result<usize> {
        let (first, end) = self.page_range(offset, len)?;
        if first == end {
            return Ok(0);
        }
        let core = self.core()?;
        let mut mm = core.lock();
        // (A plain space has no frames: the kernel owns its pages.)
        let frames = mm.frames_in(self.id, first, end);
        let r = migrate_frames(core, &mut mm, frames);
        drop(mm);
        if let Ok(n) = r {
            tracing::debug!(space = self.id.0, frames = n, "migrated");
        }
        r
    }

    /// Reset this space to the current contents of `snapshot` (a space of the same family
    /// and size — typically the parent it was forked from), in place: only the 2 MiB tables
    /// this space changed are replaced, and view pages it did not change stay mapped, so the
    /// next iteration of a fuzz loop does not fault on its clean working set again. (A
    /// space cannot be reset to itself: the borrow checker rejects `s.reset_to(&s)`.)
    ///
    /// In an [async-WP arena](crate::ArenaBuilder::async_wp) the pages this space changed
    /// only by stores to pages it had mapped read-only are put back in place instead — their
    /// bytes copied from the snapshot and write-protected again, O(pages written), no table
    /// touched — so a fuzz loop's next stores to them are again the kernel's alone.
    ///
    /// The reset takes `&mut self`: no other thread may touch this space's view meanwhile.
    /// (A store through a raw pointer racing the reset is a data race on the view, as with
    /// [`Space::as_mut_slice`]; the reset may then keep or lose it.)
    ///
    /// # Errors
    /// [`Error::NotRelated`] when `snapshot` is of another arena, family or size;
    /// [`Error::Os`] when the snapshot's pages cannot be protected or frozen.
    ///
    /// ```
    /// # fn main() -> Result<(), cowarena::Error> {
    /// let arena = cowarena::Arena::new()?;
    /// let mut snap = arena.space(1 << 20)?;
    /// snap.write(0, b"pristine")?;
    /// let mut work = snap.fork()?;
    /// work.as_mut_slice()[..5].copy_from_slice(b"dirty");
    /// work.reset_to(&snap)?;
    /// assert_eq!(&work.as_slice()[..8], b"pristine");
    /// # Ok(()) }
    /// ```
    pub fn reset_to(&mut self, snapshot: &Space) -> Result<()> {
        if !Arc::ptr_eq(&self.inner, &snapshot.inner) {
            return Err(Error::NotRelated);
        }
        let core = self.core()?;
        let mut mm = core.lock();
        if !mm.resettable(self.id, snapshot.id) {
            return Err(Error::NotRelated);
        }
        core.prepare_share(&mut mm, snapshot.id, ForkStrategy::Auto)?;
        let pages = mm.pages(self.id);
        // Stores the kernel served alone in read-only pages must be undone too: where the
        // entry is still the snapshot's, the bytes are copied back in place (no table
        // touched); the others are zapped with their table below.
        core.restore_written(&mut mm, self.id, snapshot.id)?;
        let need = mm.shared_homes(self.id, 0, pages).len() + mm.pinned_in(snapshot.id);
        core.ensure_pool(&mut mm, need)?;
        let mut ops = Vec::new();
        mm.reset_to(self.id, snapshot.id, &mut ops);
        core.run_ops(&mut mm, &ops)
    }

    /// Pages (indices) in the byte range referenced since the last clear.
    ///
    /// # Errors
    /// [`Error::OutOfRange`].
    pub fn referenced(&self, offset: usize, len: usize) -> Result<Vec<usize>> {
        let (first, end) = self.page_range(offset, len)?;
        let core = self.core()?;
        let mut mm = core.lock();
        if mm.is_plain(self.id) {
            // Never cleared: every page touched since creation (the kernel's page tables).
            return core.plain_touched(&mm, self.id, first, end);
        }
        core.sync_written(&mut mm, self.id, first, end)?;
        Ok(mm.referenced(self.id, first, end))
    }

    /// Clear the referenced bits of the byte range and re-arm detection, without breaking
    /// any shared table (one bit serves every sharer). Returns how many pages were
    /// referenced. Reads of pages whose bytes live in this view (written since this space's
    /// last fork) are not observed after a clear; their next write is.
    ///
    /// # Errors
    /// [`Error::OutOfRange`]; [`Error::Os`] when re-arming the views fails.
    pub fn clear_referenced(&self, offset: usize, len: usize) -> Result<usize> {
        let (first, end) = self.page_range(offset, len)?;
        if first == end {
            return Ok(0);
        }
        let core = self.core()?;
        let mut mm = core.lock();
        core.adopt_if_plain(&mut mm, self.id, AdoptHow::Auto)?; // re-arming needs the model
        core.sync_written(&mut mm, self.id, first, end)?;
        let mut ops = Vec::new();
        let n = mm.clear_referenced(self.id, first, end, &mut ops);
        core.run_ops(&mut mm, &ops)?;
        Ok(n)
    }

    /// Pages (indices) in the byte range written since the last [`Space::clean`] (or
    /// inherited dirty from the parent at fork). Exact: a page is listed only if written.
    ///
    /// # Errors
    /// [`Error::OutOfRange`].
    pub fn dirty_pages(&self, offset: usize, len: usize) -> Result<Vec<usize>> {
        let (first, end) = self.page_range(offset, len)?;
        let core = self.core()?;
        let mm = core.lock();
        if mm.is_plain(self.id) {
            // Exact from the kernel's page tables: a page is allocated only when written.
            return core.plain_written(&mm, self.id, first, end);
        }
        // Dirty in the model, or written by stores the kernel served alone (not recorded
        // here: asking costs one scan, as the kernel's own dirty tracking does).
        let unseen = core.unseen_written(&mm, self.id, first, end)?;
        let dirty = mm.dirty_pages(self.id, first, end);
        Ok(crate::mm::merge_pages(dirty, unseen))
    }

    /// Return the pages written since the last clean and mark them clean (mkclean: breaks
    /// the shared tables that hold dirty entries), so that an incremental snapshot saves only
    /// what changed. Later writes mark pages dirty again.
    ///
    /// **Who tracks the writes.** In an arena whose forks are async-WP
    /// ([`ArenaBuilder::async_forks`](crate::ArenaBuilder::async_forks), the default in
    /// signal mode on Linux 6.7+), the first `clean` of a space never forked hands its
    /// tracking to the kernel: its view becomes async-WP in place (nothing is copied or
    /// re-faulted), a later store to a written page costs no user-space fault (the kernel
    /// marks the page written), and each `clean` is one `PAGEMAP_SCAN` walk that lists and
    /// re-arms — the kernel's own transparent dirty tracking. Such a space forks, resets and
    /// saves like any other, but cannot [`pin`](Space::pin) (pin before the first `clean` to
    /// keep a trapping view). Elsewhere every first write after a `clean` traps once, and
    /// `clean` write-protects the pages written.
    ///
    /// # Errors
    /// [`Error::OutOfRange`]; [`Error::Os`] when re-protecting written pages fails.
    pub fn clean(&self, offset: usize, len: usize) -> Result<Vec<usize>> {
        let (first, end) = self.page_range(offset, len)?;
        if first == end {
            return Ok(Vec::new());
        }
        let core = self.core()?;
        let mut mm = core.lock();
        core.adopt_if_plain(&mut mm, self.id, AdoptHow::Track)?; // re-protecting needs the model
        if mm.space_async(self.id) {
            return core.clean_async(&mut mm, self.id, first, end);
        }
        let mut ops = Vec::new();
        let dirty = mm.mkclean(self.id, first, end, &mut ops);
        let ops = mm.coalesce_protects(self.id, ops);
        core.run_ops(&mut mm, &ops)?;
        Ok(dirty)
    }
}

/// Move `frames` into one new pool region.
pub(crate) fn migrate_frames(
    core: &crate::fault::Core,
    mm: &mut crate::mm::Mm<crate::sys::mem::Mapping>,
    frames: Vec<crate::mm::FrameId>,
) -> Result<usize> {
    if frames.is_empty() {
        return Ok(0);
    }
    let pool = crate::sys::mem::Mapping::anon(frames.len() * PAGE_SIZE).map_err(|e| Error::os("mmap pool", e))?;
    let region = mm.add_pool_region(pool.addr(), frames.len(), pool);
    let mut ops = Vec::new();
    for (slot, f) in frames.iter().enumerate() {
        mm.migrate_frame(*f, region, slot, &mut ops);
    }
    core.run_ops(mm, &ops)?;
    Ok(frames.len())
}

impl Drop for Space {
    fn drop(&mut self) {
        // In a fork(2) child: nothing to do, and nothing may be touched (see
        // `Error::ForkedProcess`); the arena's own drop leaks the inherited state.
        let Ok(core) = self.core() else { return };
        let mut mm = core.lock();
        // Unmaps under the lock, so the address cannot be handed to a new view while a stale
        // fault on it is being looked up.
        let r = core.drop_space(&mut mm, self.id);
        drop(mm);
        // Events only after the lock is released: a subscriber may touch view memory.
        if let Err(e) = r {
            // Only a view holding homes of shared frames is frozen on drop; if that mremap
            // fails we cannot move the bytes out, so the view stays mapped (memory is kept,
            // data is never lost) and the drop is retried at later forks, drops and
            // `Arena::compact` (counted in `Stats::drops_deferred` / `drops_pending`).
            tracing::warn!(space = self.id.0, error = %e, "cowarena: could not freeze a dropped view; kept mapped, drop deferred and retried later");
        }
        tracing::debug!(space = self.id.0, "space dropped");
    }
}
