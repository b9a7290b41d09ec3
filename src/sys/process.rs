//! Which process this is: an arena belongs to the process that created it. A `fork(2)`
//! child inherits the arena's memory and its userfaultfd (which still serves the *parent's*
//! address space) but none of its views (they are `MADV_DONTFORK`) or threads, so it must
//! not act on the arena at all.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

/// This process's id, refreshed in every `fork(2)` child by an atfork handler, so that
/// signal context can read it with one atomic load (0 until [`init`]).
static PID: AtomicI32 = AtomicI32::new(0);
static INIT: Once = Once::new();

extern "C" fn refresh_in_child() {
    // SAFETY: getpid has no preconditions and is async-signal-safe (atfork child handlers
    // run in the child right after fork, where only such calls are allowed).
    PID.store(unsafe { libc::getpid() }, Ordering::SeqCst);
}

/// Start tracking the pid (once per process; called when an arena is created).
pub fn init() {
    INIT.call_once(|| {
        refresh_in_child();
        // SAFETY: registers a handler with no preconditions; the handler only stores the
        // result of getpid. A failure (ENOMEM) leaves the API's own getpid checks in force.
        unsafe { libc::pthread_atfork(None, None, Some(refresh_in_child)) };
    });
}

/// The current process id, from the kernel (one syscall): what the API checks on entry.
/// Exact even after a raw `clone(2)` that bypassed atfork handlers.
pub fn pid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// The current process id as of the last `fork(2)` through libc, with one atomic load:
/// for the signal handler (async-signal-safe, no syscall).
pub fn pid_cached() -> i32 {
    PID.load(Ordering::Relaxed)
}
