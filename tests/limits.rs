//! Exhausted process limits (issue 10, item 5): with no file descriptor left, creating an
//! arena must say "too many open files", not that userfaultfd is forbidden (the old
//! message told root to "run as root").
//!
//! The limit is lowered and the descriptors are used up in a re-executed copy of this
//! test binary (`child` below, selected by an environment variable), so no other test
//! runs short of descriptors.

use std::fs::File;
use std::process::Command;

use cowarena::{Arena, Error, FaultMode};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

const ENV: &str = "COWARENA_LIMITS_CHILD";

/// Use up every descriptor below a low RLIMIT_NOFILE but `free`; returns the holders.
fn exhaust(free: usize) -> Vec<File> {
    let mut held = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("open /dev/null: {e}"),
        }
    }
    held.truncate(held.len() - free);
    held
}

fn check(mode: FaultMode) {
    // 0 free: the userfaultfd cannot be opened; 1 free: the userfaultfd takes it and an
    // eventfd cannot be opened; with more an arena may succeed. Never "unavailable".
    for free in 0..5 {
        let held = exhaust(free);
        let r = Arena::builder().fault_mode(mode).build();
        drop(held);
        match r {
            Err(Error::TooManyOpenFiles { what, source }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EMFILE), "{mode:?} free={free}: {what}");
                let msg = Error::TooManyOpenFiles { what, source }.to_string();
                assert!(msg.contains("too many open files") && msg.contains("ulimit -n"), "message: {msg}");
                eprintln!("{mode:?} free={free}: {msg}");
            }
            Ok(arena) => {
                assert!(free >= 2, "{mode:?}: an arena with only {free} free descriptor(s)?");
                drop(arena);
            }
            Err(e) => panic!("{mode:?} with {free} free descriptor(s): want TooManyOpenFiles, got {e:?} ({e})"),
        }
        if free < 2 {
            // What failed was about descriptors: with them back, the same call works.
            Arena::builder().fault_mode(mode).build().expect("arena after the descriptors came back");
        }
    }
}

/// The body run in the re-executed binary; a no-op in a normal test run.
#[test]
fn child() {
    if std::env::var_os(ENV).is_none() {
        return;
    }
    let hard = getrlimit(Resource::Nofile).maximum;
    setrlimit(Resource::Nofile, Rlimit { current: Some(64), maximum: hard }).expect("setrlimit");
    check(FaultMode::Thread);
    check(FaultMode::Signal);
}

#[test]
fn fd_exhaustion_says_too_many_open_files() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["child", "--exact", "--nocapture", "--test-threads=1"])
        .env(ENV, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed ({}):\n{}\n{stderr}", out.status, String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("too many open files while opening a userfaultfd"), "{stderr}");
    assert!(stderr.contains("too many open files while opening an eventfd"), "{stderr}");
}
