//! The kernel interface. Every raw syscall and ioctl of cowarena lives under this module;
//! everything above it is safe Rust.

pub mod futex;
pub mod inject;
pub mod mem;
pub mod pagemap;
pub mod process;
pub mod signal;
pub mod swap;
// Reached from outside only through the doc-hidden `cowarena::__bench` (the bench baselines).
#[allow(missing_docs)]
pub mod uffd;
pub mod wake;
