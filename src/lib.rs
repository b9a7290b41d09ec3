//! cowarena (work in progress)
pub mod error;
pub mod mm;
pub(crate) mod sys;
pub use error::{Error, Result};
