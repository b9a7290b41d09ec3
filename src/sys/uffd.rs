//! userfaultfd: opening it with the most capable access available, the API handshake, and
//! the ioctls the fault engine uses. Written against `linux-raw-sys` (no bindgen, no
//! libclang): see DESIGN.md for why the `userfaultfd` crate is not used.

use std::ffi::c_void;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use linux_raw_sys::general as g;
use rustix::io::Errno;
use rustix::ioctl::{opcode, Ioctl, IoctlOutput, Opcode, Updater};

use crate::error::{Error, UffdBlock};

// Request numbers, computed with the architecture's `_IO`/`_IOWR` encoding (it differs
// on powerpc, mips, sparc and alpha: never hard-code the x86 values).
const UFFDIO: u8 = g::UFFDIO as u8;
/// `_IO(0xAA, 0)`: open a userfaultfd through `/dev/userfaultfd` (Linux 6.1+).
const USERFAULTFD_IOC_NEW: Opcode = opcode::none(UFFDIO, 0);
/// `_IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api)`.
const UFFDIO_API: Opcode = opcode::read_write::<g::uffdio_api>(UFFDIO, g::_UFFDIO_API as u8);
/// `_IOWR(UFFDIO, _UFFDIO_REGISTER, struct uffdio_register)`.
const UFFDIO_REGISTER: Opcode = opcode::read_write::<g::uffdio_register>(UFFDIO, g::_UFFDIO_REGISTER as u8);
/// `_IOR(UFFDIO, _UFFDIO_UNREGISTER, struct uffdio_range)`.
const UFFDIO_UNREGISTER: Opcode = opcode::read::<g::uffdio_range>(UFFDIO, g::_UFFDIO_UNREGISTER as u8);
/// `_IOR(UFFDIO, _UFFDIO_WAKE, struct uffdio_range)`.
const UFFDIO_WAKE: Opcode = opcode::read::<g::uffdio_range>(UFFDIO, g::_UFFDIO_WAKE as u8);
/// `_IOWR(UFFDIO, _UFFDIO_COPY, struct uffdio_copy)`.
const UFFDIO_COPY: Opcode = opcode::read_write::<g::uffdio_copy>(UFFDIO, g::_UFFDIO_COPY as u8);
/// `_IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)` (Linux 6.8+); linux-raw-sys 0.12 has
/// the struct and `_UFFDIO_MOVE` but not the request number.
const UFFDIO_MOVE: Opcode = opcode::read_write::<g::uffdio_move>(UFFDIO, g::_UFFDIO_MOVE as u8);
/// `_IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: Opcode = opcode::read_write::<g::uffdio_writeprotect>(UFFDIO, g::_UFFDIO_WRITEPROTECT as u8);
/// `UFFDIO_WRITEPROTECT_MODE_WP` (bit 0); not exported by linux-raw-sys 0.12.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

/// Issue the userfaultfd ioctl `OP` with its argument struct; never touches `errno` (the
/// fault path calls this from the SIGBUS handler).
///
/// # Safety
/// `T` must be the argument type the kernel expects for `OP`, and any addresses inside it
/// must be valid for what that ioctl does with them.
unsafe fn uffd_ioctl<const OP: Opcode, T>(fd: BorrowedFd<'_>, arg: &mut T) -> io::Result<()> {
    // SAFETY: forwarded to the caller: `T` is `OP`'s argument type; `arg` is live and
    // writable for the whole call.
    unsafe { rustix::ioctl::ioctl(fd, Updater::<OP, T>::new(arg)) }.map_err(io::Error::from)
}

/// `USERFAULTFD_IOC_NEW` with its flags as the integer argument; returns the new fd.
struct IocNew(u32);

// SAFETY: USERFAULTFD_IOC_NEW passes its flags by value (no user memory is read or
// written), and its non-negative return value is a new file descriptor owned by the caller.
unsafe impl Ioctl for IocNew {
    type Output = OwnedFd;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        USERFAULTFD_IOC_NEW
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.0 as usize as *mut c_void
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<OwnedFd> {
        // SAFETY: a successful USERFAULTFD_IOC_NEW returns a fresh fd owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(out as RawFd) })
    }
}

/// How this process obtained its userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UffdAccess {
    /// Through `/dev/userfaultfd` (Linux 6.1+): faults from user and kernel mode are served.
    Device,
    /// Through `userfaultfd(2)` without `UFFD_USER_MODE_ONLY` (root, CAP_SYS_PTRACE, or
    /// `vm.unprivileged_userfaultfd=1`): faults from user and kernel mode are served.
    Syscall,
    /// Through `userfaultfd(2)` with `UFFD_USER_MODE_ONLY`: only user-mode faults are
    /// served; a *syscall* that touches an unpopulated view page (e.g. `write(fd, view)`)
    /// fails with EFAULT. Use the explicit `Space::read`/`Space::write` API or
    /// `Space::populate` before handing view memory to the kernel.
    UserModeOnly,
}

impl UffdAccess {
    /// One sentence on what this access level implies for users.
    pub fn implications(self) -> &'static str {
        match self {
            UffdAccess::Device => {
                "opened via /dev/userfaultfd: kernel-mode accesses to views (e.g. write(2) from a view) are served"
            }
            UffdAccess::Syscall => {
                "opened via userfaultfd(2) with full privileges: kernel-mode accesses to views are served"
            }
            UffdAccess::UserModeOnly => {
                "opened with UFFD_USER_MODE_ONLY: a syscall touching an unpopulated view page fails with EFAULT; \
                 use Space::read/write or Space::populate before passing view memory to the kernel"
            }
        }
    }
}

/// Feature bits cowarena asks for, with their kernel names (for error messages and doctor).
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (g::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64, "UFFD_FEATURE_PAGEFAULT_FLAG_WP"),
    (g::UFFD_FEATURE_EVENT_REMAP as u64, "UFFD_FEATURE_EVENT_REMAP"),
    (g::UFFD_FEATURE_SIGBUS as u64, "UFFD_FEATURE_SIGBUS"),
    (g::UFFD_FEATURE_THREAD_ID as u64, "UFFD_FEATURE_THREAD_ID"),
    (g::UFFD_FEATURE_WP_UNPOPULATED as u64, "UFFD_FEATURE_WP_UNPOPULATED"),
    (g::UFFD_FEATURE_MOVE as u64, "UFFD_FEATURE_MOVE"),
    (g::UFFD_FEATURE_WP_ASYNC as u64, "UFFD_FEATURE_WP_ASYNC"),
];

pub const FEATURE_WP: u64 = g::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
pub const FEATURE_EVENT_REMAP: u64 = g::UFFD_FEATURE_EVENT_REMAP as u64;
pub const FEATURE_SIGBUS: u64 = g::UFFD_FEATURE_SIGBUS as u64;
pub const FEATURE_THREAD_ID: u64 = g::UFFD_FEATURE_THREAD_ID as u64;
pub const FEATURE_MOVE: u64 = g::UFFD_FEATURE_MOVE as u64;
/// Write-protect faults resolved by the kernel itself (Linux 6.7+): a write to a protected
/// page proceeds at once and only marks the page written (`PAGEMAP_SCAN`'s
/// `PAGE_IS_WRITTEN`); no message, no signal. Applies to every range of the userfaultfd.
pub const FEATURE_WP_ASYNC: u64 = g::UFFD_FEATURE_WP_ASYNC as u64;
/// `UFFDIO_WRITEPROTECT` also protects unpopulated pages (pte markers; Linux 6.4+). The
/// kernel turns it on by itself with [`FEATURE_WP_ASYNC`].
pub const FEATURE_WP_UNPOPULATED: u64 = g::UFFD_FEATURE_WP_UNPOPULATED as u64;

pub const PAGEFAULT_FLAG_WRITE: u64 = g::UFFD_PAGEFAULT_FLAG_WRITE as u64;
pub const PAGEFAULT_FLAG_WP: u64 = g::UFFD_PAGEFAULT_FLAG_WP as u64;

/// An open, API-negotiated userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    access: UffdAccess,
    features: u64,
}

/// One message read from the userfaultfd.
#[derive(Debug, Clone, Copy)]
pub enum UffdMsg {
    /// A page fault at `address` (page-aligned by the caller), with `UFFD_PAGEFAULT_FLAG_*`.
    PageFault { address: u64, flags: u64, tid: u32 },
    /// A REMAP event: `[from, from+len)` moved to `to` (the mremap caller waits for us).
    Remap { from: u64, to: u64, len: u64 },
    /// Any other event (fork/remove/unmap are not requested; logged and ignored).
    Other(u8),
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Is a seccomp filter installed on this thread (`Seccomp: 2` in /proc/self/status)?
pub fn seccomp_filtered() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Seccomp:")).map(|l| l.split_whitespace().nth(1) == Some("2")))
        .unwrap_or(false)
}

/// The flags of every userfaultfd cowarena opens.
const UFFD_FLAGS: rustix::mm::UserfaultfdFlags =
    rustix::mm::UserfaultfdFlags::CLOEXEC.union(rustix::mm::UserfaultfdFlags::NONBLOCK);

fn raw_open(flags: rustix::mm::UserfaultfdFlags, user_mode_only: bool) -> io::Result<OwnedFd> {
    let umo = if user_mode_only { g::UFFD_USER_MODE_ONLY } else { 0 };
    let flags = flags | rustix::mm::UserfaultfdFlags::from_bits_retain(umo);
    // SAFETY: userfaultfd(2) creates a new fd; it touches no memory of ours.
    Ok(unsafe { rustix::mm::userfaultfd(flags) }?)
}

fn dev_open(flags: rustix::mm::UserfaultfdFlags) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let dev = rustix::fs::open("/dev/userfaultfd", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    // SAFETY: USERFAULTFD_IOC_NEW on /dev/userfaultfd takes the new fd's flags by value.
    Ok(unsafe { rustix::ioctl::ioctl(&dev, IocNew(flags.bits())) }?)
}

/// Is this the error of a process (EMFILE) or system (ENFILE) out of file descriptors?
pub fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Open a userfaultfd fd with the most capable access available, without the handshake.
fn open_fd() -> Result<(OwnedFd, UffdAccess), Error> {
    let flags = UFFD_FLAGS;
    let dev = dev_open(flags);
    if let Ok(fd) = dev {
        return Ok((fd, UffdAccess::Device));
    }
    let full = raw_open(flags, false);
    if let Ok(fd) = full {
        return Ok((fd, UffdAccess::Syscall));
    }
    let umo = raw_open(flags, true);
    if let Ok(fd) = umo {
        return Ok((fd, UffdAccess::UserModeOnly));
    }
    let full_err = full.unwrap_err();
    let umo_err = umo.unwrap_err();
    let dev_err = dev.unwrap_err();
    // Out of descriptors is no permission problem (root meets it too): say so.
    if let Some(e) = [&dev_err, &full_err, &umo_err].into_iter().find(|e| out_of_fds(e)) {
        let source = io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EMFILE));
        return Err(Error::TooManyOpenFiles { what: "a userfaultfd", source });
    }
    let cause = match umo_err.raw_os_error() {
        Some(libc::ENOSYS) => UffdBlock::NoKernelSupport,
        // User-mode-only is allowed to everyone since 5.11 unless something filters it.
        Some(libc::EPERM) if seccomp_filtered() => UffdBlock::Seccomp,
        // Before 5.11 the flag is unknown (EINVAL): the plain syscall's error decides.
        _ if dev_err.raw_os_error() == Some(libc::EACCES) => UffdBlock::DevicePermission,
        _ if full_err.raw_os_error() == Some(libc::EPERM) && seccomp_filtered() => UffdBlock::Seccomp,
        _ => UffdBlock::Unprivileged,
    };
    Err(Error::UffdUnavailable(cause, umo_err))
}

impl Uffd {
    /// Feature bits the kernel offers (probed on a throwaway fd: the handshake is one-shot).
    pub fn probe() -> Result<(UffdAccess, u64), Error> {
        let (fd, access) = open_fd()?;
        let api = api(&fd, 0).map_err(|e| Error::os("UFFDIO_API", e))?;
        Ok((access, api.features))
    }

    /// Open and negotiate: `required` features must all be offered; `optional` ones are
    /// taken when offered.
    pub fn open(required: u64, optional: u64) -> Result<Uffd, Error> {
        let (_, offered) = Self::probe()?;
        if let Some((_, name)) = FEATURE_NAMES.iter().find(|(b, _)| required & b != 0 && offered & b == 0) {
            return Err(Error::MissingFeature { feature: name, kernel: kernel_release() });
        }
        let (fd, access) = open_fd()?;
        let want = required | (optional & offered);
        let got = api(&fd, want).map_err(|e| Error::os("UFFDIO_API", e))?;
        Ok(Uffd { fd, access, features: want & got.features | want })
    }

    /// Open a userfaultfd whose write-protect faults the kernel resolves itself
    /// ([`FEATURE_WP_ASYNC`], Linux 6.7+; with [`FEATURE_WP_UNPOPULATED`], which the kernel
    /// implies anyway). Register ranges with `register_modes(.., false, true)`, protect them
    /// with [`Uffd::writeprotect`], and read (and re-arm) what was written with
    /// `PAGEMAP_SCAN` (`sys::pagemap`). Never for a range whose writes must trap: the write
    /// happens before anyone hears of it.
    ///
    /// # Errors
    /// [`Error::MissingFeature`] naming `UFFD_FEATURE_WP_ASYNC` on kernels before 6.7; the
    /// errors of [`Uffd::open`].
    pub fn open_wp_async() -> Result<Uffd, Error> {
        Self::open(FEATURE_WP | FEATURE_WP_ASYNC, FEATURE_WP_UNPOPULATED)
    }

    pub fn access(&self) -> UffdAccess {
        self.access
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    /// Register `[start, start+len)` for MISSING and WP faults.
    pub fn register(&self, start: usize, len: usize) -> io::Result<()> {
        self.register_modes(start, len, true, true)
    }

    /// Register `[start, start+len)` for MISSING faults (`missing`) and/or write-protect
    /// faults (`wp`); the engine always takes both ([`Uffd::register`]).
    pub fn register_modes(&self, start: usize, len: usize, missing: bool, wp: bool) -> io::Result<()> {
        let mode =
            if missing { g::UFFDIO_REGISTER_MODE_MISSING } else { 0 } | if wp { g::UFFDIO_REGISTER_MODE_WP } else { 0 };
        let mut r = g::uffdio_register {
            range: g::uffdio_range { start: start as u64, len: len as u64 },
            mode: mode as u64,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`; registering a range
        // touches no Rust memory.
        unsafe { uffd_ioctl::<UFFDIO_REGISTER, _>(self.fd.as_fd(), &mut r) }
    }

    /// Unregister `[start, start+len)` (undoes [`Uffd::register`]; clears write-protection
    /// on its pages, O(pages) for a WP registration). Threads waiting on a fault in the
    /// range are woken and retry against the kernel.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = g::uffdio_range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`; it touches no Rust memory.
        unsafe { uffd_ioctl::<UFFDIO_UNREGISTER, _>(self.fd.as_fd(), &mut r) }
    }

    /// UFFDIO_COPY `len` bytes from `src` to `dst`, retried until complete. EAGAIN (a
    /// pending REMAP or a partial copy) is retried; EEXIST reports `Ok(false)` (someone
    /// populated the page first).
    ///
    /// # Safety
    /// `src..src+len` must be readable memory that stays mapped for the call.
    pub unsafe fn copy(&self, dst: usize, src: usize, len: usize, wp: bool) -> io::Result<bool> {
        let r = until_done(len, super::inject::Point::UffdCopy, |done| {
            let mut c = g::uffdio_copy {
                dst: (dst + done) as u64,
                src: (src + done) as u64,
                len: (len - done) as u64,
                mode: if wp { g::UFFDIO_COPY_MODE_WP as u64 } else { 0 },
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; the caller guarantees `src`
            // is readable; `dst` lies in a range registered with this userfaultfd.
            let r = unsafe { uffd_ioctl::<UFFDIO_COPY, _>(self.fd.as_fd(), &mut c) };
            (c.copy, r)
        });
        match r {
            (_, Ok(())) => Ok(true),
            (0, Err(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            (_, Err(e)) => Err(e),
        }
    }

    /// UFFDIO_MOVE `len` bytes of pages from `src` to `dst` (Linux 6.8+, `FEATURE_MOVE`):
    /// the pages themselves change address, nothing is copied; `dst` ends up mapped
    /// writable and `src` a hole. Returns how many bytes moved before an error, with the
    /// error: the kernel refuses pages it cannot move (EBUSY: shared with another process
    /// after fork(2), pinned; EEXIST: `dst` populated) and the caller falls back to a copy
    /// of what is left. EAGAIN (a pending REMAP, a racing fault) is retried here.
    ///
    /// # Safety
    /// `src..src+len` must be populated anonymous pages nobody reads or writes during or
    /// after the call (their bytes leave with the pages), and `dst..dst+len` unpopulated
    /// pages of a range registered with this userfaultfd.
    pub unsafe fn move_pages(&self, dst: usize, src: usize, len: usize) -> (usize, io::Result<()>) {
        until_done(len, super::inject::Point::UffdMove, |done| {
            let mut m = g::uffdio_move {
                dst: (dst + done) as u64,
                src: (src + done) as u64,
                len: (len - done) as u64,
                mode: 0,
                move_: 0,
            };
            // SAFETY: UFFDIO_MOVE takes a `struct uffdio_move`; the caller guarantees both
            // ranges are as the kernel needs them and that nobody uses `src`'s bytes.
            let r = unsafe { uffd_ioctl::<UFFDIO_MOVE, _>(self.fd.as_fd(), &mut m) };
            (m.move_, r)
        })
    }

    /// Set (`wp`) or clear write protection on `[start, start+len)`; clearing wakes waiters.
    pub fn writeprotect(&self, start: usize, len: usize, wp: bool) -> io::Result<()> {
        let mut w = g::uffdio_writeprotect {
            range: g::uffdio_range { start: start as u64, len: len as u64 },
            mode: if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        loop {
            let r = match super::inject::hit(super::inject::Point::UffdWriteprotect) {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`; changing
                // protection invalidates no Rust reference.
                None => unsafe { uffd_ioctl::<UFFDIO_WRITEPROTECT, _>(self.fd.as_fd(), &mut w) },
            };
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                r => return r,
            }
        }
    }

    /// Wake threads waiting on faults in `[start, start+len)`.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = g::uffdio_range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        unsafe { uffd_ioctl::<UFFDIO_WAKE, _>(self.fd.as_fd(), &mut r) }
    }

    /// Read pending messages without blocking; returns how many were decoded into `out`.
    pub fn read_msgs(&self, out: &mut Vec<UffdMsg>) -> io::Result<usize> {
        const N: usize = 64;
        let mut buf = [MaybeUninit::<g::uffd_msg>::uninit(); N];
        // SAFETY: the same memory seen as its bytes; any byte may be uninitialised there.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<MaybeUninit<u8>>(), std::mem::size_of_val(&buf))
        };
        // read(2) on a userfaultfd writes whole messages only.
        let n = match rustix::io::read(&self.fd, bytes) {
            Ok((init, _)) => init.len(),
            Err(Errno::AGAIN) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let count = n / std::mem::size_of::<g::uffd_msg>();
        for m in &buf[..count] {
            // SAFETY: the kernel initialised the first `count` messages.
            let m = unsafe { m.assume_init() };
            // SAFETY: the union member read matches `event`, as the uapi header documents.
            let msg = unsafe {
                match m.event as u32 {
                    g::UFFD_EVENT_PAGEFAULT => UffdMsg::PageFault {
                        address: m.arg.pagefault.address,
                        flags: m.arg.pagefault.flags,
                        tid: m.arg.pagefault.feat.ptid,
                    },
                    g::UFFD_EVENT_REMAP => {
                        UffdMsg::Remap { from: m.arg.remap.from, to: m.arg.remap.to, len: m.arg.remap.len }
                    }
                    e => UffdMsg::Other(e as u8),
                }
            };
            out.push(msg);
        }
        Ok(count)
    }
}

/// Drive an ioctl that may do part of `len` bytes (UFFDIO_COPY, UFFDIO_MOVE) to the end:
/// `step(done)` issues it for the bytes after `done` and returns the struct's progress field
/// (bytes done, or a negative errno) with the ioctl's result. EAGAIN (a pending REMAP event,
/// a racing fault) is retried; another error ends the loop. Returns the bytes done, and the
/// error if any. Allocation-free: it runs in the signal handler. `point` is the fault
/// injection hook, consulted before each attempt.
fn until_done(
    len: usize,
    point: super::inject::Point,
    mut step: impl FnMut(usize) -> (i64, io::Result<()>),
) -> (usize, io::Result<()>) {
    let mut done = 0usize;
    while done < len {
        let (progress, r) = match super::inject::hit(point) {
            Some(errno) => (0, Err(io::Error::from_raw_os_error(errno))),
            None => step(done),
        };
        match r {
            Ok(()) => done = len,
            Err(_) if progress > 0 => done += progress as usize,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
            Err(e) => return (done, Err(e)),
        }
    }
    (done, Ok(()))
}

fn api(fd: &OwnedFd, features: u64) -> io::Result<g::uffdio_api> {
    let mut a = g::uffdio_api { api: g::UFFD_API as u64, features, ioctls: 0 };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
    unsafe { uffd_ioctl::<UFFDIO_API, _>(fd.as_fd(), &mut a) }?;
    Ok(a)
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The computed request numbers agree with the ones linux-raw-sys generated from this
    /// architecture's headers, and with the `_IO(0xAA, 0)` encoding of the device ioctl.
    #[test]
    fn request_numbers() {
        use linux_raw_sys::ioctl as i;
        assert_eq!(UFFDIO_API as u64, i::UFFDIO_API as u64);
        assert_eq!(UFFDIO_REGISTER as u64, i::UFFDIO_REGISTER as u64);
        assert_eq!(UFFDIO_WAKE as u64, i::UFFDIO_WAKE as u64);
        assert_eq!(UFFDIO_COPY as u64, i::UFFDIO_COPY as u64);
        assert_eq!(UFFDIO_WRITEPROTECT as u64, i::UFFDIO_WRITEPROTECT as u64);
        #[cfg(any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64", target_arch = "riscv64"))]
        {
            assert_eq!(USERFAULTFD_IOC_NEW as u64, 0xAA00);
            assert_eq!(UFFDIO_MOVE as u64, 0xc028_aa05);
        }
    }
}
