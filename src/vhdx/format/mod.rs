//! VHDX structures, sans I/O ([MS-VHDX] section 2).
//!
//! - [`header`]: the file type identifier and the two headers (2.2.1, 2.2.2), and the choice
//!   of the current header.
//! - [`region`]: the region table (2.2.3) and its known regions.
//! - [`metadata`]: the metadata table and its known items (2.6), the parent locator (2.6.2.6).
//! - [`bat`]: BAT entries, block states and the chunk index math (2.5).
//! - [`log`]: log entries, the active sequence and its replay plan, and the entry writer (2.3).
//!
//! All integers are little-endian; GUIDs are in the Microsoft mixed-endian layout
//! ([`uuid::Uuid::from_bytes_le`]).

pub mod bat;
pub mod header;
pub mod log;
pub mod metadata;
pub mod region;

use uuid::Uuid;

/// One MiB: the alignment of every object after the header section ([MS-VHDX] 2.1).
pub const MIB: u64 = 1 << 20;
/// 64 KiB: the size of each slot of the header section ([MS-VHDX] 2.2).
pub const SLOT_SIZE: usize = 64 * 1024;
/// Offset of the first header ([MS-VHDX] 2.2).
pub const HEADER1_OFFSET: u64 = 64 * 1024;
/// Offset of the second header.
pub const HEADER2_OFFSET: u64 = 128 * 1024;
/// Offset of the first region table.
pub const REGION_TABLE1_OFFSET: u64 = 192 * 1024;
/// Offset of the second region table.
pub const REGION_TABLE2_OFFSET: u64 = 256 * 1024;

/// `N` bytes at `off`, or zeros when `b` is too short (callers check lengths first; this only
/// keeps a wrong length from panicking).
fn bytes_at<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    b.get(off..off + N)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(bytes_at(b, off))
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes_at(b, off))
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes_at(b, off))
}

pub(crate) fn guid_at(b: &[u8], off: usize) -> Uuid {
    Uuid::from_bytes_le(bytes_at(b, off))
}

/// Copy `src` into `b` at `off` (the buffers are built by this module at their full size).
pub(crate) fn put(b: &mut [u8], off: usize, src: &[u8]) {
    if let Some(dst) = b.get_mut(off..off + src.len()) {
        dst.copy_from_slice(src);
    }
}

pub(crate) fn put_guid(b: &mut [u8], off: usize, g: &Uuid) {
    put(b, off, &g.to_bytes_le());
}

/// CRC-32C of `bytes` with the 4-byte checksum field at `field` taken as zero
/// ([MS-VHDX] 2.2.2: "computed over the entire ... with the Checksum field set to zero").
pub fn crc32c_zeroed(bytes: &[u8], field: usize) -> u32 {
    let head = bytes.get(..field).unwrap_or(bytes);
    let tail = bytes.get(field + 4..).unwrap_or(&[]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(head), &[0; 4]);
    crc32c::crc32c_append(crc, tail)
}

/// Store the CRC-32C of `bytes` (field zeroed first) into its checksum field at `field`.
pub(crate) fn seal(bytes: &mut [u8], field: usize) {
    put(bytes, field, &[0; 4]);
    let crc = crc32c::crc32c(bytes);
    put(bytes, field, &crc.to_le_bytes());
}

/// Verify the stored checksum at `field` against the computed one.
pub(crate) fn check_crc(
    bytes: &[u8],
    field: usize,
    structure: &'static str,
    offset: u64,
) -> crate::Result<()> {
    let stored = u32_at(bytes, field);
    let computed = crc32c_zeroed(bytes, field);
    if stored == computed {
        Ok(())
    } else {
        Err(crate::error::Error::Checksum {
            path: None,
            structure,
            offset,
            stored,
            computed,
        })
    }
}

/// `Err(Format)` with `detail` unless `ok`.
pub(crate) fn ensure(ok: bool, detail: impl FnOnce() -> String) -> crate::Result<()> {
    if ok {
        Ok(())
    } else {
        Err(crate::error::Error::format(detail()))
    }
}

/// Decode UTF-16LE bytes (even length) to a String; `what` names the field in errors.
pub(crate) fn utf16le(b: &[u8], what: &str) -> crate::Result<String> {
    ensure(b.len().is_multiple_of(2), || {
        format!("{what}: odd UTF-16 length {}", b.len())
    })?;
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units)
        .map_err(|_| crate::error::Error::format(format!("{what}: invalid UTF-16")))
}

/// Encode a string as UTF-16LE bytes.
pub(crate) fn to_utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}
