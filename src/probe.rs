//! What this machine (or container) offers cowarena: the logic behind `cowarena doctor`.
//!
//! [`probe`] inspects the kernel, the ways userfaultfd can be opened, the features it
//! offers, seccomp and transparent huge pages, and then *actually tries the library*: it
//! builds an [`Arena`] and does a tiny fork/write/read round trip. The returned [`Report`]
//! prints as the doctor's output, and [`Report::works`] is its exit status.
//!
//! ```
//! let report = cowarena::probe::probe();
//! println!("{report}");
//! if !report.works() {
//!     eprintln!("cowarena cannot work here: {}", report.advice.join("; "));
//! }
//! ```

use std::fmt;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::error::{remedy, Error, UffdBlock};
use crate::sys::uffd as su;
use crate::{Arena, FaultMode, UffdAccess};

/// Path of the userfaultfd device (Linux 6.1+).
pub const DEVICE: &str = "/dev/userfaultfd";

/// A userfaultfd feature (or THP) and whether this kernel offers it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Feature {
    /// Short name, e.g. `WP`.
    pub name: &'static str,
    /// The kernel's name, e.g. `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
    pub kernel_name: &'static str,
    /// Offered? `None` when it could not be probed (userfaultfd could not be opened).
    pub present: Option<bool>,
    /// Whether cowarena needs it and what it is used for.
    pub role: &'static str,
}

/// What opening `/dev/userfaultfd` with read-write access gave.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceState {
    /// The device node does not exist (kernel older than 6.1, or not passed to the container).
    Absent,
    /// It exists and this process may open it.
    Accessible,
    /// It exists but opening it failed (usually EACCES: its mode is 0600 root).
    Denied(String),
}

/// What the `userfaultfd(2)` system call gave, tried without side effects (the fd is closed).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyscallState {
    /// The call returned a file descriptor.
    Allowed,
    /// The call failed with this errno.
    Failed(i32),
}

/// The result of the tiny end-to-end run through the public API.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoundTrip {
    /// `Arena::new`, a space, a fork, writes through views and the API, reads: all correct.
    Passed {
        /// How the arena's userfaultfd was opened.
        access: UffdAccess,
        /// How its faults are served.
        mode: FaultMode,
    },
    /// `Arena::new()` failed because userfaultfd cannot be opened; the cause is classified.
    Blocked(UffdBlock, String),
    /// Another error, or wrong data (the message says which).
    Failed(String),
}

/// Everything `cowarena doctor` reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Report {
    /// `/proc/sys/kernel/osrelease`, e.g. `6.18.44`.
    pub kernel: String,
    /// `(major, minor)` parsed from [`Report::kernel`], if it parses.
    pub kernel_version: Option<(u32, u32)>,
    /// Effective user id of this process.
    pub uid: u32,
    /// `/proc/sys/vm/unprivileged_userfaultfd`: `Some(true)` when unprivileged users may use
    /// the full syscall.
    pub unprivileged_sysctl: Option<bool>,
    /// `/dev/userfaultfd`.
    pub device: DeviceState,
    /// `userfaultfd(2)` without flags (kernel-mode faults too: needs privilege).
    pub syscall_full: SyscallState,
    /// `userfaultfd(2)` with `UFFD_USER_MODE_ONLY` (allowed to everyone since 5.11).
    pub syscall_user_mode_only: SyscallState,
    /// A seccomp filter is installed on this process (`Seccomp: 2` in /proc/self/status).
    pub seccomp_filter: bool,
    /// The seccomp filter refuses `userfaultfd(2)` (EPERM even with `UFFD_USER_MODE_ONLY`).
    pub seccomp_blocks_userfaultfd: bool,
    /// The access path the library picks (the most capable available), or why there is none.
    pub access: Result<UffdAccess, UffdBlock>,
    /// Features, in the order WP, WP_UNPOPULATED, MOVE, SIGBUS, EVENT_REMAP, THREAD_ID, THP.
    pub features: Vec<Feature>,
    /// `/sys/kernel/mm/transparent_hugepage/enabled`, the selected value (`always`,
    /// `madvise`, `never`), if readable.
    pub thp: Option<String>,
    /// The end-to-end run.
    pub round_trip: RoundTrip,
    /// What to do, one sentence each (empty when nothing needs doing).
    pub advice: Vec<String>,
}

impl Report {
    /// Can the library work here? True exactly when the round trip passed.
    pub fn works(&self) -> bool {
        matches!(self.round_trip, RoundTrip::Passed { .. })
    }

    /// The named feature's state (`WP`, `SIGBUS`, `THP`, ...), if it is in the report.
    pub fn feature(&self, name: &str) -> Option<&Feature> {
        self.features.iter().find(|f| f.name == name)
    }
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

fn euid() -> u32 {
    // No libc call needed: the effective uid is the second field of `Uid:`.
    read_trim("/proc/self/status")
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

fn device_state() -> DeviceState {
    match std::fs::OpenOptions::new().read(true).write(true).open(DEVICE) {
        Ok(_) => DeviceState::Accessible,
        Err(e) if e.kind() == io::ErrorKind::NotFound => DeviceState::Absent,
        Err(e) => DeviceState::Denied(e.to_string()),
    }
}

/// Try `userfaultfd(2)` and close the result at once.
fn try_syscall(user_mode_only: bool) -> SyscallState {
    let flags = libc::O_CLOEXEC
        | libc::O_NONBLOCK
        | if user_mode_only { linux_raw_sys::general::UFFD_USER_MODE_ONLY as libc::c_int } else { 0 };
    // SAFETY: userfaultfd(2) takes one int of flags and returns a new fd or -1; it touches
    // no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return SyscallState::Failed(io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: the kernel just returned this fd and nobody else owns it; dropping closes it.
    drop(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
    SyscallState::Allowed
}

fn thp_mode() -> Option<String> {
    let s = read_trim("/sys/kernel/mm/transparent_hugepage/enabled")?;
    let start = s.find('[')?;
    let end = s[start..].find(']')? + start;
    Some(s[start + 1..end].to_owned())
}

/// (short name, kernel name, role) for each userfaultfd feature reported, in order.
const FEATURES: &[(&str, &str, &str)] = &[
    ("WP", "UFFD_FEATURE_PAGEFAULT_FLAG_WP", "required: write-protect faults break shared pages"),
    ("WP_UNPOPULATED", "UFFD_FEATURE_WP_UNPOPULATED", "optional (6.4+): not used by this version"),
    ("MOVE", "UFFD_FEATURE_MOVE", "optional (6.8+): a write to a page no one else maps takes it instead of copying"),
    (
        "WP_ASYNC",
        "UFFD_FEATURE_WP_ASYNC",
        "optional (6.7+, with PAGEMAP_SCAN): forks' stores served by the kernel alone (async_forks, async_wp)",
    ),
    ("SIGBUS", "UFFD_FEATURE_SIGBUS", "fast path: faults served in the faulting thread (else a handler thread)"),
    ("EVENT_REMAP", "UFFD_FEATURE_EVENT_REMAP", "fast fork: mremap of registered views without re-registering"),
    ("THREAD_ID", "UFFD_FEATURE_THREAD_ID", "optional: names the faulting thread in logs"),
];

/// The round trip: 64 KiB space, written through the view and the API, forked, verified.
fn round_trip() -> RoundTrip {
    let arena = match Arena::new() {
        Ok(a) => a,
        Err(Error::UffdUnavailable(cause, e)) => {
            return RoundTrip::Blocked(cause, Error::UffdUnavailable(cause, e).to_string())
        }
        Err(e) => return RoundTrip::Failed(format!("Arena::new(): {e}")),
    };
    let run = || -> Result<Option<String>, Error> {
        let mut root = arena.space(64 << 10)?;
        root.as_mut_slice()[..8].copy_from_slice(b"cowarena");
        root.write(40 << 10, b"api write")?;
        let mut child = root.fork()?;
        child.as_mut_slice()[0] = b'C';
        child.write(40 << 10, b"API")?;
        let mut buf = [0u8; 9];
        root.read(40 << 10, &mut buf)?;
        let checks = [
            (&root.as_slice()[..8], &b"cowarena"[..], "parent view after the child's write"),
            (&child.as_slice()[..8], &b"Cowarena"[..], "child view"),
            (&buf[..], &b"api write"[..], "parent read() after the child's write()"),
            (&child.as_slice()[40 << 10..(40 << 10) + 9], &b"API write"[..], "child view of its write()"),
            (&child.as_slice()[60 << 10..(60 << 10) + 4], &[0u8; 4][..], "never-written page"),
        ];
        for (got, want, what) in checks {
            if got != want {
                return Ok(Some(format!("wrong data in {what}: {got:?}, expected {want:?}")));
            }
        }
        Ok(None)
    };
    match run() {
        Ok(None) => RoundTrip::Passed { access: arena.uffd_access(), mode: arena.fault_mode() },
        Ok(Some(wrong)) => RoundTrip::Failed(wrong),
        Err(e) => RoundTrip::Failed(e.to_string()),
    }
}

/// Inspect this process's environment and try the library; see the [module docs](self).
pub fn probe() -> Report {
    let kernel = read_trim("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into());
    let kernel_version = parse_version(&kernel);
    let uid = euid();
    let unprivileged_sysctl = read_trim("/proc/sys/vm/unprivileged_userfaultfd").map(|v| v != "0");
    let device = device_state();
    let syscall_full = try_syscall(false);
    let syscall_user_mode_only = try_syscall(true);
    let seccomp_filter = su::seccomp_filtered();
    let seccomp_blocks_userfaultfd = seccomp_filter && syscall_user_mode_only == SyscallState::Failed(libc::EPERM);

    let (access, offered) = match su::Uffd::probe() {
        Ok((a, f)) => (Ok(a), Some(f)),
        Err(Error::UffdUnavailable(cause, _)) => (Err(cause), None),
        // Opened, but the API handshake failed: no features known.
        Err(_) => (Err(UffdBlock::NoKernelSupport), None),
    };
    let bit = |kernel_name: &str| su::FEATURE_NAMES.iter().find(|(_, n)| *n == kernel_name).map(|(b, _)| *b);
    let mut features: Vec<Feature> = FEATURES
        .iter()
        .map(|&(name, kernel_name, role)| Feature {
            name,
            kernel_name,
            present: offered.map(|f| bit(kernel_name).is_some_and(|b| f & b != 0)),
            role,
        })
        .collect();
    let thp = thp_mode();
    features.push(Feature {
        name: "THP",
        kernel_name: "transparent_hugepage",
        present: thp.as_deref().map(|m| m != "never"),
        role: "optional: not used by this version (huge views would make fork-time protection cheaper)",
    });

    let round_trip = round_trip();

    let mut advice = Vec::new();
    match &round_trip {
        RoundTrip::Blocked(cause, _) => advice.push(remedy(*cause).to_owned()),
        RoundTrip::Failed(msg) => {
            advice.push(format!("the library failed its self-test ({msg}); please report it with this output"))
        }
        RoundTrip::Passed { access, .. } => {
            if *access == UffdAccess::UserModeOnly {
                advice.push(format!(
                    "{}; for full access use {DEVICE} (Linux 6.1+, read-write for this user) or \
                     `sysctl -w vm.unprivileged_userfaultfd=1`",
                    access.implications()
                ));
            }
        }
    }
    if let DeviceState::Denied(e) = &device {
        if !matches!(round_trip, RoundTrip::Passed { access: UffdAccess::Device, .. }) {
            let profile = if seccomp_blocks_userfaultfd {
                ", or allow userfaultfd(2) with `--security-opt seccomp=cowarena-seccomp.json` (then \
                 UFFD_USER_MODE_ONLY works for any user)"
            } else {
                ""
            };
            advice.push(format!(
                "{DEVICE} is present but uid {uid} cannot open it ({e}): its mode and owner come from the \
                 host (usually 0600 root); run as root, or give this user read-write access on the host \
                 (a group, or `chmod 0666 {DEVICE}`){profile}"
            ));
        }
    }
    if seccomp_blocks_userfaultfd && matches!(round_trip, RoundTrip::Passed { .. }) {
        advice.push(format!(
            "seccomp blocks userfaultfd(2); cowarena works through {DEVICE}, but a process that cannot open \
             the device would fail: `--security-opt seccomp=cowarena-seccomp.json` allows the syscall"
        ));
    }
    if let Some(f) = features.iter().find(|f| f.name == "SIGBUS" && f.present == Some(false)) {
        advice.push(format!("{} is missing: faults are served by a handler thread (slower)", f.kernel_name));
    }
    if let Some(f) = features.iter().find(|f| f.name == "EVENT_REMAP" && f.present == Some(false)) {
        advice.push(format!("{} is missing: forks of written spaces are slower", f.kernel_name));
    }
    if kernel_version.is_some_and(|v| v < (5, 11)) {
        advice.push("cowarena needs Linux 5.11 or newer".into());
    }

    Report {
        kernel,
        kernel_version,
        uid,
        unprivileged_sysctl,
        device,
        syscall_full,
        syscall_user_mode_only,
        seccomp_filter,
        seccomp_blocks_userfaultfd,
        access,
        features,
        thp,
        round_trip,
        advice,
    }
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOSYS => "ENOSYS",
        libc::EINVAL => "EINVAL",
        _ => return format!("errno {e}"),
    };
    name.to_owned()
}

impl fmt::Display for SyscallState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyscallState::Allowed => f.write_str("allowed"),
            SyscallState::Failed(e) => write!(f, "refused ({})", errno_name(*e)),
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceState::Absent => f.write_str("absent"),
            DeviceState::Accessible => f.write_str("present, read-write access"),
            DeviceState::Denied(e) => write!(f, "present, not accessible ({e})"),
        }
    }
}

fn access_name(a: UffdAccess) -> &'static str {
    match a {
        UffdAccess::Device => "device (/dev/userfaultfd)",
        UffdAccess::Syscall => "privileged syscall (userfaultfd(2))",
        UffdAccess::UserModeOnly => "user-mode-only syscall (userfaultfd(2) with UFFD_USER_MODE_ONLY)",
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cowarena doctor")?;
        writeln!(f, "  kernel:                 {}", self.kernel)?;
        writeln!(f, "  effective uid:          {}", self.uid)?;
        let sysctl = match self.unprivileged_sysctl {
            Some(v) => if v { "1" } else { "0" }.to_owned(),
            None => "unreadable".into(),
        };
        writeln!(f, "  vm.unprivileged_userfaultfd: {sysctl}")?;
        writeln!(f, "  seccomp filter:         {}", yes_no(self.seccomp_filter))?;
        writeln!(f, "  seccomp blocks userfaultfd: {}", yes_no(self.seccomp_blocks_userfaultfd))?;
        writeln!(f, "  {DEVICE}:       {}", self.device)?;
        writeln!(f, "  userfaultfd(2):         {}", self.syscall_full)?;
        writeln!(f, "  userfaultfd(2) UFFD_USER_MODE_ONLY: {}", self.syscall_user_mode_only)?;
        match self.access {
            Ok(a) => writeln!(f, "  access path:            {}", access_name(a))?,
            Err(cause) => writeln!(f, "  access path:            none ({cause:?})")?,
        }
        writeln!(f, "  features:")?;
        for feat in &self.features {
            let state = match feat.present {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown",
            };
            let thp = if feat.name == "THP" {
                format!(" [{}]", self.thp.as_deref().unwrap_or("unreadable"))
            } else {
                String::new()
            };
            writeln!(f, "    {:<15} {:<7} {}{thp}  ({})", feat.name, state, feat.kernel_name, feat.role)?;
        }
        match &self.round_trip {
            RoundTrip::Passed { access, mode } => writeln!(
                f,
                "  self-test:              passed (fork/write/read round trip; access {}, fault mode {mode:?})",
                access_name(*access)
            )?,
            RoundTrip::Blocked(cause, msg) => writeln!(f, "  self-test:              FAILED ({cause:?}): {msg}")?,
            RoundTrip::Failed(msg) => writeln!(f, "  self-test:              FAILED: {msg}")?,
        }
        if self.advice.is_empty() {
            writeln!(f, "what to do: nothing, cowarena works here")?;
        } else {
            writeln!(f, "what to do:")?;
            for a in &self.advice {
                writeln!(f, "  - {a}")?;
            }
        }
        write!(f, "verdict: {}", if self.works() { "cowarena works here" } else { "cowarena CANNOT work here" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_version("5.11.0"), Some((5, 11)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn every_feature_is_known_to_the_sys_layer() {
        for (_, kernel_name, _) in FEATURES {
            assert!(su::FEATURE_NAMES.iter().any(|(_, n)| n == kernel_name), "{kernel_name}");
        }
    }

    #[test]
    fn report_is_consistent() {
        let r = probe();
        let text = r.to_string();
        assert!(text.contains(&r.kernel), "{text}");
        assert_eq!(r.features.len(), FEATURES.len() + 1);
        assert!(text.contains("verdict:"), "{text}");
        match (&r.access, &r.round_trip) {
            (Ok(a), RoundTrip::Passed { access, .. }) => assert_eq!(a, access),
            (Err(c), RoundTrip::Blocked(b, msg)) => {
                assert_eq!(c, b);
                assert!(msg.contains(remedy(*c)), "{msg}");
            }
            (a, t) => panic!("access {a:?} but round trip {t:?}"),
        }
    }
}
