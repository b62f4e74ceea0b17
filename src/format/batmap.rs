//! blktap's batmap (§3.3): a `tdbatmap` header after the padded BAT of files written by
//! Xen's blktap, with one bit per block set when every sector of the block is present.

use super::{SECTOR_SIZE, bat};

/// The blktap batmap (§3.3): one bit per block, set when every sector of the block is present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batmap {
    /// Offset of the `tdbatmap` header.
    pub header_offset: u64,
    /// Offset of the map.
    pub map_offset: u64,
    /// Sectors of map.
    pub map_sectors: u32,
    /// Batmap version (major << 16 | minor).
    pub version: u32,
    /// Checksum stored in the header.
    pub checksum: u32,
}

/// Cookie of blktap's batmap header.
pub const BATMAP_COOKIE: [u8; 8] = *b"tdbatmap";

/// Bytes of the header [`Batmap::parse`] reads: cookie (8), map offset (8), map sectors (4),
/// version (4), checksum (4) and a marker byte.
pub const BATMAP_HEADER_BYTES: usize = 29;

/// Where blktap puts the header: the first sector after the BAT, padded to a sector, of a
/// table of `max_table_entries` entries at `table_offset`.
pub fn header_offset(table_offset: u64, max_table_entries: u32) -> u64 {
    table_offset + bat::table_bytes(max_table_entries)
}

impl Batmap {
    /// Parse the header read at `header_offset` (at least [`BATMAP_HEADER_BYTES`] bytes):
    /// `None` when it does not start with [`BATMAP_COOKIE`] (or is too short).
    pub fn parse(bytes: &[u8], header_offset: u64) -> Option<Batmap> {
        let b = bytes.get(..BATMAP_HEADER_BYTES)?;
        if b[0..8] != BATMAP_COOKIE {
            return None;
        }
        let be = |s: &[u8]| s.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x));
        Some(Batmap {
            header_offset,
            map_offset: be(&b[8..16]),
            map_sectors: be(&b[16..20]) as u32,
            version: be(&b[20..24]) as u32,
            checksum: be(&b[24..28]) as u32,
        })
    }

    /// Whether the map is usable: sector aligned, clear of its header, inside a file of
    /// `file_len` bytes, and with a bit for each of `blocks` blocks.
    pub fn fits(&self, blocks: u32, file_len: u64) -> bool {
        let at = self.header_offset;
        let map_end = self.map_offset.checked_add(self.map_bytes());
        let over_header =
            self.map_offset < at.saturating_add(SECTOR_SIZE) && map_end.is_none_or(|e| e > at);
        self.map_offset.is_multiple_of(SECTOR_SIZE)
            && !over_header
            && map_end.is_some_and(|e| e <= file_len)
            && self.map_bytes() >= u64::from(blocks).div_ceil(8)
    }

    /// Bytes of map.
    pub fn map_bytes(&self) -> u64 {
        u64::from(self.map_sectors) * SECTOR_SIZE
    }

    /// The checksum blktap computes over `map` (one's complement of the byte sum; version 1.1
    /// summed signed chars, §3.3).
    pub fn computed_checksum(&self, map: &[u8]) -> u32 {
        let signed = self.version == 0x0001_0001;
        let sum = map.iter().fold(0u32, |s, &b| {
            let v = if signed {
                i32::from(b as i8) as u32
            } else {
                u32::from(b)
            };
            s.wrapping_add(v)
        });
        !sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(map_offset: u64, map_sectors: u32) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..8].copy_from_slice(&BATMAP_COOKIE);
        b[8..16].copy_from_slice(&map_offset.to_be_bytes());
        b[16..20].copy_from_slice(&map_sectors.to_be_bytes());
        b[20..24].copy_from_slice(&0x0001_0002u32.to_be_bytes());
        b[24..28].copy_from_slice(&0xDEAD_BEEFu32.to_be_bytes());
        b
    }

    #[test]
    fn parse_and_placement() {
        let at = header_offset(1536, 100);
        assert_eq!(at, 1536 + 512);
        let bm = Batmap::parse(&header(at + 512, 1), at).unwrap();
        assert_eq!(
            bm,
            Batmap {
                header_offset: at,
                map_offset: at + 512,
                map_sectors: 1,
                version: 0x0001_0002,
                checksum: 0xDEAD_BEEF,
            }
        );
        assert!(bm.fits(100, at + 1024));
        assert!(bm.fits(4096, at + 1024), "one sector holds 4096 bits");
        assert!(!bm.fits(4097, at + 1024), "too small");
        assert!(!bm.fits(100, at + 1023), "past the end of the file");
        let over = Batmap::parse(&header(at, 1), at).unwrap();
        assert!(!over.fits(100, at + 1024), "over its own header");
        let odd = Batmap::parse(&header(at + 513, 1), at).unwrap();
        assert!(!odd.fits(100, at + 2048), "not sector aligned");
        let huge = Batmap::parse(&header(u64::MAX - 511, 1), at).unwrap();
        assert!(!huge.fits(100, u64::MAX), "map end overflows");
        let mut no_cookie = header(at + 512, 1);
        no_cookie[0] = b'x';
        assert_eq!(Batmap::parse(&no_cookie, at), None);
        assert_eq!(Batmap::parse(&header(at + 512, 1)[..28], at), None);
    }
}
