//! The kernel interface. Every raw syscall and ioctl of cowarena lives under this module;
//! everything above it is safe Rust.

pub mod inject;
pub mod mem;
pub mod process;
pub mod signal;
pub mod uffd;
pub mod wake;
