//! The arena's swap file (`Arena::evict`): evicted frames' bytes, one 4 KiB slot each,
//! grown in chunks that are also mapped read-only (a chunk is a region of homes, see
//! `mm/evict.rs`). Pages are written with `pwrite(2)`, made durable and dropped from the
//! page cache (`fdatasync` + `POSIX_FADV_DONTNEED`: eviction must give memory back, and
//! page cache counts against a container's memory limit), and read back with `pread(2)` —
//! async-signal-safe, and an I/O error is an error, not the `SIGBUS` a read through the
//! mapping would raise.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use super::mem::Mapping;

/// The swap file. Removed when dropped if it has a name.
pub struct SwapFile {
    file: File,
    /// The path, if the file was created at one (`ArenaBuilder::swap_path`).
    path: Option<PathBuf>,
}

impl SwapFile {
    /// Create the swap file at `path` (truncated if it exists), or, without a path, an
    /// unnamed file in the temporary directory (`$TMPDIR`, else `/tmp`) that disappears
    /// with the arena (`O_TMPFILE`; a named file unlinked at once where that is
    /// unsupported).
    pub fn create(path: Option<&Path>) -> io::Result<SwapFile> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(p) = path {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)?;
            return Ok(SwapFile { file, path: Some(p.to_path_buf()) });
        }
        let dir = std::env::temp_dir();
        match std::fs::OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE).open(&dir) {
            Ok(file) => Ok(SwapFile { file, path: None }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {
                let nanos =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
                let p = dir.join(format!("cowarena-swap-{}-{nanos:x}", std::process::id()));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&p)?;
                std::fs::remove_file(&p)?;
                Ok(SwapFile { file, path: None })
            }
            Err(e) => Err(e),
        }
    }

    /// Make the file `len` bytes long (sparse) and map `[off, off + chunk)` of it
    /// read-only: a new chunk of slots.
    pub fn add_chunk(&self, off: u64, chunk: usize) -> io::Result<Mapping> {
        self.file.set_len(off + chunk as u64)?;
        Mapping::file_read_only(&self.file, off, chunk)
    }

    /// Write `len` bytes from address `src` at offset `off`.
    ///
    /// # Safety
    /// `[src, src + len)` must be readable memory that nothing changes during the call.
    pub unsafe fn write_from(&self, src: usize, len: usize, off: u64) -> io::Result<()> {
        // SAFETY: the caller guarantees the range is readable and stable.
        let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
        let mut done = 0;
        while done < len {
            match rustix::io::pwrite(self.file.as_fd(), &bytes[done..], off + done as u64) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Make what was written durable and drop it from the page cache.
    pub fn sync_and_drop(&self, off: u64, len: u64) -> io::Result<()> {
        rustix::fs::fdatasync(self.file.as_fd())?;
        // (Advice only: a failure leaves the pages cached, not wrong.)
        let _ =
            rustix::fs::fadvise(self.file.as_fd(), off, std::num::NonZeroU64::new(len), rustix::fs::Advice::DontNeed);
        Ok(())
    }

    /// Read `len` bytes (whole pages) at offset `off` into address `dst`.
    /// Async-signal-safe (no allocation: the errors are OS codes or a simple kind). A short
    /// read — the file was truncated under the arena — is `UnexpectedEof`.
    ///
    /// # Safety
    /// `[dst, dst + len)` must be writable memory that nothing else uses during the call.
    pub unsafe fn read_pages(&self, dst: usize, len: usize, off: u64) -> io::Result<()> {
        // SAFETY: the caller guarantees the range is writable and ours.
        let buf = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, len) };
        let mut done = 0;
        while done < len {
            match rustix::io::pread(self.file.as_fd(), &mut buf[done..], off + done as u64) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}
