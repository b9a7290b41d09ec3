//! `futex(2)` for the arena lock (`crate::fault::lock`): sleep while a word holds a value,
//! wake sleepers. Raw syscalls through rustix's `linux_raw` backend: no `errno`, no
//! allocation, async-signal-safe — the SIGBUS handler may sleep here instead of spinning.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use rustix::thread::futex;

/// Sleep while `word` holds `expected` (return at once when it does not), for at most
/// `timeout` (`None`: no limit). Returns on a wake-up, a timeout, a signal or spuriously:
/// the caller re-checks the word.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|d| futex::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    });
    // EAGAIN (the word changed), EINTR and ETIMEDOUT all mean "look again".
    let _ = futex::wait(word, futex::Flags::PRIVATE, expected, ts.as_ref());
}

/// Wake at most `n` sleepers on `word`.
pub fn wake(word: &AtomicU32, n: u32) {
    // Cannot fail for a valid, aligned word of this process (a reference).
    let _ = futex::wake(word, futex::Flags::PRIVATE, n);
}
