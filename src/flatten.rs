//! Writing the logical content of a chain to a new standalone file: raw, a fixed VHD, or a
//! dynamic VHD that leaves all-zero blocks unallocated. The inputs are only read.
//!
//! The output is written under a temporary name in the output's directory, synced, and only
//! then given its final name, so a failure or a crash never leaves a half-written file under
//! that name. Without `force` the final name is taken with a hard link, which fails if a file
//! of that name appeared meanwhile (a rename where hard links are not supported).
//!
//! The work goes in spans of one output block (or 2 MiB for raw and fixed outputs): one
//! [`Chain::plan_span`] and one [`Chain::read_plan`] per span, so a fully allocated layer
//! costs one read and one write per block; spans no layer provides are skipped without
//! reading, and all-zero spans are left as holes or unallocated blocks.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::bitmap::SectorBitmap;
use crate::chain::{Chain, ChainOptions, SpanPlan};
use crate::error::{Error, Result};
use crate::io::{CloneOutcome, ClonePiece, CloneRun, FileStorage};
use crate::layer::files::{WriteMode, open_for_writing};
use crate::layer::{CloneSource, CreateLimits, DiskKind, Format, LayerWriter};
use crate::merge::clone_candidate;

/// The kind of file [`flatten`] writes (Hyper-V's Convert-VHD targets, and raw).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlattenFormat {
    /// A raw image: the virtual disk's bytes and nothing else (sparse where zero).
    Raw,
    /// A fixed VHD: the raw bytes followed by a footer.
    Fixed,
    /// A dynamic VHD; blocks that would be all zero stay unallocated.
    #[default]
    Dynamic,
    /// A fixed VHDX (LeaveBlockAllocated, every block present; all-zero spans stay holes).
    VhdxFixed,
    /// A dynamic VHDX; blocks that would be all zero stay NOT_PRESENT.
    VhdxDynamic,
}

impl FlattenFormat {
    /// Every output format.
    pub const ALL: [FlattenFormat; 5] = [
        FlattenFormat::Raw,
        FlattenFormat::Fixed,
        FlattenFormat::Dynamic,
        FlattenFormat::VhdxFixed,
        FlattenFormat::VhdxDynamic,
    ];

    /// `raw`, `fixed`, `dynamic` (VHD), `vhdx-fixed` or `vhdx-dynamic`.
    pub fn name(self) -> &'static str {
        match self {
            FlattenFormat::Raw => "raw",
            FlattenFormat::Fixed => "fixed",
            FlattenFormat::Dynamic => "dynamic",
            FlattenFormat::VhdxFixed => "vhdx-fixed",
            FlattenFormat::VhdxDynamic => "vhdx-dynamic",
        }
    }

    /// The format a file name asks for: `.vhdx`/`.avhdx` a dynamic VHDX, `.raw`/`.img`/`.bin`
    /// raw, anything else a dynamic VHD.
    pub fn from_extension(path: &Path) -> FlattenFormat {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("vhdx" | "avhdx") => FlattenFormat::VhdxDynamic,
            Some("raw" | "img" | "bin") => FlattenFormat::Raw,
            _ => FlattenFormat::Dynamic,
        }
    }

    /// The format and kind of image this output is, `None` for raw.
    pub fn target(self) -> Option<(Format, DiskKind)> {
        match self {
            FlattenFormat::Raw => None,
            FlattenFormat::Fixed => Some((Format::Vhd, DiskKind::Fixed)),
            FlattenFormat::Dynamic => Some((Format::Vhd, DiskKind::Dynamic)),
            FlattenFormat::VhdxFixed => Some((Format::Vhdx, DiskKind::Fixed)),
            FlattenFormat::VhdxDynamic => Some((Format::Vhdx, DiskKind::Dynamic)),
        }
    }

    /// What the output's format allows (largest virtual size, block sizes, default block
    /// size), as that format defines it ([`Format::create_limits`]); `None` for raw, which
    /// holds any size and has no blocks.
    pub fn limits(self) -> Option<CreateLimits> {
        self.target().map(|(f, k)| f.create_limits(k))
    }

    /// A sparse output whose blocks are written one by one.
    fn is_dynamic(self) -> bool {
        matches!(self, FlattenFormat::Dynamic | FlattenFormat::VhdxDynamic)
    }
}

/// What a flatten's progress callback is told after each span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlattenProgress {
    /// Bytes of the virtual disk done: the position reached.
    pub position: u64,
    /// The virtual size.
    pub virtual_size: u64,
    /// Bytes of data done: of the spans done, those in which some layer has a block (a fixed
    /// layer: every span).
    pub data_done: u64,
    /// Bytes of such spans in the whole disk: the data there is to copy (the other spans are
    /// holes or unallocated blocks in the output). `data_done` reaches it at the end.
    pub data_total: u64,
}

/// A progress callback, called after each span.
pub type Progress<'a> = &'a mut dyn FnMut(&FlattenProgress);

options! {
    /// Options for [`flatten`].
    pub struct FlattenOptions<'a> {
        /// The output format (dynamic by default).
        pub format: FlattenFormat,
        /// Replace an existing output file (never one of the chain's own files).
        pub force: bool,
        /// Block size of a dynamic output; `None`: the flattened layer's block size, or 2 MiB when
        /// it is a fixed disk.
        pub block_size: Option<u32>,
        /// Which layer's content to write (0, the default, is the child at the top of the chain).
        pub layer: usize,
        /// Called with (bytes done, total bytes) as the work proceeds.
        pub progress: Option<Progress<'a>>,
        /// When set (by another thread, e.g. a signal handler), the flatten stops before its next
        /// span with [`Error::Cancelled`]; the temporary file is removed and the output untouched.
        pub cancel: Option<Arc<AtomicBool>>,
        /// Clone instead of copying where the file system allows (default true): a span (an
        /// output block, or 2 MiB of a raw or fixed output) whose every sector one layer holds
        /// is placed with block clones of that layer's data when the offsets of both files are
        /// aligned, on a file system with reflink (see [`crate::merge::MergeOptions::clone`]).
        pub clone: bool => set_clone,
    }
}

impl Default for FlattenOptions<'_> {
    fn default() -> Self {
        FlattenOptions {
            format: FlattenFormat::default(),
            force: false,
            block_size: None,
            layer: 0,
            progress: None,
            cancel: None,
            clone: true,
        }
    }
}

impl std::fmt::Debug for FlattenOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlattenOptions")
            .field("format", &self.format)
            .field("force", &self.force)
            .field("block_size", &self.block_size)
            .field("layer", &self.layer)
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel)
            .field("clone", &self.clone)
            .finish()
    }
}

/// What [`flatten`] wrote.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlattenReport {
    /// The output file.
    #[cfg_attr(feature = "serde", serde(rename = "output_path"))]
    pub output: PathBuf,
    /// Its format.
    pub format: FlattenFormat,
    /// The virtual size in bytes (the flattened layer's).
    pub virtual_size: u64,
    /// Bytes of non-zero spans written (zero spans are holes or unallocated blocks), and of
    /// cloned spans (not read, so zeros or not).
    pub data_bytes: u64,
    /// Of `data_bytes`, those placed by block cloning (see [`FlattenOptions::clone`]).
    pub bytes_cloned: u64,
    /// Blocks allocated in a dynamic output (0 for raw and fixed).
    #[cfg_attr(feature = "serde", serde(rename = "allocated_block_count"))]
    pub blocks_allocated: u64,
    /// Layers the content was read from.
    #[cfg_attr(feature = "serde", serde(rename = "layer_count"))]
    pub layers: usize,
}

/// Open the chain at `input` and flatten it into `output` (see [`flatten`]).
pub fn flatten_path(
    input: impl AsRef<Path>,
    chain_options: &ChainOptions,
    output: impl AsRef<Path>,
    opts: FlattenOptions<'_>,
) -> Result<FlattenReport> {
    let chain = Chain::open(input, chain_options)?;
    flatten(&chain, output, opts)
}

/// Write the logical content of layer `opts.layer` of `chain` to a new standalone file at
/// `output`. Refuses an existing output unless `opts.force`, and always refuses an output
/// that is one of the chain's files.
pub fn flatten(
    chain: &Chain,
    output: impl AsRef<Path>,
    mut opts: FlattenOptions<'_>,
) -> Result<FlattenReport> {
    let output = output.as_ref();
    let layer = opts.layer;
    if layer >= chain.len() {
        return Err(Error::InvalidParameter(format!(
            "layer {layer} does not exist: the chain has {} layer(s)",
            chain.len()
        )));
    }
    let top = chain.layer(layer).ok_or_else(|| {
        Error::InvalidParameter(format!(
            "layer {layer} does not exist: the chain has {} layer(s)",
            chain.len()
        ))
    })?;
    let size = top.virtual_size();
    // Held until the new file has replaced the old one.
    let mut replaced = check_output(chain, output, opts.force)?;
    check_output_size(opts.format, size)?;
    let block_size = opts
        .block_size
        .unwrap_or_else(|| default_block_size(opts.format, top));
    let tmp = temp_path(output)?;
    let span = match opts.format {
        f if f.is_dynamic() => u64::from(block_size).min(crate::merge::MAX_UNIT_BYTES),
        // The fixed output's chunk (its block size) is the raw span too.
        _ => RAW_SPAN,
    };
    let mut w = Writer {
        chain,
        layer,
        sector: u64::from(chain.sector_size()),
        size,
        done: 0,
        data_bytes: 0,
        progress: opts.progress.take(),
        cancel: opts.cancel.take(),
        data_done: 0,
        data_total: 0,
        cloning: opts.clone,
        bytes_cloned: 0,
        held: Held::default(),
    };
    if w.progress.is_some() {
        w.data_total = (0..size.div_ceil(span))
            .map(|i| (i * span, span.min(size - i * span)))
            .filter(|&(pos, n)| w.has_blocks(pos, n))
            .map(|(_, n)| n)
            .sum();
    }
    let res = match opts.format {
        FlattenFormat::Raw => w.raw(&tmp),
        f if f.is_dynamic() => create_output(&tmp, f, size, block_size, chain.sector_size())
            .and_then(|mut out| write_dynamic(&mut w, out.as_mut())),
        f => create_output(&tmp, f, size, block_size, chain.sector_size())
            .and_then(|out| w.fixed(out)),
    };
    // Windows cannot rename over a file this process holds open; elsewhere the lock is held
    // until the new file has replaced the old one.
    if cfg!(windows) {
        drop(replaced.take());
    }
    let blocks_allocated = match res.and_then(|b| publish(&tmp, output, opts.force).map(|()| b)) {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    drop(replaced);
    Ok(FlattenReport {
        output: output.to_path_buf(),
        format: opts.format,
        virtual_size: size,
        data_bytes: w.data_bytes,
        bytes_cloned: w.bytes_cloned,
        blocks_allocated,
        layers: chain.len() - layer,
    })
}

/// A virtual size the output format cannot hold (a VHD's 2040 GiB): refused before anything
/// is written.
fn check_output_size(format: FlattenFormat, size: u64) -> Result<()> {
    let Some(limits) = format.limits() else {
        return Ok(());
    };
    let max = limits.max_virtual_size;
    if size > max {
        let fits: Vec<&str> = FlattenFormat::ALL
            .iter()
            .filter(|f| f.limits().is_none_or(|l| size <= l.max_virtual_size))
            .map(|f| f.name())
            .collect();
        return Err(Error::InvalidParameter(format!(
            "the virtual size {size} is larger than a {} output can hold ({max} bytes, {} GiB); flatten to {} instead",
            format.name(),
            max >> 30,
            fits.join(" or ")
        )));
    }
    Ok(())
}

/// The output's block size when the caller gives none: the flattened layer's if the output
/// format allows it ([`FlattenFormat::limits`]) and the layer is not fixed, else the format's
/// default. A raw output has no blocks: its spans are [`RAW_SPAN`].
fn default_block_size(format: FlattenFormat, top: &dyn crate::layer::Layer) -> u32 {
    let Some(limits) = format.limits() else {
        return RAW_SPAN as u32;
    };
    u32::try_from(top.block_size())
        .ok()
        .filter(|&b| top.kind() != DiskKind::Fixed && limits.allows_block_size(b))
        .unwrap_or(limits.default_block_size)
}

/// A new fixed or dynamic image at `tmp` in the output's format, open for writing, with the
/// chain's logical sector size where the format records one.
fn create_output(
    tmp: &Path,
    format: FlattenFormat,
    size: u64,
    block_size: u32,
    sector_size: u32,
) -> Result<Box<dyn LayerWriter>> {
    let Some((f, kind)) = format.target() else {
        return Err(Error::InvalidParameter(
            "a raw output is a plain file, not an image".into(),
        ));
    };
    let image = crate::layer::NewImage {
        kind,
        size,
        block_size,
        sector_size,
    };
    crate::layer::create_layer(f, tmp, &image)
}

/// Write `data` (whole sectors of the output, inside one of its blocks) at virtual byte
/// `pos`: every sector selected, so zeros in it are written too.
fn write_span(out: &mut dyn LayerWriter, pos: u64, data: &mut [u8]) -> Result<()> {
    let (bs, ss) = (out.block_size(), u64::from(out.sector_size()));
    let mask = SectorBitmap::full((data.len() as u64 / ss) as usize);
    out.write_sectors(pos / bs, (pos % bs) / ss, data, &mask)
}

/// Where flatten's clones and writes go: the raw output file, or an output layer.
enum Target<'o> {
    Raw(&'o File, &'o Path),
    Layer(&'o mut dyn LayerWriter),
}

impl Target<'_> {
    /// Clone `pieces` (virtual byte position in the output, source; a piece never crosses an
    /// output block) in order, stretches contiguous in both files with one call each (see
    /// [`LayerWriter::clone_run`]): how many were placed, and the outcome of the last tried.
    fn clone_run(&mut self, pieces: &[(u64, CloneSource<'_>)]) -> Result<(usize, CloneOutcome)> {
        match self {
            Target::Layer(out) => {
                let (bs, ss) = (out.block_size(), u64::from(out.sector_size()));
                let clones: Vec<ClonePiece<'_>> = pieces
                    .iter()
                    .map(|&(pos, src)| ClonePiece {
                        block: pos / bs,
                        first: (pos % bs) / ss,
                        src,
                    })
                    .collect();
                out.clone_run(&clones)
            }
            Target::Raw(file, path) => raw_clone_run(file, path, pieces),
        }
    }

    /// Write `data` at virtual byte `pos` (every byte: zeros in it too).
    fn write(&mut self, pos: u64, data: &mut [u8]) -> Result<()> {
        match self {
            Target::Layer(out) => write_span(&mut **out, pos, data),
            Target::Raw(file, path) => crate::io::pwrite_all(file, data, pos)
                .map_err(|e| Error::io(format!("{}: writing", path.display()), e)),
        }
    }
}

/// [`Target::clone_run`] into a raw output: virtual byte `pos` is file offset `pos`.
fn raw_clone_run(
    file: &File,
    path: &Path,
    pieces: &[(u64, CloneSource<'_>)],
) -> Result<(usize, CloneOutcome)> {
    let mut start = 0;
    while let Some((pos, src)) = pieces.get(start) {
        let mut run = CloneRun::new(src, *pos);
        let mut end = start + 1;
        while pieces.get(end).is_some_and(|(p, s)| run.extend(s, *p)) {
            end += 1;
        }
        let r = crate::io::clone_file_range(run.src, run.src_offset, file, run.offset, run.len)
            .map_err(|e| Error::io(format!("{}: cloning", path.display()), e))?;
        if r != CloneOutcome::Cloned {
            return Ok((start, r));
        }
        start = end;
    }
    Ok((pieces.len(), CloneOutcome::Cloned))
}

/// Spans one layer wholly provides, held to be placed together ([`Writer::place_held`]):
/// their clones (virtual byte position, source) in order, and each span's position, length
/// and where its pieces end in `pieces`.
#[derive(Default)]
struct Held<'c> {
    pieces: Vec<(u64, CloneSource<'c>)>,
    spans: Vec<(u64, u64, usize)>,
}

/// The most spans held at once (raw and fixed outputs have no batches to bound them).
const MAX_HELD_SPANS: usize = 4096;

/// Refuse an output that exists (unless forced) or that is one of the chain's files. An
/// existing output to replace is returned locked like every file a command writes, so a file
/// another process is merging is refused with System is in use (32774).
fn check_output(chain: &Chain, output: &Path, force: bool) -> Result<Option<FileStorage>> {
    let meta = match std::fs::metadata(output) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::io(
                format!("{}: checking the output", output.display()),
                e,
            ));
        }
    };
    for l in chain.layers() {
        if crate::locator::same_file(l.layer.path(), output) {
            return Err(Error::InvalidParameter(format!(
                "the output {} is {}, a file of the chain being flattened",
                output.display(),
                l.layer.path().display()
            )));
        }
    }
    if meta.is_dir() {
        return Err(Error::InvalidParameter(format!(
            "the output {} is a directory",
            output.display()
        )));
    }
    if !force {
        return Err(Error::InvalidParameter(format!(
            "the output {} already exists (the force option (--force) replaces it)",
            output.display()
        )));
    }
    open_for_writing(output, WriteMode::Replace).map(Some)
}

/// A name for the temporary output beside `output` (same directory, so the final rename
/// stays on one file system).
fn temp_path(output: &Path) -> Result<PathBuf> {
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = temp_prefix(output)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(output.with_file_name(format!("{prefix}{n}.tmp")))
}

/// How the name of every temporary file that [`flatten`] writes beside `output` from this
/// process starts (`.NAME.vhd-merge-PID-`; the file ends in `.tmp`). For a caller that has to
/// exit without unwinding (a second interrupt) and removes those files itself.
pub fn temp_prefix(output: &Path) -> Result<String> {
    let name = output.file_name().ok_or_else(|| {
        Error::InvalidParameter(format!("the output {} has no file name", output.display()))
    })?;
    Ok(format!(
        ".{}.vhd-merge-{}-",
        name.to_string_lossy(),
        std::process::id()
    ))
}

/// Give the finished temporary file its final name, then sync the directory.
fn publish(tmp: &Path, output: &Path, force: bool) -> Result<()> {
    let io = |what: &str, e| Error::io(format!("{}: {what}", output.display()), e);
    if force {
        std::fs::rename(tmp, output).map_err(|e| io("renaming the finished output", e))?;
    } else {
        match std::fs::hard_link(tmp, output) {
            Ok(()) => {
                std::fs::remove_file(tmp).map_err(|e| io("removing the temporary name", e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::InvalidParameter(format!(
                    "the output {} appeared while flattening (the force option (--force) replaces it)",
                    output.display()
                )));
            }
            Err(_) => {
                // No hard links on this file system: check, then rename.
                if output.exists() {
                    return Err(Error::InvalidParameter(format!(
                        "the output {} appeared while flattening (the force option (--force) replaces it)",
                        output.display()
                    )));
                }
                std::fs::rename(tmp, output).map_err(|e| io("renaming the finished output", e))?;
            }
        }
    }
    sync_dir(output);
    Ok(())
}

/// Make the new directory entry durable (best effort: not every platform can open a
/// directory).
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Raw output: bytes planned, read and written at a time.
const RAW_SPAN: u64 = 2 << 20;

/// True when every byte is zero. Folds 4 KiB at a time (vectorised, no early exit inside a
/// chunk), stopping at the first chunk with data.
fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

struct Writer<'c, 'p> {
    chain: &'c Chain,
    layer: usize,
    /// The chain's logical sector size in bytes.
    sector: u64,
    size: u64,
    done: u64,
    data_bytes: u64,
    progress: Option<Progress<'p>>,
    cancel: Option<Arc<AtomicBool>>,
    /// See [`FlattenProgress`] (counted only with a progress callback).
    data_done: u64,
    data_total: u64,
    /// Still trying block clones (off when asked, or once the output said it never can).
    cloning: bool,
    bytes_cloned: u64,
    held: Held<'c>,
}

impl Writer<'_, '_> {
    /// The span `pos..pos + len` is done.
    fn report(&mut self, pos: u64, len: u64) {
        self.done = pos + len;
        if self.progress.is_none() {
            return;
        }
        if self.has_blocks(pos, len) {
            self.data_done += len;
        }
        let p = FlattenProgress {
            position: self.done,
            virtual_size: self.size,
            data_done: self.data_done,
            data_total: self.data_total,
        };
        if let Some(cb) = self.progress.as_mut() {
            cb(&p);
        }
    }

    /// Whether some layer of the flattened range has a block in `pos..pos + len` (from the
    /// block tables only: no reads).
    fn has_blocks(&self, pos: u64, len: u64) -> bool {
        self.chain.layers()[self.layer..].iter().any(|l| {
            let v = l.layer.as_ref();
            if pos >= v.virtual_size() {
                return false;
            }
            let bs = v.block_size();
            let last = (pos + len - 1).min(v.virtual_size() - 1) / bs;
            (pos / bs..=last).any(|b| v.is_mapped(b).unwrap_or(true))
        })
    }

    fn plan(&self, pos: u64, len: u64) -> Result<SpanPlan> {
        self.chain.plan_span(
            self.layer..self.chain.len(),
            pos / self.sector,
            (len / self.sector) as usize,
        )
    }

    /// Every writer calls it once per span (through [`Writer::read`] or
    /// [`Writer::try_clone`]), so this is where a cancel request is seen.
    fn check_cancel(&self) -> Result<()> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            return Err(Error::Cancelled(format!(
                "flatten stopped at byte {} of {}; the partial file was removed and the output left as it was",
                self.done, self.size
            )));
        }
        Ok(())
    }

    /// Hold span `pos..` (planned as `plan`) for [`Writer::place_held`] when one layer holds
    /// all of it and its data can be a clone source; false when it must be read and written.
    fn hold(&mut self, plan: &SpanPlan, pos: u64) -> Result<bool> {
        self.check_cancel()?;
        let chain = self.chain;
        let Some(only) = self.cloning.then(|| clone_candidate(plan)).flatten() else {
            return Ok(false);
        };
        let layer = chain.layers()[only.layer].layer.as_ref();
        let start = self.held.pieces.len();
        for p in &only.pieces {
            let Some(src) = layer.clone_source(p.block, p.first_in_block, p.len as u64) else {
                self.held.pieces.truncate(start);
                self.cloning = false;
                return Ok(false);
            };
            self.held
                .pieces
                .push((pos + p.first as u64 * self.sector, src));
        }
        let n = plan.sectors as u64 * self.sector;
        self.held.spans.push((pos, n, self.held.pieces.len()));
        Ok(true)
    }

    /// Place the held spans in order: their clones with one [`Target::clone_run`] (spans
    /// contiguous in both files cost one clone call together); from a span whose clone did
    /// not work, that span is read and written (over any of its pieces already cloned: the
    /// same bytes) and the clones go on with the next one, unless the output said it never
    /// clones. `buf` holds a span.
    fn place_held(
        &mut self,
        target: &mut Target<'_>,
        buf: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        let held = std::mem::take(&mut self.held);
        let (mut span, mut piece) = (0, 0);
        while span < held.spans.len() {
            if self.cloning {
                let (placed, r) = target.clone_run(&held.pieces[piece..])?;
                let upto = piece + placed;
                while let Some(&(_, n, _)) = held.spans.get(span).filter(|s| s.2 <= upto) {
                    self.bytes_cloned += n;
                    self.data_bytes += n;
                    span += 1;
                }
                self.cloning = r != CloneOutcome::Unsupported;
            }
            let Some(&(pos, n, end)) = held.spans.get(span) else {
                break;
            };
            let plan = self.plan(pos, n)?;
            let data = &mut buf[..n as usize];
            if self.read(&plan, data, scratch)? {
                target.write(pos, data)?;
            }
            (span, piece) = (span + 1, end);
        }
        self.held = held;
        self.held.pieces.clear();
        self.held.spans.clear();
        Ok(())
    }

    /// One span at `pos`, `n` bytes: held for cloning, or (after the held spans are placed)
    /// read and written.
    fn span(
        &mut self,
        target: &mut Target<'_>,
        pos: u64,
        n: u64,
        plan: &SpanPlan,
        buf: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        if self.hold(plan, pos)? {
            if self.held.spans.len() >= MAX_HELD_SPANS {
                self.place_held(target, buf, scratch)?;
            }
        } else {
            self.place_held(target, buf, scratch)?;
            let data = &mut buf[..n as usize];
            if self.read(plan, data, scratch)? {
                target.write(pos, data)?;
            }
        }
        self.report(pos, n);
        Ok(())
    }

    /// Fill `buf` with the span's content; false when it is all zero.
    fn read(&mut self, plan: &SpanPlan, buf: &mut [u8], scratch: &mut Vec<u8>) -> Result<bool> {
        self.check_cancel()?;
        if plan.sources.is_empty() {
            return Ok(false);
        }
        let ss = self.sector as usize;
        for r in plan.unclaimed.runs() {
            buf[r.start * ss..r.end * ss].fill(0);
        }
        self.chain.read_plan(plan, buf, scratch)?;
        let nonzero = !is_zero(buf);
        if nonzero {
            self.data_bytes += buf.len() as u64;
        }
        Ok(nonzero)
    }

    fn raw(&mut self, tmp: &Path) -> Result<u64> {
        let io = |what: &str, e| Error::io(format!("{}: {what}", tmp.display()), e);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| io("cannot create", e))?;
        file.set_len(self.size)
            .map_err(|e| io("setting the length", e))?;
        let span = RAW_SPAN;
        let mut buf = vec![0u8; span as usize];
        let mut scratch = Vec::new();
        let mut pos = 0;
        let mut writeback = crate::io::Writeback::default();
        let mut target = Target::Raw(&file, tmp);
        while pos < self.size {
            let n = span.min(self.size - pos);
            let plan = self.plan(pos, n)?;
            self.span(&mut target, pos, n, &plan, &mut buf, &mut scratch)?;
            // Spans left as holes are noted too: writeback of a hole costs nothing.
            writeback.note(pos, n, |o, len| crate::io::start_writeback(&file, o, len));
            pos += n;
        }
        self.place_held(&mut target, &mut buf, &mut scratch)?;
        file.sync_all().map_err(|e| io("flushing to disk", e))?;
        Ok(0)
    }

    fn fixed(&mut self, mut out: Box<dyn LayerWriter>) -> Result<u64> {
        let chunk = out.block_size().min(RAW_SPAN);
        let mut buf = vec![0u8; chunk as usize];
        let mut scratch = Vec::new();
        let mut pos = 0;
        let mut target = Target::Layer(out.as_mut());
        while pos < self.size {
            let n = chunk.min(self.size - pos);
            let plan = self.plan(pos, n)?;
            self.span(&mut target, pos, n, &plan, &mut buf, &mut scratch)?;
            pos += n;
        }
        self.place_held(&mut target, &mut buf, &mut scratch)?;
        out.finish()?;
        Ok(0)
    }
}

/// Fill a new dynamic disk block by block, in batches: plan a batch, reserve room for the
/// blocks some layer provides (one footer move per batch, not per block), write them, commit.
fn write_dynamic(w: &mut Writer<'_, '_>, out: &mut dyn LayerWriter) -> Result<u64> {
    const BATCH_BYTES: u64 = 256 << 20;
    // A span is a block, or a part of one (VHDX blocks reach 256 MiB): memory stays bounded.
    let span = out.block_size().min(crate::merge::MAX_UNIT_BYTES);
    let spans = w.size.div_ceil(span);
    let batch = (BATCH_BYTES / span).max(1);
    let mut buf = vec![0u8; span as usize];
    let mut scratch = Vec::new();
    let mut first = 0;
    while first < spans {
        let last = (first + batch).min(spans);
        let mut plans = Vec::with_capacity((last - first) as usize);
        for i in first..last {
            let pos = i * span;
            let n = span.min(w.size - pos);
            plans.push((pos, n, w.plan(pos, n)?));
        }
        // One span per block where spans are blocks (VHD); a VHDX allocates as it writes.
        let wanted = plans.iter().filter(|p| !p.2.sources.is_empty()).count() as u64;
        out.reserve(wanted)?;
        let mut target = Target::Layer(&mut *out);
        for (pos, n, plan) in &plans {
            w.span(&mut target, *pos, *n, plan, &mut buf, &mut scratch)?;
        }
        // Cloned data is data: placed before the commit syncs it and publishes its blocks.
        w.place_held(&mut target, &mut buf, &mut scratch)?;
        out.commit()?;
        first = last;
    }
    out.finish()?;
    crate::layer::count_mapped(&*out)
}

#[cfg(feature = "serde")]
serialize_as_name!(FlattenFormat);
