//! The 1024-byte dynamic disk header and its parent locators (§2).

use byteorder::{BigEndian, ByteOrder};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Size of the dynamic header on disk.
pub const HEADER_SIZE: usize = 1024;
/// The header cookie.
pub const COOKIE: [u8; 8] = *b"cxsparse";
/// Offset of the checksum inside the header.
pub const CHECKSUM_OFFSET: usize = 36;
/// Header Version 1.0.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Header Data Offset: unused, all 64 bits set (§2.1).
pub const NO_NEXT: u64 = u64::MAX;
/// Number of parent locator entries.
pub const LOCATOR_COUNT: usize = 8;
/// Bytes of the Parent Unicode Name field.
pub const PARENT_NAME_BYTES: usize = 512;

/// A parent locator's Platform Code (§2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlatformCode {
    /// 0: unused entry.
    None,
    /// `Wi2r`: deprecated relative Windows path, 8-bit.
    Wi2r,
    /// `Wi2k`: deprecated absolute Windows path, 8-bit.
    Wi2k,
    /// `W2ru`: Windows path relative to the child, UTF-16LE.
    W2ru,
    /// `W2ku`: absolute Windows path, UTF-16LE.
    W2ku,
    /// `Mac `: Mac OS alias blob (opaque).
    Mac,
    /// `MacX`: file URL, UTF-8.
    MacX,
    /// Anything else, kept so it round-trips.
    Other(u32),
}

impl PlatformCode {
    /// The on-disk value.
    pub fn to_u32(self) -> u32 {
        match self {
            PlatformCode::None => 0,
            PlatformCode::Wi2r => 0x5769_3272,
            PlatformCode::Wi2k => 0x5769_326B,
            PlatformCode::W2ru => 0x5732_7275,
            PlatformCode::W2ku => 0x5732_6B75,
            PlatformCode::Mac => 0x4D61_6320,
            PlatformCode::MacX => 0x4D61_6358,
            PlatformCode::Other(v) => v,
        }
    }

    /// Decode the on-disk value.
    pub fn from_u32(v: u32) -> PlatformCode {
        [
            PlatformCode::None,
            PlatformCode::Wi2r,
            PlatformCode::Wi2k,
            PlatformCode::W2ru,
            PlatformCode::W2ku,
            PlatformCode::Mac,
            PlatformCode::MacX,
        ]
        .into_iter()
        .find(|c| c.to_u32() == v)
        .unwrap_or(PlatformCode::Other(v))
    }

    /// The four-character code, e.g. `W2ru`.
    pub fn name(self) -> String {
        match self {
            PlatformCode::None => "none".into(),
            c => super::footer::fourcc_str(c.to_u32().to_be_bytes()),
        }
    }

    /// Decode a locator payload to a path or URL, lossily: UTF-16LE for `W2ru`/`W2ku`, UTF-8
    /// for `MacX`, 8-bit for the deprecated `Wi2r`/`Wi2k` (§2.2). `None` for `Mac ` aliases and
    /// unknown codes. Trailing NULs are dropped.
    pub fn decode_payload(self, data: &[u8]) -> Option<String> {
        let s = match self {
            PlatformCode::W2ru | PlatformCode::W2ku => {
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&units)
            }
            PlatformCode::MacX => String::from_utf8_lossy(data).into_owned(),
            // 8-bit paths from old Windows: Latin-1 is the lossless reading of any byte.
            PlatformCode::Wi2r | PlatformCode::Wi2k => {
                data.iter().map(|&b| char::from(b)).collect()
            }
            _ => return None,
        };
        Some(s.trim_end_matches('\0').to_string())
    }

    /// Encode a path for this platform code (the inverse of [`PlatformCode::decode_payload`]).
    pub fn encode_payload(self, path: &str) -> Vec<u8> {
        match self {
            PlatformCode::W2ru | PlatformCode::W2ku => {
                path.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
            }
            PlatformCode::Wi2r | PlatformCode::Wi2k => path
                .chars()
                .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
                .collect(),
            _ => path.as_bytes().to_vec(),
        }
    }
}

/// One of the eight parent locator entries (§2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParentLocator {
    /// Platform Code.
    pub platform_code: PlatformCode,
    /// Platform Data Space as stored: sectors per the spec, bytes in Microsoft's files.
    pub data_space: u32,
    /// Platform Data Length: bytes of locator data.
    pub data_length: u32,
    /// Reserved field, preserved.
    pub reserved: u32,
    /// Absolute byte offset of the locator data.
    pub data_offset: u64,
}

impl ParentLocator {
    /// An unused entry.
    pub const EMPTY: ParentLocator = ParentLocator {
        platform_code: PlatformCode::None,
        data_space: 0,
        data_length: 0,
        reserved: 0,
        data_offset: 0,
    };

    /// True when the entry is unused.
    pub fn is_empty(&self) -> bool {
        self.platform_code == PlatformCode::None
    }

    /// Data Space in bytes with blktap's rule: below 512 it counts sectors, a multiple of 512
    /// counts bytes, anything else is not interpretable (`None`) (§2.2).
    pub fn data_space_bytes(&self) -> Option<u64> {
        let v = u64::from(self.data_space);
        if v < 512 {
            Some(v * 512)
        } else if v % 512 == 0 {
            Some(v)
        } else {
            None
        }
    }

    /// Bytes of the file this locator claims: the larger of Data Length and the interpreted
    /// Data Space. Used to keep new blocks clear of locator data (§4.1).
    pub fn extent_len(&self) -> u64 {
        let len = u64::from(self.data_length);
        self.data_space_bytes().map_or(len, |s| s.max(len))
    }
}

/// The dynamic disk header (§2.1). Every field is kept, reserved ones included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Data Offset: unused, normally all ones.
    pub data_offset: u64,
    /// Table Offset: absolute byte offset of the BAT.
    pub table_offset: u64,
    /// Header Version.
    pub header_version: u32,
    /// Max Table Entries.
    pub max_table_entries: u32,
    /// Block Size in bytes (data only, without the bitmap).
    pub block_size: u32,
    /// Checksum as stored (serialising writes the correct one).
    pub checksum: u32,
    /// Parent Unique Id (differencing disks).
    pub parent_unique_id: Uuid,
    /// Parent Time Stamp, seconds since 2000-01-01 UTC.
    pub parent_timestamp: u32,
    /// Reserved field at offset 60, preserved.
    pub reserved1: u32,
    /// Parent Unicode Name, raw UTF-16BE bytes (see [`DynamicHeader::parent_name`]).
    pub parent_name_raw: [u8; PARENT_NAME_BYTES],
    /// The eight parent locator entries.
    pub locators: [ParentLocator; LOCATOR_COUNT],
    /// Reserved bytes 768..1024, preserved.
    pub reserved2: [u8; 256],
}

impl DynamicHeader {
    /// Decode a header. Checks the cookie only; see [`DynamicHeader::checksum_ok`].
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Result<DynamicHeader> {
        if b[0..8] != COOKIE {
            return Err(Error::format(format!(
                "no dynamic header: cookie is {:?}, expected \"cxsparse\"",
                String::from_utf8_lossy(&b[0..8])
            )));
        }
        let mut parent_name_raw = [0u8; PARENT_NAME_BYTES];
        parent_name_raw.copy_from_slice(&b[64..576]);
        let mut locators = [ParentLocator::EMPTY; LOCATOR_COUNT];
        for (i, loc) in locators.iter_mut().enumerate() {
            let e = &b[576 + 24 * i..576 + 24 * (i + 1)];
            *loc = ParentLocator {
                platform_code: PlatformCode::from_u32(BigEndian::read_u32(&e[0..4])),
                data_space: BigEndian::read_u32(&e[4..8]),
                data_length: BigEndian::read_u32(&e[8..12]),
                reserved: BigEndian::read_u32(&e[12..16]),
                data_offset: BigEndian::read_u64(&e[16..24]),
            };
        }
        let mut reserved2 = [0u8; 256];
        reserved2.copy_from_slice(&b[768..1024]);
        Ok(DynamicHeader {
            data_offset: BigEndian::read_u64(&b[8..16]),
            table_offset: BigEndian::read_u64(&b[16..24]),
            header_version: BigEndian::read_u32(&b[24..28]),
            max_table_entries: BigEndian::read_u32(&b[28..32]),
            block_size: BigEndian::read_u32(&b[32..36]),
            checksum: BigEndian::read_u32(&b[36..40]),
            parent_unique_id: Uuid::from_slice(&b[40..56]).unwrap_or_default(),
            parent_timestamp: BigEndian::read_u32(&b[56..60]),
            reserved1: BigEndian::read_u32(&b[60..64]),
            parent_name_raw,
            locators,
            reserved2,
        })
    }

    fn write_fields(&self, b: &mut [u8; HEADER_SIZE]) {
        b[0..8].copy_from_slice(&COOKIE);
        BigEndian::write_u64(&mut b[8..16], self.data_offset);
        BigEndian::write_u64(&mut b[16..24], self.table_offset);
        BigEndian::write_u32(&mut b[24..28], self.header_version);
        BigEndian::write_u32(&mut b[28..32], self.max_table_entries);
        BigEndian::write_u32(&mut b[32..36], self.block_size);
        b[40..56].copy_from_slice(self.parent_unique_id.as_bytes());
        BigEndian::write_u32(&mut b[56..60], self.parent_timestamp);
        BigEndian::write_u32(&mut b[60..64], self.reserved1);
        b[64..576].copy_from_slice(&self.parent_name_raw);
        for (i, loc) in self.locators.iter().enumerate() {
            let e = &mut b[576 + 24 * i..576 + 24 * (i + 1)];
            BigEndian::write_u32(&mut e[0..4], loc.platform_code.to_u32());
            BigEndian::write_u32(&mut e[4..8], loc.data_space);
            BigEndian::write_u32(&mut e[8..12], loc.data_length);
            BigEndian::write_u32(&mut e[12..16], loc.reserved);
            BigEndian::write_u64(&mut e[16..24], loc.data_offset);
        }
        b[768..1024].copy_from_slice(&self.reserved2);
    }

    /// The checksum the header's current contents should carry.
    pub fn computed_checksum(&self) -> u32 {
        let mut b = [0u8; HEADER_SIZE];
        self.write_fields(&mut b);
        super::checksum(&b, CHECKSUM_OFFSET)
    }

    /// True when the stored checksum matches the contents.
    pub fn checksum_ok(&self) -> bool {
        self.checksum == self.computed_checksum()
    }

    /// Set `checksum` to the value [`DynamicHeader::to_bytes`] writes.
    pub fn fix_checksum(&mut self) {
        self.checksum = self.computed_checksum();
    }

    /// Encode the header with a correct checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        self.write_fields(&mut b);
        let sum = super::checksum(&b, CHECKSUM_OFFSET);
        BigEndian::write_u32(&mut b[36..40], sum);
        b
    }

    /// The Parent Unicode Name: UTF-16BE up to the first NUL, decoded lossily (unpaired
    /// surrogates occur in real files, §2.1).
    pub fn parent_name(&self) -> String {
        let units: Vec<u16> = self
            .parent_name_raw
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }

    /// Store `name` as the Parent Unicode Name (UTF-16BE, NUL padded). Fails if it does not fit
    /// in 255 UTF-16 units plus the terminator.
    pub fn set_parent_name(&mut self, name: &str) -> Result<()> {
        let units: Vec<u16> = name.encode_utf16().collect();
        if units.len() >= PARENT_NAME_BYTES / 2 {
            return Err(Error::InvalidParameter(format!(
                "parent name {name:?} is {} UTF-16 units; the header holds at most 255",
                units.len()
            )));
        }
        self.parent_name_raw = [0; PARENT_NAME_BYTES];
        for (i, u) in units.iter().enumerate() {
            self.parent_name_raw[2 * i..2 * i + 2].copy_from_slice(&u.to_be_bytes());
        }
        Ok(())
    }

    /// Bytes of sector bitmap in front of each block: one bit per sector, padded to a whole
    /// sector (§3.2).
    pub fn bitmap_bytes(&self) -> u64 {
        bitmap_bytes_for(self.block_size)
    }

    /// Sectors per block.
    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size) / 512
    }
}

/// Padded sector-bitmap size for a block size (§3.2).
pub fn bitmap_bytes_for(block_size: u32) -> u64 {
    let spb = u64::from(block_size) / 512;
    spb.div_ceil(8).div_ceil(512).max(1) * 512
}

#[cfg(feature = "serde")]
serialize_as_name!(PlatformCode);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_codes_round_trip() {
        for v in [
            0,
            0x5769_3272,
            0x5769_326B,
            0x5732_7275,
            0x5732_6B75,
            0x4D61_6320,
            0x4D61_6358,
            77,
        ] {
            assert_eq!(PlatformCode::from_u32(v).to_u32(), v);
        }
        assert_eq!(PlatformCode::W2ru.name(), "W2ru");
        assert_eq!(PlatformCode::Mac.name(), "Mac ");
    }

    #[test]
    fn payloads() {
        let p = PlatformCode::W2ku.encode_payload("C:\\dir\\p.vhd");
        assert_eq!(p[0..2], [b'C', 0]);
        assert_eq!(
            PlatformCode::W2ku.decode_payload(&p).unwrap(),
            "C:\\dir\\p.vhd"
        );
        assert_eq!(
            PlatformCode::MacX
                .decode_payload(b"file://localhost/a/b.vhd\0")
                .unwrap(),
            "file://localhost/a/b.vhd"
        );
        assert_eq!(
            PlatformCode::Wi2k.decode_payload(b"C:\\\xe9.vhd").unwrap(),
            "C:\\\u{e9}.vhd"
        );
        assert_eq!(PlatformCode::Mac.decode_payload(b"xx"), None);
        // An odd trailing byte and an unpaired surrogate do not fail.
        let s = PlatformCode::W2ru
            .decode_payload(&[0x00, 0xD8, 0x41])
            .unwrap();
        assert_eq!(s, "\u{FFFD}");
    }

    #[test]
    fn data_space_units() {
        let mut l = ParentLocator::EMPTY;
        l.data_space = 1; // sectors
        assert_eq!(l.data_space_bytes(), Some(512));
        l.data_space = 4096; // bytes
        assert_eq!(l.data_space_bytes(), Some(4096));
        l.data_space = 1000; // neither
        assert_eq!(l.data_space_bytes(), None);
        l.data_length = 700;
        assert_eq!(l.extent_len(), 700);
    }

    #[test]
    fn bitmap_sizes() {
        assert_eq!(bitmap_bytes_for(512 * 1024), 512);
        assert_eq!(bitmap_bytes_for(2 << 20), 512);
        assert_eq!(bitmap_bytes_for(8 << 20), 2048);
        assert_eq!(bitmap_bytes_for(512), 512);
    }
}
