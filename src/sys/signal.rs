//! The SIGBUS handler of the same-thread fault mode (`UFFD_FEATURE_SIGBUS`): the kernel
//! delivers a view fault to the faulting thread as SIGBUS, and the thread serves it itself.
//!
//! Everything reachable from [`on_sigbus`] is async-signal-safe: no allocation, no lock
//! but the arena's own futex lock (a bounded spin, then `FUTEX_WAIT`: see
//! `crate::fault::lock`), no stdio.
//! A SIGBUS that is not ours goes to the handler installed before us.

use std::io;
use std::sync::OnceLock;

/// What the fault callback did with a SIGBUS.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// Served: return and let the access retry.
    Handled,
    /// The address is not in any view: chain to the previous handler.
    NotOurs,
    /// Ours but impossible to serve: die loudly (the message is written to stderr).
    Failed(&'static str),
}

/// The fault callback: `(address, the CPU reported a write)`.
pub type Callback = fn(usize, bool) -> Outcome;

struct Installed {
    prev: libc::sigaction,
    callback: Callback,
}

// SAFETY: `libc::sigaction` is plain data (a handler address, a mask, flags); it is only
// read after `OnceLock` published it.
unsafe impl Sync for Installed {}
// SAFETY: as above; no thread affinity.
unsafe impl Send for Installed {}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Install the SIGBUS handler once per process, remembering the previous one for chaining.
pub fn install(callback: Callback) -> io::Result<()> {
    let mut err = None;
    INSTALLED.get_or_init(|| {
        // SAFETY: zeroed sigaction structs are valid "no handler" values; we fill ours
        // before passing it to sigaction(2), which writes the previous one into `prev`.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            // Not SA_ONSTACK: Rust threads have a small alternate stack for overflow reports, too
            // small for the fault path; we run on the faulting thread's own stack.
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut prev: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &sa, &mut prev) != 0 {
                err = Some(io::Error::last_os_error());
            }
            Installed { prev, callback }
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Did the CPU report the faulting access as a write? (x86-64: bit 1 of the page-fault
/// error code in the signal context; elsewhere unknown, reported as a read — a write then
/// faults once more on the write-protected page, which the engine recognises.)
fn fault_was_write(ctx: *mut libc::c_void) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: for an SA_SIGINFO handler the kernel passes a valid `ucontext_t`.
        let uc = unsafe { &*(ctx as *const libc::ucontext_t) };
        uc.uc_mcontext.gregs[libc::REG_ERR as usize] & 2 != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ctx;
        false
    }
}

/// Is SIGBUS blocked in the calling thread? A view fault in signal mode is then fatal: the
/// kernel unblocks it, resets the action to the default and kills the process, without
/// running any handler (so nothing can be logged).
pub fn sigbus_blocked() -> bool {
    // SAFETY: a zeroed sigset_t is a valid output buffer; SIG_BLOCK with a null set only
    // reads the current mask into `old`.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old) == 0
            && libc::sigismember(&old, libc::SIGBUS) == 1
    }
}

/// Write a message to stderr without allocating.
pub fn write_stderr(parts: &[&str]) {
    for p in parts {
        // SAFETY: write(2) from a live byte slice; async-signal-safe.
        unsafe { libc::write(2, p.as_ptr() as *const libc::c_void, p.len()) };
    }
}

/// Nanoseconds of `CLOCK_MONOTONIC` (async-signal-safe).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a live timespec; async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Yield the CPU while spinning for a lock (async-signal-safe).
pub fn yield_now() {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
}

/// Restores the interrupted code's `errno` when dropped: the fault path's ioctls, madvise
/// and eventfd writes may fail and set it, and the code we interrupted (between a libc call
/// and its `errno` check, say) must not see that (as signal-hook-registry's `ErrnoGuard`).
struct ErrnoGuard(libc::c_int);

impl ErrnoGuard {
    fn new() -> ErrnoGuard {
        // SAFETY: `__errno_location` returns this thread's errno slot, always valid;
        // reading it is async-signal-safe.
        ErrnoGuard(unsafe { *libc::__errno_location() })
    }
}

impl Drop for ErrnoGuard {
    fn drop(&mut self) {
        // SAFETY: as in `new`; writing this thread's own errno slot.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let _errno = ErrnoGuard::new();
    let Some(inst) = INSTALLED.get() else { return };
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let outcome = (inst.callback)(addr, fault_was_write(ctx));
    match outcome {
        Outcome::Handled => {}
        Outcome::Failed(why) => {
            write_stderr(&["cowarena: cannot serve a fault on a view: ", why, "; dying of SIGBUS\n"]);
            reset_default(sig);
        }
        Outcome::NotOurs => chain(&inst.prev, sig, info, ctx),
    }
}

fn reset_default(sig: libc::c_int) {
    // SAFETY: installing SIG_DFL is always valid; returning from the handler re-executes
    // the faulting access, which then kills the process with the signal (loudly).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

fn chain(prev: &libc::sigaction, sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let h = prev.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // A synchronous fault cannot be ignored: fall back to the default action.
        reset_default(sig);
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this type.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler installed without SA_SIGINFO has this type.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
}
