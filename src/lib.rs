#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod arena;
pub mod error;
mod fault;
#[doc(hidden)]
pub mod mm;
pub mod probe;
pub mod space;
mod sync;
pub(crate) mod sys;

/// The userfaultfd layer, for the benchmark's baselines (`examples/bench`) only: not part
/// of the API, no stability promise.
#[doc(hidden)]
pub mod __bench {
    pub use crate::sys::uffd::{Uffd, UffdMsg, FEATURE_WP, PAGEFAULT_FLAG_WP};
}

/// Fault injection for tests (cargo feature `fault-injection`).
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub mod inject {
    pub use crate::sys::inject::{arm, disarm, Point};
}

pub use arena::{Arena, ArenaBuilder, BrokenBy, FaultMode, FaultStats, Stats, UffdAccess};
pub use error::{Error, Result, UffdBlock};
pub use space::{ForkStrategy, Space};
