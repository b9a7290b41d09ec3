//! A fixed-size bitset, one bit per page of a view.

#[derive(Clone, Debug, Default)]
pub struct Bits {
    words: Vec<u64>,
}

impl Bits {
    pub fn new(bits: usize) -> Bits {
        Bits { words: vec![0; bits.div_ceil(64)] }
    }
    pub fn get(&self, i: usize) -> bool {
        self.words[i / 64] >> (i % 64) & 1 != 0
    }
    pub fn set(&mut self, i: usize) {
        self.words[i / 64] |= 1 << (i % 64);
    }
    pub fn clear(&mut self, i: usize) {
        self.words[i / 64] &= !(1 << (i % 64));
    }
    pub fn bit_len(&self) -> usize {
        self.words.len() * 64
    }
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }
    /// Indices in `[start, end)` that are set, by scanning words.
    pub fn ones(&self, start: usize, end: usize) -> impl Iterator<Item = usize> + '_ {
        let (w0, w1) = (start / 64, end.div_ceil(64).min(self.words.len()));
        (w0..w1)
            .flat_map(move |wi| {
                let mut w = self.words[wi];
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let b = w.trailing_zeros() as usize;
                    w &= w - 1;
                    Some(wi * 64 + b)
                })
            })
            .filter(move |&i| i >= start && i < end)
    }

    /// Maximal runs `[start, end)` of indices set in `self` and clear in `other`.
    pub fn runs_and_not(&self, other: &Bits) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let mut open: Option<usize> = None;
        for (wi, (&a, &b)) in self.words.iter().zip(&other.words).enumerate() {
            let w = a & !b;
            if w == 0 && open.is_none() {
                continue;
            }
            if w == u64::MAX && open.is_some() {
                continue;
            }
            for bit in 0..64 {
                let i = wi * 64 + bit;
                match (w >> bit & 1 != 0, open) {
                    (true, None) => open = Some(i),
                    (false, Some(s)) => {
                        runs.push((s, i));
                        open = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(s) = open {
            runs.push((s, self.words.len() * 64));
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs() {
        let mut a = Bits::new(200);
        let b = Bits::new(200);
        for i in [1, 2, 3, 63, 64, 65, 130] {
            a.set(i);
        }
        assert_eq!(a.runs_and_not(&b), vec![(1, 4), (63, 66), (130, 131)]);
        let mut c = Bits::new(200);
        c.set(64);
        assert_eq!(a.runs_and_not(&c), vec![(1, 4), (63, 64), (65, 66), (130, 131)]);
        assert_eq!(a.count(), 7);
    }
}
