//! Anonymous mappings (views, frozen regions), 2 MiB aligned so that `mremap` can move
//! whole page tables, and the raw byte copies the engine performs on them.
//!
//! Every call goes through `rustix`'s raw syscalls, which never read or write `errno`:
//! some of these run in the SIGBUS handler, under the interrupted code.

use std::ffi::c_void;
use std::io;

pub use rustix::mm::Advice;
use rustix::mm::{self, MapFlags, MprotectFlags, MremapFlags, ProtFlags};

/// Bytes per page.
pub const PAGE: usize = 4096;
/// Bytes covered by one PTE table (512 entries).
pub const TABLE_SPAN: usize = 2 << 20;

/// An owned anonymous mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
}

fn ptr(addr: usize) -> *mut c_void {
    addr as *mut c_void
}

impl Mapping {
    /// Map `len` bytes (a multiple of the page size) of zero-filled private anonymous
    /// memory at a 2 MiB-aligned address, excluded from `fork(2)` (MADV_DONTFORK: a forked
    /// child would otherwise read zeros where the view is unregistered) and from
    /// transparent huge pages.
    ///
    /// The mapping is never populated, even under `mlockall(MCL_FUTURE)`: that makes every
    /// new mapping locked and populated at mmap time, which would fill a view with zero
    /// pages before it is registered with userfaultfd (its accesses would then never
    /// fault: silent zeros). So the range is mapped `PROT_NONE` first (populating skips
    /// inaccessible mappings), unlocked (`munlock` clears `VM_LOCKED`, so that the
    /// `mprotect` that follows does not populate it either), then made read-write.
    pub fn anon(len: usize) -> io::Result<Mapping> {
        let padded = len.checked_add(TABLE_SPAN).ok_or_else(|| io::Error::from(rustix::io::Errno::NOMEM))?;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let raw = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                padded,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }? as usize;
        let addr = (raw + TABLE_SPAN - 1) & !(TABLE_SPAN - 1);
        let head = addr - raw;
        let tail = padded - head - len;
        // SAFETY: both trimmed pieces lie inside the mapping we just created and own.
        unsafe {
            if head > 0 {
                let _ = mm::munmap(ptr(raw), head);
            }
            if tail > 0 {
                let _ = mm::munmap(ptr(addr + len), tail);
            }
        }
        let m = Mapping { addr, len };
        // SAFETY: the range is this fresh, inaccessible mapping; nothing references it.
        unsafe {
            mm::munlock(ptr(addr), len)?;
            mm::mprotect(ptr(addr), len, MprotectFlags::READ | MprotectFlags::WRITE)?;
        }
        m.advise(0, len, Advice::LinuxDontFork)?;
        m.advise(0, len, Advice::LinuxNoHugepage)?;
        Ok(m)
    }

    /// Map `len` bytes of `file` from `offset` (page-aligned) read-only and private: a
    /// loaded image's data area, whose pages are homes the engine only copies from. Not
    /// inherited by `fork(2)` children.
    pub fn file_read_only(file: &std::fs::File, offset: u64, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping at a kernel-chosen address aliases nothing; the file stays
        // mapped (the kernel holds a reference) after `file` is closed.
        let addr = unsafe {
            mm::mmap(std::ptr::null_mut(), len, ProtFlags::READ, MapFlags::PRIVATE | MapFlags::NORESERVE, file, offset)
        }? as usize;
        let m = Mapping { addr, len };
        m.advise(0, len, Advice::LinuxDontFork)?;
        Ok(m)
    }

    pub fn addr(&self) -> usize {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// madvise a sub-range.
    pub fn advise(&self, off: usize, len: usize, advice: Advice) -> io::Result<()> {
        debug_assert!(off + len <= self.len);
        // SAFETY: the range lies inside this mapping; advice values we use do not
        // invalidate Rust references (nobody holds references into views across this call
        // except under the documented view soundness contract).
        Ok(unsafe { mm::madvise(ptr(self.addr + off), len, advice) }?)
    }

    /// Move every page of this mapping to a new 2 MiB-aligned mapping, leaving this one in
    /// place but empty (`MREMAP_DONTUNMAP`). The kernel moves whole page tables: O(tables).
    /// With UFFD_FEATURE_EVENT_REMAP the call blocks until the REMAP event is read.
    pub fn freeze(&self) -> io::Result<Mapping> {
        // Reserve an aligned destination, then move onto it.
        let dst = Mapping::anon(self.len)?;
        let to = dst.addr;
        std::mem::forget(dst);
        // SAFETY: source is this mapping; destination is a range we reserved and own;
        // MREMAP_FIXED replaces the reservation atomically.
        let r = unsafe {
            mm::mremap_fixed(ptr(self.addr), self.len, self.len, MremapFlags::MAYMOVE | MremapFlags::DONTUNMAP, ptr(to))
        };
        match r {
            Ok(r) => Ok(Mapping { addr: r as usize, len: self.len }),
            Err(e) => {
                // SAFETY: the reservation is still ours.
                let _ = unsafe { mm::munmap(ptr(to), self.len) };
                Err(e.into())
            }
        }
    }
}

impl Mapping {
    /// Move `fresh` (a mapping of the same length, e.g. registered with another
    /// userfaultfd) onto this mapping's address, replacing it atomically (`MREMAP_FIXED`:
    /// an access meanwhile sees one or the other, never a hole). `self` then owns the moved
    /// mapping; `fresh` is consumed. Whatever this mapping held is unmapped. With
    /// UFFD_FEATURE_EVENT_REMAP on `fresh`'s userfaultfd the call blocks until the REMAP
    /// event is read.
    pub fn replace_with(&self, fresh: Mapping) -> io::Result<()> {
        assert_eq!(fresh.len, self.len, "replace_with: lengths differ");
        // SAFETY: both ranges are mappings we own; MREMAP_FIXED moves `fresh` onto ours,
        // unmapping ours in the same step. On success `fresh`'s old range is no longer
        // mapped (forgotten below); on failure nothing moved and `fresh` unmaps itself.
        unsafe { mm::mremap_fixed(ptr(fresh.addr), fresh.len, self.len, MremapFlags::MAYMOVE, ptr(self.addr)) }?;
        std::mem::forget(fresh);
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; the engine guarantees no fault is outstanding on it.
        let _ = unsafe { mm::munmap(ptr(self.addr), self.len) };
    }
}

/// Copy `dst.len()` bytes out of memory at `src`.
///
/// # Safety
/// `src..src+dst.len()` must be mapped, readable and populated (not a view page that
/// would fault into the engine), and not concurrently written.
pub unsafe fn read_raw(src: usize, dst: &mut [u8]) {
    // SAFETY: forwarded to the caller.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
}

/// The `len` bytes at `addr`, borrowed.
///
/// # Safety
/// `addr..addr+len` must be mapped, readable and populated (not a view page that would
/// fault into the engine), and must neither change nor be unmapped while the returned
/// slice lives.
pub unsafe fn bytes_at<'a>(addr: usize, len: usize) -> &'a [u8] {
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
}

/// The CRC of the 4096-byte page at `addr` (`crate::image::crc`).
///
/// # Safety
/// `addr..addr+4096` must be mapped and readable, and not a view page that would fault
/// into the engine (a loaded image's data page faults only into the kernel).
pub unsafe fn crc_page(addr: usize) -> u32 {
    // SAFETY: forwarded to the caller; the slice lives for this call only.
    crate::image::crc(unsafe { std::slice::from_raw_parts(addr as *const u8, 4096) })
}

/// Copy `src` into memory at `dst`.
///
/// # Safety
/// `dst..dst+src.len()` must be mapped, writable, populated and writable without a fault
/// (not write-protected), and not concurrently accessed.
pub unsafe fn write_raw(dst: usize, src: &[u8]) {
    // SAFETY: forwarded to the caller.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
}

/// MADV_DONTNEED a range that the caller owns (pages of a frozen region whose frames died).
pub fn discard_range(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller passes pages of a live mapping it owns and nobody reads any more.
    Ok(unsafe { mm::madvise(ptr(addr), len, Advice::LinuxDontNeed) }?)
}

/// Make one view page inaccessible so that the access that cannot be served dies loudly
/// (SIGSEGV) instead of reading a zero page.
pub fn poison_page(addr: usize) -> io::Result<()> {
    // SAFETY: changes protection of one page of a view we own; no Rust reference is
    // created from it by the library.
    Ok(unsafe { mm::mprotect(ptr(addr), PAGE, MprotectFlags::empty()) }?)
}

/// Copy one page from `src` to `dst`.
///
/// # Safety
/// Both pages must be mapped and populated-or-anonymous plain memory (not a view page that
/// could fault into the engine), not overlapping, and not concurrently written.
pub unsafe fn copy_page(dst: usize, src: usize) {
    // SAFETY: forwarded to the caller.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, PAGE) };
}

/// Copy pages `(dst, src)`, each as [`copy_page`], prefetching the next pair while one is
/// copied (scattered pages are cold: the first lines of each cost a memory round trip).
///
/// # Safety
/// As [`copy_page`], for every pair.
pub unsafe fn copy_pages(pairs: &[(usize, usize)]) {
    for (i, &(dst, src)) in pairs.iter().enumerate() {
        if let Some(&(nd, ns)) = pairs.get(i + 1) {
            prefetch(ns);
            prefetch(nd);
        }
        // SAFETY: forwarded to the caller.
        unsafe { copy_page(dst, src) };
    }
}

/// A hint to bring the first lines of the page at `addr` into the cache (no fault, no
/// effect on memory).
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in 0..4 {
        // SAFETY: a prefetch never faults or writes, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((addr + line * 64) as *const i8)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}
