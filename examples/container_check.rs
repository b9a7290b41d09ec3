//! The semantic check the container tests run (built statically, copied into a `FROM scratch`
//! image). Exit status says what happened, so the test can assert it:
//!
//! | exit | meaning |
//! | --- | --- |
//! | 0 | every check passed (or, for `exhaust`, everything written was read back correctly) |
//! | 1 | another library error (printed) |
//! | 2 | `Arena::new()` failed: userfaultfd unavailable (the error, with its remedy, is printed) |
//! | 3 | WRONG DATA: a read returned bytes that were not written |
//! | 4 | `exhaust`: the library's capacity error (`Error::CapacityExhausted`) |
//! | 64 | usage error |
//!
//! ```text
//! container_check                      # fork/write/read/verify across several spaces, both fault modes
//! container_check exhaust BYTES [--max-memory BYTES] [--max-resident BYTES] [--via api|view] [--pin-text]
//! ```

use std::process::exit;

use cowarena::{Arena, Error, FaultMode, Space};

const PAGE: usize = 4096;

fn die(code: i32, msg: String) -> ! {
    eprintln!("container_check: {msg}");
    exit(code)
}

fn arena(builder: cowarena::ArenaBuilder) -> Arena {
    match builder.build() {
        Ok(a) => a,
        Err(e @ Error::UffdUnavailable(cause, _)) => die(2, format!("cause={cause:?}: {e}")),
        Err(e) => die(1, format!("Arena::new(): {e}")),
    }
}

/// A space and the bytes it must hold.
struct Checked {
    space: Space,
    model: Vec<u8>,
    name: String,
}

impl Checked {
    fn verify(&self) {
        let view = self.space.as_slice();
        if let Some(i) = (0..self.model.len()).find(|&i| view[i] != self.model[i]) {
            die(3, format!("WRONG DATA in {} (view) at byte {i}: {} != {}", self.name, view[i], self.model[i]));
        }
        let mut buf = vec![0u8; self.model.len()];
        self.space.read(0, &mut buf).unwrap_or_else(|e| die(1, format!("read {}: {e}", self.name)));
        if buf != self.model {
            die(3, format!("WRONG DATA in {} (read API)", self.name));
        }
    }

    fn fork(&self, name: &str) -> Checked {
        let space = self.space.fork().unwrap_or_else(|e| die(1, format!("fork {}: {e}", self.name)));
        Checked { space, model: self.model.clone(), name: name.into() }
    }

    /// Write `n` scattered bytes (pseudo-random, from `seed`) through the view and the API.
    fn scribble(&mut self, seed: u64, n: usize) {
        let mut x = seed | 1;
        let len = self.model.len();
        for k in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x as usize) % len;
            let b = (x >> 32) as u8;
            if k % 2 == 0 {
                self.space.as_mut_slice()[off] = b;
            } else {
                let end = (off + 100).min(len);
                let data = vec![b; end - off];
                self.space.write(off, &data).unwrap_or_else(|e| die(1, format!("write {}: {e}", self.name)));
                self.model[off..end].copy_from_slice(&data);
                continue;
            }
            self.model[off] = b;
        }
    }
}

fn semantic(mode: FaultMode) {
    let arena = arena(Arena::builder().fault_mode(mode));
    let mut all = Vec::new();
    // Sizes: inside one table, an odd length across tables, several tables.
    for (i, len) in [(0usize, 64 << 10), (1, (4 << 20) + 123), (2, 8 << 20)] {
        let space = arena.space(len).unwrap_or_else(|e| die(1, format!("space: {e}")));
        let mut root = Checked { space, model: vec![0; len], name: format!("root{i}") };
        root.verify(); // zero-filled
        root.scribble(i as u64 + 1, 2000);
        let mut child = root.fork(&format!("root{i}/child"));
        let mut grandchild = child.fork(&format!("root{i}/child/grandchild"));
        child.scribble(100 + i as u64, 1500);
        grandchild.scribble(200 + i as u64, 1500);
        root.scribble(300 + i as u64, 1500);
        // A fork of a fork after writes, then a write to every page of it.
        let mut late = child.fork(&format!("root{i}/child/late"));
        for p in (0..len).step_by(PAGE) {
            late.space.as_mut_slice()[p] ^= 0x5a;
            late.model[p] ^= 0x5a;
        }
        for c in [&root, &child, &grandchild, &late] {
            c.verify();
        }
        all.extend([root, child, grandchild, late]);
    }
    arena.check_invariants().unwrap_or_else(|e| die(3, format!("invariant broken: {e}")));
    let stats = arena.stats();
    if stats.forks != 9 || stats.faults.failed != 0 {
        die(1, format!("unexpected stats: {stats:?}"));
    }
    // Drop the roots first: the children must keep their bytes.
    all.retain(|c| !c.name.ends_with(|ch: char| ch.is_ascii_digit()));
    for c in &all {
        c.verify();
    }
    drop(all);
    let s = arena.stats();
    if (s.frames_in_use, s.tables_in_use, s.views_in_use, s.spaces_in_use) != (0, 0, 0, 0) {
        die(1, format!("leak after dropping every space: {s:?}"));
    }
    println!(
        "container_check: {mode:?} mode OK (access {:?}: {}; {} forks, {} CoW faults)",
        arena.uffd_access(),
        arena.uffd_access().implications(),
        stats.forks,
        stats.faults.write_cow
    );
}

fn exhaust(bytes: usize, max_memory: Option<u64>, max_resident: Option<u64>, via_view: bool) {
    let mut b = Arena::builder();
    if let Some(m) = max_memory {
        b = b.max_memory(m);
    }
    if let Some(m) = max_resident {
        b = b.max_resident(m);
    }
    let arena = arena(b);
    let mut space = arena.space(bytes).unwrap_or_else(|e| die(1, format!("space: {e}")));
    let chunk = 1 << 20;
    let pattern = |off: usize| ((off / PAGE) as u8) ^ 0xa5;
    let mut written = 0;
    while written < bytes {
        let n = chunk.min(bytes - written);
        let data: Vec<u8> = (written..written + n).map(pattern).collect();
        if via_view {
            space.as_mut_slice()[written..written + n].copy_from_slice(&data);
        } else {
            match space.write(written, &data) {
                Ok(()) => {}
                Err(e @ Error::CapacityExhausted { .. }) => {
                    die(4, format!("capacity error after {} MiB: {e}", written >> 20))
                }
                Err(e) => die(1, format!("write at {written}: {e}")),
            }
        }
        written += n;
        if written % (16 << 20) == 0 {
            eprintln!("container_check: wrote {} MiB", written >> 20);
        }
    }
    let mut buf = vec![0u8; chunk];
    for off in (0..bytes).step_by(chunk) {
        let n = chunk.min(bytes - off);
        space.read(off, &mut buf[..n]).unwrap_or_else(|e| die(1, format!("read at {off}: {e}")));
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(off + i)) {
            die(3, format!("WRONG DATA at byte {}: {} != {}", off + i, buf[i], pattern(off + i)));
        }
    }
    let s = arena.stats();
    println!(
        "container_check: wrote and verified {} MiB ({} frames evicted, {} read back from the swap file)",
        bytes >> 20,
        s.frames_evicted,
        s.frames_swapped_in
    );
}

/// Re-execute this program from an in-memory copy (a memfd), so its code lives in shmem.
///
/// Why: under a cgroup memory limit without swap, the kernel keeps reclaiming the page
/// cache that holds a file-backed program's code and reading it back, as long as that
/// counts as progress; a process at its limit can crawl for minutes before the OOM killer
/// acts (seen on cgroup v1 with this binary's working set; a program whose loop fits in a
/// page or two is killed at once). shmem without swap is not reclaimable, so with the code
/// pinned the container reaches its verdict (capacity error, loud death) promptly. This is
/// test set-up: it changes how fast the kernel gives up, not what the library does.
fn pin_text() {
    const MARK: &str = "CONTAINER_CHECK_TEXT_PINNED";
    if std::env::var_os(MARK).is_some() {
        return;
    }
    let exe = std::fs::read("/proc/self/exe").unwrap_or_else(|e| die(1, format!("read /proc/self/exe: {e}")));
    // SAFETY: memfd_create with a NUL-terminated name and no flags touches no memory of ours.
    let fd = unsafe { libc::memfd_create(c"container_check".as_ptr(), 0) };
    if fd < 0 {
        die(1, format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    let path = format!("/proc/self/fd/{fd}");
    std::fs::write(&path, exe).unwrap_or_else(|e| die(1, format!("write {path}: {e}")));
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&path).args(std::env::args_os().skip(1)).env(MARK, "1").exec();
    die(1, format!("exec {path}: {err}"))
}

fn parse_size(s: &str) -> usize {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<usize>().map(|n| n << shift).unwrap_or_else(|_| die(64, format!("bad size {s:?}")))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("semantic") => {
            semantic(FaultMode::Signal);
            semantic(FaultMode::Thread);
            println!("container_check: all checks passed");
        }
        Some("exhaust") => {
            let bytes = parse_size(args.get(1).map(String::as_str).unwrap_or_else(|| die(64, "exhaust BYTES".into())));
            let (mut max, mut resident, mut via_view) = (None, None, false);
            let mut it = args[2..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--max-memory" => max = it.next().map(|v| parse_size(v) as u64),
                    "--max-resident" => resident = it.next().map(|v| parse_size(v) as u64),
                    "--via" => via_view = it.next().map(String::as_str) == Some("view"),
                    "--pin-text" => pin_text(),
                    other => die(64, format!("unknown argument {other:?}")),
                }
            }
            exhaust(bytes, max, resident, via_view);
        }
        Some(other) => die(64, format!("unknown command {other:?}; see the file's docs")),
    }
}
