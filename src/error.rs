//! The one error type of the public API.
//!
//! Every variant's message says what went wrong *and what to do about it*: a user who
//! meets one of these in a container log should not need to read our source.

use std::io;

/// Why userfaultfd could not be opened (see [`Error::UffdUnavailable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UffdBlock {
    /// `userfaultfd(2)` returned EPERM even with `UFFD_USER_MODE_ONLY` while a seccomp filter
    /// is installed: Docker's, containerd's and Podman's default profiles do this.
    Seccomp,
    /// The kernel refuses unprivileged userfaultfd (`vm.unprivileged_userfaultfd=0` and no
    /// `CAP_SYS_PTRACE`) and `/dev/userfaultfd` is absent or not accessible.
    Unprivileged,
    /// `/dev/userfaultfd` exists but this process may not open it, and the syscall is refused.
    DevicePermission,
    /// The kernel has no userfaultfd at all (ENOSYS: too old, or built without
    /// `CONFIG_USERFAULTFD`).
    NoKernelSupport,
}

/// Errors returned by cowarena.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// userfaultfd is not available to this process; the message names the remedy.
    #[error("userfaultfd unavailable: {}", remedy(*.0))]
    UffdUnavailable(UffdBlock, #[source] io::Error),

    /// The kernel lacks a userfaultfd feature cowarena needs.
    #[error(
        "the kernel lacks userfaultfd feature {feature} (running {kernel}); cowarena needs \
         Linux 5.11 or newer with write-protect support for anonymous memory (CONFIG_HAVE_ARCH_USERFAULTFD_WP)"
    )]
    MissingFeature {
        /// The feature's kernel name, e.g. `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
        feature: &'static str,
        /// `uname -r` of the running kernel.
        kernel: String,
    },

    /// An offset/length pair falls outside the space.
    #[error("range {offset:#x}+{len:#x} is outside the space of {size:#x} bytes")]
    OutOfRange {
        /// First byte of the request.
        offset: usize,
        /// Length of the request.
        len: usize,
        /// Size of the space.
        size: usize,
    },

    /// A size or length argument is unusable (zero, or too large for the address space).
    #[error("invalid size {size:#x}: {why}")]
    InvalidSize {
        /// The rejected value.
        size: usize,
        /// What is wrong with it.
        why: &'static str,
    },

    /// A configured limit of the arena has been reached.
    #[error(
        "arena memory limit reached: {what} would exceed the limit of {limit} bytes resident \
         (written pages and read-only copies in views count); drop or discard spaces you no longer \
         need, read with `Space::read` (it maps nothing), or raise `Arena::builder().max_memory(..)`"
    )]
    CapacityExhausted {
        /// What was being allocated.
        what: &'static str,
        /// The configured limit, in bytes.
        limit: u64,
    },

    /// Every slot of the SIGBUS handler's arena registry is taken: at most `limit` arenas
    /// in [`FaultMode::Signal`](crate::FaultMode::Signal) may be alive at once.
    #[error(
        "too many live arenas in signal fault mode (the limit is {limit}): drop arenas you no longer \
         need, create spaces of independent families from one arena (families never interact), \
         or build further arenas with `.fault_mode(FaultMode::Thread)`"
    )]
    TooManyArenas {
        /// The most signal-mode arenas alive at once.
        limit: usize,
    },

    /// The arena was created by another process: this is a `fork(2)` child, which inherits
    /// the arena's memory but not its views, threads or address space. Nothing is done.
    #[error(
        "this arena belongs to process {owner} and this is its fork(2) child {current}: the child \
         inherits neither the views (MADV_DONTFORK) nor the fault engine, and the inherited \
         userfaultfd still serves the parent; create a new Arena in the child (dropping the \
         inherited handles is safe: it does nothing)"
    )]
    ForkedProcess {
        /// The process that created the arena.
        owner: i32,
        /// This process.
        current: i32,
    },

    /// The calling thread blocks SIGBUS, but the arena serves view faults in a SIGBUS
    /// handler ([`FaultMode::Signal`](crate::FaultMode::Signal)): the first view fault of
    /// this thread would kill the process, silently.
    #[error(
        "SIGBUS is blocked in this thread, and this arena serves view faults in a SIGBUS handler \
         (FaultMode::Signal): a view fault here would kill the process without a message. Unblock \
         SIGBUS in threads that touch views (pthread_sigmask: it is a synchronous fault signal, \
         not one for a signal-handling thread), or build the arena with `.fault_mode(FaultMode::Thread)`"
    )]
    SigbusBlocked,

    /// An offset that must be page-aligned is not.
    #[error("offset {offset:#x} is not a multiple of the 4096-byte page size; discard whole pages")]
    Unaligned {
        /// The rejected offset.
        offset: usize,
    },

    /// An operation this arena's configuration cannot offer; the message names the
    /// configuration to use instead.
    #[error("{what} is not supported {why}")]
    Unsupported {
        /// The refused operation.
        what: &'static str,
        /// Why, and what to do.
        why: &'static str,
    },

    /// Two spaces that must belong to the same fork family (and size) do not.
    #[error("the spaces are not related: reset_to needs a space of the same fork family, size and arena")]
    NotRelated,

    /// The writer given to [`Space::write_to`](crate::Space::write_to) failed after
    /// `written` bytes of the space had been written to it.
    #[error("writing the space out failed after {written} bytes: {source}")]
    WriteFailed {
        /// Bytes the writer accepted before it failed.
        written: u64,
        /// The writer's error.
        #[source]
        source: io::Error,
    },

    /// [`Arena::load`](crate::Arena::load): the file is not an image this build can load;
    /// `problem` says why. Nothing was mapped.
    #[error("cannot load {}: {problem}", path.display())]
    BadImage {
        /// The file given to `load`.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: crate::ImageProblem,
    },

    /// Reading or writing an image file failed (`op` names the step).
    #[error("{op} {}: {source}", path.display())]
    ImageIo {
        /// The step: "open", "read", "write", "sync", "rename", "map".
        op: &'static str,
        /// The image file.
        path: std::path::PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },

    /// A page of a space loaded from an image failed its checksum when it was first
    /// brought in: the file is damaged, or was changed after it was saved. The page was not
    /// used; load the space again from a good copy.
    #[error(
        "page {page} of a loaded image failed its checksum: the image file is damaged or was changed after it \
         was saved (load it again from a good copy)"
    )]
    CorruptPage {
        /// The page's index in the space.
        page: usize,
    },

    /// The arena's swap file failed (`Arena::evict`, or bringing an evicted page back): a
    /// page that cannot be read back is never replaced by zeros — the access fails. An
    /// eviction that fails moves nothing.
    #[error(
        "swap file I/O failed ({op}): {source}; check the swap file's filesystem (free space, I/O errors, \
         or whether something truncated the file) or give the arena another one with \
         `ArenaBuilder::swap_path`"
    )]
    SwapIo {
        /// The step that failed.
        op: &'static str,
        /// The system's error (`UnexpectedEof`: the file is shorter than the slot).
        #[source]
        source: io::Error,
    },

    /// An internal error (a bug, or an injected failure) in the fault path; the operation
    /// did not happen. Other spaces are unaffected.
    #[error("internal error in cowarena's fault path: {0}; please report it")]
    Internal(String),

    /// A kernel call failed; `op` names it.
    #[error("{op} failed: {source}")]
    Os {
        /// The operation, e.g. `mmap view` or `UFFDIO_COPY`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The process reached a mapping limit: an `mmap`/`mremap` failed with ENOMEM, which
    /// for cowarena's (unpopulated) mappings means `vm.max_map_count` or the address space
    /// (RLIMIT_AS, or the 128 TiB user address space) is exhausted.
    #[error(
        "{op} failed: {source}: the process has run out of mappings (`vm.max_map_count`, see \
         /proc/sys/vm/max_map_count) or of address space (RLIMIT_AS / `ulimit -v`, or the 128 TiB \
         user address space); drop spaces you no longer need, call `Arena::compact`, or raise the \
         limit (`sysctl -w vm.max_map_count=262144`, `ulimit -v unlimited`)"
    )]
    MappingLimit {
        /// The operation, e.g. `mmap view`.
        op: &'static str,
        /// The OS error (ENOMEM).
        #[source]
        source: io::Error,
    },

    /// The process (or the system) has no file descriptor left (EMFILE/ENFILE): an arena
    /// needs a few (one userfaultfd, two eventfds).
    #[error(
        "too many open files while opening {what} (RLIMIT_NOFILE reached): close descriptors \
         or raise the limit (`ulimit -n`)"
    )]
    TooManyOpenFiles {
        /// What was being opened, e.g. `a userfaultfd`.
        what: &'static str,
        /// The OS error (EMFILE or ENFILE).
        #[source]
        source: io::Error,
    },

    /// The arena's fault engine has stopped (a previous fatal error); no new work is accepted.
    #[error("the arena's fault engine has stopped after a fatal error: {0}; create a new Arena")]
    EngineStopped(String),
}

/// The remedy text for each cause; kept here so `doctor` and the error agree.
pub fn remedy(cause: UffdBlock) -> &'static str {
    match cause {
        UffdBlock::Seccomp => {
            "userfaultfd(2) blocked by seccomp (EPERM under a seccomp filter, as in Docker's default \
             profile): run the container with `--security-opt seccomp=cowarena-seccomp.json` (shipped \
             in the cowarena repository: Docker's default profile plus userfaultfd), or on Linux 6.1+ \
             with `--device /dev/userfaultfd`"
        }
        UffdBlock::Unprivileged => {
            "unprivileged userfaultfd is disabled (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE): \
             run as root, `sysctl -w vm.unprivileged_userfaultfd=1`, or (Linux 6.1+) give this user \
             read-write access to /dev/userfaultfd"
        }
        UffdBlock::DevicePermission => {
            "/dev/userfaultfd exists but is not accessible to this user and the syscall is refused: \
             `chmod 0666 /dev/userfaultfd` or add the user to its group (Linux 6.1+), or \
             `sysctl -w vm.unprivileged_userfaultfd=1`"
        }
        UffdBlock::NoKernelSupport => {
            "this kernel has no userfaultfd (ENOSYS): cowarena needs Linux 5.11+ built with \
             CONFIG_USERFAULTFD"
        }
    }
}

/// `Result` with cowarena's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn os(op: &'static str, source: io::Error) -> Self {
        let mapping = op.starts_with("mmap") || op.starts_with("mremap");
        if mapping && source.raw_os_error() == Some(libc::ENOMEM) {
            return Error::MappingLimit { op, source };
        }
        Error::Os { op, source }
    }

    /// As [`Error::os`] for a call that opens a descriptor: EMFILE/ENFILE become
    /// [`Error::TooManyOpenFiles`] naming `what`.
    pub(crate) fn open_fd(op: &'static str, what: &'static str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => Error::TooManyOpenFiles { what, source },
            _ => Error::Os { op, source },
        }
    }
}
