//! VHDX (VHD version 2, `.vhdx` / `.avhdx`): the on-disk structures of Microsoft's [MS-VHDX]
//! open specification, a read-only reader, and [`Vhdx`]: one file opened for reading or
//! crash-safe writing, and created like Hyper-V creates it ([`create`]).
//!
//! [`format`](mod@format) is sans I/O like the VHD [`crate::format`]: bytes in, structs out,
//! structs to bytes. Nothing here opens a file; every size that would drive an allocation is
//! bounded by the caller (the region or log bytes it hands in).

mod bat;
pub mod check;
pub mod create;
pub mod format;
pub mod image;
pub mod info;
mod journal;
pub mod reader;
pub mod repair;

pub use image::{BlockState, Vhdx};
pub use reader::VhdxReader;
