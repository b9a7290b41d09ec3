//! Container tests: cowarena inside Docker, for real.
//!
//! They need a Docker engine and the CI image built by `docker/build-image.sh` (`FROM
//! scratch` + static-pie binaries built on the host), so they are `#[ignore]`d in a plain
//! `cargo test`. `.ci/docker-tests.sh` builds the image and runs them with
//! `COWARENA_DOCKER_IMAGE=<tag> cargo test --test docker -- --ignored`; without a Docker
//! engine that script skips them with a message.
//!
//! Configurations (each asserted, see the test names): the shipped seccomp profile,
//! `--device /dev/userfaultfd`, non-root users, Docker's default profile, a container
//! memory limit with and without `max_memory` and with `max_resident` (eviction), and the `docker run` lines of
//! `docs/containers.md`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cowarena::error::remedy;
use cowarena::UffdBlock;

const PROFILE: &str = "--security-opt=seccomp=cowarena-seccomp.json";
const DEVICE: &str = "--device=/dev/userfaultfd";
/// The integration test binaries staged in the image by docker/build-image.sh.
const TEST_DIR: &str = "/cowarena-tests";

fn image() -> String {
    std::env::var("COWARENA_DOCKER_IMAGE").expect(
        "COWARENA_DOCKER_IMAGE is not set: run .ci/docker-tests.sh, which builds the image and runs these tests",
    )
}

struct Run {
    code: i32,
    out: String,
    oom_killed: bool,
    what: String,
}

impl Run {
    fn text(&self) -> String {
        format!("`{}` exited {}\n--- output ---\n{}", self.what, self.code, self.out)
    }
    fn assert_ok(&self) {
        assert_eq!(self.code, 0, "{}", self.text());
    }
}

/// `docker run` with `opts`, the image, then `cmd`; stdout and stderr merged; killed after
/// `timeout`. Run from the crate root, so `seccomp=cowarena-seccomp.json` resolves.
fn docker_run(opts: &[&str], cmd: &[&str], timeout: Duration) -> Run {
    let image = image();
    let name = format!("cowarena-test-{}-{}", std::process::id(), fastrand_suffix());
    let what = format!("docker run {} {image} {}", opts.join(" "), cmd.join(" "));
    eprintln!("$ {what}");
    let mut child = Command::new("docker")
        .arg("run")
        .arg(format!("--name={name}"))
        .args(opts)
        .arg(&image)
        .args(cmd)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker CLI");
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let to = std::thread::spawn(move || std::io::read_to_string(&mut so).unwrap_or_default());
    let te = std::thread::spawn(move || std::io::read_to_string(&mut se).unwrap_or_default());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = Command::new("docker").args(["kill", &name]).output();
            let _ = child.wait();
            let _ = Command::new("docker").args(["rm", "-f", &name]).output();
            panic!("`{what}` did not finish in {timeout:?} (killed): a hang");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let inspect = Command::new("docker").args(["inspect", "-f", "{{.State.OOMKilled}}", &name]).output().unwrap();
    let oom_killed = String::from_utf8_lossy(&inspect.stdout).trim() == "true";
    let _ = Command::new("docker").args(["rm", "-f", &name]).output();
    let out = to.join().unwrap() + &te.join().unwrap();
    let run = Run { code: status.code().unwrap_or(-1), out, oom_killed, what };
    eprintln!("  -> exit {}{}", run.code, if run.oom_killed { " (OOM killed)" } else { "" });
    run
}

fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u64 & 0xffff_ffff) * 1000 + N.fetch_add(1, Ordering::Relaxed)
}

const SHORT: Duration = Duration::from_secs(120);

/// The semantic check, the doctor, and (when `tests`) every integration test binary.
fn suite_passes(opts: &[&str], tests: bool, expect_access: &str, skip: &[&str]) {
    let check = docker_run(opts, &["container_check"], SHORT);
    check.assert_ok();
    assert!(check.out.contains("container_check: all checks passed"), "{}", check.text());
    assert!(
        check.out.contains(&format!("access {expect_access}")),
        "expected access {expect_access}: {}",
        check.text()
    );

    let doctor = docker_run(opts, &["cowarena", "doctor"], SHORT);
    doctor.assert_ok();
    assert!(doctor.out.contains("verdict: cowarena works here"), "{}", doctor.text());
    assert!(doctor.out.contains("self-test:              passed"), "{}", doctor.text());

    if tests {
        let names = test_binaries();
        assert!(names.iter().any(|n| n == "basic"), "no test binaries in the image: {names:?}");
        for name in names {
            let bin = format!("{TEST_DIR}/{name}");
            let mut cmd = vec![bin.as_str(), "--test-threads=2"];
            for s in skip {
                cmd.extend(["--skip", s]);
            }
            let r = docker_run(opts, &cmd, Duration::from_secs(300));
            r.assert_ok();
            assert!(r.out.contains("test result: ok."), "{}", r.text());
        }
    }
}

/// Names of the test binaries staged in the image: `COWARENA_DOCKER_TESTS`, set by
/// .ci/docker-tests.sh from docker/build-image.sh's output (a `FROM scratch` image has no `ls`).
fn test_binaries() -> Vec<String> {
    let list = std::env::var("COWARENA_DOCKER_TESTS").unwrap_or_default();
    list.split_whitespace().map(str::to_owned).collect()
}

/// Known failure under `UFFD_USER_MODE_ONLY` access (what the shipped profile gives a
/// process without CAP_SYS_PTRACE): this core test expects thread fault mode to serve
/// kernel-mode accesses, which user-mode-only userfaultfd never does (EFAULT, as
/// `UffdAccess::UserModeOnly` documents). Run in full under `--device` below.
const USER_MODE_ONLY_SKIPS: &[&str] = &["syscalls_on_views_never_see_silent_zeros"];

#[test]
#[ignore = "needs Docker and the CI image: run .ci/docker-tests.sh"]
fn a_shipped_profile_passes() {
    // Root without CAP_SYS_PTRACE and vm.unprivileged_userfaultfd=0: user-mode-only access.
    suite_passes(&[PROFILE], true, "UserModeOnly", USER_MODE_ONLY_SKIPS);
    // With CAP_SYS_PTRACE the full syscall is allowed.
    suite_passes(&[PROFILE, "--cap-add=SYS_PTRACE"], false, "Syscall", &[]);
}

#[test]
#[ignore = "needs Docker and the CI image: run .ci/docker-tests.sh"]
fn b_device_passes() {
    suite_passes(&[DEVICE], true, "Device", &[]);
    let doctor = docker_run(&[DEVICE], &["cowarena", "doctor"], SHORT);
    assert!(doctor.out.contains("access path:            device"), "{}", doctor.text());
    assert!(doctor.out.contains("seccomp blocks userfaultfd: yes"), "{}", doctor.text());
}

/// Can uid/gid 1000 open the host's /dev/userfaultfd? `--device` copies its mode and owner.
fn device_open_for_1000() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata("/dev/userfaultfd") else { return false };
    let mode = m.mode();
    (m.uid() == 1000 && mode & 0o600 == 0o600) || (m.gid() == 1000 && mode & 0o060 == 0o060) || mode & 0o006 == 0o006
}

#[test]
#[ignore = "needs Docker and the CI image: run .ci/docker-tests.sh"]
fn c_non_root() {
    let user = "--user=1000:1000";
    if device_open_for_1000() {
        suite_passes(&[user, DEVICE], false, "Device", &[]);
    } else {
        // The node is 0600 root on the host: uid 1000 cannot open it, and Docker's default
        // profile refuses the syscall: the documented error, with its remedy.
        let r = docker_run(&[user, DEVICE], &["container_check"], SHORT);
        assert_eq!(r.code, 2, "{}", r.text());
        assert!(r.out.contains("cause=Seccomp"), "{}", r.text());
        assert!(r.out.contains(remedy(UffdBlock::Seccomp)), "{}", r.text());
        let d = docker_run(&[user, DEVICE], &["cowarena", "doctor"], SHORT);
        assert_eq!(d.code, 1, "{}", d.text());
        assert!(d.out.contains("uid 1000 cannot open it"), "doctor must name the device permission: {}", d.text());
    }
    // With the shipped profile any user gets user-mode-only userfaultfd (5.11+).
    // (The test binaries already ran with this access as root in `a_shipped_profile_passes`.)
    suite_passes(&[user, PROFILE], false, "UserModeOnly", &[]);
    suite_passes(&[user, PROFILE, DEVICE], false, "", &[]);
}

#[test]
#[ignore = "needs Docker and the CI image: run .ci/docker-tests.sh"]
fn d_default_profile_gives_the_seccomp_error() {
    let r = docker_run(&[], &["container_check"], SHORT);
    assert_eq!(r.code, 2, "{}", r.text());
    assert!(r.out.contains("cause=Seccomp"), "{}", r.text());
    let remedy = remedy(UffdBlock::Seccomp);
    assert!(remedy.contains("--security-opt seccomp=cowarena-seccomp.json"), "{remedy}");
    assert!(remedy.contains("--device /dev/userfaultfd"), "{remedy}");
    assert!(r.out.contains(&format!("userfaultfd unavailable: {remedy}")), "{}", r.text());

    let d = docker_run(&[], &["cowarena", "doctor"], SHORT);
    assert_eq!(d.code, 1, "{}", d.text());
    for want in ["seccomp blocks userfaultfd: yes", "verdict: cowarena CANNOT work here", remedy] {
        assert!(d.out.contains(want), "missing {want:?}: {}", d.text());
    }
}

const MEM: &[&str] = &["--memory=64m", "--memory-swap=64m"];

#[test]
#[ignore = "needs Docker and the CI image: run .ci/docker-tests.sh"]
fn e_memory_limit_without_max_memory_dies_loudly() {
    for via in ["api", "view"] {
        let opts: Vec<&str> = MEM.iter().copied().chain([PROFILE]).collect();
        // `--pin-text`: without it the kernel (memcg v1, no swap) can spend minutes evicting
        // and re-reading the program's code before it OOM-kills; see `pin_text` in
        // examples/container_check.rs. The library's behaviour is the same either way.
        let cmd = ["container_check", "exhaust", "160m", "--via", via, "--pin-text"];
        let r = docker_run(&opts, &cmd, SHORT);
        assert_ne!(r.code, 3, "WRONG DATA under a memory limit: {}", r.text());
        assert_ne!(r.code, 0, "160 MiB written and verified under a 64 MiB limit without swap?\n{}", r.text());
        // The library's capacity error, or a loud death: OOM kill, SIGSEGV, SIGBUS.
        let loud = r.code == 4 || (r.code == 137 && r.oom_killed) || r.code == 139 || r.code == 135;
        assert!(loud, "via {via}: neither the capacity error nor a loud death: {}", r.text());
    }
}

#[test]
#[ignore = "needs Docker and the CI image: run .ci/docker-tests.sh"]
fn e_memory_limit_with_max_memory_gives_capacity_error() {
    let opts: Vec<&str> = MEM.iter().copied().chain([PROFILE]).collect();
    let r = docker_run(&opts, &["container_check", "exhaust", "160m", "--max-memory", "32m"], SHORT);
    assert_eq!(r.code, 4, "{}", r.text());
    assert!(r.out.contains("arena memory limit reached"), "{}", r.text());
    assert!(!r.oom_killed, "{}", r.text());
    // Through the view there is no error value: the access dies loudly, with the reason.
    let r = docker_run(&opts, &["container_check", "exhaust", "160m", "--max-memory", "32m", "--via", "view"], SHORT);
    assert!(r.code == 135 || r.code == 139, "expected SIGBUS/SIGSEGV: {}", r.text());
    assert!(r.out.contains("memory limit reached"), "the reason must be logged: {}", r.text());
    assert!(!r.oom_killed, "{}", r.text());
}

/// Issue 16: the same 160 MiB under the same 64 MiB limit (no swap), with
/// `max_resident(32 MiB)`: cold pages go to the arena's swap file (in the container's
/// `/tmp`) and come back when read, so everything is written and verified, through the API
/// and through the view, where without it the container dies (test above).
#[test]
#[ignore = "needs Docker and the CI image: run .ci/docker-tests.sh"]
fn e_memory_limit_with_max_resident_completes() {
    let opts: Vec<&str> = MEM.iter().copied().chain([PROFILE]).collect();
    for via in ["api", "view"] {
        let cmd = ["container_check", "exhaust", "160m", "--max-resident", "32m", "--via", via, "--pin-text"];
        let r = docker_run(&opts, &cmd, SHORT);
        r.assert_ok();
        assert!(!r.oom_killed, "{}", r.text());
        assert!(r.out.contains("wrote and verified 160 MiB"), "{}", r.text());
        assert!(!r.out.contains("(0 frames evicted"), "nothing was evicted: {}", r.text());
    }
}

/// Every `docker run` line of docs/containers.md, with the image `cowarena` replaced by the
/// CI image: a line whose comment says `fails` must exit non-zero with the seccomp remedy,
/// the others must exit 0. Lines for other images (the test-suite image) are not run here.
#[test]
#[ignore = "needs Docker and the CI image: run .ci/docker-tests.sh"]
fn f_documented_commands_work() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/containers.md")).unwrap();
    let mut ran = 0;
    for line in doc.lines().map(str::trim).filter(|l| l.starts_with("docker run ")) {
        let (cmd, comment) = line.split_once('#').unwrap_or((line, ""));
        let words: Vec<&str> = cmd.split_whitespace().skip(2).collect();
        let mut opts = Vec::new();
        let mut it = words.iter();
        let mut rest = Vec::new();
        while let Some(w) = it.next() {
            if *w == "--rm" {
                continue; // docker_run removes the container itself, after reading its state
            } else if let Some(o) = w.strip_prefix("--") {
                if o.contains('=') || ["rm", "init"].contains(&o) {
                    opts.push(w.to_string());
                } else {
                    opts.push(format!("{w}={}", it.next().unwrap()));
                }
            } else {
                rest.extend(std::iter::once(*w).chain(it.by_ref().copied()));
            }
        }
        let Some((&img, args)) = rest.split_first() else { panic!("no image in {line:?}") };
        if img != "cowarena" {
            eprintln!("(not run here: image {img}) {line}");
            continue;
        }
        let opt_refs: Vec<&str> = opts.iter().map(String::as_str).collect();
        let r = docker_run(&opt_refs, args, Duration::from_secs(600));
        if comment.contains("fails") {
            assert_ne!(r.code, 0, "documented to fail: {line}\n{}", r.text());
            assert!(r.out.contains(remedy(UffdBlock::Seccomp)), "{line}: {}", r.text());
        } else {
            assert_eq!(r.code, 0, "documented to work: {line}\n{}", r.text());
        }
        ran += 1;
    }
    assert!(ran >= 4, "expected at least 4 runnable docker run lines in docs/containers.md, ran {ran}");
}
