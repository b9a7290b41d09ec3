//! cargo-fuzz target: `Arena::load` on damaged and foreign files.
//!
//! Inputs whose first byte is even are a whole file, loaded as is. The others describe a
//! valid image — a space of up to 4 MiB with a few pages written, saved with
//! `Space::save` — followed by edits (offset, xor) applied to the saved file before it is
//! loaded: that reaches the index, the data checksums and the geometry checks, not just the
//! magic. Whatever the file, `load` must return a space or a typed error (`BadImage`,
//! `ImageIo`), never panic; a loaded space read whole through the API must give its bytes
//! or `CorruptPage` for a page whose data was edited, and an unedited image must load and
//! read back exactly what was saved. Every input leaves the (shared) arena empty.

#![no_main]

use std::sync::OnceLock;

use cowarena::{Arena, Error};
use libfuzzer_sys::fuzz_target;

const PAGE: usize = 4096;

fn arena() -> &'static Arena {
    static A: OnceLock<Arena> = OnceLock::new();
    A.get_or_init(|| Arena::new().expect("userfaultfd"))
}

fn path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cowarena-fuzz-image-{}.img", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let arena = arena();
    let p = path();
    let mut want: Option<Vec<u8>> = None;
    if first % 2 == 0 {
        std::fs::write(&p, rest).unwrap();
    } else {
        // A valid image, then edits.
        let len = 1 + (u32::from_le_bytes([first, *rest.first().unwrap_or(&0), 0, 0]) as usize * 97) % (4 << 20);
        let mut s = arena.space(len).unwrap();
        let mut model = vec![0u8; len];
        let (spec, edits) = rest.split_at(rest.len().min(16));
        for (i, &b) in spec.iter().enumerate() {
            let off = (b as usize * 7919 + i * 104_729) % len;
            s.write(off, &[b | 1]).unwrap();
            model[off] = b | 1;
        }
        s.save(&p).unwrap();
        drop(s);
        if edits.len() >= 5 {
            let mut bytes = std::fs::read(&p).unwrap();
            for e in edits.chunks_exact(5) {
                let at = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as usize % bytes.len();
                bytes[at] ^= e[4] | 1;
            }
            std::fs::write(&p, &bytes).unwrap();
        } else {
            want = Some(model);
        }
    }
    match arena.load(&p) {
        Ok(l) => {
            let mut buf = vec![0u8; l.len()];
            match l.read(0, &mut buf) {
                Ok(()) => {
                    if let Some(w) = &want {
                        assert!(buf == *w, "an unedited image read back wrong");
                    }
                }
                Err(Error::CorruptPage { page }) => {
                    assert!(want.is_none(), "an unedited image failed a checksum at page {page}");
                    assert!(page < l.len().div_ceil(PAGE));
                }
                Err(e) => panic!("unexpected error reading a loaded space: {e}"),
            }
        }
        Err(Error::BadImage { .. } | Error::ImageIo { .. }) => {
            assert!(want.is_none(), "an unedited image did not load");
        }
        Err(e) => panic!("unexpected error from load: {e}"),
    }
    let _ = std::fs::remove_file(&p);
    let st = arena.stats();
    assert_eq!((st.spaces_in_use, st.frames_in_use, st.views_in_use), (0, 0, 0), "LEAK: {st:?}");
});
