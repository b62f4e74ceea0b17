//! Merging a differencing VHD into its parent or an ancestor: what Hyper-V's
//! `MergeVirtualHardDisk(SourcePath, DestinationPath, out Job)` does (§6.1, §6.7).
//!
//! After a merge the destination's logical content equals the source's logical content before
//! it, byte for byte, over the source's virtual size: each sector the source or an intermediate
//! holds takes the data of the nearest such layer (a set bitmap bit with zero data overwrites
//! too); a sector past the end of an intermediate smaller than the source, which no nearer
//! layer holds, becomes zeros (the source reads zeros there: the smaller layer hides the
//! destination); every other sector keeps the destination's data. The destination keeps its identity (its footer does not change); the
//! source and the intermediates are opened read-only, never written, and by default not deleted:
//! the report says which files are now obsolete.
//!
//! Two entry points share one engine:
//! - [`merge`]: synchronous, returns a [`MergeReport`].
//! - [`MergeJob::start`]: runs the merge on a worker thread and returns a [`Job`] modelled on
//!   `CIM_ConcreteJob` (state, percent complete, error code, cancel).
//!
//! # How it works
//! 1. **Plan** ([`MergePlan::build`]) from the layers' block tables and states only
//!    ([`crate::Layer::mapped_blocks`], [`crate::Layer::block_state`]): the destination units
//!    (destination blocks, or parts of at most [`MAX_UNIT_BYTES`]) that any merged layer
//!    has a block over or that lie past the end of the smallest merged layer, and for each the
//!    sectors merged layers hold and those they decide are zeros
//!    ([`crate::chain::SpanPlan::hidden`]). Nothing walks the virtual size sector by sector,
//!    so planning a 2 TiB sparse disk costs one pass over its block table.
//! 2. **Execute**: each unit is assembled in memory with one read per contributing layer and
//!    block ([`crate::Chain::plan_span`] + [`crate::Chain::read_plan`]) and written with one
//!    [`crate::LayerWriter::write_sectors`]. A reader thread assembles the next units while
//!    the caller's thread writes, with a few unit buffers in flight, so memory stays bounded
//!    whatever the size, data and depth.
//! 3. Units are written in batches: [`crate::LayerWriter::reserve`] once per batch (a VHD's
//!    end footer moves once), then [`crate::LayerWriter::commit`], the format's crash-safe
//!    publish (for a VHD, data durable before bitmaps and BAT entries point at it; see
//!    [`crate::vhd`]). An interrupted merge (crash, error, cancel) leaves a valid
//!    destination, and running the same merge again finishes it with the same result, because
//!    the source is unchanged and rewriting its data is idempotent.
//!
//! ```
//! use vhd_merge::create::{create_differencing, create_dynamic, CreateOptions};
//! use vhd_merge::merge::{merge, MergeOptions};
//! use vhd_merge::{Chain, ChainOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let base = dir.path().join("base.vhd");
//! let child = dir.path().join("child.vhd");
//! create_dynamic(&base, 8 << 20, &CreateOptions::default())?.write_at(0, &[1; 4096])?;
//! create_differencing(&child, &base, &CreateOptions::default())?.write_at(512, &[2; 512])?;
//!
//! let report = merge(&child, None, &MergeOptions::default())?;
//! assert_eq!(report.bytes_merged, 512);
//!
//! let chain = Chain::open(&base, &ChainOptions::default())?;
//! let mut buf = [0u8; 1024];
//! chain.read_at(0, 0, &mut buf)?;
//! assert_eq!(&buf[..512], &[1; 512][..]);
//! assert_eq!(&buf[512..], &[2; 512][..]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::chain::ChainOptions;
use crate::error::Result;
use crate::io::Storage;

mod execute;
mod job;
mod plan;
mod scan;

pub use execute::{assemble_unit, read_assembled};
pub use job::{Job, JobState, MergeJob, Progress};
pub(crate) use plan::clone_candidate;
pub use plan::{MAX_UNIT_BYTES, MergePlan, PlannedLayer};
pub use scan::{ScannedLayer, peek_layer};

/// A progress callback: called from the thread running the merge, at most about a thousand
/// times per merge plus once at each state change, so it may do a little work (update a
/// progress bar, send on a channel).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Wraps a [`Storage`] before the merge writes through it (the testing hooks
/// `MergeOptions::destination_io` and `link_io`, with the `testing` feature: fault injection
/// with `io::FaultyStorage`, corruption, counting).
pub type StorageWrapper = Arc<dyn Fn(Box<dyn Storage>) -> Box<dyn Storage> + Send + Sync>;

/// Default amount of destination block space written between two commits: 1 GiB.
///
/// A re-run after a crash redoes every write (the source is unchanged), so the batch size does
/// not change how much work an interruption costs; it bounds the bitmap and BAT updates held
/// in memory, and sets how often the destination is flushed. Each commit costs two
/// `fdatasync`s (and each batch that grows the file one more for the footer), which is what
/// matters where a flush has a high fixed cost. Since block data is handed to the device as it
/// is written ([`crate::io::Storage::start_writeback`]), a flush only waits for the tail:
/// on the development VM a 1 GiB full-block merge took 0.50 s with one batch, 0.51 s with
/// 256 MiB and 0.52 s with 128 MiB batches (before that change, 1.3 s against 2 to 3 s).
pub const DEFAULT_BATCH_BYTES: u64 = 1 << 30;

options! {
    /// Options of a merge.
    ///
    /// Built from [`Default`] with a setter per field (the struct is `#[non_exhaustive]`, so
    /// a struct literal is refused outside the crate):
    ///
    /// ```
    /// use vhd_merge::{ChainOptions, MergeOptions};
    /// let chain = ChainOptions::default().ignore_absolute_locators(true);
    /// let opts = MergeOptions::default().chain(chain).verify(true).set_clone(false);
    /// assert!(opts.verify && !opts.clone && opts.chain.ignore_absolute_locators);
    /// ```
    ///
    /// ```compile_fail,E0639
    /// let opts = vhd_merge::MergeOptions { verify: true, ..Default::default() };
    /// ```
    #[derive(Clone)]
    pub struct MergeOptions {
        /// How to find and open the source's chain (parent override, search directories,
        /// confinement, leniency). Search directories are also scanned for siblings.
        pub chain: ChainOptions,
        /// Compute and report the plan without writing, deleting or locking anything.
        pub dry_run: bool,
        /// After writing, read every merged range back through the destination's chain and compare
        /// its CRC32 with the CRC32 of the source's view computed while merging.
        pub verify: bool,
        /// Merge even though other differencing disks (siblings) depend on the destination or on an
        /// intermediate: their content will change. Also allows removing a source that has children
        /// that are not relinked.
        pub force: bool,
        /// After the destination is durably finished (and verified, if asked), delete the source
        /// and the intermediates.
        pub remove_merged: bool,
        /// Children of the source to re-point at the destination after the merge (their view does
        /// not change). Children of intermediates are refused: their view would change.
        pub relink: Vec<PathBuf>,
        /// Commit after this many bytes of destination blocks (at least one block per batch).
        pub batch_bytes: u64,
        /// Called with progress (see [`ProgressFn`]).
        pub progress: Option<ProgressFn>,
        /// Wraps the destination's storage (see [`StorageWrapper`]; a testing hook, only with the
        /// `testing` feature).
        #[cfg(feature = "testing")]
        pub destination_io: Option<StorageWrapper>,
        /// Clone instead of copying where the file system allows (default true): a destination
        /// unit whose every sector one merged layer provides, from whole blocks it holds, is
        /// placed with a block clone (FICLONERANGE on XFS with reflink, btrfs, ...) when source
        /// and destination offsets are aligned to 4 KiB and both files are on the same file
        /// system; it then shares the source's extents and no data moves. Everything else, and
        /// every unit on a file system that cannot clone, is copied. False copies everything
        /// (physically separate data; `--no-clone`).
        pub clone: bool => set_clone,
        /// Wraps the storage of the layer that links to the destination when the merge updates
        /// that link (a VHDX destination's identity changes when it is written; see
        /// [`crate::layer::set_parent_ids`]; a testing hook, only with the `testing` feature).
        #[cfg(feature = "testing")]
        pub link_io: Option<StorageWrapper>,
        /// Set to true to stop the merge between two units; what was written is committed and
        /// re-running the merge finishes it. [`Job::cancel`] uses its own flag.
        pub cancel: Option<Arc<AtomicBool>>,
    }
}

impl Default for MergeOptions {
    fn default() -> MergeOptions {
        MergeOptions {
            chain: ChainOptions::default(),
            dry_run: false,
            verify: false,
            force: false,
            remove_merged: false,
            relink: Vec::new(),
            batch_bytes: DEFAULT_BATCH_BYTES,
            progress: None,
            #[cfg(feature = "testing")]
            destination_io: None,
            clone: true,
            #[cfg(feature = "testing")]
            link_io: None,
            cancel: None,
        }
    }
}

impl MergeOptions {
    /// `storage` as the merge writes through it: wrapped by the testing hook
    /// (`destination_io`, or `link_io` when `link`) if the `testing` feature has one set.
    pub(crate) fn hooked(&self, storage: Box<dyn Storage>, link: bool) -> Box<dyn Storage> {
        #[cfg(feature = "testing")]
        {
            let hook = if link {
                &self.link_io
            } else {
                &self.destination_io
            };
            if let Some(wrap) = hook {
                return wrap(storage);
            }
        }
        let _ = link;
        storage
    }
}

impl fmt::Debug for MergeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("MergeOptions");
        d.field("chain", &self.chain)
            .field("dry_run", &self.dry_run)
            .field("verify", &self.verify)
            .field("force", &self.force)
            .field("remove_merged", &self.remove_merged)
            .field("relink", &self.relink)
            .field("batch_bytes", &self.batch_bytes)
            .field("progress", &self.progress.is_some())
            .field("clone", &self.clone)
            .field("cancel", &self.cancel);
        #[cfg(feature = "testing")]
        d.field("destination_io", &self.destination_io.is_some())
            .field("link_io", &self.link_io.is_some());
        d.finish()
    }
}

/// What a verify pass compared.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Destination units compared.
    #[cfg_attr(feature = "serde", serde(rename = "unit_count"))]
    pub units: u64,
    /// Bytes compared (the merged sectors).
    pub bytes: u64,
}

/// The result of a merge (or of a dry run).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MergeReport {
    /// The source, as given.
    #[cfg_attr(feature = "serde", serde(rename = "path"))]
    pub source: PathBuf,
    /// The destination, as found in the source's chain.
    #[cfg_attr(feature = "serde", serde(rename = "destination_path"))]
    pub destination: PathBuf,
    /// The plan that was executed (or that a dry run computed).
    pub plan: MergePlan,
    /// True for a dry run: nothing was written.
    pub dry_run: bool,
    /// Bytes of merged sectors written into the destination (0 for a dry run), cloned or
    /// copied.
    pub bytes_merged: u64,
    /// Of `bytes_merged`, those placed by block cloning (sharing the source's extents)
    /// instead of being copied; see [`MergeOptions::clone`].
    pub bytes_cloned: u64,
    /// Destination blocks allocated by this run.
    #[cfg_attr(feature = "serde", serde(rename = "allocated_block_count"))]
    pub blocks_allocated: u64,
    /// Growth of the destination file in bytes.
    pub destination_growth: u64,
    /// Files that no longer hold a valid view: the source and the intermediates (Hyper-V
    /// leaves them in place). Empty for a dry run.
    pub obsolete: Vec<PathBuf>,
    /// Files deleted because of [`MergeOptions::remove_merged`].
    pub removed: Vec<PathBuf>,
    /// Children re-pointed at the destination.
    pub relinked: Vec<PathBuf>,
    /// The verify pass, when asked for.
    pub verified: Option<VerifyReport>,
    /// Wall-clock time of the whole operation.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub elapsed: Duration,
    /// Odd but non-fatal things noticed (chain warnings, siblings merged over with `force`).
    pub warnings: Vec<String>,
}

/// Merge `source` into `destination` (an ancestor in its chain; the immediate parent when
/// `None`) and return what was done. Runs on the calling thread; see [`MergeJob::start`] for
/// the asynchronous form.
///
/// Errors carry the `MergeVirtualHardDisk` return code ([`crate::Error::return_code`]): a
/// source that is not differencing, a destination outside its chain or smaller than the
/// source give Invalid parameter (32773), a destination that does not exist File not found
/// (32779); siblings that the merge would corrupt, Invalid state
/// (32775); a destination locked by another merge, System is in use (32774); a destination
/// that cannot be written, Access denied (32769); I/O failures (out of space, ...), Failed
/// (32768) with the OS error in the description, leaving a valid destination that a re-run
/// finishes.
pub fn merge(
    source: impl AsRef<Path>,
    destination: Option<&Path>,
    options: &MergeOptions,
) -> Result<MergeReport> {
    let tracker = job::Tracker::new(None, options);
    let res = execute::run(source.as_ref(), destination, options, &tracker);
    tracker.finish(&res);
    res
}
