//! An eventfd to stop the engine's reader, and `poll` on a few descriptors. Through
//! `rustix`: `EventFd::signal` runs in the SIGBUS handler and must not touch `errno`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{self, EventfdFlags, PollFd, PollFlags, Timespec};

#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        Ok(EventFd(event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?))
    }

    pub fn signal(&self) -> io::Result<()> {
        rustix::io::write(&self.0, &1u64.to_ne_bytes())?;
        Ok(())
    }

    /// Reset the counter (non-blocking; nothing to do if it is already zero).
    pub fn clear(&self) {
        let mut v = [0u8; 8];
        let _ = rustix::io::read(&self.0, &mut v);
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Wait until one of `N` descriptors is readable, or `timeout_ms` passed (-1: no limit);
/// returns which are readable (none when interrupted by a signal).
pub fn poll<const N: usize>(fds: [BorrowedFd<'_>; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut fds = fds.map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::IN));
    let timeout = (timeout_ms >= 0)
        .then(|| Timespec { tv_sec: i64::from(timeout_ms / 1000), tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000 });
    match event::poll(&mut fds, timeout.as_ref()) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok([false; N]),
        Err(e) => return Err(e.into()),
    }
    Ok(std::array::from_fn(|i| !fds[i].revents().is_empty()))
}
