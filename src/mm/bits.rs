//! A sparse bitset, one bit per page of a view, in chunks of 512 bits (one PTE table's
//! worth) allocated on first use: a fork's view costs 8 bytes per 2 MiB until it is
//! touched, not a bit per page.
//!
//! Setting a bit in an absent chunk needs a chunk: [`Bits::set_with`] takes it from a
//! preallocated supply, so the signal-handler fault path never allocates.

/// One chunk: 512 bits.
pub type Chunk = Box<[u64; CHUNK_WORDS]>;
const CHUNK_WORDS: usize = 8;
const CHUNK_BITS: usize = CHUNK_WORDS * 64;

#[derive(Clone, Debug, Default)]
pub struct Bits {
    chunks: Vec<Option<Chunk>>,
    /// Invariant: the number of bits set (so [`Bits::count`] is O(1)).
    ones: usize,
}

impl Bits {
    pub fn new(bits: usize) -> Bits {
        Bits { chunks: vec![None; bits.div_ceil(CHUNK_BITS)], ones: 0 }
    }

    /// A fresh chunk for [`Bits::set_with`]'s supply.
    pub fn new_chunk() -> Chunk {
        Box::new([0; CHUNK_WORDS])
    }

    /// [`Bits::new_chunk`], or an error instead of aborting when memory is exhausted.
    pub fn try_new_chunk() -> Result<Chunk, std::collections::TryReserveError> {
        super::try_box(0)
    }

    fn word(&self, wi: usize) -> u64 {
        self.chunks[wi / CHUNK_WORDS].as_ref().map_or(0, |c| c[wi % CHUNK_WORDS])
    }

    fn words(&self) -> usize {
        self.chunks.len() * CHUNK_WORDS
    }

    pub fn get(&self, i: usize) -> bool {
        self.word(i / 64) >> (i % 64) & 1 != 0
    }

    /// Set bit `i`, taking a chunk from `spares` if its chunk is absent.
    pub fn set_with(&mut self, i: usize, spares: &mut Vec<Chunk>) {
        let c = self.chunks[i / CHUNK_BITS].get_or_insert_with(|| {
            let mut c = spares.pop().unwrap_or_else(Bits::new_chunk);
            c.fill(0);
            c
        });
        let w = &mut c[i % CHUNK_BITS / 64];
        self.ones += usize::from(*w >> (i % 64) & 1 == 0);
        *w |= 1 << (i % 64);
    }

    /// Set bit `i`, allocating its chunk if absent (not for signal context).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn set(&mut self, i: usize) {
        self.set_with(i, &mut Vec::new());
    }

    pub fn clear(&mut self, i: usize) {
        if let Some(c) = &mut self.chunks[i / CHUNK_BITS] {
            let w = &mut c[i % CHUNK_BITS / 64];
            self.ones -= usize::from(*w >> (i % 64) & 1 != 0);
            *w &= !(1 << (i % 64));
        }
    }

    pub fn bit_len(&self) -> usize {
        self.chunks.len() * CHUNK_BITS
    }

    /// Clear every bit and release the chunks (not for signal context).
    pub fn clear_all(&mut self) {
        self.chunks.iter_mut().for_each(|c| *c = None);
        self.ones = 0;
    }

    /// Bits set in `[start, end)`, where the range lies within one 512-bit chunk (a table's
    /// pages): at most 8 popcounts.
    pub fn count_range(&self, start: usize, end: usize) -> usize {
        debug_assert!(start <= end && (end == start || (end - 1) / CHUNK_BITS == start / CHUNK_BITS));
        let Some(c) = self.chunks.get(start / CHUNK_BITS).and_then(|c| c.as_ref()) else { return 0 };
        let (lo, hi) = (start % CHUNK_BITS, (end - 1) % CHUNK_BITS + 1);
        if end == start {
            return 0;
        }
        (lo / 64..hi.div_ceil(64))
            .map(|wi| {
                let mut w = c[wi];
                if wi == lo / 64 {
                    w &= u64::MAX << (lo % 64);
                }
                if wi == (hi - 1) / 64 && hi % 64 != 0 {
                    w &= (1u64 << (hi % 64)) - 1;
                }
                w.count_ones() as usize
            })
            .sum()
    }

    /// Bits set, in O(1).
    pub fn count(&self) -> usize {
        debug_assert_eq!(
            self.ones,
            self.chunks.iter().flatten().flat_map(|c| c.iter()).map(|w| w.count_ones() as usize).sum::<usize>(),
            "Bits::ones out of step"
        );
        self.ones
    }

    /// Indices in `[start, end)` that are set, by scanning words.
    pub fn ones(&self, start: usize, end: usize) -> impl Iterator<Item = usize> + '_ {
        let (w0, w1) = (start / 64, end.div_ceil(64).min(self.words()));
        // Skip absent chunks whole: a huge, sparsely touched view costs O(chunks).
        (w0 / CHUNK_WORDS..w1.div_ceil(CHUNK_WORDS))
            .filter(move |c| self.chunks[*c].is_some())
            .flat_map(move |c| (c * CHUNK_WORDS).max(w0)..((c + 1) * CHUNK_WORDS).min(w1))
            .flat_map(move |wi| set_bits_of(self.word(wi), wi * 64))
            .filter(move |&i| i >= start && i < end)
    }

    /// Maximal runs `[start, end)` of indices set in `self` and clear in `other`.
    pub fn runs_and_not(&self, other: &Bits) -> Vec<(usize, usize)> {
        self.runs_and_not_in(other, 0, self.bit_len())
    }

    /// [`Bits::runs_and_not`] clipped to `[start, end)`: O(words of the range), each word's
    /// runs found with bit scans (a word that continues or ends nothing costs one test).
    pub fn runs_and_not_in(&self, other: &Bits, start: usize, end: usize) -> Vec<(usize, usize)> {
        self.runs_where(Some(other), start, end)
    }

    /// Maximal runs of indices set, clipped to `[start, end)`.
    pub fn runs_in(&self, start: usize, end: usize) -> Vec<(usize, usize)> {
        self.runs_where(None, start, end)
    }

    fn runs_where(&self, other: Option<&Bits>, start: usize, end: usize) -> Vec<(usize, usize)> {
        let end = end.min(self.bit_len());
        let mut runs = Vec::new();
        if start >= end {
            return runs;
        }
        let mut open: Option<usize> = None;
        for wi in start / 64..end.div_ceil(64) {
            let mut w = self.word(wi) & !other.map_or(0, |o| o.word(wi));
            if wi == start / 64 {
                w &= u64::MAX << (start % 64);
            }
            if wi == (end - 1) / 64 && end % 64 != 0 {
                w &= (1u64 << (end % 64)) - 1;
            }
            let mut bit = 0u32;
            while bit < 64 {
                let rest = w >> bit;
                match open {
                    None => {
                        if rest == 0 {
                            break;
                        }
                        bit += rest.trailing_zeros();
                        open = Some(wi * 64 + bit as usize);
                    }
                    Some(s) => {
                        bit += rest.trailing_ones();
                        if bit < 64 {
                            runs.push((s, wi * 64 + bit as usize));
                            open = None;
                        }
                    }
                }
            }
        }
        if let Some(s) = open {
            runs.push((s, end));
        }
        runs
    }
}

/// The indices `base + b` of the bits `b` set in `w`, ascending.
pub fn set_bits_of(mut w: u64, base: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if w == 0 {
            return None;
        }
        let b = w.trailing_zeros() as usize;
        w &= w - 1;
        Some(base + b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs() {
        let mut a = Bits::new(2000);
        let b = Bits::new(2000);
        for i in [1, 2, 3, 63, 64, 65, 130, 511, 512, 1500] {
            a.set(i);
        }
        assert_eq!(a.runs_and_not(&b), vec![(1, 4), (63, 66), (130, 131), (511, 513), (1500, 1501)]);
        let mut c = Bits::new(2000);
        c.set(64);
        assert_eq!(a.runs_and_not(&c)[..3], [(1, 4), (63, 64), (65, 66)]);
        assert_eq!(a.count(), 10);
        assert_eq!(a.count_range(0, 512), 8);
        assert_eq!(a.count_range(2, 64), 3);
        assert_eq!(a.count_range(63, 66), 3);
        assert_eq!(a.count_range(512, 1024), 1);
        assert_eq!(a.count_range(1024, 1536), 1);
        assert_eq!(a.count_range(5, 5), 0);
        assert_eq!(a.ones(60, 600).collect::<Vec<_>>(), vec![63, 64, 65, 130, 511, 512]);
        a.clear(512);
        assert!(!a.get(512) && a.get(511) && !a.get(1000));
        a.clear_all();
        assert_eq!(a.count(), 0);
    }

    /// The word-scanning runs against a bit-by-bit reference, on random sparse and dense
    /// patterns and random clips.
    #[test]
    fn runs_and_not_matches_a_reference() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            let n = 64 + (next() % 3000) as usize;
            let (mut a, mut b) = (Bits::new(n), Bits::new(n));
            let density = next() % 4;
            for i in 0..n {
                let r = next() % 8;
                if (density == 0 && r == 0) || (density == 1 && r < 4) || (density >= 2 && r < 7) {
                    a.set(i);
                }
                if next() % 16 == 0 {
                    b.set(i);
                }
            }
            let (start, end) =
                if round % 2 == 0 { (0, n) } else { ((next() as usize) % n, (next() as usize) % (n + 80)) };
            let mut want = Vec::new();
            let mut open = None;
            for i in start..end.min(a.bit_len()) {
                match (a.get(i) && !b.get(i), open) {
                    (true, None) => open = Some(i),
                    (false, Some(s)) => {
                        want.push((s, i));
                        open = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = open {
                want.push((s, end.min(a.bit_len())));
            }
            assert_eq!(a.runs_and_not_in(&b, start, end), want, "round {round}: n {n} [{start}, {end})");
            let ones: Vec<usize> = a.runs_in(start, end).into_iter().flat_map(|(s, e)| s..e).collect();
            assert_eq!(ones, a.ones(start, end.min(a.bit_len())).collect::<Vec<_>>(), "round {round}: runs_in");
        }
    }

    #[test]
    fn set_with_takes_from_the_supply() {
        let mut a = Bits::new(4096);
        let mut spares = vec![Bits::new_chunk(), Bits::new_chunk()];
        a.set_with(5, &mut spares);
        a.set_with(6, &mut spares);
        assert_eq!(spares.len(), 1, "one chunk for one table's bits");
        a.set_with(3000, &mut spares);
        assert!(spares.is_empty() && a.get(5) && a.get(6) && a.get(3000));
    }
}
