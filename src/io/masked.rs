//! The write-cost rule for masked writes, shared by the VHD and the VHDX writers: how the
//! sectors a [`SectorBitmap`] selects in one block become writes of the file.
//!
//! One pwrite per run of selected sectors made an every-other-4-KiB merge one system call per
//! 4 KiB (131,087 pwrite64 for 512 MiB). Instead, runs less than [`MAX_GAP`] bytes apart
//! become one write whose gaps are filled: with zeros in a block that is new (its space reads
//! as zeros, and the gap sectors are not exposed as data by the format), or with the file's
//! own bytes, read in by one read of the whole write's range, in a block that already holds
//! data (the gap sectors keep their content). No write is longer than [`MAX_WRITE`]: the
//! buffer a filled write needs stays bounded whatever the block size, and payload writes stay
//! at most 1 MiB (why that matters for VHDX: [`MAX_WRITE`]).

use std::ops::Range;

use crate::Result;
use crate::bitmap::SectorBitmap;

/// Runs of selected sectors closer than this (in bytes) are written together.
pub(crate) const MAX_GAP: usize = 64 * 1024;

/// The longest single write, in bytes. It bounds the buffer of a filled write. And for VHDX
/// payload (it was the VHDX writer's own limit): a buffered write of 2 MiB at a 2 MiB-aligned
/// offset (a VHDX block of 2 MiB or more: blocks are 1 MiB aligned) lets the page cache use
/// 2 MiB folios; on a VM whose balloon reports free memory to the host in 2 MiB blocks (free
/// page reporting, order 9), each such folio is memory the host has discarded, and copying
/// into it costs a host fault per page: a 1 GiB merge spent 1.5-3.4 s of kernel time in
/// `copy_folio_from_iter_atomic` against 0.3 s with 1 MiB writes (the VHD writer's 4 KiB-aligned
/// block data never gets 2 MiB folios; `cp` writes 128 KiB at a time). Elsewhere the extra
/// system calls cost nothing measurable (one per MiB).
pub(crate) const MAX_WRITE: usize = 1024 * 1024;

/// What the unselected sectors inside one write get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gaps {
    /// Zeros: a new block, whose space reads as zeros.
    Zeros,
    /// The file's bytes there, read first: a block that already holds data.
    FromFile,
}

/// One write of the rule: the sectors `sectors` (of the masked buffer), and whether unselected
/// sectors lie inside it (a write without gaps goes straight from the caller's buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) sectors: Range<usize>,
    pub(crate) gaps: bool,
}

/// The writes of the rule for `mask` with sectors of `sector_size` bytes, in order.
pub(crate) fn pieces(mask: &SectorBitmap, sector_size: usize) -> Vec<Piece> {
    let max_gap = MAX_GAP.div_ceil(sector_size);
    let max_len = (MAX_WRITE / sector_size).max(1);
    let mut out: Vec<Piece> = Vec::new();
    for run in mask.runs() {
        if let Some(last) = out.last_mut()
            && run.start - last.sectors.end < max_gap
            && run.end - last.sectors.start <= max_len
        {
            last.sectors.end = run.end;
            last.gaps = true;
            continue;
        }
        let mut start = run.start;
        while start < run.end {
            let end = run.end.min(start + max_len);
            out.push(Piece {
                sectors: start..end,
                gaps: false,
            });
            start = end;
        }
    }
    out
}

/// Write the sectors `mask` selects from `data` (sectors of `sector_size` bytes) by the
/// rule: `write(bytes, offset)` and `read(buf, offset)` take byte offsets from the start of
/// `data`'s first sector; `read` is only called for [`Gaps::FromFile`]. `scratch` is the
/// buffer of filled writes (kept by the caller between blocks).
pub(crate) fn write_masked(
    data: &[u8],
    mask: &SectorBitmap,
    sector_size: usize,
    gaps: Gaps,
    scratch: &mut Vec<u8>,
    mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
    mut write: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let ss = sector_size;
    for p in pieces(mask, ss) {
        let bytes = p.sectors.start * ss..p.sectors.end * ss;
        let at = bytes.start as u64;
        if !p.gaps {
            write(&data[bytes], at)?;
            continue;
        }
        scratch.clear();
        scratch.resize(bytes.len(), 0);
        if gaps == Gaps::FromFile {
            read(scratch, at)?;
        }
        for r in mask.runs_in(p.sectors.clone(), true) {
            let (from, to) = (r.start * ss, r.end * ss);
            scratch[from - bytes.start..to - bytes.start].copy_from_slice(&data[from..to]);
        }
        write(scratch, at)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn mask(len: usize, runs: &[Range<usize>]) -> SectorBitmap {
        let mut m = SectorBitmap::new(len);
        for r in runs {
            m.set_range(r.clone());
        }
        m
    }

    fn piece(sectors: Range<usize>, gaps: bool) -> Piece {
        Piece { sectors, gaps }
    }

    #[test]
    fn runs_closer_than_the_gap_join_and_farther_ones_do_not() {
        // 512-byte sectors: a gap of 64 KiB is 128 sectors.
        let m = mask(
            4096,
            &[0..8, 16..24, 24 + 127..24 + 128, 24 + 128 + 128..300],
        );
        assert_eq!(
            pieces(&m, 512),
            vec![piece(0..24 + 128, true), piece(280..300, false)]
        );
    }

    #[test]
    fn a_gap_of_exactly_the_limit_splits() {
        let m = mask(1024, &[0..1, 129..130]);
        assert_eq!(
            pieces(&m, 512),
            vec![piece(0..1, false), piece(129..130, false)]
        );
        let m = mask(1024, &[0..1, 128..130]);
        assert_eq!(pieces(&m, 512), vec![piece(0..130, true)]);
    }

    #[test]
    fn the_gap_is_counted_in_bytes_for_4096_byte_sectors() {
        // 64 KiB is 16 sectors of 4 KiB.
        let m = mask(64, &[0..1, 16..17, 33..34]);
        assert_eq!(
            pieces(&m, 4096),
            vec![piece(0..17, true), piece(33..34, false)]
        );
    }

    #[test]
    fn edges_empty_full_first_and_last_sector() {
        assert!(pieces(&SectorBitmap::new(100), 512).is_empty());
        assert_eq!(
            pieces(&SectorBitmap::full(100), 512),
            vec![piece(0..100, false)]
        );
        let m = mask(4096, &[0..1, 4095..4096]);
        assert_eq!(
            pieces(&m, 512),
            vec![piece(0..1, false), piece(4095..4096, false)]
        );
    }

    #[test]
    fn no_write_is_longer_than_the_limit() {
        // A full 4 MiB block of 512-byte sectors: four 1 MiB writes.
        let full = SectorBitmap::full(8192);
        let p = pieces(&full, 512);
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|p| p.sectors.len() == 2048 && !p.gaps));
        // Every other 4 KiB: joined up to 1 MiB, never across it, and every selected sector
        // is in exactly one piece.
        let mut m = SectorBitmap::new(8192);
        for s in (0..8192).step_by(16) {
            m.set_range(s..s + 8);
        }
        let p = pieces(&m, 512);
        assert!(p.iter().all(|p| p.sectors.len() * 512 <= MAX_WRITE));
        assert!(p.len() >= 4 && p.len() <= 5, "{} pieces", p.len());
        let mut seen = SectorBitmap::new(8192);
        for q in &p {
            for r in m.runs_in(q.sectors.clone(), true) {
                seen.set_range(r);
            }
        }
        assert_eq!(seen, m);
        assert!(p.windows(2).all(|w| w[0].sectors.end <= w[1].sectors.start));
    }

    /// Run `write_masked` on a file image `file` (the block's bytes) and return it.
    fn apply(file: &[u8], data: &[u8], m: &SectorBitmap, ss: usize, gaps: Gaps) -> Vec<u8> {
        let out = RefCell::new(file.to_vec());
        let mut scratch = Vec::new();
        write_masked(
            data,
            m,
            ss,
            gaps,
            &mut scratch,
            |buf, at| {
                let at = at as usize;
                buf.copy_from_slice(&out.borrow()[at..at + buf.len()]);
                Ok(())
            },
            |bytes, at| {
                let at = at as usize;
                out.borrow_mut()[at..at + bytes.len()].copy_from_slice(bytes);
                Ok(())
            },
        )
        .unwrap();
        out.into_inner()
    }

    /// What the block must hold afterwards: `data` at selected sectors, `old` elsewhere.
    fn expected(old: &[u8], data: &[u8], m: &SectorBitmap, ss: usize) -> Vec<u8> {
        (0..old.len())
            .map(|i| if m.get(i / ss) { data[i] } else { old[i] })
            .collect()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn a_block_with_data_keeps_its_unselected_sectors() {
        for ss in [512, 4096] {
            let n = 3 * MAX_WRITE / ss;
            let mut m = SectorBitmap::new(n);
            for s in (0..n).step_by(3) {
                m.set_range(s..s + 1);
            }
            m.set_range(n - 40..n);
            let (old, data) = (pattern(n * ss, 7), pattern(n * ss, 99));
            let got = apply(&old, &data, &m, ss, Gaps::FromFile);
            assert!(got == expected(&old, &data, &m, ss), "sector size {ss}");
        }
    }

    #[test]
    fn a_new_block_gets_zeros_in_the_gaps_and_is_never_read() {
        let ss = 512;
        let n = 1000;
        let m = mask(n, &[0..8, 16..24, 500..501, 999..1000]);
        let data = pattern(n * ss, 3);
        let zeros = vec![0u8; n * ss];
        let mut scratch = vec![0xee; 16];
        let file = RefCell::new(vec![0u8; n * ss]);
        write_masked(
            &data,
            &m,
            ss,
            Gaps::Zeros,
            &mut scratch,
            |_, _| panic!("a new block is never read"),
            |bytes, at| {
                let at = at as usize;
                file.borrow_mut()[at..at + bytes.len()].copy_from_slice(bytes);
                Ok(())
            },
        )
        .unwrap();
        assert!(file.into_inner() == expected(&zeros, &data, &m, ss));
    }

    #[test]
    fn errors_of_read_and_write_come_back() {
        let m = mask(100, &[0..1, 2..3]);
        let data = vec![1u8; 100 * 512];
        let fail = |failing: bool| match failing {
            true => Err(crate::Error::InvalidParameter("injected".into())),
            false => Ok(()),
        };
        // (gaps, the read fails): the failing side's error comes back.
        for (gaps, read_fails) in [(Gaps::FromFile, true), (Gaps::Zeros, false)] {
            let read = |_: &mut [u8], _| fail(read_fails);
            let write = |_: &[u8], _| fail(!read_fails);
            let r = write_masked(&data, &m, 512, gaps, &mut Vec::new(), read, write);
            assert!(r.is_err(), "{gaps:?}");
        }
    }
}
