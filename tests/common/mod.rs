//! Helpers shared by the integration tests (each test file includes this module).
#![allow(dead_code)]

use std::time::Duration;

use cowarena::{Arena, Space, Stats};

pub const PAGE: usize = 4096;
pub const TABLE: usize = 2 << 20;

/// xorshift64*: tiny, deterministic, good enough to drive schedules.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that nearby seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }

    /// An offset in `0..len` biased towards interesting places: page and table
    /// boundaries (either side) and the end of the space.
    pub fn offset(&mut self, len: usize) -> usize {
        let o = match self.below(6) {
            0 => {
                let pages = len.div_ceil(PAGE);
                let p = self.below(pages + 1) * PAGE;
                p.saturating_sub(self.below(16))
            }
            1 => {
                let tables = len.div_ceil(TABLE);
                let t = self.below(tables + 1) * TABLE;
                (t + self.below(32)).saturating_sub(16)
            }
            2 => len.saturating_sub(self.range(1, 5000)),
            _ => self.below(len),
        };
        o.min(len - 1)
    }

    /// A (offset, length) inside a space of `len` bytes, with lengths from one byte to a
    /// few pages and frequent page crossings.
    pub fn span(&mut self, len: usize) -> (usize, usize) {
        let off = self.offset(len);
        let max = len - off;
        let want = match self.below(8) {
            0 => 1,
            1 => self.range(1, 16),
            2 => PAGE,
            3 => self.range(PAGE, 3 * PAGE + 17),
            4 => self.range(1, 64 * 1024),
            _ => self.range(1, 600),
        };
        (off, want.min(max).max(1))
    }
}

/// An integer from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not an integer")),
        Err(_) => default,
    }
}

/// `COWARENA_STRESS_SECS` (default `default_secs`).
pub fn stress_duration(default_secs: u64) -> Duration {
    Duration::from_secs(env_u64("COWARENA_STRESS_SECS", default_secs))
}

/// Assert that nothing allocated by the arena survives (invariant 5).
pub fn assert_nothing_left(arena: &Arena, ctx: &str) {
    let s: Stats = arena.stats();
    assert_eq!(
        (s.spaces_in_use, s.frames_in_use, s.tables_in_use, s.views_in_use, s.frozen_regions, s.pool_regions),
        (0, 0, 0, 0, 0, 0),
        "{ctx}: something leaked after every space dropped: {s:?}"
    );
    arena.check_invariants().unwrap_or_else(|e| panic!("{ctx}: invariants broken after all drops: {e}"));
}

/// Compare `got` against `want`, reporting the first differing byte with its page.
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], base: usize, ctx: &dyn std::fmt::Display) {
    assert_eq!(got.len(), want.len());
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        let at = base + i;
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
        panic!(
            "{ctx}: divergence at byte {at:#x} (page {}, offset {}): got {:#04x}, want {:#04x}; {bad} bytes differ in {:#x}..{:#x}",
            at / PAGE,
            at % PAGE,
            got[i],
            want[i],
            base,
            base + got.len()
        );
    }
}

/// Resident set size of this process, in bytes (from /proc/self/status).
pub fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Abort the process (with a message) unless disarmed before `limit` passes: turns a hang
/// into a loud failure.
pub struct Watchdog {
    tx: Option<std::sync::mpsc::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn new(what: &'static str, limit: Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                    // Straight to fd 2: `eprintln!` is captured by the test harness, and the
                    // capture is lost when the process aborts.
                    use std::io::Write as _;
                    let msg = format!("WATCHDOG: {what} did not finish within {limit:?}: hang; aborting\n");
                    let _ = std::io::stderr().write_all(msg.as_bytes());
                    std::process::abort();
                }
            })
            .unwrap();
        Watchdog { tx: Some(tx), handle: Some(handle) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `s` holds exactly `want`, through its view and through `Space::read`; the first differing
/// byte is named.
pub fn assert_space_is(s: &Space, want: &[u8], what: &str) {
    let got = s.as_slice();
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: byte {i} (page {}) is {} but should be {}", i / PAGE, got[i], want[i]);
    }
    let mut buf = vec![0u8; want.len()];
    s.read(0, &mut buf).unwrap();
    if let Some(i) = (0..want.len()).find(|&i| buf[i] != want[i]) {
        panic!("{what}: Space::read byte {i} (page {}) is {} but should be {}", i / PAGE, buf[i], want[i]);
    }
}
