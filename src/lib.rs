//! Merge Microsoft VHD differencing disks into their parent or into an ancestor several levels
//! up: what Hyper-V's `MergeVirtualHardDisk` does, in pure Rust, on any OS.
//!
//! The crate is layered (see `docs/design.md`):
//!
//! - [`format`](mod@format): the on-disk structures, sans I/O.
//! - [`Vhd`] ([`image`]): one open file, its own sectors, crash-safe block allocation.
//! - [`check`] and [`repair`]: validate a file or chain, and fix footers, checksums and bad
//!   BAT entries.
//! - [`create`]: new fixed, dynamic and differencing disks, laid out like Windows does.
//! - [`Chain`] ([`chain`]): a child and its verified ancestors, found through parent locators;
//!   reads through the chain ([`Chain::read_at`], [`ChainReader`]).
//! - [`set_parent`] ([`setparent`]): re-point a child at a moved, renamed or replaced parent.
//! - [`flatten()`] ([`mod@flatten`]): the logical content of a chain as a new standalone file.
//! - [`vhdx`]: VHDX (`.vhdx`, `.avhdx`) on-disk structures, sans I/O (reading and writing come later).
//! - [`mod@merge`]: merging a differencing disk into an ancestor ([`merge()`], [`MergeJob`]).
//!
//! ```
//! use vhd_merge::{create, OpenOptions, Vhd};
//!
//! let dir = tempfile::tempdir()?;
//! let base = dir.path().join("base.vhd");
//! let mut vhd = create::create_dynamic(&base, 8 << 20, &create::CreateOptions::default())?;
//! vhd.write_at(4096, &[0xAB; 512])?;
//!
//! let vhd = Vhd::open(&base, OpenOptions::read_only())?;
//! let mut buf = [0u8; 512];
//! vhd.read_own(4096, &mut buf)?;
//! assert_eq!(buf, [0xAB; 512]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
// The one exception is `io::start_writeback` (one sync_file_range call, a performance hint).
#![deny(unsafe_code)]

pub mod chain;
pub mod check;
pub mod create;
pub mod error;
pub mod flatten;
pub mod format;
pub mod image;
pub mod io;
pub mod layer;
pub mod locator;
#[cfg(test)]
mod mem_layer;
pub mod merge;
pub mod repair;
pub mod setparent;
mod vhd_layer;
pub mod vhdx;
pub mod vhdx_layer;

pub use chain::{Chain, ChainLayer, ChainOptions, ChainReader, FoundBy};
pub use error::{Error, ParentCandidate, Result, ReturnCode};
pub use flatten::{
    FlattenFormat, FlattenOptions, FlattenProgress, FlattenReport, flatten, flatten_path,
};
pub use format::{DiskType, SECTOR_SIZE};
pub use image::{BlockMap, OpenOptions, SizeRule, SizeSource, Vhd};
pub use io::CloneOutcome;
pub use layer::{BlockState, CloneSource, DiskKind, Format, Layer, LayerWriter, open_layer};
pub use merge::{Job, JobState, MergeJob, MergeOptions, MergeReport, merge};
pub use setparent::{SetParentOptions, SetParentReport, set_parent, set_parent_on};

/// The README's examples, compiled and run as doc tests so they cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
