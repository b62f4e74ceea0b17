//! The Block Allocation Table (§3.1).

use byteorder::{BigEndian, ByteOrder};

use crate::error::{Error, Result};

/// A BAT entry meaning "block not allocated".
pub const UNUSED: u32 = 0xFFFF_FFFF;

/// The BAT: one big-endian u32 per block, the absolute sector of the block's bitmap.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Bat {
    /// The entries, [`UNUSED`] for unallocated blocks.
    pub entries: Vec<u32>,
}

/// Bytes the table occupies on disk for `entries` entries: padded to a sector (§3.1).
pub fn table_bytes(entries: u32) -> u64 {
    (u64::from(entries) * 4).div_ceil(512) * 512
}

impl Bat {
    /// A table of `entries` unallocated entries.
    pub fn new_unallocated(entries: u32) -> Bat {
        Bat {
            entries: vec![UNUSED; entries as usize],
        }
    }

    /// Decode `entries` entries from `bytes`. The caller has already checked `entries` against
    /// the file length; this only checks that `bytes` holds them.
    pub fn parse(bytes: &[u8], entries: u32) -> Result<Bat> {
        let need = entries as usize * 4;
        if bytes.len() < need {
            return Err(Error::format(format!(
                "BAT truncated: {} bytes for {entries} entries, need {need}",
                bytes.len()
            )));
        }
        Ok(Bat {
            entries: bytes[..need]
                .chunks_exact(4)
                .map(BigEndian::read_u32)
                .collect(),
        })
    }

    /// Encode the table padded to a sector with 0xFF, as Windows, QEMU and blktap write it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        let mut out = vec![0xFF; table_bytes(n) as usize];
        for (i, e) in self.entries.iter().enumerate() {
            BigEndian::write_u32(&mut out[4 * i..4 * i + 4], *e);
        }
        out
    }

    /// The byte offset of block `index`'s bitmap, or `None` when unallocated or out of range.
    pub fn block_offset(&self, index: u64) -> Option<u64> {
        let e = *self.entries.get(usize::try_from(index).ok()?)?;
        (e != UNUSED).then_some(u64::from(e) * 512)
    }

    /// Number of allocated entries.
    pub fn allocated(&self) -> usize {
        self.entries.iter().filter(|&&e| e != UNUSED).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let bat = Bat {
            entries: vec![3, UNUSED, 0x1000],
        };
        let b = bat.to_bytes();
        assert_eq!(b.len(), 512);
        assert!(b[12..].iter().all(|&x| x == 0xFF));
        assert_eq!(Bat::parse(&b, 3).unwrap(), bat);
        assert_eq!(bat.block_offset(0), Some(1536));
        assert_eq!(bat.block_offset(1), None);
        assert_eq!(bat.block_offset(99), None);
        assert_eq!(bat.allocated(), 2);
        assert!(Bat::parse(&b[..8], 3).is_err());
    }

    #[test]
    fn table_sizes() {
        assert_eq!(table_bytes(0), 0);
        assert_eq!(table_bytes(1), 512);
        assert_eq!(table_bytes(128), 512);
        assert_eq!(table_bytes(129), 1024);
        assert_eq!(
            table_bytes(u32::MAX),
            (u64::from(u32::MAX) * 4).div_ceil(512) * 512
        );
    }
}
