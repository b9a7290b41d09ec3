//! Kernel-free tests of the core: a fake "kernel" holds one `u64` per mapped page and
//! performs the engine's actions; random operation sequences are checked against a
//! plain reference (one `Vec<u64>` per space) and against [`Mm::check`].

use super::*;
use std::collections::HashMap;

const BASE_STEP: usize = 1 << 32;

/// Pages as the kernel would hold them: address -> (value, write-protected).
#[derive(Default)]
struct FakeKernel {
    mem: HashMap<usize, (u64, bool)>,
    next_base: usize,
    /// Pinned view pages (address -> pins): the engine must never move, zap, protect or
    /// fill over them (`pin.rs`).
    pinned: HashMap<usize, u32>,
}

impl FakeKernel {
    fn assert_not_pinned(&self, addr: usize, pages: usize, what: &str) {
        for p in 0..pages {
            assert!(!self.pinned.contains_key(&(addr + p * PAGE_SIZE)), "{what} of a pinned page");
        }
    }
    fn map(&mut self) -> usize {
        self.next_base += BASE_STEP;
        self.next_base
    }
    fn run(&mut self, a: Action) {
        match a {
            Action::Fill { dst, .. }
            | Action::Take { dst, .. }
            | Action::Unprotect { dst }
            | Action::Evacuate { dst, .. } => self.assert_not_pinned(dst, 1, "a fault action"),
            Action::Wake => {}
        }
        match a {
            Action::Wake => {}
            Action::Fill { dst, src, wp } => {
                let v = match src {
                    Src::Zero => 0,
                    Src::Addr(s) => self.mem.get(&s).expect("fill from an unpopulated home").0,
                };
                assert!(self.mem.insert(dst, (v, wp)).is_none(), "UFFDIO_COPY onto a present page");
            }
            Action::Evacuate { dst, to } => {
                let v = self.mem.get(&dst).expect("evacuation of a missing page").0;
                assert!(self.mem.insert(to, (v, false)).is_none(), "pool slot reused");
                let p = self.mem.get_mut(&dst).unwrap();
                assert!(p.1, "evacuation of a writable page");
                p.1 = false;
            }
            Action::Take { dst, src } => {
                let (v, _) = self.mem.remove(&src).expect("UFFDIO_MOVE from an unpopulated home");
                assert!(self.mem.insert(dst, (v, false)).is_none(), "UFFDIO_MOVE onto a present page");
            }
            Action::Unprotect { dst } => {
                let p = self.mem.get_mut(&dst).expect("unprotect of a missing page");
                assert!(p.1, "unprotect of a writable page");
                p.1 = false;
            }
        }
    }
    fn moverange(&mut self, from: usize, to: usize, pages: usize) {
        self.assert_not_pinned(from, pages, "a freeze");
        for p in 0..pages {
            if let Some(v) = self.mem.remove(&(from + p * PAGE_SIZE)) {
                self.mem.insert(to + p * PAGE_SIZE, v);
            }
        }
    }
    fn ops(&mut self, ops: Vec<KernelOp>) {
        for op in ops {
            match op {
                KernelOp::Zap { addr, len } => {
                    self.assert_not_pinned(addr, len / PAGE_SIZE, "a zap");
                    self.unmap(addr, len / PAGE_SIZE)
                }
                KernelOp::Protect { addr, len } => {
                    self.assert_not_pinned(addr, len / PAGE_SIZE, "a write-protect");
                    for p in 0..len / PAGE_SIZE {
                        if let Some(pg) = self.mem.get_mut(&(addr + p * PAGE_SIZE)) {
                            pg.1 = true;
                        }
                    }
                }
                KernelOp::CopyPage { dst, src } => {
                    let v = self.mem.get(&src).expect("migration from an unpopulated home").0;
                    self.mem.insert(dst, (v, false));
                }
            }
        }
    }
    fn unmap(&mut self, base: usize, pages: usize) {
        for p in 0..pages {
            self.mem.remove(&(base + p * PAGE_SIZE));
        }
    }
}

struct Sim {
    mm: Mm<(usize, usize)>,
    k: FakeKernel,
    spaces: Vec<(SpaceId, Vec<u64>)>,
    /// Every `refuse_moves`-th UFFDIO_MOVE is refused (the engine then copies); 0: never.
    refuse_moves: u64,
    moves: u64,
    /// Drops evacuate their few surviving homes to the pool (the engine's choice) rather
    /// than always freezing.
    evacuate_drops: bool,
    /// Frames re-homed by automatic compaction steps.
    compacted: usize,
    /// Live pins: space, pages `[first, end)`.
    pins: Vec<(SpaceId, usize, usize)>,
}

impl Sim {
    fn new() -> Sim {
        Sim {
            mm: Mm::new(),
            k: FakeKernel::default(),
            spaces: Vec::new(),
            refuse_moves: 0,
            moves: 0,
            evacuate_drops: true,
            compacted: 0,
            pins: Vec::new(),
        }
    }
    fn has_pins(&self, i: usize) -> bool {
        self.mm.pinned_in(self.spaces[i].0) > 0
    }
    /// What `Space::pin` does: write-fault every page not writable (same bytes), then pin.
    fn pin(&mut self, i: usize, first: usize, end: usize) {
        let sp = self.spaces[i].0;
        for p in first..end {
            if !self.mm.is_writable(sp, p) {
                let v = self.spaces[i].1[p];
                self.access(i, p, Some(v));
            }
        }
        self.mm.pin(sp, first, end);
        let base = self.mm.view_base(sp);
        for p in first..end {
            *self.k.pinned.entry(base + p * PAGE_SIZE).or_default() += 1;
            assert!(self.mm.is_pinned(sp, p));
        }
        self.pins.push((sp, first, end));
    }
    fn unpin(&mut self, k: usize) {
        let (sp, first, end) = self.pins.swap_remove(k);
        self.mm.unpin(sp, first, end);
        let base = self.mm.view_base(sp);
        for p in first..end {
            let a = base + p * PAGE_SIZE;
            let n = self.k.pinned.get_mut(&a).unwrap();
            *n -= 1;
            if *n == 0 {
                self.k.pinned.remove(&a);
            }
        }
    }
    /// A store the engine never hears of (DMA into a pinned page).
    fn dma(&mut self, k: usize, off: usize, v: u64) {
        let (sp, first, end) = self.pins[k];
        let p = first + off % (end - first);
        let addr = self.mm.view_base(sp) + p * PAGE_SIZE;
        let pg = self.k.mem.get_mut(&addr).expect("a pinned page is resident");
        assert!(!pg.1, "a pinned page is write-protected");
        pg.0 = v;
        let i = self.spaces.iter().position(|(s, _)| *s == sp).unwrap();
        self.spaces[i].1[p] = v;
    }
    fn reclaim(&mut self) {
        let k = &mut self.k;
        let mut dead = Vec::new();
        self.mm.drain_reclaim(|a, l| k.unmap(a, l / PAGE_SIZE), |b| dead.push(b));
        for (base, pages) in dead {
            self.k.unmap(base, pages);
        }
    }
    /// What the engine's `lock()` does: keep pool slots available (`extra` more).
    fn top_up(&mut self, extra: usize) {
        if self.mm.pool_free() < 8 + extra {
            let n = 16 + extra;
            let base = self.k.map();
            self.mm.add_pool(base, n, (base, n));
            self.reclaim();
        }
    }
    /// What the engine's housekeeping does at every fork and drop: queue an excess sparse
    /// region, then one small compaction step (small budgets, to exercise partial steps).
    fn housekeep(&mut self) {
        self.mm.queue_excess_frozen();
        if !self.mm.compaction_pending() {
            return;
        }
        self.top_up(8);
        let budget = self.mm.pool_free().saturating_sub(8).min(7);
        let mut ops = Vec::new();
        self.compacted += self.mm.compact_step(budget, 40, &mut ops);
        self.k.ops(ops);
        self.reclaim();
    }
    /// Make `i`'s tables shareable: protect its few writable pages or freeze its view.
    fn prepare_share(&mut self, sp: SpaceId) {
        match self.mm.share_plan(sp) {
            SharePlan::Ready => {}
            SharePlan::Protect => {
                let mut ops = Vec::new();
                self.mm.protect_writable(sp, &mut ops);
                self.k.ops(ops);
            }
            SharePlan::Freeze => {
                let pages = self.mm.pages(sp);
                let base = self.mm.view_base(sp);
                let to = self.k.map();
                self.k.moverange(base, to, pages);
                self.mm.freeze_view(sp, to, (to, pages));
                self.reclaim();
            }
        }
    }
    fn create(&mut self, pages: usize) {
        let base = self.k.map();
        let sp = self.mm.new_space(pages, base, (base, pages));
        self.spaces.push((sp, vec![0; pages]));
    }
    fn fork(&mut self, i: usize) {
        let (p, model) = (self.spaces[i].0, self.spaces[i].1.clone());
        let pages = model.len();
        self.housekeep();
        self.prepare_share(p);
        let base = self.k.map();
        self.top_up(self.mm.pinned_in(p));
        let mut ops = Vec::new();
        let c = self.mm.fork(p, base, (base, pages), &mut ops);
        self.k.ops(ops);
        self.spaces.push((c, model));
    }
    /// An access through the view: fault if the fake kernel would fault, then access.
    fn access(&mut self, i: usize, page: usize, write: Option<u64>) -> u64 {
        let sp = self.spaces[i].0;
        let addr = self.mm.view_base(sp) + page * PAGE_SIZE;
        loop {
            let need = match self.k.mem.get(&addr) {
                None => true,
                Some(&(_, wp)) => write.is_some() && wp,
            };
            if !need {
                break;
            }
            self.top_up(0);
            let mut r = self.mm.resolve_fault(sp, page, write.is_some());
            assert_ne!(r.action, Action::Wake, "fault resolved to nothing");
            if let Action::Take { .. } = r.action {
                self.moves += 1;
                if self.refuse_moves != 0 && self.moves % self.refuse_moves == 0 {
                    r = r.fell_back();
                }
            }
            self.k.run(r.action);
            self.mm.commit(r);
            self.reclaim();
        }
        let p = self.k.mem.get_mut(&addr).unwrap();
        if let Some(v) = write {
            p.0 = v;
            self.spaces[i].1[page] = v;
        }
        p.0
    }
    fn discard(&mut self, i: usize, first: usize, end: usize) {
        let need = self.mm.shared_homes(self.spaces[i].0, first, end).len();
        self.top_up(need);
        let mut ops = Vec::new();
        self.mm.discard(self.spaces[i].0, first, end, &mut ops);
        self.k.ops(ops);
        self.reclaim();
        self.spaces[i].1[first..end].fill(0);
    }
    fn migrate(&mut self, i: usize, first: usize, end: usize) {
        let frames = self.mm.frames_in(self.spaces[i].0, first, end);
        self.migrate_frames(frames);
    }
    fn compact(&mut self) {
        let frames = self.mm.sparse_frozen_frames();
        self.migrate_frames(frames);
    }
    fn migrate_frames(&mut self, frames: Vec<FrameId>) {
        if frames.is_empty() {
            return;
        }
        let base = self.k.map();
        let r = self.mm.add_pool_region(base, frames.len(), (base, frames.len()));
        let mut ops = Vec::new();
        for (slot, f) in frames.into_iter().enumerate() {
            self.mm.migrate_frame(f, r, slot, &mut ops);
        }
        self.k.ops(ops);
        self.reclaim();
    }
    fn clear_referenced(&mut self, i: usize, first: usize, end: usize) {
        let mut ops = Vec::new();
        let sp = self.spaces[i].0;
        self.mm.clear_referenced(sp, first, end, &mut ops);
        self.k.ops(ops);
        assert!(self.mm.referenced(sp, first, end).iter().all(|&p| self.mm.is_pinned(sp, p)));
    }
    fn mkclean(&mut self, i: usize, first: usize, end: usize) {
        let mut ops = Vec::new();
        let sp = self.spaces[i].0;
        self.mm.mkclean(sp, first, end, &mut ops);
        let ops = self.mm.coalesce_protects(sp, ops); // as `Space::clean` does
        self.k.ops(ops);
        // (Pinned pages stay dirty: DMA may write them unseen.)
        assert!(self.mm.dirty_pages(sp, first, end).iter().all(|&p| self.mm.is_pinned(sp, p)));
    }
    fn reset(&mut self, i: usize, j: usize) {
        let (a, b) = (self.spaces[i].0, self.spaces[j].0);
        if !self.mm.resettable(a, b) {
            return;
        }
        self.prepare_share(b);
        let need = self.mm.shared_homes(a, 0, self.mm.pages(a)).len() + self.mm.pinned_in(b);
        self.top_up(need);
        let mut ops = Vec::new();
        self.mm.reset_to(a, b, &mut ops);
        self.k.ops(ops);
        self.reclaim();
        self.spaces[i].1 = self.spaces[j].1.clone();
    }
    fn api_read(&mut self, i: usize, page: usize) -> u64 {
        match self.mm.read_source(self.spaces[i].0, page) {
            Src::Zero => 0,
            Src::Addr(a) => self.k.mem[&a].0,
        }
    }
    fn drop_space(&mut self, i: usize) {
        let (sp, _) = self.spaces.swap_remove(i);
        self.housekeep();
        if let (DropPlan::Evacuate(n), true) = (self.mm.drop_plan(sp), self.evacuate_drops) {
            self.top_up(n);
            let mut ops = Vec::new();
            self.mm.evacuate_survivors(sp, &mut ops);
            self.k.ops(ops);
        }
        let (base, pages) = match self.mm.drop_space(sp) {
            Dropped::Unmap(b) => b,
            Dropped::Freeze => {
                let pages = self.mm.pages(sp);
                let base = self.mm.view_base(sp);
                let to = self.k.map();
                self.k.moverange(base, to, pages);
                self.mm.drop_frozen(sp, to, (to, pages))
            }
        };
        self.k.unmap(base, pages);
        self.reclaim();
    }
    fn check(&self) {
        self.mm.check().unwrap();
        // Invariant 3: every present view page holds its entry's frame bytes.
        for (sp, model) in &self.spaces {
            let base = self.mm.view_base(*sp);
            for (p, want) in model.iter().enumerate() {
                if let Some(&(v, _)) = self.k.mem.get(&(base + p * PAGE_SIZE)) {
                    assert_eq!(v, *want, "{sp:?} page {p}: view holds stale bytes");
                }
            }
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `clean` of many scattered written pages: one write-protect of their span instead of a
/// call per run, split around pinned pages (the fake kernel refuses to protect those);
/// every written page ends protected and clean, and a later write faults again.
#[test]
fn scattered_cleans_protect_their_span_in_few_calls_and_never_a_pinned_page() {
    let mut s = Sim::new();
    let pages = 4 * PTRS_PER_PTE;
    s.create(pages);
    let written: Vec<usize> = (0..pages).step_by(13).collect();
    for &p in &written {
        s.access(0, p, Some(p as u64 + 1));
    }
    s.pin(0, 13 * 40, 13 * 40 + 1);
    let sp = s.spaces[0].0;
    let mut ops = Vec::new();
    s.mm.mkclean(sp, 0, pages, &mut ops);
    let runs = ops.len();
    assert!(runs >= written.len() - 2, "one protect per scattered page: {runs}");
    let ops = s.mm.coalesce_protects(sp, ops);
    assert_eq!(ops.len(), 2, "the span, split around the pinned page: {ops:?}");
    s.k.ops(ops);
    for &p in &written {
        let addr = s.mm.view_base(sp) + p * PAGE_SIZE;
        let wp = s.k.mem[&addr].1;
        assert_eq!(wp, !s.mm.is_pinned(sp, p), "page {p}");
    }
    assert_eq!(s.mm.dirty_pages(sp, 0, pages), vec![13 * 40], "only the pinned page stays dirty");
    s.access(0, 13, Some(7)); // faults again: write-protected
    assert_eq!(s.mm.dirty_pages(sp, 0, pages), vec![13, 13 * 40]);
    // Few runs, or sparse ones: left as they are.
    let mut ops = Vec::new();
    s.mm.mkclean(sp, 0, pages, &mut ops);
    assert_eq!(s.mm.coalesce_protects(sp, ops.clone()), ops);
    s.check();
}

/// The same scattered cleans over a view mapped whole: walking the span would rewrite
/// every mapped PTE (~100 ns each in the kernel), so a call per run is kept.
#[test]
fn scattered_cleans_of_a_view_mapped_whole_keep_a_call_per_run() {
    let mut s = Sim::new();
    let pages = 4 * PTRS_PER_PTE;
    s.create(pages);
    for p in 0..pages {
        s.access(0, p, None); // mapped (read-only zero fills)
    }
    for p in (0..pages).step_by(13) {
        s.access(0, p, Some(p as u64 + 1));
    }
    let sp = s.spaces[0].0;
    let mut ops = Vec::new();
    s.mm.mkclean(sp, 0, pages, &mut ops);
    assert!(ops.len() >= pages / 13 - 2);
    assert_eq!(s.mm.coalesce_protects(sp, ops.clone()), ops, "no span walk over mapped pages");
    s.k.ops(ops);
    s.check();
}

#[test]
fn fork_shares_tables_and_write_breaks_one() {
    let mut s = Sim::new();
    s.create(2048);
    for p in [0, 1, 600, 1500] {
        s.access(0, p, Some(p as u64 + 1));
    }
    assert_eq!(s.mm.tables_in_use(), 3);
    s.fork(0);
    assert_eq!(s.mm.counters.tables_shared, 3);
    assert_eq!(s.mm.tables_shared_now(), 3);
    // A read through the child does not break anything.
    assert_eq!(s.access(1, 600, None), 601);
    assert_eq!(s.mm.counters.tables_broken, 0);
    // A write through the child breaks exactly the table it lands in, and COWs the page.
    s.access(1, 0, Some(99));
    assert_eq!(s.mm.counters.tables_broken, 1);
    assert_eq!(s.mm.counters.faults_write_cow, 1);
    assert_eq!(s.access(0, 0, None), 1);
    // The parent's write to the same table: the table is no longer shared -> reused.
    s.access(0, 1, Some(7));
    assert_eq!(s.mm.counters.tables_reused, 1);
    assert_eq!(s.mm.counters.tables_broken, 1);
    // Frame 1 was shared by two tables; parent now wrote it: COW (refs 2).
    assert_eq!(s.access(1, 1, None), 2);
    s.check();
}

#[test]
fn exclusive_frame_is_reused_not_copied() {
    let mut s = Sim::new();
    s.create(512);
    s.access(0, 5, Some(5));
    s.fork(0);
    s.drop_space(1);
    // Parent is alone again: its write reuses the table and takes the frozen frame over.
    s.access(0, 5, Some(6));
    assert_eq!(s.mm.counters.faults_write_reuse, 1);
    assert_eq!(s.mm.counters.pages_moved, 0, "moves are off by default");
    assert_eq!(s.mm.counters.faults_write_cow, 0);
    assert_eq!(s.mm.frozen_regions(), 0, "the frozen region died with its last home");
    s.check();
}

#[test]
fn exclusive_frame_is_taken_by_move_and_its_old_home_left_alone() {
    for refuse in [false, true] {
        let mut s = Sim::new();
        s.mm.set_take_exclusive(true);
        s.mm.set_protect_limit(Some(0)); // forks freeze: the parent's pages move out of its view
        s.refuse_moves = refuse as u64;
        s.create(512);
        s.access(0, 5, Some(5));
        s.fork(0);
        s.access(1, 5, Some(50)); // the child's own copy: frame 5 is the parent's alone
        s.access(0, 5, Some(6));
        assert_eq!(s.mm.counters.faults_write_reuse, 1);
        assert_eq!(s.mm.counters.pages_moved, !refuse as u64);
        let copied = s.mm.counters.bytes_copied;
        assert_eq!(copied, if refuse { 2 * PAGE_SIZE as u64 } else { PAGE_SIZE as u64 }, "refused={refuse}");
        assert_eq!((s.access(0, 5, None), s.access(1, 5, None)), (6, 50));
        s.check();
        s.drop_space(1);
        s.drop_space(0);
        assert!(s.k.mem.is_empty(), "pages left mapped: {}", s.k.mem.len());
    }
}

#[test]
fn everything_is_released() {
    let mut s = Sim::new();
    s.create(1024);
    for p in 0..1024 {
        s.access(0, p, Some(p as u64));
    }
    s.fork(0);
    s.fork(1);
    s.access(2, 3, Some(1));
    s.access(0, 700, Some(1));
    s.drop_space(1);
    s.drop_space(0);
    s.drop_space(0);
    assert_eq!((s.mm.frames_in_use(), s.mm.tables_in_use(), s.mm.views_in_use(), s.mm.frozen_regions()), (0, 0, 0, 0));
    assert!(s.k.mem.is_empty(), "pages left mapped: {}", s.k.mem.len());
}

#[test]
fn model_random_sequences() {
    let (mut moved, mut compacted, mut pinned) = (0, 0, 0);
    for seed in 1..=60u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut s = Sim::new();
        // Alternate the fork strategy: always freeze, always protect, or the default.
        s.mm.set_protect_limit([Some(0), Some(usize::MAX), None][seed as usize % 3]);
        // And how write faults on exclusive frames are served: copied, taken by
        // UFFDIO_MOVE, or taken with every third move refused by the kernel.
        s.mm.set_take_exclusive(seed % 4 != 0);
        s.refuse_moves = if seed % 4 == 3 { 3 } else { 0 };
        // Drops evacuate their few survivors, or always freeze (then compaction cleans up).
        s.evacuate_drops = seed % 5 < 3;
        let pages = 512 * (1 + rng.below(3)) + rng.below(3) * 7;
        s.create(pages);
        for step in 0..1500 {
            if s.spaces.is_empty() {
                s.create(pages);
            }
            let i = rng.below(s.spaces.len());
            let page = rng.below(pages);
            match rng.below(100) {
                0..=4 if s.spaces.len() < 12 => s.fork(i),
                // (A pinned space cannot be dropped, discarded or reset: the guard borrows it.)
                5..=7 if !s.has_pins(i) => s.drop_space(i),
                8..=10 if !s.has_pins(i) => {
                    let end = (page + 1 + rng.below(700)).min(pages);
                    s.discard(i, page, end);
                }
                11 => {
                    let end = (page + 1 + rng.below(700)).min(pages);
                    s.migrate(i, page, end);
                }
                12 => {
                    s.compact();
                    let j = rng.below(s.spaces.len());
                    if !s.has_pins(i) {
                        s.reset(i, j);
                    }
                }
                71..=73 if s.pins.len() < 4 => {
                    let end = (page + 1 + rng.below(40)).min(pages);
                    s.pin(i, page, end);
                    pinned += 1;
                }
                74..=76 if !s.pins.is_empty() => s.unpin(rng.below(s.pins.len())),
                77..=84 if !s.pins.is_empty() => {
                    let (k, v) = (rng.below(s.pins.len()), rng.next());
                    s.dma(k, page, v);
                }
                13 => {
                    let end = (page + 1 + rng.below(700)).min(pages);
                    s.clear_referenced(i, page, end);
                }
                14 => {
                    let end = (page + 1 + rng.below(700)).min(pages);
                    s.mkclean(i, page, end);
                }
                15..=40 => {
                    let v = rng.next();
                    s.access(i, page, Some(v));
                    let sp = s.spaces[i].0;
                    assert!(s.mm.lookup(sp, page).has(Pte::DIRTY), "seed {seed}: a write must mark the page dirty");
                    assert!(s.mm.lookup(sp, page).has(Pte::ACCESSED));
                }
                41..=70 => {
                    let want = s.spaces[i].1[page];
                    assert_eq!(s.access(i, page, None), want, "seed {seed} step {step}: view read");
                    let e = s.mm.lookup(s.spaces[i].0, page);
                    assert!(
                        !e.present() || e.has(Pte::ACCESSED) || s.mm.space(s.spaces[i].0).vs.home.get(page),
                        "seed {seed} step {step}: read not seen"
                    );
                }
                _ => {
                    let want = s.spaces[i].1[page];
                    assert_eq!(s.api_read(i, page), want, "seed {seed} step {step}: api read");
                }
            }
            if step % 50 == 0 {
                s.check();
            }
        }
        s.check();
        while !s.pins.is_empty() {
            s.unpin(0);
        }
        s.check();
        while !s.spaces.is_empty() {
            s.drop_space(0);
        }
        assert_eq!((s.mm.frames_in_use(), s.mm.tables_in_use(), s.mm.frozen_regions()), (0, 0, 0), "seed {seed}");
        assert!(s.k.mem.is_empty(), "seed {seed}: pages left mapped");
        if seed % 4 != 0 {
            moved += s.mm.counters.pages_moved;
        }
        compacted += s.compacted;
    }
    assert!(compacted > 0, "no automatic compaction step re-homed a frame: the path went untested");
    assert!(moved > 0, "no write fault took an exclusive page: the Take path went untested");
    assert!(pinned > 0, "no range was pinned: the pinning rules went untested");
}

/// A fork chain: every generation writes one page, forks and drops its parent. With
/// either fork strategy, the frozen regions (mappings the size of the space) and the
/// address space stay bounded, and every byte stays right.
#[test]
fn fork_chains_stay_bounded() {
    for (limit, evacuate) in [(None, true), (Some(0), true), (Some(0), false), (None, false)] {
        let mut s = Sim::new();
        s.mm.set_protect_limit(limit);
        s.evacuate_drops = evacuate;
        let pages = 4096;
        s.create(pages);
        let mut most = 0;
        for g in 0..1500 {
            let page = (g * 7) % pages;
            s.access(0, page, Some(g as u64 + 1));
            s.fork(0);
            s.drop_space(0); // the parent (swap_remove puts the child at 0)
            most = most.max(s.mm.frozen_regions());
            if g % 100 == 0 {
                s.check();
            }
        }
        s.check();
        for g in 0..1500 {
            let page = (g * 7) % pages;
            assert_eq!(s.api_read(0, page), g as u64 + 1, "{limit:?}/{evacuate}: generation {g}");
        }
        // Pool regions are dense (16 slots each here, retired with at least 8 used);
        // frozen regions left by forks or drops are compacted once they are sparse or
        // past the bound.
        let frozen_max = FROZEN_SOFT_MAX + 1500 / 8 + 8;
        assert!(most <= frozen_max, "{limit:?}/{evacuate}: {most} frozen regions (bound {frozen_max})");
        let c = s.mm.counters;
        assert_eq!(c.broken_by.migrate, 0, "re-homing breaks no table");
        if limit == Some(0) || !evacuate {
            assert!(c.frames_rehomed > 0, "{limit:?}/{evacuate}: nothing re-homed");
        }
        s.drop_space(0);
        assert_eq!((s.mm.frames_in_use(), s.mm.frozen_regions()), (0, 0));
        assert!(s.k.mem.is_empty());
    }
}

/// A frozen region whose homes fall to a quarter of its peak is queued and compacted by
/// bounded steps, without breaking tables; the last home leaving unmaps it.
#[test]
fn sparse_frozen_region_is_compacted_in_bounded_steps() {
    let mut s = Sim::new();
    s.mm.set_protect_limit(Some(0)); // forks freeze
    s.create(1024);
    for p in 0..1024 {
        s.access(0, p, Some(p as u64 + 1));
    }
    s.fork(0); // 1024 homes frozen, shared with the child
    assert_eq!(s.mm.frozen_regions(), 1);
    // Both overwrite 800 pages: the frozen region falls below a quarter of its peak.
    for p in 0..800 {
        s.access(0, p, Some(5000 + p as u64));
        s.access(1, p, Some(9000 + p as u64));
    }
    assert_eq!(s.mm.sparse_regions(), 1);
    let tables_before = s.mm.counters.tables_broken;
    let mut steps = 0;
    while s.mm.compaction_pending() {
        s.housekeep();
        s.check();
        steps += 1;
        assert!(steps < 1000);
    }
    assert!(steps > 1, "bounded steps: {steps}");
    assert_eq!(s.mm.counters.tables_broken, tables_before, "re-homing breaks no table");
    assert_eq!(s.mm.counters.frames_rehomed, 224);
    for p in 0..1024 {
        let (a, b) = if p < 800 { (5000 + p as u64, 9000 + p as u64) } else { (p as u64 + 1, p as u64 + 1) };
        assert_eq!((s.api_read(0, p), s.api_read(1, p)), (a, b));
        assert_eq!((s.access(0, p, None), s.access(1, p, None)), (a, b));
    }
    s.check();
}

#[test]
fn merge_pages_keeps_each_page_once_in_order() {
    use super::merge_pages;
    assert_eq!(merge_pages(vec![1, 4, 9], vec![2, 4, 10]), vec![1, 2, 4, 9, 10]);
    assert_eq!(merge_pages(vec![], vec![3]), vec![3]);
    assert_eq!(merge_pages(vec![3], vec![]), vec![3]);
    assert_eq!(merge_pages(vec![5, 6], vec![1, 2]), vec![1, 2, 5, 6]);
}
