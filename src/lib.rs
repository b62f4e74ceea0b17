//! Merge Microsoft VHD differencing disks into their parent or into an ancestor several levels
//! up: what Hyper-V's `MergeVirtualHardDisk` does, in pure Rust, on any OS. Sector-exact
//! (partial bitmaps, mixed block sizes, zeros that overwrite), crash-safe (re-running an
//! interrupted merge finishes it), and with the `MergeVirtualHardDisk` return codes.
//!
//! A chain of three disks, and a merge of the newest two levels up, into the base:
//!
//! ```
//! use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};
//! use vhd_merge::{Chain, ChainOptions, MergeOptions, merge};
//!
//! let dir = tempfile::tempdir()?;
//! let base = dir.path().join("base.vhd");
//! let child = dir.path().join("child.vhd");
//! let grandchild = dir.path().join("grandchild.vhd");
//! let opts = CreateOptions::default();
//!
//! // A 16 MiB dynamic base and two differencing disks above it; each writes one sector.
//! create_dynamic(&base, 16 << 20, &opts)?.write_at(0, &[1; 512])?;
//! create_differencing(&child, &base, &opts)?.write_at(512, &[2; 512])?;
//! create_differencing(&grandchild, &child, &opts)?.write_at(1024, &[3; 512])?;
//!
//! // What the grandchild shows: layer 0 of its chain (itself), read through its parents.
//! let mut before = vec![0u8; 1536];
//! Chain::open(&grandchild, &ChainOptions::default())?.read_at(0, 0, &mut before)?;
//! assert_eq!((before[0], before[512], before[1024]), (1, 2, 3));
//!
//! // Merge the grandchild and the child between into the base. Neither is changed; both
//! // are obsolete now (`MergeOptions::remove_merged` deletes them).
//! let report = merge(&grandchild, Some(&base), &MergeOptions::default())?;
//! assert_eq!(report.bytes_merged, 1024);
//! assert_eq!(report.obsolete.len(), 2);
//!
//! // The base alone reads what the grandchild read.
//! let mut after = vec![0u8; 1536];
//! Chain::open(&base, &ChainOptions::default())?.read_at(0, 0, &mut after)?;
//! assert_eq!(after, before);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `merge(&child, None, ..)` merges into the parent. [`MergeOptions`] has a dry run (the plan,
//! nothing written), a CRC32 verify pass, `--force` for siblings that would change, and
//! relinking a child of the source; [`MergeJob`] runs the same merge on a worker thread with
//! progress and cancel. Every error is an [`Error`], whose [`Error::return_code`] is the
//! `MergeVirtualHardDisk` value (32768 Failed to 32779 File not found).
//!
//! The modules, from the top down (each builds on those below it):
//!
//! - [`mod@merge`]: merging a differencing disk into an ancestor ([`merge()`], [`MergeJob`]):
//!   a plan from the block tables, then batched crash-safe writes.
//! - [`Chain`] ([`chain`]): a child and its verified ancestors, found through parent locators,
//!   search directories or unique id; reads through the chain ([`Chain::read_at`],
//!   [`ChainReader`]).
//! - [`flatten()`] ([`mod@flatten`]): the logical content of a chain as a new standalone file.
//! - [`set_parent`] ([`setparent`]): re-point a child at a moved, renamed or replaced parent.
//! - [`info`]: what one file holds, VHD or VHDX ([`info::inspect_file`]), the report
//!   `vhd-merge info` prints.
//! - [`check`] and [`repair`]: validate a file or chain, and fix footers, checksums and bad
//!   BAT entries.
//! - [`layer`]: what the engine needs from any disk image format ([`Layer`], [`LayerWriter`]).
//! - [`Vhd`] ([`mod@vhd`]): one open VHD file, its own sectors, crash-safe block allocation;
//!   [`create`]: new fixed, dynamic and differencing disks, laid out like Windows does.
//! - [`vhdx`]: VHDX (`.vhdx`, `.avhdx`): the on-disk structures, a reader, writable opens
//!   with crash-safe writes through the log, creation, check and repair; [`vhdx_layer`]
//!   puts it behind the layer boundary, so every function above takes VHDX chains too.
//! - [`format`](mod@format): the VHD on-disk structures, sans I/O; [`io`]: positional I/O
//!   and, with the `testing` feature, the fault-injecting storage the crash tests use.
//!
//! The architecture, and the VHD format with the quirks of every tool that writes it, are
//! described in [`docs/design.md`] and [`docs/vhd-format.md`], which the package ships (docs.rs
//! shows them under *Source*), and VHDX in `docs/vhdx-format.md`. A section number in the
//! documentation of an item (`§4.2`) is a section of `docs/vhd-format.md`, or of
//! `docs/vhdx-format.md` where the item is a VHDX one.
//!
//! [`docs/design.md`]: https://docs.rs/crate/vhd-merge/latest/source/docs/design.md
//! [`docs/vhd-format.md`]: https://docs.rs/crate/vhd-merge/latest/source/docs/vhd-format.md
#![deny(missing_docs)]
// The one exception is `io::start_writeback` (one sync_file_range call, a performance hint).
#![deny(unsafe_code)]

/// `serde::Serialize` for an enum as its `name()` string (the `serde` feature): the JSON of the
/// reports spells `disk_type`, `format` and `platform_code` as the text output does.
#[cfg(feature = "serde")]
macro_rules! serialize_as_name {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.name())
            }
        }
    };
}

#[macro_use]
mod options;

pub mod bitmap;
pub mod chain;
pub mod check;
pub mod create;
pub mod error;
pub mod flatten;
pub mod format;
pub mod info;
pub mod io;
pub mod layer;
pub mod locator;
#[cfg(test)]
mod mem_layer;
pub mod merge;
pub mod problem;
pub mod repair;
pub mod setparent;
pub mod vhd;
mod vhd_layer;
pub mod vhdx;
pub mod vhdx_layer;

pub use chain::{Chain, ChainLayer, ChainOptions, ChainReader, FoundBy};
pub use error::{Error, ParentCandidate, Result, ReturnCode};
pub use flatten::{
    FlattenFormat, FlattenOptions, FlattenProgress, FlattenReport, flatten, flatten_path,
};
pub use format::{DiskType, SECTOR_SIZE};
pub use io::CloneOutcome;
pub use layer::{BlockState, CloneSource, DiskKind, Format, Layer, LayerWriter, open_layer};
pub use layer::{OpenOptions, SizeRule};
pub use merge::{Job, JobState, MergeJob, MergeOptions, MergeReport, merge};
pub use setparent::{SetParentOptions, SetParentReport, set_parent, set_parent_on};
/// The former name of [`mod@vhd`], kept so that `vhd_merge::image::...` paths still work.
pub use vhd as image;
pub use vhd::{BlockMap, SizeSource, Vhd};

/// The README's examples, compiled and run as doc tests so they cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
