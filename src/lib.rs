#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "cowarena supports Linux only: it serves page faults through userfaultfd(2) (Linux 5.11+) \
     and moves page tables with mremap(MREMAP_DONTUNMAP)"
);

pub mod arena;
pub mod error;
mod fault;
pub(crate) mod image;
pub(crate) mod mm;
pub mod probe;
pub mod space;
mod sync;
pub(crate) mod sys;

/// The userfaultfd and `PAGEMAP_SCAN` layer, for the benchmark's baselines (`examples/bench`)
/// and the kernel peer of `examples/fuzz_reset` only: not part of the API, no stability
/// promise.
#[doc(hidden)]
pub mod __bench {
    pub use crate::sys::pagemap::{category, PageRun, Pagemap, Query, CHECK_WPASYNC, WP_MATCHING};
    pub use crate::sys::uffd::{
        Uffd, UffdMsg, FEATURE_SIGBUS, FEATURE_WP, FEATURE_WP_ASYNC, FEATURE_WP_UNPOPULATED, PAGEFAULT_FLAG_WP,
    };
}

/// Fault injection for tests (cargo feature `fault-injection`).
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub mod inject {
    pub use crate::sys::inject::{arm, disarm, Point};
}

pub use arena::{AgingStats, Arena, ArenaBuilder, BrokenBy, FaultMode, FaultStats, LockStats, Stats, UffdAccess};
pub use error::{Error, Result, UffdBlock};
pub use fault::EvictStats;
pub use image::ImageProblem;
pub use space::{ForkStrategy, Pinned, Space};

// Compile-time guarantees of the documented thread-safety: `Arena` and `Space` are
// `Send + Sync` (spaces move between threads and are shared by reference).
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Arena>();
    send_sync::<Space>();
    send_sync::<ArenaBuilder>();
    send_sync::<Stats>();
    send_sync::<Error>();
};
