//! File type identifier ([MS-VHDX] 2.2.1) and headers (2.2.2).

use uuid::Uuid;

use super::{
    MIB, SLOT_SIZE, check_crc, ensure, guid_at, put, put_guid, seal, u16_at, u32_at, u64_at,
};
use crate::Result;

/// Signature of the file type identifier.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Signature of a header.
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Bytes of a header covered by its checksum ([MS-VHDX] 2.2.2).
pub const HEADER_SIZE: usize = 4096;
const CREATOR_BYTES: usize = 512;

/// The file type identifier at offset 0 ([MS-VHDX] 2.2.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileIdentifier {
    /// The creator string (diagnostic only; never acted upon).
    pub creator: String,
}

impl FileIdentifier {
    /// Parse the first bytes of a file (at least 520).
    pub fn parse(b: &[u8]) -> Result<FileIdentifier> {
        ensure(b.len() >= 8 + CREATOR_BYTES, || {
            "VHDX file identifier: file too short".into()
        })?;
        ensure(&b[..8] == FILE_SIGNATURE, || {
            "not a VHDX file: no 'vhdxfile' signature at offset 0".into()
        })?;
        let units: Vec<u16> = b[8..8 + CREATOR_BYTES]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        Ok(FileIdentifier {
            creator: String::from_utf16_lossy(&units),
        })
    }

    /// The 64 KiB slot; a creator longer than 255 UTF-16 units is cut (it stays NUL-terminated).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0; SLOT_SIZE];
        put(&mut b, 0, FILE_SIGNATURE);
        let units: Vec<u8> = self
            .creator
            .encode_utf16()
            .take(CREATOR_BYTES / 2 - 1)
            .flat_map(u16::to_le_bytes)
            .collect();
        put(&mut b, 8, &units);
        b
    }
}

/// One of the two headers ([MS-VHDX] 2.2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Higher is newer; the current header is the valid one with the higher number.
    pub sequence_number: u64,
    /// Regenerated before the first write of any kind in a session.
    pub file_write_guid: Uuid,
    /// Regenerated before the first guest-visible write; a child's `parent_linkage`.
    pub data_write_guid: Uuid,
    /// Non-zero: the log may hold entries with this GUID that must be replayed.
    pub log_guid: Uuid,
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Length of the log in bytes (a multiple of 1 MiB).
    pub log_length: u32,
    /// Offset of the log in the file (a multiple of 1 MiB, at least 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Parse and validate a header slot (at least its first 4 KiB); `offset` (its place in the
    /// file) is for messages. Checks signature, CRC-32C, versions and the log location.
    pub fn parse(b: &[u8], offset: u64) -> Result<Header> {
        ensure(b.len() >= HEADER_SIZE, || {
            format!("VHDX header at {offset}: shorter than 4 KiB")
        })?;
        let b = &b[..HEADER_SIZE];
        ensure(&b[..4] == HEADER_SIGNATURE, || {
            format!("VHDX header at {offset}: no 'head' signature")
        })?;
        check_crc(b, 4, "VHDX header", offset)?;
        let h = Header {
            sequence_number: u64_at(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: u16_at(b, 64),
            version: u16_at(b, 66),
            log_length: u32_at(b, 68),
            log_offset: u64_at(b, 72),
        };
        h.validate(offset)?;
        Ok(h)
    }

    /// The version and log-location rules of [MS-VHDX] 2.2.2.
    pub fn validate(&self, offset: u64) -> Result<()> {
        ensure(self.version == 1, || {
            format!(
                "VHDX header at {offset}: version {} (expected 1)",
                self.version
            )
        })?;
        ensure(self.log_version == 0, || {
            format!(
                "VHDX header at {offset}: log version {} (expected 0)",
                self.log_version
            )
        })?;
        ensure(
            self.log_length > 0 && u64::from(self.log_length) % MIB == 0,
            || {
                format!(
                    "VHDX header at {offset}: log length {} is not a non-zero multiple of 1 MiB",
                    self.log_length
                )
            },
        )?;
        ensure(
            self.log_offset >= MIB && self.log_offset.is_multiple_of(MIB),
            || {
                format!(
                    "VHDX header at {offset}: log offset {} is not a multiple of 1 MiB at or after 1 MiB",
                    self.log_offset
                )
            },
        )
    }

    /// The byte range of the log in the file.
    pub fn log_range(&self) -> std::ops::Range<u64> {
        self.log_offset..self.log_offset.saturating_add(self.log_length.into())
    }

    /// The 4 KiB header with its checksum (the rest of the 64 KiB slot is reserved, zero).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0; HEADER_SIZE];
        put(&mut b, 0, HEADER_SIGNATURE);
        put(&mut b, 8, &self.sequence_number.to_le_bytes());
        put_guid(&mut b, 16, &self.file_write_guid);
        put_guid(&mut b, 32, &self.data_write_guid);
        put_guid(&mut b, 48, &self.log_guid);
        put(&mut b, 64, &self.log_version.to_le_bytes());
        put(&mut b, 66, &self.version.to_le_bytes());
        put(&mut b, 68, &self.log_length.to_le_bytes());
        put(&mut b, 72, &self.log_offset.to_le_bytes());
        seal(&mut b, 4);
        b
    }
}

/// Which header slot is current, and its contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentHeader {
    /// 0 for the header at 64 KiB, 1 for the one at 128 KiB.
    pub slot: usize,
    /// The current header.
    pub header: Header,
    /// Why the other slot was not used, when it is invalid.
    pub other_error: Option<String>,
}

/// Choose the current header from the two slots ([MS-VHDX] 2.2.2.1): the valid one with the
/// higher sequence number; one valid header suffices; equal sequence numbers are accepted only
/// when the two headers are byte-identical (Disk2vhd writes them so; qemu's rule).
pub fn current_header(slot1: &[u8], slot2: &[u8]) -> Result<CurrentHeader> {
    let h1 = Header::parse(slot1, super::HEADER1_OFFSET);
    let h2 = Header::parse(slot2, super::HEADER2_OFFSET);
    match (h1, h2) {
        (Ok(a), Ok(b)) => choose_valid(a, b, slot1, slot2),
        (Ok(a), Err(e)) => Ok(CurrentHeader {
            slot: 0,
            header: a,
            other_error: Some(e.to_string()),
        }),
        (Err(e), Ok(b)) => Ok(CurrentHeader {
            slot: 1,
            header: b,
            other_error: Some(e.to_string()),
        }),
        (Err(e1), Err(e2)) => Err(crate::Error::format(format!(
            "no valid VHDX header: {e1}; {e2}"
        ))),
    }
}

fn choose_valid(a: Header, b: Header, slot1: &[u8], slot2: &[u8]) -> Result<CurrentHeader> {
    use std::cmp::Ordering::*;
    let slot = match a.sequence_number.cmp(&b.sequence_number) {
        Greater => 0,
        Less => 1,
        Equal if slot1[..HEADER_SIZE] == slot2[..HEADER_SIZE] => 0,
        Equal => {
            return Err(crate::Error::format(format!(
                "both VHDX headers have sequence number {} but differ",
                a.sequence_number
            )));
        }
    };
    let header = if slot == 0 { a } else { b };
    Ok(CurrentHeader {
        slot,
        header,
        other_error: None,
    })
}
