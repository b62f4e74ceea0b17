//! Sector bitmaps: one bit per sector, most significant bit of byte 0 is sector 0 (a VHD's
//! on-disk order, §3.2). Format-agnostic: the layer boundary speaks it ([`crate::layer::Layer`]'s
//! block states, [`crate::layer::LayerWriter::write_sectors`]'s masks), and each format converts
//! its own on-disk bitmaps into it.
//!
//! Stored as big-endian-loaded `u64` words, so bit `i` is bit `63 - i % 64` of word `i / 64`
//! and the on-disk MSB-first order maps onto `leading_zeros`. Every search and range
//! operation works a word at a time.

use std::ops::Range;

/// A bitmap of `len` sectors.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct SectorBitmap {
    words: Vec<u64>,
    len: usize,
}

impl std::fmt::Debug for SectorBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SectorBitmap({} of {} set: ",
            self.count_ones(),
            self.len
        )?;
        for (i, r) in self.runs().enumerate() {
            if i == 8 {
                write!(f, " ...")?;
                break;
            }
            write!(f, " {}..{}", r.start, r.end)?;
        }
        write!(f, ")")
    }
}

#[inline]
fn mask_from(bit: usize) -> u64 {
    // Bits bit..64 of a word (in MSB-first numbering).
    if bit >= 64 { 0 } else { u64::MAX >> bit }
}

impl SectorBitmap {
    /// A bitmap of `len` clear bits.
    pub fn new(len: usize) -> SectorBitmap {
        SectorBitmap {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// A bitmap of `len` set bits.
    pub fn full(len: usize) -> SectorBitmap {
        let mut b = SectorBitmap::new(len);
        b.set_range(0..len);
        b
    }

    /// Decode the first `len` bits of an on-disk bitmap. Missing bytes read as clear.
    pub fn from_bytes(bytes: &[u8], len: usize) -> SectorBitmap {
        let mut b = SectorBitmap::new(len);
        let nbytes = len.div_ceil(8).min(bytes.len());
        for (w, chunk) in b.words.iter_mut().zip(bytes[..nbytes].chunks(8)) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_be_bytes(buf);
        }
        b.trim();
        b
    }

    /// Encode into `out` (which should hold at least `len / 8` rounded-up bytes; extra bytes
    /// are left as they are). Bits past `len` in the last byte are written as zero.
    pub fn write_bytes(&self, out: &mut [u8]) {
        let nbytes = self.len.div_ceil(8).min(out.len());
        for (chunk, w) in out[..nbytes].chunks_mut(8).zip(&self.words) {
            let bytes = w.to_be_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// Encode into a new buffer of `padded` bytes (at least the bitmap's size), zero padded.
    pub fn to_bytes_padded(&self, padded: usize) -> Vec<u8> {
        let mut out = vec![0u8; padded.max(self.len.div_ceil(8))];
        self.write_bytes(&mut out);
        out
    }

    fn trim(&mut self) {
        let tail = self.len % 64;
        if tail != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= !mask_from(tail);
        }
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i` (false past the end).
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        i < self.len && (self.words[i / 64] >> (63 - i % 64)) & 1 == 1
    }

    /// Set bit `i` (ignored past the end).
    pub fn set(&mut self, i: usize) {
        self.set_range(i..i + 1);
    }

    fn apply_range(&mut self, r: Range<usize>, set: bool) {
        let end = r.end.min(self.len);
        let mut i = r.start;
        while i < end {
            let w = i / 64;
            let lo = i % 64;
            let hi = (end - w * 64).min(64);
            let m = mask_from(lo) & !mask_from(hi);
            if set {
                self.words[w] |= m;
            } else {
                self.words[w] &= !m;
            }
            i = w * 64 + hi;
        }
    }

    /// Set every bit in `r` (clipped to the bitmap).
    pub fn set_range(&mut self, r: Range<usize>) {
        self.apply_range(r, true);
    }

    /// Clear every bit in `r` (clipped to the bitmap).
    pub fn clear_range(&mut self, r: Range<usize>) {
        self.apply_range(r, false);
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// True when no bit is set.
    pub fn none(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// True when every bit is set.
    pub fn all(&self) -> bool {
        self.count_ones() == self.len
    }

    /// The 64 bits starting at bit `start`, first bit in the most significant position; bits
    /// past the end are zero.
    #[inline]
    pub fn extract(&self, start: usize) -> u64 {
        let w = start / 64;
        let s = start % 64;
        let a = self.words.get(w).copied().unwrap_or(0);
        if s == 0 {
            return a;
        }
        let b = self.words.get(w + 1).copied().unwrap_or(0);
        (a << s) | (b >> (64 - s))
    }

    /// Overwrite `n` bits (n <= 64) starting at `start` with the top `n` bits of `value`.
    #[inline]
    fn deposit(&mut self, start: usize, value: u64, n: usize) {
        if n == 0 {
            return;
        }
        let value = value & !mask_from(n);
        let w = start / 64;
        let s = start % 64;
        let m = !mask_from(n);
        self.words[w] = (self.words[w] & !(m >> s)) | (value >> s);
        if s + n > 64 {
            let spill = 64 - s;
            self.words[w + 1] = (self.words[w + 1] & !(m << spill)) | (value << spill);
        }
    }

    /// Copy `n` bits from `src` starting at `src_start` into this bitmap at `dst_start`.
    /// Both ranges are clipped to their bitmaps.
    pub fn copy_bits_from(
        &mut self,
        dst_start: usize,
        src: &SectorBitmap,
        src_start: usize,
        n: usize,
    ) {
        let n = n
            .min(self.len.saturating_sub(dst_start))
            .min(src.len.saturating_sub(src_start));
        let mut done = 0;
        while done < n {
            let k = (n - done).min(64);
            self.deposit(dst_start + done, src.extract(src_start + done), k);
            done += k;
        }
    }

    /// `self &= !other` over the common length.
    pub fn and_not(&mut self, other: &SectorBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    /// `self |= other` over the common length.
    pub fn or(&mut self, other: &SectorBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        self.trim();
    }

    /// `self &= other` over the common length; bits past `other`'s words are cleared.
    pub fn and(&mut self, other: &SectorBitmap) {
        for (i, a) in self.words.iter_mut().enumerate() {
            *a &= other.words.get(i).copied().unwrap_or(0);
        }
    }

    /// Index of the first bit at or after `from` whose value is `value`, or `len`.
    pub fn find(&self, from: usize, value: bool) -> usize {
        let mut i = from;
        while i < self.len {
            let w = i / 64;
            let mut word = self.words[w];
            if !value {
                word = !word;
            }
            word &= mask_from(i % 64);
            if word != 0 {
                return (w * 64 + word.leading_zeros() as usize).min(self.len);
            }
            i = (w + 1) * 64;
        }
        self.len
    }

    /// Runs of set bits, in order.
    pub fn runs(&self) -> Runs<'_> {
        self.runs_in(0..self.len, true)
    }

    /// Runs of bits equal to `value` inside `range`, in order.
    pub fn runs_in(&self, range: Range<usize>, value: bool) -> Runs<'_> {
        Runs {
            bitmap: self,
            pos: range.start.min(self.len),
            end: range.end.min(self.len),
            value,
        }
    }
}

/// Iterator over runs of equal bits (see [`SectorBitmap::runs`]).
#[derive(Debug)]
pub struct Runs<'a> {
    bitmap: &'a SectorBitmap,
    pos: usize,
    end: usize,
    value: bool,
}

impl Iterator for Runs<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        if self.pos >= self.end {
            return None;
        }
        let start = self.bitmap.find(self.pos, self.value);
        if start >= self.end {
            self.pos = self.end;
            return None;
        }
        let stop = self.bitmap.find(start, !self.value).min(self.end);
        self.pos = stop;
        Some(start..stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_runs(bits: &[bool], value: bool) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bits.len() {
            if bits[i] == value {
                let s = i;
                while i < bits.len() && bits[i] == value {
                    i += 1;
                }
                out.push(s..i);
            } else {
                i += 1;
            }
        }
        out
    }

    #[test]
    fn msb_first_on_disk() {
        let b = SectorBitmap::from_bytes(&[0x80, 0x01], 16);
        assert!(b.get(0));
        assert!(!b.get(1));
        assert!(b.get(15));
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![0..1, 15..16]);
        let mut out = [0u8; 2];
        b.write_bytes(&mut out);
        assert_eq!(out, [0x80, 0x01]);
    }

    #[test]
    fn partial_bytes_are_exact() {
        // 0b1010_0000: sectors 0 and 2, not 1 (the libvhdi pitfall of §3.2).
        let b = SectorBitmap::from_bytes(&[0xA0], 8);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![0..1, 2..3]);
    }

    #[test]
    fn bits_past_len_are_ignored() {
        let b = SectorBitmap::from_bytes(&[0xFF, 0xFF], 3);
        assert_eq!(b.count_ones(), 3);
        assert!(b.all());
    }

    proptest! {
        #[test]
        fn runs_match_naive(bits in proptest::collection::vec(any::<bool>(), 0..300), value: bool) {
            let mut b = SectorBitmap::new(bits.len());
            for (i, &x) in bits.iter().enumerate() {
                if x { b.set(i); }
            }
            prop_assert_eq!(b.runs_in(0..bits.len(), value).collect::<Vec<_>>(), naive_runs(&bits, value));
            let bytes = b.to_bytes_padded(0);
            prop_assert_eq!(SectorBitmap::from_bytes(&bytes, bits.len()), b.clone());
            prop_assert_eq!(b.count_ones(), bits.iter().filter(|&&x| x).count());
        }

        #[test]
        fn ranges_and_copies(len in 1usize..400, a in 0usize..400, n in 0usize..400,
                             src_len in 1usize..400, s in 0usize..400, d in 0usize..400, k in 0usize..400,
                             seed in any::<u64>()) {
            let mut b = SectorBitmap::new(len);
            b.set_range(a..a + n);
            for i in 0..len {
                prop_assert_eq!(b.get(i), i >= a && i < a + n);
            }
            let mut src = SectorBitmap::new(src_len);
            let mut x = seed;
            for i in 0..src_len {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if x >> 63 == 1 { src.set(i); }
            }
            let before = b.clone();
            b.copy_bits_from(d, &src, s, k);
            let kk = k.min(len.saturating_sub(d)).min(src_len.saturating_sub(s));
            for i in 0..len {
                let want = if i >= d && i < d + kk { src.get(s + i - d) } else { before.get(i) };
                prop_assert_eq!(b.get(i), want, "bit {}", i);
            }
            let mut c = b.clone();
            c.clear_range(a..a + n);
            for i in 0..len {
                prop_assert_eq!(c.get(i), b.get(i) && !(i >= a && i < a + n));
            }
        }
    }
}
