//! The on-disk snapshot image of [`Space::save`](crate::Space::save) and
//! [`Arena::load`](crate::Arena::load): pure encoding and validation, no I/O.
//!
//! Layout (all integers little-endian):
//!
//! | offset | bytes | what |
//! | --- | --- | --- |
//! | 0 | 4096 | header: magic `COWARENA`, format version, space length, page count, index and data offsets, stored-page count, index CRC, header CRC |
//! | 4096 | `8 * ceil(pages / 64)` | index bitmap: bit `p` set when page `p` is stored |
//! | after | `4 * pages` | CRC-32 (IEEE, `crc32fast`) of each page (0 where not stored) |
//! | `data_offset` | `4096 * pages` | page `p` at `data_offset + 4096 * p`; pages not stored are holes |
//!
//! A page is stored unless it is all zeros, so a sparse space makes a sparse file. The
//! data area is page-aligned so that a read-only mapping of it can serve as the frames'
//! homes; each page's CRC is checked when it is first brought in, not at load.

use std::fmt;

/// The file's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"COWARENA";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Page size of the data area.
pub const PAGE: usize = 4096;
/// The header's size on disk (the index starts after it).
pub const HEADER_LEN: usize = PAGE;
/// Bytes of the header that carry fields (the rest is zero).
const FIELDS_LEN: usize = 68;
/// Largest space an image may describe (1 TiB): a bound on what a damaged header can ask
/// `load` to allocate.
pub const MAX_SPACE: u64 = 1 << 40;

/// What is wrong with a file given to `Arena::load`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageProblem {
    /// The file does not start with the magic bytes: not a cowarena image.
    NotAnImage,
    /// Written by a newer format version than this build reads.
    NewerVersion {
        /// The file's version.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// The header's checksum does not match its fields.
    DamagedHeader,
    /// The header's fields contradict each other or exceed the limits.
    BadGeometry(&'static str),
    /// The file is shorter (or longer) than its header says.
    Truncated {
        /// The file's length.
        len: u64,
        /// The length its header implies.
        expected: u64,
    },
    /// The index's checksum does not match, or its bitmap disagrees with the page count.
    DamagedIndex,
}

impl fmt::Display for ImageProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageProblem::NotAnImage => write!(f, "not a cowarena image (no COWARENA magic)"),
            ImageProblem::NewerVersion { found, supported } => write!(
                f,
                "written by image format version {found}; this build of cowarena reads version {supported} — upgrade cowarena"
            ),
            ImageProblem::DamagedHeader => write!(f, "the header is damaged (checksum mismatch)"),
            ImageProblem::BadGeometry(why) => write!(f, "the header is inconsistent: {why}"),
            ImageProblem::Truncated { len, expected } => {
                write!(f, "the file is {len} bytes but its header says {expected}: truncated or appended to")
            }
            ImageProblem::DamagedIndex => write!(f, "the page index is damaged (checksum mismatch)"),
        }
    }
}

/// A validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The space's length in bytes.
    pub len: u64,
    /// Pages of the space (`len` rounded up).
    pub pages: u64,
    /// Pages stored in the data area.
    pub stored: u64,
    /// Where the data area starts (page-aligned).
    pub data_offset: u64,
    /// CRC of the index (bitmap and page CRCs).
    pub index_crc: u32,
}

/// Bytes of the index bitmap for `pages` pages.
pub fn bitmap_len(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}

/// Bytes of the index (bitmap, then a CRC per page) for `pages` pages.
pub fn index_len(pages: u64) -> u64 {
    bitmap_len(pages) + 4 * pages
}

/// Where the data area starts for an image of `pages` pages (a writer knows it before it
/// knows how many pages it will store).
pub fn data_offset(pages: u64) -> u64 {
    (HEADER_LEN as u64 + index_len(pages)).next_multiple_of(PAGE as u64)
}

/// The file length an image with this header has.
pub fn image_len(h: &Header) -> u64 {
    h.data_offset + h.pages * PAGE as u64
}

/// The CRC of one page (or of any bytes).
pub fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Encode `h` as the 4096-byte header block.
pub fn encode_header(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    b[16..24].copy_from_slice(&h.len.to_le_bytes());
    b[24..32].copy_from_slice(&h.pages.to_le_bytes());
    b[32..40].copy_from_slice(&(HEADER_LEN as u64).to_le_bytes());
    b[40..48].copy_from_slice(&h.data_offset.to_le_bytes());
    b[48..56].copy_from_slice(&h.stored.to_le_bytes());
    b[56..60].copy_from_slice(&h.index_crc.to_le_bytes());
    b[60..64].copy_from_slice(&(PAGE as u32).to_le_bytes());
    let c = crc(&b[..FIELDS_LEN - 4]);
    b[FIELDS_LEN - 4..FIELDS_LEN].copy_from_slice(&c.to_le_bytes());
    b
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Validate the first bytes of a file of `file_len` bytes as a header: the magic, the
/// version, the header checksum, the geometry (page count from the length, the index and
/// data offsets, the limits) and the file's length — in that order, so that the problem
/// reported is the most basic one.
pub fn parse_header(b: &[u8], file_len: u64) -> Result<Header, ImageProblem> {
    if b.len() < 8 || b[0..8] != MAGIC {
        return Err(ImageProblem::NotAnImage);
    }
    if b.len() < 12 {
        return Err(ImageProblem::Truncated { len: file_len, expected: HEADER_LEN as u64 });
    }
    let version = u32_at(b, 8);
    if version > VERSION {
        return Err(ImageProblem::NewerVersion { found: version, supported: VERSION });
    }
    if b.len() < HEADER_LEN {
        return Err(ImageProblem::Truncated { len: file_len, expected: HEADER_LEN as u64 });
    }
    if u32_at(b, FIELDS_LEN - 4) != crc(&b[..FIELDS_LEN - 4]) || b[FIELDS_LEN..HEADER_LEN].iter().any(|&x| x != 0) {
        return Err(ImageProblem::DamagedHeader);
    }
    if version == 0 {
        return Err(ImageProblem::BadGeometry("version 0"));
    }
    let h = Header {
        len: u64_at(b, 16),
        pages: u64_at(b, 24),
        data_offset: u64_at(b, 40),
        stored: u64_at(b, 48),
        index_crc: u32_at(b, 56),
    };
    if u32_at(b, 12) as usize != HEADER_LEN || u64_at(b, 32) != HEADER_LEN as u64 {
        return Err(ImageProblem::BadGeometry("header length"));
    }
    if u32_at(b, 60) as usize != PAGE {
        return Err(ImageProblem::BadGeometry("page size is not 4096"));
    }
    if h.len == 0 || h.len > MAX_SPACE {
        return Err(ImageProblem::BadGeometry("space length is zero or above 1 TiB"));
    }
    if h.pages != h.len.div_ceil(PAGE as u64) {
        return Err(ImageProblem::BadGeometry("page count does not match the length"));
    }
    if h.stored > h.pages {
        return Err(ImageProblem::BadGeometry("more pages stored than the space has"));
    }
    if h.data_offset != data_offset(h.pages) {
        return Err(ImageProblem::BadGeometry("data offset does not follow the index"));
    }
    let expected = image_len(&h);
    if file_len != expected {
        return Err(ImageProblem::Truncated { len: file_len, expected });
    }
    Ok(h)
}

/// The index block (bitmap then CRCs) for pages whose CRCs are `crcs` (`None`: not
/// stored), and its CRC.
pub fn encode_index(crcs: &[Option<u32>]) -> (Vec<u8>, u32) {
    let pages = crcs.len() as u64;
    let bm = bitmap_len(pages) as usize;
    let mut b = vec![0u8; index_len(pages) as usize];
    for (p, c) in crcs.iter().enumerate() {
        if let Some(c) = c {
            b[p / 8] |= 1 << (p % 8);
            b[bm + 4 * p..bm + 4 * p + 4].copy_from_slice(&c.to_le_bytes());
        }
    }
    let c = crc(&b);
    (b, c)
}

/// A validated index: each page's expected CRC (0 for a hole) and which pages are stored,
/// as the loaded region's checks keep them (no per-page `Option`: 1 MiB per GiB, not 2,
/// and nothing to convert at load).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageIndex {
    /// Expected CRC of each page (0 for holes).
    pub crcs: Vec<u32>,
    /// Bit `p` set when page `p` is stored.
    pub stored: Vec<u64>,
}

impl PageIndex {
    /// The index of pages whose CRCs are `crcs` (`None`: a hole).
    #[cfg(test)]
    pub fn from_options(crcs: &[Option<u32>]) -> PageIndex {
        let mut stored = vec![0u64; crcs.len().div_ceil(64)];
        for (p, c) in crcs.iter().enumerate() {
            if c.is_some() {
                stored[p / 64] |= 1 << (p % 64);
            }
        }
        PageIndex { crcs: crcs.iter().map(|c| c.unwrap_or(0)).collect(), stored }
    }

    /// Pages in the image.
    pub fn pages(&self) -> usize {
        self.crcs.len()
    }

    /// Is page `p` stored?
    #[cfg(test)]
    pub fn is_stored(&self, p: usize) -> bool {
        self.stored[p / 64] & (1 << (p % 64)) != 0
    }

    /// Page `p`'s CRC, `None` for a hole.
    #[cfg(test)]
    pub fn get(&self, p: usize) -> Option<u32> {
        self.is_stored(p).then(|| self.crcs[p])
    }

    /// Pages stored.
    pub fn count(&self) -> usize {
        self.stored.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// Validate the index block `b` against `h` and return it (every hole's CRC must be 0,
/// the stored count the header's, and the bitmap clear past the last page).
pub fn parse_index(b: &[u8], h: &Header) -> Result<PageIndex, ImageProblem> {
    let bm = bitmap_len(h.pages) as usize;
    if b.len() as u64 != index_len(h.pages) || crc(b) != h.index_crc {
        return Err(ImageProblem::DamagedIndex);
    }
    let pages = h.pages as usize;
    // The bitmap's bytes, little-endian, as words (bit `p % 8` of byte `p / 8` is bit
    // `p % 64` of word `p / 64`).
    let mut stored: Vec<u64> = b[..bm]
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    // Bits past the last page must be clear.
    let words = pages.div_ceil(64);
    let tail_clear =
        stored[words..].iter().all(|&w| w == 0) && (pages % 64 == 0 || stored[words - 1] >> (pages % 64) == 0);
    stored.truncate(words);
    let crcs: Vec<u32> =
        b[bm..bm + 4 * pages].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let hole_with_crc = crcs.iter().enumerate().any(|(p, &c)| c != 0 && stored[p / 64] & (1 << (p % 64)) == 0);
    let index = PageIndex { crcs, stored };
    if hole_with_crc || !tail_clear || index.count() as u64 != h.stored {
        return Err(ImageProblem::DamagedIndex);
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64, stored_every: usize) -> (Header, Vec<u8>, Vec<u8>) {
        let pages = len.div_ceil(PAGE as u64);
        let crcs: Vec<Option<u32>> =
            (0..pages as usize).map(|p| (p % stored_every == 0).then_some(p as u32 * 7 + 1)).collect();
        let (index, index_crc) = encode_index(&crcs);
        let stored = crcs.iter().flatten().count() as u64;
        let h = Header { len, pages, stored, data_offset: data_offset(pages), index_crc };
        (h, encode_header(&h), index)
    }

    #[test]
    fn header_and_index_round_trip() {
        for (len, every) in [(1, 1), (4096, 1), (4097, 2), (3 << 20, 5), (1 << 30, 1000)] {
            let (h, hb, ib) = image(len, every);
            assert_eq!(parse_header(&hb, image_len(&h)), Ok(h));
            let index = parse_index(&ib, &h).unwrap();
            assert_eq!(index.pages() as u64, h.pages);
            assert_eq!(index.count() as u64, h.stored);
            let crcs: Vec<Option<u32>> =
                (0..h.pages as usize).map(|p| (p % every == 0).then_some(p as u32 * 7 + 1)).collect();
            assert_eq!(index, PageIndex::from_options(&crcs), "len {len}");
            assert!((0..h.pages as usize).all(|p| index.get(p) == crcs[p]));
            assert_eq!(h.data_offset % PAGE as u64, 0);
        }
    }

    #[test]
    fn each_problem_is_named() {
        let (h, hb, ib) = image(3 << 20, 3);
        let n = image_len(&h);
        assert_eq!(parse_header(b"ELF\x7f....", n), Err(ImageProblem::NotAnImage));
        assert_eq!(parse_header(&hb[..100], n), Err(ImageProblem::Truncated { len: n, expected: 4096 }));
        let mut newer = hb.clone();
        newer[8] = 2;
        assert_eq!(parse_header(&newer, n), Err(ImageProblem::NewerVersion { found: 2, supported: 1 }));
        for at in [16, 24, 40, 48, 56, 63, 100, 4095] {
            let mut bad = hb.clone();
            bad[at] ^= 0x10;
            assert_eq!(parse_header(&bad, n), Err(ImageProblem::DamagedHeader), "byte {at}");
        }
        assert_eq!(parse_header(&hb, n - 1), Err(ImageProblem::Truncated { len: n - 1, expected: n }));
        assert_eq!(parse_header(&hb, n + 4096), Err(ImageProblem::Truncated { len: n + 4096, expected: n }));
        for at in [0, ib.len() / 2, ib.len() - 1] {
            let mut bad = ib.clone();
            bad[at] ^= 1;
            assert_eq!(parse_index(&bad, &h), Err(ImageProblem::DamagedIndex), "index byte {at}");
        }
        assert_eq!(parse_index(&ib[..ib.len() - 4], &h), Err(ImageProblem::DamagedIndex));
        // A consistent header (valid CRC) with impossible geometry.
        let mut g = h;
        g.pages += 1;
        assert!(matches!(parse_header(&encode_header(&g), image_len(&g)), Err(ImageProblem::BadGeometry(_))));
        let mut g = h;
        g.len = MAX_SPACE + 1;
        g.pages = g.len.div_ceil(4096);
        assert!(matches!(parse_header(&encode_header(&g), 0), Err(ImageProblem::BadGeometry(_))));
    }

    /// No input panics: random bytes, and every single-byte change of a valid header.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let (h, hb, ib) = image(1 << 20, 2);
        let mut x = 0x9e3779b97f4a7c15u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 5000) as usize;
            let bytes: Vec<u8> = (0..n).map(|i| (x.rotate_left(i as u32 % 64) >> 3) as u8).collect();
            let _ = parse_header(&bytes, x % (1 << 32));
            let _ = parse_index(&bytes, &h);
        }
        for at in 0..FIELDS_LEN {
            for bit in 0..8 {
                let mut b = hb.clone();
                b[at] ^= 1 << bit;
                assert!(parse_header(&b, image_len(&h)).is_err(), "flip of byte {at} bit {bit} accepted");
            }
        }
        assert!(parse_index(&ib, &h).is_ok());
    }
}
