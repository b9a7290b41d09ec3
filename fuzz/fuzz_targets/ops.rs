//! cargo-fuzz target: operation sequences over a family of spaces, checked against a
//! reference model (one `Vec<u8>` per space).
//!
//! Each input decodes (via `arbitrary`) into a fault mode and up to `MAX_OPS` operations:
//! create (1 byte ..= 8 MiB), fork (each strategy), drop, writes and reads through the view
//! and through the API (API calls at arbitrary, often out-of-range, offsets and lengths:
//! they must fail with `OutOfRange`/`Unaligned`/`NotRelated`, never panic), populate,
//! discard, migrate, compact, clean/dirty_pages, referenced/clear_referenced, reset_to.
//! Every byte read is compared with the model. At the end of the input: every space is
//! compared in full (view and API), `check_invariants()` must pass, everything is dropped
//! and the arena's gauges (spaces, frames, tables, views, frozen regions) must be zero.
//!
//! One arena per fault mode and plain setting per process (a `OnceLock`): arenas in signal mode are limited
//! to 64 live at once and creating one costs syscalls, so every input must leave the arena
//! empty — which is what the final check asserts.

#![no_main]

use std::collections::BTreeSet;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use cowarena::{Arena, Error, FaultMode, ForkStrategy, Space};
use libfuzzer_sys::fuzz_target;

const PAGE: usize = 4096;
const TABLE: usize = 2 << 20;
/// Largest space an input may create.
const MAX_SPACE: usize = 8 << 20;
/// Bound on the total bytes of live spaces in one input.
const MAX_TOTAL: usize = 64 << 20;
const MAX_LIVE: usize = 16;
const MAX_OPS: usize = 256;
/// Bound on one view/API data transfer (keeps executions fast; whole-space compares happen
/// at the end of the input anyway).
const MAX_XFER: usize = 256 << 10;

fn arena(mode: FaultMode, plain: bool, async_wp: bool) -> &'static Arena {
    static ARENAS: [OnceLock<Arena>; 8] = [const { OnceLock::new() }; 8];
    let i = plain as usize + 4 * async_wp as usize;
    let cell = match mode {
        FaultMode::Signal => &ARENAS[i],
        FaultMode::Thread => &ARENAS[2 + i],
        m => panic!("fuzz target: no arena for {m:?}"),
    };
    cell.get_or_init(|| {
        Arena::builder()
            .fault_mode(mode)
            .plain_until_fork(plain)
            .async_wp(async_wp)
            .build()
            .unwrap_or_else(|e| panic!("cannot create a {mode:?}-mode arena (is userfaultfd available?): {e}"))
    })
}

/// A space size.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    /// 1..=256 bytes: one partial page.
    Tiny(u8),
    /// A few pages, give or take a few bytes.
    Pages(u8, i8),
    /// 1..=4 tables, give or take a few pages/bytes.
    Tables(u8, i16),
    /// Anything up to the maximum.
    Raw(u32),
}

impl Size {
    fn bytes(self) -> usize {
        let n = match self {
            Size::Tiny(b) => b as usize + 1,
            Size::Pages(n, d) => (((n % 64) as usize + 1) * PAGE).saturating_add_signed(d as isize),
            Size::Tables(n, d) => (((n % 4) as usize + 1) * TABLE).saturating_add_signed(d as isize),
            Size::Raw(r) => r as usize % MAX_SPACE + 1,
        };
        n.clamp(1, MAX_SPACE)
    }
}

/// An offset or length, biased towards page and table boundaries and the end of the space.
/// May lie outside the space (API calls must then fail cleanly; view accesses clamp it).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Num {
    /// Anywhere in `0..=len`.
    In(u32),
    /// Page boundary `p`, plus a small delta.
    Page(u16, i8),
    /// Table boundary `t`, plus a delta.
    Table(u8, i16),
    /// `len - back` (or `len + back`).
    End(u16, bool),
    /// Small value.
    Small(u8),
    /// Anything, including values that overflow `offset + len`.
    Wild(u64),
}

impl Num {
    fn resolve(self, len: usize) -> usize {
        match self {
            Num::In(x) => x as usize % (len + 1),
            Num::Page(p, d) => ((p as usize) * PAGE).wrapping_add(d as isize as usize),
            Num::Table(t, d) => ((t % 8) as usize * TABLE).wrapping_add(d as isize as usize),
            Num::End(b, false) => len.wrapping_sub(b as usize),
            Num::End(b, true) => len + b as usize,
            Num::Small(s) => s as usize,
            Num::Wild(w) => w as usize,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Strategy {
    Auto,
    KeepWarm,
    Freeze,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Create(Size),
    Fork {
        src: u8,
        strategy: Strategy,
    },
    Drop {
        idx: u8,
    },
    ViewWrite {
        idx: u8,
        off: Num,
        len: Num,
        fill: u8,
    },
    ViewRmw {
        idx: u8,
        off: Num,
        add: u8,
    },
    ViewRead {
        idx: u8,
        off: Num,
        len: Num,
    },
    ApiWrite {
        idx: u8,
        off: Num,
        len: Num,
        fill: u8,
    },
    ApiRead {
        idx: u8,
        off: Num,
        len: Num,
    },
    /// `b.write(view of a)` then `b.read(into view of a)`: API calls whose buffers fault.
    CrossCopy {
        a: u8,
        b: u8,
        src: Num,
        dst: Num,
        len: Num,
    },
    Populate {
        idx: u8,
        off: Num,
        len: Num,
        write: bool,
    },
    Discard {
        idx: u8,
        off: Num,
        len: Num,
    },
    Migrate {
        idx: u8,
        off: Num,
        len: Num,
    },
    Compact,
    Clean {
        idx: u8,
        off: Num,
        len: Num,
    },
    DirtyPages {
        idx: u8,
        off: Num,
        len: Num,
    },
    Referenced {
        idx: u8,
        off: Num,
        len: Num,
    },
    ClearReferenced {
        idx: u8,
        off: Num,
        len: Num,
    },
    ArenaClearReferenced,
    ResetTo {
        idx: u8,
        snap: u8,
    },
    Verify {
        idx: u8,
    },
    CheckInvariants,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Thread fault mode when `mode % 4 == 0` (its faults cost ~10x more), else signal mode;
    /// new spaces plain until their first fork when `(mode / 4) % 2 == 0`, else registered
    /// from the start; stores to read-only pages served by the kernel alone
    /// (`ArenaBuilder::async_wp`) when `(mode / 8) % 2 == 1`.
    mode: u8,
    ops: Vec<Op>,
}

struct Entry {
    space: Space,
    model: Vec<u8>,
    /// Fork family (spaces created by `Arena::space` start a new one; forks inherit it).
    family: u32,
    /// Pages written since the last `clean` that must be reported dirty (a subset of what
    /// the library may report: forks inherit dirty bits, which we do not require).
    dirty: BTreeSet<usize>,
}

/// Deterministic bytes for a write: distinct per position and per `fill`, never all zero.
fn pattern(fill: u8, at: usize, n: usize) -> Vec<u8> {
    (0..n).map(|i| ((at + i) as u8).wrapping_mul(31) ^ fill ^ ((at + i) >> 12) as u8 | 1).collect()
}

fn in_range(off: usize, len: usize, size: usize) -> bool {
    off.checked_add(len).is_some_and(|end| end <= size)
}

/// Pages `[first, end)` the library's range operations cover for an in-range byte range.
/// The pages a byte range covers; an empty range covers none (it changes nothing).
fn pages(off: usize, len: usize) -> std::ops::Range<usize> {
    if len == 0 {
        return off / PAGE..off / PAGE;
    }
    off / PAGE..(off + len).div_ceil(PAGE)
}

/// Clamp `(off, len)` into a space of `size` bytes for a view access (at least one byte).
fn clamp(off: usize, len: usize, size: usize) -> (usize, usize) {
    let off = off.min(size - 1);
    let len = len.clamp(1, MAX_XFER).min(size - off);
    (off, len)
}

fn assert_same(got: &[u8], want: &[u8], base: usize, what: &dyn std::fmt::Display) {
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "DIVERGENCE in {what}: byte {:#x} (page {}) is {:#04x}, model says {:#04x}",
            base + i,
            (base + i) / PAGE,
            got[i],
            want[i]
        );
    }
}

/// Expect `r` to be `Ok` when the range is in range, else exactly `OutOfRange`.
fn expect_range<T: std::fmt::Debug>(r: cowarena::Result<T>, ok: bool, what: &str) -> Option<T> {
    match (r, ok) {
        (Ok(v), true) => Some(v),
        (Err(Error::OutOfRange { .. }), false) => None,
        (r, _) => panic!("{what}: expected {}, got {r:?}", if ok { "Ok" } else { "OutOfRange" }),
    }
}

fn pick(live: &[Entry], idx: u8) -> Option<usize> {
    (!live.is_empty()).then(|| idx as usize % live.len())
}

fn check_invariants(arena: &Arena, when: &str) {
    if let Err(e) = arena.check_invariants() {
        panic!("invariant broken {when}: {e}");
    }
}

fn run(input: Input) {
    let mode = if input.mode.is_multiple_of(4) { FaultMode::Thread } else { FaultMode::Signal };
    let arena = arena(mode, (input.mode / 4).is_multiple_of(2), (input.mode / 8) % 2 == 1);
    let mut live: Vec<Entry> = Vec::new();
    let mut total = 0usize;
    let mut next_family = 0u32;

    for op in input.ops.into_iter().take(MAX_OPS) {
        match op {
            Op::Create(size) => {
                let n = size.bytes();
                if live.len() >= MAX_LIVE || total + n > MAX_TOTAL {
                    continue;
                }
                let space = arena.space(n).expect("space");
                assert_eq!(space.len(), n);
                total += n;
                next_family += 1;
                live.push(Entry { space, model: vec![0; n], family: next_family, dirty: BTreeSet::new() });
            }
            Op::Fork { src, strategy } => {
                let Some(i) = pick(&live, src) else { continue };
                let n = live[i].model.len();
                if live.len() >= MAX_LIVE || total + n > MAX_TOTAL {
                    continue;
                }
                let strategy = match strategy {
                    Strategy::Auto => ForkStrategy::Auto,
                    Strategy::KeepWarm => ForkStrategy::KeepWarm,
                    Strategy::Freeze => ForkStrategy::Freeze,
                };
                let space = live[i].space.fork_with(strategy).expect("fork");
                assert_eq!(space.len(), n);
                total += n;
                let (model, family) = (live[i].model.clone(), live[i].family);
                live.push(Entry { space, model, family, dirty: BTreeSet::new() });
            }
            Op::Drop { idx } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = live.swap_remove(i);
                total -= e.model.len();
                drop(e);
            }
            Op::ViewWrite { idx, off, len, fill } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &mut live[i];
                let size = e.model.len();
                let (off, n) = clamp(off.resolve(size), len.resolve(size), size);
                let data = pattern(fill, off, n);
                e.space.as_mut_slice()[off..off + n].copy_from_slice(&data);
                e.model[off..off + n].copy_from_slice(&data);
                e.dirty.extend(pages(off, n));
            }
            Op::ViewRmw { idx, off, add } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &mut live[i];
                let size = e.model.len();
                let (off, _) = clamp(off.resolve(size), 1, size);
                let v = e.space.as_slice()[off];
                assert_eq!(v, e.model[off], "view byte {off:#x} before read-modify-write");
                let nv = v.wrapping_add(add | 1);
                e.space.as_mut_slice()[off] = nv;
                e.model[off] = nv;
                e.dirty.insert(off / PAGE);
            }
            Op::ViewRead { idx, off, len } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &live[i];
                let size = e.model.len();
                let (off, n) = clamp(off.resolve(size), len.resolve(size), size);
                assert_same(&e.space.as_slice()[off..off + n], &e.model[off..off + n], off, &"view read");
            }
            Op::ApiWrite { idx, off, len, fill } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &mut live[i];
                let size = e.model.len();
                let (off, n) = (off.resolve(size), len.resolve(size));
                if in_range(off, n, size) {
                    let n = n.min(MAX_XFER);
                    let data = pattern(fill, off, n);
                    e.space.write(off, &data).expect("api write in range");
                    e.model[off..off + n].copy_from_slice(&data);
                    e.dirty.extend(pages(off, n));
                } else {
                    // Out of range: must fail before touching anything. The buffer length is
                    // what is checked, so use a real buffer of a bounded length where possible.
                    // (Bounding the length may bring the range back in: then it must succeed.)
                    let n = n.min(MAX_XFER + 1);
                    let r = e.space.write(off, &vec![0xEE; n]);
                    if expect_range(r, in_range(off, n, size), "api write").is_some() {
                        e.model[off..off + n].fill(0xEE);
                        e.dirty.extend(pages(off, n));
                    }
                }
            }
            Op::ApiRead { idx, off, len } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &live[i];
                let size = e.model.len();
                let (off, n) = (off.resolve(size), len.resolve(size).min(MAX_XFER + 1));
                let mut buf = vec![0xA5u8; n];
                let ok = in_range(off, n, size);
                if expect_range(e.space.read(off, &mut buf), ok, "api read").is_some() {
                    assert_same(&buf, &e.model[off..off + n], off, &"api read");
                } else {
                    assert!(buf.iter().all(|&b| b == 0xA5), "a failed read wrote the buffer");
                }
            }
            Op::CrossCopy { a, b, src, dst, len } => {
                let (Some(a), Some(b)) = (pick(&live, a), pick(&live, b)) else { continue };
                if a == b {
                    continue;
                }
                let (sa, sb) = (live[a].model.len(), live[b].model.len());
                let n = len.resolve(sa).clamp(1, MAX_XFER).min(sa).min(sb);
                let so = src.resolve(sa).min(sa - n);
                let dof = dst.resolve(sb).min(sb - n);
                let (ea, eb) = two(&mut live, a, b);
                eb.space.write(dof, &ea.space.as_slice()[so..so + n]).expect("write from a view");
                eb.model[dof..dof + n].copy_from_slice(&ea.model[so..so + n]);
                eb.dirty.extend(pages(dof, n));
                // And back: read b into a's view (the destination faults for write).
                let (ea, eb) = two(&mut live, a, b);
                eb.space.read(dof, &mut ea.space.as_mut_slice()[so..so + n]).expect("read into a view");
                let chunk = eb.model[dof..dof + n].to_vec();
                ea.model[so..so + n].copy_from_slice(&chunk);
                ea.dirty.extend(pages(so, n));
                assert_same(&ea.space.as_slice()[so..so + n], &ea.model[so..so + n], so, &"cross copy");
            }
            Op::Populate { idx, off, len, write } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &live[i];
                let size = e.model.len();
                let (off, n) = (off.resolve(size), len.resolve(size));
                let n = if in_range(off, n, size) { n.min(MAX_XFER) } else { n };
                let ok = in_range(off, n, size);
                if expect_range(e.space.populate(off, n, write), ok, "populate").is_some() {
                    assert_same(&e.space.as_slice()[off..off + n], &e.model[off..off + n], off, &"after populate");
                }
            }
            Op::Discard { idx, off, len } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &mut live[i];
                let size = e.model.len();
                let (off, n) = (off.resolve(size), len.resolve(size));
                let r = e.space.discard(off, n);
                if !off.is_multiple_of(PAGE) {
                    assert!(matches!(r, Err(Error::Unaligned { .. })), "discard at unaligned {off:#x}: {r:?}");
                } else if expect_range(r, in_range(off, n, size), "discard").is_some() {
                    let end = ((off + n).div_ceil(PAGE) * PAGE).min(size);
                    e.model[off..end].fill(0);
                    for p in pages(off, n) {
                        e.dirty.remove(&p);
                    }
                }
            }
            Op::Migrate { idx, off, len } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &live[i];
                let size = e.model.len();
                let (off, n) = (off.resolve(size), len.resolve(size));
                if let Some(moved) = expect_range(e.space.migrate(off, n), in_range(off, n, size), "migrate") {
                    assert!(
                        moved <= pages(off, n).len(),
                        "migrate moved {moved} frames for {} pages",
                        pages(off, n).len()
                    );
                }
            }
            Op::Compact => {
                arena.compact().expect("compact");
            }
            Op::Clean { idx, off, len } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &mut live[i];
                let size = e.model.len();
                let (off, n) = (off.resolve(size), len.resolve(size));
                if let Some(was) = expect_range(e.space.clean(off, n), in_range(off, n, size), "clean") {
                    let range = pages(off, n);
                    check_dirty(&was, &e.dirty, range.clone(), "clean");
                    let now = e.space.dirty_pages(off, n).expect("dirty_pages after clean");
                    assert!(now.is_empty(), "pages still dirty right after clean: {now:?}");
                    e.dirty.retain(|p| !range.contains(p));
                }
            }
            Op::DirtyPages { idx, off, len } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &live[i];
                let size = e.model.len();
                let (off, n) = (off.resolve(size), len.resolve(size));
                if let Some(d) = expect_range(e.space.dirty_pages(off, n), in_range(off, n, size), "dirty_pages") {
                    check_dirty(&d, &e.dirty, pages(off, n), "dirty_pages");
                }
            }
            Op::Referenced { idx, off, len } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &live[i];
                let size = e.model.len();
                let (off, n) = (off.resolve(size), len.resolve(size));
                if let Some(r) = expect_range(e.space.referenced(off, n), in_range(off, n, size), "referenced") {
                    let range = pages(off, n);
                    assert!(r.iter().all(|p| range.contains(p)), "referenced pages outside {range:?}: {r:?}");
                }
            }
            Op::ClearReferenced { idx, off, len } => {
                let Some(i) = pick(&live, idx) else { continue };
                let e = &live[i];
                let size = e.model.len();
                let (off, n) = (off.resolve(size), len.resolve(size));
                let ok = in_range(off, n, size);
                if let Some(k) = expect_range(e.space.clear_referenced(off, n), ok, "clear_referenced") {
                    assert!(k <= pages(off, n).len(), "clear_referenced counted {k} pages");
                    let r = e.space.referenced(off, n).expect("referenced after clear");
                    assert!(r.is_empty(), "pages referenced right after clear_referenced: {r:?}");
                }
            }
            Op::ArenaClearReferenced => {
                arena.clear_referenced().expect("arena clear_referenced");
            }
            Op::ResetTo { idx, snap } => {
                let (Some(a), Some(b)) = (pick(&live, idx), pick(&live, snap)) else { continue };
                // A space cannot be reset to itself: the borrow checker rejects `s.reset_to(&s)`.
                if a == b {
                    continue;
                }
                let related = live[a].family == live[b].family && live[a].model.len() == live[b].model.len();
                let (ea, eb) = two(&mut live, a, b);
                match (ea.space.reset_to(&eb.space), related) {
                    (Ok(()), true) => {
                        ea.model.copy_from_slice(&eb.model);
                        ea.dirty.clear();
                    }
                    (Err(Error::NotRelated), false) => {}
                    (r, _) => panic!("reset_to (related: {related}): {r:?}"),
                }
            }
            Op::Verify { idx } => {
                let Some(i) = pick(&live, idx) else { continue };
                verify(&live[i], "verify");
            }
            Op::CheckInvariants => {
                check_invariants(arena, "during the run");
                assert_eq!(arena.stats().spaces_in_use, live.len() as u64, "spaces_in_use");
            }
        }
    }

    for e in &live {
        verify(e, "final compare");
    }
    check_invariants(arena, "at the end");
    // Drop alternately from both ends: parents before children and the reverse.
    let mut front = true;
    while !live.is_empty() {
        let e = if front { live.remove(0) } else { live.pop().unwrap() };
        drop(e);
        front = !front;
    }
    check_invariants(arena, "after dropping everything");
    let s = arena.stats();
    assert!(
        s.spaces_in_use == 0
            && s.frames_in_use == 0
            && s.tables_in_use == 0
            && s.views_in_use == 0
            && s.frozen_regions == 0,
        "LEAK: the arena is not empty after every space dropped: {s:#?}"
    );
    assert_eq!(s.faults.failed, 0, "faults failed: {s:#?}");
}

/// Every page in `range` we know to be dirty must be reported, and every reported page must
/// be in `range`.
fn check_dirty(reported: &[usize], known: &BTreeSet<usize>, range: std::ops::Range<usize>, what: &str) {
    assert!(reported.iter().all(|p| range.contains(p)), "{what}: pages outside {range:?}: {reported:?}");
    let missing: Vec<_> = known.range(range.clone()).filter(|p| !reported.contains(p)).collect();
    assert!(missing.is_empty(), "{what}: written pages not reported dirty: {missing:?} (reported {reported:?})");
}

fn verify(e: &Entry, what: &str) {
    assert_same(e.space.as_slice(), &e.model, 0, &format_args!("{what} (view)"));
    let mut buf = vec![0u8; e.model.len()];
    e.space.read(0, &mut buf).expect("read whole space");
    assert_same(&buf, &e.model, 0, &format_args!("{what} (api)"));
}

/// Two distinct entries, mutably.
fn two(live: &mut [Entry], a: usize, b: usize) -> (&mut Entry, &mut Entry) {
    assert_ne!(a, b);
    if a < b {
        let (l, r) = live.split_at_mut(b);
        (&mut l[a], &mut r[0])
    } else {
        let (l, r) = live.split_at_mut(a);
        (&mut r[0], &mut l[b])
    }
}

fuzz_target!(|input: Input| run(input));
