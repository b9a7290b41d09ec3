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

/// Fault injection for tests (cargo feature `fault-injection`).
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub mod inject {
    pub use crate::sys::inject::{arm, disarm, Point};
}

pub use arena::{AgingStats, Arena, ArenaBuilder, BrokenBy, FaultMode, FaultStats, Stats, UffdAccess};
pub use error::{Error, Result, UffdBlock};
pub use space::{ForkStrategy, Space};
