//! The VHD on-disk structures, sans I/O: bytes in, structs out, structs to bytes.
//!
//! Nothing here opens a file or allocates from a size read out of one without a bound
//! supplied by the caller. Section numbers in comments refer to `docs/vhd-format.md` in the repository
//! (the project's notes on the Microsoft VHD specification v1.0 and on how real tools
//! write the format).

pub mod bat;
pub mod batmap;
pub mod footer;
pub mod header;

/// The sector bitmap, shared by every format: [`crate::bitmap`] (its former path, kept).
pub use crate::bitmap::{self, SectorBitmap};
pub use bat::Bat;
pub use batmap::Batmap;
pub use footer::{DiskType, Footer, Geometry};
pub use header::{DynamicHeader, ParentLocator, PlatformCode};

/// Bytes per sector: always 512 in VHD v1.
pub const SECTOR_SIZE: u64 = 512;

/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH_OFFSET: u64 = 946_684_800;

/// Largest virtual size of a dynamic or differencing disk: 0xFF000000 sectors (2040 GiB),
/// the limit of Windows and QEMU (§1.6).
pub const MAX_DYNAMIC_SIZE: u64 = 0xFF00_0000 * SECTOR_SIZE;

/// The one's-complement byte-sum checksum of the footer and the dynamic header (§1.3),
/// with the four checksum bytes at `checksum_at` counted as zero.
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, b) in bytes.iter().enumerate() {
        if i < checksum_at || i >= checksum_at + 4 {
            sum = sum.wrapping_add(u32::from(*b));
        }
    }
    !sum
}

/// Round `value` up to a multiple of `align` (a power of two), or `None` on overflow.
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(value.checked_add(align - 1)? & !(align - 1))
}

/// Convert a Unix time (seconds) to a VHD time stamp, saturating at the format's range.
pub fn vhd_timestamp_from_unix(unix_secs: u64) -> u32 {
    let secs = unix_secs.saturating_sub(VHD_EPOCH_OFFSET);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Convert a VHD time stamp to Unix seconds.
pub fn unix_from_vhd_timestamp(ts: u32) -> u64 {
    u64::from(ts) + VHD_EPOCH_OFFSET
}

/// A VHD time stamp as `YYYY-MM-DDTHH:MM:SSZ` (UTC, proleptic Gregorian calendar).
pub fn vhd_time_utc(ts: u32) -> String {
    let unix = unix_from_vhd_timestamp(ts);
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil_from_days, for days after 1970-01-01 (all a VHD time stamp holds).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_strings() {
        // The VHD epoch.
        assert_eq!(vhd_time_utc(0), "2000-01-01T00:00:00Z");
        // A leap day, and the last second a u32 VHD time stamp can express.
        assert_eq!(vhd_time_utc(86_400 * 59 + 3661), "2000-02-29T01:01:01Z");
        assert_eq!(vhd_time_utc(u32::MAX), "2136-02-07T06:28:15Z");
        assert_eq!(
            vhd_time_utc(vhd_timestamp_from_unix(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
    }

    #[test]
    fn checksum_skips_its_own_field() {
        let mut a = [0u8; 16];
        a[0] = 1;
        a[4] = 0xAA; // inside the checksum field at 4..8
        assert_eq!(checksum(&a, 4), !1u32);
        assert_eq!(checksum(&[0u8; 8], 0), !0u32);
    }

    #[test]
    fn align() {
        assert_eq!(align_up(0, 512), Some(0));
        assert_eq!(align_up(1, 512), Some(512));
        assert_eq!(align_up(512, 512), Some(512));
        assert_eq!(align_up(u64::MAX, 512), None);
    }

    #[test]
    fn timestamps() {
        assert_eq!(vhd_timestamp_from_unix(VHD_EPOCH_OFFSET + 5), 5);
        assert_eq!(vhd_timestamp_from_unix(3), 0);
        assert_eq!(unix_from_vhd_timestamp(5), VHD_EPOCH_OFFSET + 5);
    }
}
