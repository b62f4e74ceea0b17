//! The 512-byte hard disk footer (§1).

use byteorder::{BigEndian, ByteOrder};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Size of the footer on disk.
pub const FOOTER_SIZE: usize = 512;
/// The footer cookie.
pub const COOKIE: [u8; 8] = *b"conectix";
/// The cookie blktap writes to disable a VHD on purpose (§7.19).
pub const POISON_COOKIE: [u8; 8] = *b"v_poison";
/// Offset of the checksum inside the footer.
pub const CHECKSUM_OFFSET: usize = 64;
/// The "reserved" feature bit that must be set (§1.1).
pub const FEATURE_RESERVED: u32 = 0x2;
/// The "temporary" feature bit.
pub const FEATURE_TEMPORARY: u32 = 0x1;
/// File Format Version 1.0.
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// Data Offset of a fixed disk: every writer sets all 64 bits.
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Creator Host OS "Wi2k" (Windows).
pub const HOST_OS_WINDOWS: u32 = 0x5769_326B;
/// Creator Host OS "Mac ".
pub const HOST_OS_MAC: u32 = 0x4D61_6320;

/// The Disk Type field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiskType {
    /// 2: data followed by the footer, no header or BAT.
    Fixed,
    /// 3: sparse, blocks allocated on demand; never-written sectors read as zero.
    Dynamic,
    /// 4: sparse, sectors not held here come from the parent.
    Differencing,
    /// Any other value (0 none, 1/5/6 deprecated, or garbage); kept so it round-trips.
    Other(u32),
}

#[cfg(feature = "serde")]
serialize_as_name!(DiskType);

impl DiskType {
    /// The on-disk value.
    pub fn to_u32(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
            DiskType::Other(v) => v,
        }
    }

    /// Decode the on-disk value.
    pub fn from_u32(v: u32) -> DiskType {
        match v {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            v => DiskType::Other(v),
        }
    }

    /// `fixed`, `dynamic`, `differencing`, or `unknown(N)`.
    pub fn name(self) -> String {
        match self {
            DiskType::Fixed => "fixed".into(),
            DiskType::Dynamic => "dynamic".into(),
            DiskType::Differencing => "differencing".into(),
            DiskType::Other(v) => format!("unknown({v})"),
        }
    }

    /// True for the two types that have a dynamic header and a BAT.
    pub fn is_sparse(self) -> bool {
        matches!(self, DiskType::Dynamic | DiskType::Differencing)
    }
}

/// Cylinders, heads and sectors per track (§1.4).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Geometry {
    /// The largest geometry the format can express, 65535/16/255; several tools write it
    /// to say "use Current Size" (§1.5).
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors_per_track: 255,
    };

    /// The spec's CHS algorithm for a disk of `size` bytes (§1.4, with `>=` on the first branch
    /// as VirtualBox, blktap and modern QEMU have it).
    pub fn for_size(size: u64) -> Geometry {
        let mut total = size / 512;
        if total > 65535 * 16 * 255 {
            total = 65535 * 16 * 255;
        }
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = total / spt;
        } else {
            let mut s = 17;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        // All three fit their fields: heads <= 16, spt <= 255, cylinders <= 65535 by the cap.
        Geometry {
            cylinders: (cth / heads).min(65535) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }

    /// Bytes addressed by this geometry: C x H x S x 512.
    pub fn size(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track) * 512
    }
}

/// The hard disk footer. Every field is kept, including the reserved bytes (blktap stores a
/// private flag at byte 85), so rewriting a footer never loses information (§1.1, §7.17).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Features (bit 0 temporary, bit 1 reserved and normally set).
    pub features: u32,
    /// File Format Version, normally 0x00010000.
    pub format_version: u32,
    /// Absolute offset of the dynamic header; all ones for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator Application, four bytes such as `win `, `vpc `, `qemu`, `tap\0`.
    pub creator_application: [u8; 4],
    /// Creator Version, major << 16 | minor.
    pub creator_version: u32,
    /// Creator Host OS (`Wi2k` or `Mac `).
    pub creator_host_os: u32,
    /// Original Size in bytes (informational).
    pub original_size: u64,
    /// Current Size in bytes: the virtual size (see `Vhd::virtual_size` for the CHS rule).
    pub current_size: u64,
    /// Disk geometry.
    pub geometry: Geometry,
    /// Disk Type.
    pub disk_type: DiskType,
    /// Checksum as stored in the file (serialising writes the correct one).
    pub checksum: u32,
    /// Unique Id, compared as raw bytes (§7.18).
    pub unique_id: Uuid,
    /// Saved State.
    pub saved_state: u8,
    /// Bytes 85..512, preserved verbatim.
    pub reserved: [u8; 427],
}

impl Footer {
    /// Decode a footer. Checks the cookie only; see [`Footer::checksum_ok`].
    ///
    /// A 511-byte footer (written by products older than Virtual PC 2004) is read by passing
    /// its 511 bytes followed by a zero byte (§1.2).
    pub fn parse(bytes: &[u8; FOOTER_SIZE]) -> Result<Footer> {
        if bytes[0..8] == POISON_COOKIE {
            return Err(Error::format(
                "footer cookie is \"v_poison\": blktap disabled this VHD on purpose",
            ));
        }
        if bytes[0..8] != COOKIE {
            return Err(Error::format(format!(
                "no VHD footer: cookie is {:?}, expected \"conectix\"",
                String::from_utf8_lossy(&bytes[0..8])
            )));
        }
        let mut reserved = [0u8; 427];
        reserved.copy_from_slice(&bytes[85..512]);
        let mut creator_application = [0u8; 4];
        creator_application.copy_from_slice(&bytes[28..32]);
        Ok(Footer {
            features: BigEndian::read_u32(&bytes[8..12]),
            format_version: BigEndian::read_u32(&bytes[12..16]),
            data_offset: BigEndian::read_u64(&bytes[16..24]),
            timestamp: BigEndian::read_u32(&bytes[24..28]),
            creator_application,
            creator_version: BigEndian::read_u32(&bytes[32..36]),
            creator_host_os: BigEndian::read_u32(&bytes[36..40]),
            original_size: BigEndian::read_u64(&bytes[40..48]),
            current_size: BigEndian::read_u64(&bytes[48..56]),
            geometry: Geometry {
                cylinders: BigEndian::read_u16(&bytes[56..58]),
                heads: bytes[58],
                sectors_per_track: bytes[59],
            },
            disk_type: DiskType::from_u32(BigEndian::read_u32(&bytes[60..64])),
            checksum: BigEndian::read_u32(&bytes[64..68]),
            unique_id: Uuid::from_slice(&bytes[68..84]).unwrap_or_default(),
            saved_state: bytes[84],
            reserved,
        })
    }

    fn write_fields(&self, b: &mut [u8; FOOTER_SIZE]) {
        b[0..8].copy_from_slice(&COOKIE);
        BigEndian::write_u32(&mut b[8..12], self.features);
        BigEndian::write_u32(&mut b[12..16], self.format_version);
        BigEndian::write_u64(&mut b[16..24], self.data_offset);
        BigEndian::write_u32(&mut b[24..28], self.timestamp);
        b[28..32].copy_from_slice(&self.creator_application);
        BigEndian::write_u32(&mut b[32..36], self.creator_version);
        BigEndian::write_u32(&mut b[36..40], self.creator_host_os);
        BigEndian::write_u64(&mut b[40..48], self.original_size);
        BigEndian::write_u64(&mut b[48..56], self.current_size);
        BigEndian::write_u16(&mut b[56..58], self.geometry.cylinders);
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors_per_track;
        BigEndian::write_u32(&mut b[60..64], self.disk_type.to_u32());
        b[68..84].copy_from_slice(self.unique_id.as_bytes());
        b[84] = self.saved_state;
        b[85..512].copy_from_slice(&self.reserved);
    }

    /// The checksum the footer's current contents should carry.
    pub fn computed_checksum(&self) -> u32 {
        let mut b = [0u8; FOOTER_SIZE];
        self.write_fields(&mut b);
        super::checksum(&b, CHECKSUM_OFFSET)
    }

    /// True when the stored checksum matches the contents.
    pub fn checksum_ok(&self) -> bool {
        self.checksum == self.computed_checksum()
    }

    /// Encode the footer with a correct checksum (the stored `checksum` field is ignored).
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        self.write_fields(&mut b);
        let sum = super::checksum(&b, CHECKSUM_OFFSET);
        BigEndian::write_u32(&mut b[64..68], sum);
        b
    }

    /// Set `checksum` to the value [`Footer::to_bytes`] writes.
    pub fn fix_checksum(&mut self) {
        self.checksum = self.computed_checksum();
    }

    /// Creator Application as text, NUL bytes shown as `\0` (e.g. `tap\0`).
    pub fn creator_application_str(&self) -> String {
        fourcc_str(self.creator_application)
    }

    /// Creator Version as `major.minor`.
    pub fn creator_version_str(&self) -> String {
        format!(
            "{}.{}",
            self.creator_version >> 16,
            self.creator_version & 0xFFFF
        )
    }

    /// Creator Host OS as text: `Wi2k`, `Mac `, or the hex value.
    pub fn creator_host_os_str(&self) -> String {
        match self.creator_host_os {
            HOST_OS_WINDOWS => "Wi2k".into(),
            HOST_OS_MAC => "Mac ".into(),
            0 => "none".into(),
            v => format!("{v:#010x}"),
        }
    }

    /// True when the footer's creator is one whose Current Size is the guest-visible size
    /// (the list QEMU uses, §1.5), or the geometry is the 65535/16/255 marker.
    pub fn current_size_is_authoritative(&self) -> bool {
        let c = &self.creator_application;
        matches!(
            c,
            b"win " | b"qem2" | b"d2v " | b"d2v\0" | b"CTXS" | b"tap\0"
        ) || self.geometry == Geometry::MAX
    }

    /// True for Virtual PC and Virtual Server, which expose the CHS size to the guest (§1.5).
    pub fn is_virtual_pc(&self) -> bool {
        matches!(&self.creator_application, b"vpc " | b"vs  ")
    }
}

/// Four bytes as text, NUL shown as `\0` and other control or non-ASCII bytes as `\xNN`.
pub fn fourcc_str(b: [u8; 4]) -> String {
    let mut s = String::new();
    for c in b {
        match c {
            0 => s.push_str("\\0"),
            0x20..=0x7e => s.push(char::from(c)),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer {
            features: FEATURE_RESERVED,
            format_version: FORMAT_VERSION,
            data_offset: 512,
            timestamp: 0x1234_5678,
            creator_application: *b"win ",
            creator_version: 0x000A_0000,
            creator_host_os: HOST_OS_WINDOWS,
            original_size: 64 << 20,
            current_size: 64 << 20,
            geometry: Geometry::for_size(64 << 20),
            disk_type: DiskType::Dynamic,
            checksum: 0,
            unique_id: Uuid::from_bytes([7; 16]),
            saved_state: 0,
            reserved: [0; 427],
        }
    }

    #[test]
    fn round_trip_and_checksum() {
        let f = sample();
        let b = f.to_bytes();
        let g = Footer::parse(&b).unwrap();
        assert!(g.checksum_ok());
        let mut f2 = f.clone();
        f2.fix_checksum();
        assert_eq!(g, f2);
    }

    #[test]
    fn bad_cookie_and_poison() {
        let mut b = sample().to_bytes();
        b[0] = b'x';
        assert!(
            Footer::parse(&b)
                .unwrap_err()
                .to_string()
                .contains("conectix")
        );
        b[0..8].copy_from_slice(b"v_poison");
        assert!(
            Footer::parse(&b)
                .unwrap_err()
                .to_string()
                .contains("blktap")
        );
    }

    #[test]
    fn chs_matches_known_values() {
        // 64 MiB (computed by hand with the spec algorithm).
        let g = Geometry::for_size(64 << 20);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (963, 8, 17));
        // 127 GiB Hyper-V disk from the qemu-iotests sample: CHS 65535/16/255 region.
        let g = Geometry::for_size(136_365_211_648);
        assert_eq!((g.heads, g.sectors_per_track), (16, 255));
        // Saturates at the format maximum.
        assert_eq!(Geometry::for_size(u64::MAX), Geometry::MAX);
        // qemu rounds 40 MiB up to 41953280 bytes, which is exactly its CHS size.
        assert_eq!(Geometry::for_size(41_953_280).size(), 41_953_280);
    }

    #[test]
    fn boundary_uses_ge_on_first_branch() {
        let g = Geometry::for_size(65535 * 16 * 63 * 512);
        assert_eq!(g.sectors_per_track, 255);
        let g = Geometry::for_size((65535 * 16 * 63 - 1) * 512);
        assert_ne!(g.sectors_per_track, 255);
    }
}
