//! VHDX (VHD version 2, `.vhdx` / `.avhdx`): the on-disk structures of Microsoft's [MS-VHDX]
//! open specification.
//!
//! [`format`](mod@format) is sans I/O like the VHD [`crate::format`]: bytes in, structs out,
//! structs to bytes. Nothing here opens a file; every size that would drive an allocation is
//! bounded by the caller (the region or log bytes it hands in).

pub mod format;
pub mod reader;

pub use reader::VhdxReader;
