//! The layer boundary: what the chain, the composition planner, merge, flatten and check need to
//! know about one disk image, whatever its format.
//!
//! Above this module nothing names a format's types, constants or file offsets. A format joins
//! by implementing [`Layer`] (reading) and [`LayerWriter`] (writing) and by adding its signature
//! to [`crate::open_layer`]'s detection. See `docs/design.md`, "Adding a format".

use std::any::Any;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::bitmap::SectorBitmap;
use crate::error::{Error, Result};
use crate::io::CloneOutcome;

pub(crate) mod files;
pub use crate::io::{ClonePiece, CloneSource};

/// The on-disk format of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// Microsoft VHD (v1): `.vhd`, footer cookie `conectix`.
    Vhd,
    /// Microsoft VHDX (v2): `.vhdx`, `.avhdx`, file identifier `vhdxfile`.
    Vhdx,
}

#[cfg(feature = "serde")]
serialize_as_name!(Format);

/// What a format allows in a new standalone image it creates (a flatten's output), each
/// limit defined once, by the format ([`Format::create_limits`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateLimits {
    /// The largest virtual size in bytes.
    pub max_virtual_size: u64,
    /// The block sizes allowed: the powers of two in this range.
    pub block_sizes: RangeInclusive<u32>,
    /// The block size when none is asked for.
    pub default_block_size: u32,
}

impl CreateLimits {
    /// Whether `block_size` is one the format allows.
    pub fn allows_block_size(&self, block_size: u32) -> bool {
        block_size.is_power_of_two() && self.block_sizes.contains(&block_size)
    }
}

impl Format {
    /// `vhd` or `vhdx`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        }
    }

    /// What this format allows in a new standalone image of `kind` ([`DiskKind::Fixed`] or
    /// [`DiskKind::Dynamic`]; a differencing disk takes its parent's size).
    pub fn create_limits(self, kind: DiskKind) -> CreateLimits {
        match self {
            Format::Vhd => crate::vhd_layer::create_limits(kind),
            Format::Vhdx => crate::vhdx_layer::create_limits(kind),
        }
    }
}

/// What kind of disk a layer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DiskKind {
    /// Every block allocated up front.
    Fixed,
    /// Blocks allocated on demand; unallocated ones read as zeros.
    Dynamic,
    /// Blocks allocated on demand; unallocated sectors come from the parent.
    Differencing,
}

#[cfg(feature = "serde")]
serialize_as_name!(DiskKind);

impl DiskKind {
    /// `fixed`, `dynamic` or `differencing`.
    pub fn name(self) -> &'static str {
        match self {
            DiskKind::Fixed => "fixed",
            DiskKind::Dynamic => "dynamic",
            DiskKind::Differencing => "differencing",
        }
    }
}

/// How to decide the virtual size of a format that records it twice (VHD: the footer's
/// Current Size and its CHS geometry, §1.5). A format with one size field (VHDX's
/// VirtualDiskSize) ignores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SizeRule {
    /// The recorded size, except, for a VHD from Virtual PC / Virtual Server whose geometry is
    /// not the 65535/16/255 marker, C×H×S×512 (the guest of those products sees the CHS size).
    #[default]
    Auto,
    /// Always the recorded size (a VHD footer's Current Size).
    CurrentSize,
    /// Always the geometry's C×H×S×512 (capped at Current Size); VHD only.
    Chs,
}

options! {
    /// How to open a layer, whatever its format ([`open_layer`], [`crate::Vhd::open`],
    /// [`crate::vhdx_layer::VhdxLayer::open`]).
    #[derive(Clone, Copy, Debug, Default)]
    pub struct OpenOptions {
        /// Open for writing (exclusively locked).
        pub writable: bool => set_writable,
        /// Accept checksum mismatches of a format's metadata (a VHD footer or dynamic header)
        /// with a warning instead of failing.
        pub lenient: bool,
        /// How to decide the virtual size.
        pub size_rule: SizeRule,
    }
}

impl OpenOptions {
    /// Read-only, strict.
    pub fn read_only() -> OpenOptions {
        OpenOptions::default()
    }

    /// Writable, strict.
    pub fn writable() -> OpenOptions {
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        }
    }
}

/// How one block of a layer holds its sectors.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockState {
    /// Nothing here: the parent's sectors (zeros at the base of a chain).
    Transparent,
    /// Zeros, whatever the parent holds.
    Zero,
    /// Sectors held here: all of them (`None`), or those whose bit is set; the others are
    /// transparent.
    Present(Option<SectorBitmap>),
}

/// How a layer spells a parent path; the resolver maps it onto this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Spelling {
    /// Relative to the child's directory, Windows syntax (`.\dir\parent.vhd`).
    WindowsRelative,
    /// Absolute, Windows syntax (`C:\dir\parent.vhd`, `\\server\share\...`).
    WindowsAbsolute,
    /// A `file://` URL.
    FileUrl,
    /// `\\?\Volume{GUID}\dir\parent.vhdx`.
    VolumePath,
    /// A bare file name, looked up next to the child.
    FileName,
}

/// One parent path hint of a differencing layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathHint {
    /// The path as stored.
    pub text: String,
    /// How to read it.
    pub spelling: Spelling,
    /// Where it came from: a VHD locator code (`W2ru`, `W2ku`, `MacX`, ...), a VHDX locator key
    /// (`relative_path`, ...), or `header name`.
    pub source: &'static str,
}

/// A parent path hint that could not be used, with the reason (listed in
/// [`Error::ParentNotFound`] among the candidates tried).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnusableHint {
    /// What the hint would have been, as shown to the user (`<W2ru locator 2>`, a URL, ...).
    pub path: PathBuf,
    /// Where it came from (`W2ru (locator 2)`, ...).
    pub source: String,
    /// Why it cannot be used (`locator data is empty`, ...).
    pub reason: String,
}

/// What a differencing layer records about its parent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentLink {
    /// A candidate is the parent when its [`Layer::id`] is one of these (VHD: the parent unique
    /// id; VHDX: `parent_linkage` and `parent_linkage2`).
    pub ids: Vec<Uuid>,
    /// The parent's name as the child records it, for messages (VHD: the header's Parent
    /// Unicode Name).
    pub name: String,
    /// Path hints, in the order the format says to try them. Hints spelled
    /// [`Spelling::FileName`] are looked up in the search directories first and next to the
    /// child after every other hint.
    pub hints: Vec<PathHint>,
    /// Hints the layer records but that cannot be read or decoded.
    pub unusable: Vec<UnusableHint>,
}

/// What `chain` and `create` show of one file: its identity, size and link to its parent.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSummary {
    /// The file.
    pub path: PathBuf,
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskKind,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes per block (`None` for a fixed disk).
    pub block_size: Option<u64>,
    /// [`Layer::id`].
    pub unique_id: Uuid,
    /// The first parent id a differencing layer accepts ([`ParentLink::ids`]).
    pub parent_unique_id: Option<Uuid>,
    /// The parent's name as the child records it ([`ParentLink::name`]).
    pub parent_name: Option<String>,
}

impl LayerSummary {
    /// The summary of `layer` (a parent link that cannot be read gives no parent fields).
    pub fn of(layer: &dyn Layer) -> LayerSummary {
        let link = layer.parent_link().ok().flatten();
        LayerSummary {
            path: layer.path().to_path_buf(),
            disk_type: layer.kind(),
            virtual_size: layer.virtual_size(),
            block_size: (layer.kind() != DiskKind::Fixed).then(|| layer.block_size()),
            unique_id: layer.id(),
            parent_unique_id: link.as_ref().and_then(|k| k.ids.first().copied()),
            parent_name: link.map(|k| k.name),
        }
    }
}

/// One disk image opened for reading, seen in its own logical sectors.
pub trait Layer: Send + Sync + fmt::Debug {
    /// The file.
    fn path(&self) -> &Path;
    /// Its format.
    fn format(&self) -> Format;
    /// Fixed, dynamic or differencing.
    fn kind(&self) -> DiskKind;
    /// Virtual size in bytes.
    fn virtual_size(&self) -> u64;
    /// Logical sector size in bytes (512 or 4096); every layer of a chain has the same.
    fn sector_size(&self) -> u32;
    /// Bytes per block.
    fn block_size(&self) -> u64;
    /// The identity children link to.
    fn id(&self) -> Uuid;
    /// For a differencing layer, what it records about its parent.
    fn parent_link(&self) -> Result<Option<ParentLink>>;
    /// The blocks whose state is not [`BlockState::Transparent`], in increasing order. Cost
    /// follows the allocation or the block table's size, never the virtual size; memory is
    /// bounded (a table may be read as the iteration goes, so an item may be a read error).
    fn mapped_blocks(&self) -> Box<dyn Iterator<Item = Result<u64>> + '_>;
    /// The state of block `block`.
    fn block_state(&self, block: u64) -> Result<BlockState>;
    /// Whether block `block` is not [`BlockState::Transparent`], from the block table alone
    /// (no bitmap or data read; the table itself may be read).
    fn is_mapped(&self, block: u64) -> Result<bool>;
    /// How much the file grows, at most, when `blocks` new blocks are written into it (for a
    /// plan's estimates, made before the layer is opened for writing).
    fn growth_for(&self, blocks: u64) -> u64;
    /// Read the stored bytes of `buf.len() / sector_size()` sectors of `block`, from sector
    /// `first` of the block on. Defined only for sectors the block holds.
    fn read_stored(&self, block: u64, first: u64, buf: &mut [u8]) -> Result<()>;
    /// Odd but non-fatal things noticed while opening.
    fn warnings(&self) -> &[String];
    /// Take an advisory lock (exclusive or shared), or fail with System is in use (32774).
    fn lock(&self, exclusive: bool) -> Result<()>;
    /// Warnings about the link from this layer to `parent` (already accepted by id) that do
    /// not stop it (VHD: a parent time stamp that matches neither of the parent's).
    fn link_warnings(&self, parent: &dyn Layer) -> Vec<String> {
        let _ = parent;
        Vec::new()
    }
    /// The concrete layer, for format-specific tools (check, info, set-parent) to downcast.
    fn as_any(&self) -> &dyn Any;
    /// Where `sectors` sectors of `block` from sector `first` on lie, when the block holds all
    /// of them as one contiguous range of a plain file (what a block clone can share). `None`
    /// (the default) means they cannot be cloned: copy them.
    fn clone_source(&self, block: u64, first: u64, sectors: u64) -> Option<CloneSource<'_>> {
        let _ = (block, first, sectors);
        None
    }
}

/// A layer opened for writing: the destination of a merge, the output of a flatten.
pub trait LayerWriter: Layer {
    /// Make room for `blocks` new blocks at once (one call per batch).
    fn reserve(&mut self, blocks: u64) -> Result<()>;
    /// True when writing into `block` allocates it (also when the block table cannot be read:
    /// the write then meets the error).
    fn needs_allocation(&self, block: u64) -> bool;
    /// Write the sectors selected by `mask` from `data` into `block`, from sector `first` of the
    /// block on (`data` covers `mask.len()` sectors). Sectors outside the mask keep their content;
    /// masked sectors afterwards read exactly `data`, zeros included (a differencing layer stops
    /// deferring to its parent there). `data` may be used as scratch. Durable at
    /// [`LayerWriter::commit`].
    fn write_sectors(
        &mut self,
        block: u64,
        first: u64,
        data: &mut [u8],
        mask: &SectorBitmap,
    ) -> Result<()>;
    /// Publish everything written since the last commit in the format's crash-safe order.
    fn commit(&mut self) -> Result<()>;
    /// [`LayerWriter::commit`] up to the point where everything written is durably exposed:
    /// once it returns, every open of the file reads it, with the layer's new identity
    /// ([`Layer::id`]), though the last step of the crash-safe order may still be due
    /// ([`LayerWriter::finish`] completes it). A VHDX's last log entry is then named by a
    /// durable header and its pages written in place but not flushed: a crash replays them
    /// ([`crate::vhdx::Vhdx::commit_live`]). The default commits.
    fn commit_exposed(&mut self) -> Result<()> {
        self.commit()
    }
    /// Commit and end the write session; returns the layer's identity afterwards (a VHDX's
    /// DataWriteGuid changes when its data does).
    fn finish(&mut self) -> Result<Uuid>;
    /// The file's length in bytes now (for the growth a report states).
    fn file_len(&self) -> Result<u64>;
    /// Make sectors `first..` of `block` (as many as `src` holds) read `src`'s data by block
    /// cloning, like [`LayerWriter::write_sectors`] with a full mask: the same crash-safe
    /// order (the cloned data is data, durable before any table entry points at it, at
    /// [`LayerWriter::commit`]). When the answer is not [`CloneOutcome::Cloned`] nothing
    /// changed, and the caller writes the sectors instead; [`CloneOutcome::Unsupported`] says
    /// no clone from that file into this one will work. The default cannot clone.
    fn clone_sectors(
        &mut self,
        block: u64,
        first: u64,
        src: &CloneSource<'_>,
    ) -> Result<CloneOutcome> {
        let _ = (block, first, src);
        Ok(CloneOutcome::Unsupported)
    }
    /// [`LayerWriter::clone_sectors`] of each piece in order, stopping at the first that does
    /// not clone: returns how many pieces were placed (exactly as that many calls would
    /// have), with the outcome of the one that stopped it ([`CloneOutcome::Cloned`] when
    /// all did). Nothing of the pieces after the placed ones changed. A format places pieces
    /// whose bytes are contiguous in both files with one clone of the whole stretch; the
    /// default clones one piece at a time.
    fn clone_run(&mut self, pieces: &[ClonePiece<'_>]) -> Result<(usize, CloneOutcome)> {
        for (i, p) in pieces.iter().enumerate() {
            let r = self.clone_sectors(p.block, p.first, &p.src)?;
            if r != CloneOutcome::Cloned {
                return Ok((i, r));
            }
        }
        Ok((pieces.len(), CloneOutcome::Cloned))
    }
    /// The identity the layer will carry once this session writes data, chosen now and
    /// fixed for the session; `None` when writing keeps the identity (VHD). A merge makes the
    /// child that links to this layer accept it before the first write (see
    /// [`set_parent_ids`]), so that the child stays linked at every instant.
    fn next_id(&mut self) -> Option<Uuid> {
        None
    }
    /// Make the first change of the layer's identity (to [`LayerWriter::next_id`]) wait for
    /// `gate`, and fail with its error (see [`crate::vhdx::Vhdx::set_identity_gate`]). The
    /// default passes it at once.
    fn set_identity_gate(&mut self, gate: IdentityGate) -> Result<()> {
        gate.pass()
    }
}

/// What a [`LayerWriter`] waits for before its identity changes (a merge: the linking
/// child's acceptance of the destination's next identity, durable).
pub struct IdentityGate(Box<dyn FnOnce() -> Result<()> + Send>);

impl IdentityGate {
    /// A gate that waits for `f`.
    pub fn new(f: impl FnOnce() -> Result<()> + Send + 'static) -> IdentityGate {
        IdentityGate(Box::new(f))
    }

    /// Wait for the gate: its answer.
    pub fn pass(self) -> Result<()> {
        (self.0)()
    }
}

impl fmt::Debug for IdentityGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityGate")
    }
}

/// What a cheap look at a file says about its identity (at most a few small reads; for
/// scanning directories for a renamed parent or for siblings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The format whose signature the file carries.
    pub format: Format,
    /// The identity a reader goes by (VHD: the unique id of the footer whose checksum is
    /// right), `None` when no intact copy says.
    pub id: Option<Uuid>,
    /// The kind of disk, by that same intact copy.
    pub kind: Option<DiskKind>,
    /// For a differencing disk, the parent identities it accepts (empty when they cannot be
    /// read intact).
    pub parent_ids: Vec<Uuid>,
    /// Identities the file carries (VHD: the unique id of either footer copy, checksum right
    /// or not, so that a damaged copy of a wanted disk is still recognised).
    pub ids: Vec<Uuid>,
}

/// The format of the file at `path` by its signature, like crosvm's `detect_image_type`:
/// `vhdxfile` at offset 0 is VHDX, anything else is left to the VHD reader (whose footer may
/// be at the end only). `None` when the first bytes cannot be read.
pub fn detect_format(path: &Path) -> Option<Format> {
    // Never open what is not a regular file (a FIFO would block): the VHD reader says what
    // it is.
    if !std::fs::metadata(path).ok()?.is_file() {
        return Some(Format::Vhd);
    }
    let file = std::fs::File::open(path).ok()?;
    Some(format_of(&file))
}

/// The format of the open `file` by its signature ([`detect_format`]'s rule), so that an open
/// or a probe reads it through the one descriptor it then reads the image by.
fn format_of(file: &std::fs::File) -> Format {
    let mut sig = [0u8; 8];
    match crate::io::pread_exact(file, &mut sig, 0) {
        Ok(()) if &sig == b"vhdxfile" => Format::Vhdx,
        _ => Format::Vhd,
    }
}

/// What [`crate::Vhd`] answers when handed a VHDX (Not Supported, 32770): the VHD type reads
/// only VHD; [`open_layer`] opens either.
pub(crate) fn vhdx_not_supported(path: &Path) -> Error {
    Error::NotSupported {
        path: Some(path.to_path_buf()),
        detail: "this is a VHDX file (signature vhdxfile): this operation reads VHD only".into(),
    }
}

/// Open the disk image at `path` read-only (or writable, per `options`) in whatever format
/// its signature says.
pub fn open_layer(path: &Path, options: OpenOptions) -> Result<Box<dyn Layer>> {
    if options.writable {
        if detect_format(path) == Some(Format::Vhdx) {
            return Ok(Box::new(crate::vhdx_layer::VhdxLayer::open(path, options)?));
        }
        return Ok(Box::new(crate::vhd::Vhd::open(path, options)?));
    }
    // Read-only: one open serves the signature and the reader (what either format's own
    // read-only open does first, with its errors).
    let file = files::open_regular_file(path, false)?;
    let format = format_of(&file);
    let storage = crate::io::FileStorage::new(file);
    if format == Format::Vhdx {
        let storage = std::sync::Arc::new(storage);
        let layer = crate::vhdx_layer::VhdxLayer::from_storage(storage, path, false)?;
        return Ok(Box::new(layer));
    }
    Ok(Box::new(crate::vhd::Vhd::from_storage(
        Box::new(storage),
        path,
        options,
    )?))
}

/// Open the image held by `storage` (the file at `path`, possibly wrapped by a test hook) for
/// writing as a layer of `format` (as [`open_layer`] detected it when the chain was opened:
/// the storage is not read for a signature, so that a storage hook sees the format's own
/// I/O only).
pub fn open_writer(
    format: Format,
    storage: Box<dyn crate::io::Storage>,
    path: &Path,
    options: OpenOptions,
) -> Result<Box<dyn LayerWriter>> {
    if format == Format::Vhdx {
        let layer = crate::vhdx_layer::VhdxLayer::from_storage(storage.into(), path, true)?;
        return Ok(Box::new(layer));
    }
    Ok(Box::new(crate::vhd::Vhd::from_storage(
        storage, path, options,
    )?))
}

/// What a new standalone image is to be ([`create_layer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewImage {
    /// [`DiskKind::Fixed`] or [`DiskKind::Dynamic`].
    pub kind: DiskKind,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes per block (see [`Format::create_limits`]).
    pub block_size: u32,
    /// Logical sector size in bytes, where the format records one (a VHD's are 512 whatever
    /// is asked).
    pub sector_size: u32,
}

/// Create the new standalone image `image` of `format` at `path` (which must not exist) and
/// open it for writing.
pub fn create_layer(format: Format, path: &Path, image: &NewImage) -> Result<Box<dyn LayerWriter>> {
    match format {
        Format::Vhd => crate::vhd_layer::create(path, image),
        Format::Vhdx => crate::vhdx_layer::create(path, image),
    }
}

/// Set the parent identities the differencing layer held by `storage` (the file at `child`,
/// of `format`) accepts: `primary`, and `secondary` as well when given, crash-safely and
/// without changing `child`'s view or its own identity. A merge into a destination whose
/// identity changes when written ([`LayerWriter::next_id`]) calls it with (current, next)
/// before the first write and with (new, none) after the last, so that the child accepts its
/// parent at every instant. Only formats whose identity changes with data need this (VHDX:
/// `parent_linkage` and `parent_linkage2`); for the others it does nothing.
pub fn set_parent_ids(
    format: Format,
    storage: Box<dyn crate::io::Storage>,
    child: &Path,
    primary: Uuid,
    secondary: Option<Uuid>,
) -> Result<()> {
    match format {
        Format::Vhdx => crate::vhdx_layer::set_parent_ids(storage, child, primary, secondary),
        Format::Vhd => Ok(()),
    }
}

/// The parent linkage of the differencing layer at a path, held open for writing (through a
/// storage the caller opened, exclusively locked) across a merge: [`set_parent_ids`] twice
/// in one write session, the file held from the first update to [`HeldLink::finish`].
#[derive(Debug)]
pub(crate) struct HeldLink(LinkFile);

#[derive(Debug)]
enum LinkFile {
    Vhdx(Box<crate::vhdx_layer::VhdxLinkage>),
    /// A format whose linkage never changes: only the file (and its lock) is held.
    Other {
        _file: Box<dyn crate::io::Storage>,
    },
}

impl HeldLink {
    /// Open the layer of `format` at `child` over `storage` to rewrite its linkage (a dirty
    /// VHDX log is replayed onto the file).
    pub(crate) fn open(
        format: Format,
        storage: Box<dyn crate::io::Storage>,
        child: &Path,
    ) -> Result<HeldLink> {
        Ok(HeldLink(match format {
            Format::Vhdx => {
                let l = crate::vhdx_layer::VhdxLinkage::open(child, Some(storage.into()))?;
                LinkFile::Vhdx(Box::new(l))
            }
            Format::Vhd => LinkFile::Other { _file: storage },
        }))
    }

    /// [`set_parent_ids`] through this handle; with `live` the update is published with the
    /// session left open (a VHDX's log live, its pages in place not yet flushed: see
    /// [`crate::vhdx::Vhdx::commit_live`]), else at [`HeldLink::finish`].
    pub(crate) fn set_parent_ids(
        &mut self,
        primary: Uuid,
        secondary: Option<Uuid>,
        live: bool,
    ) -> Result<()> {
        match &mut self.0 {
            LinkFile::Vhdx(l) => l.set_parent_ids(primary, secondary, live),
            LinkFile::Other { .. } => Ok(()),
        }
    }

    /// Publish what is pending, end the session (a VHDX's pages in place flushed, its log
    /// cleared) and release the file.
    pub(crate) fn finish(mut self) -> Result<()> {
        match &mut self.0 {
            LinkFile::Vhdx(l) => l.finish(),
            LinkFile::Other { .. } => Ok(()),
        }
    }
}

/// Open the existing image at `path` for writing the way every command that writes one does:
/// exclusively locked before it is even read (System is in use, 32774, when another process
/// holds it), in the format its signature says.
pub fn open_layer_for_writing(path: &Path, options: OpenOptions) -> Result<Box<dyn LayerWriter>> {
    let format = detect_format(path).unwrap_or(Format::Vhd);
    let storage = files::open_for_writing(path, files::WriteMode::Existing)?;
    let options = OpenOptions {
        writable: true,
        ..options
    };
    open_writer(format, Box::new(storage), path, options)
}

/// Probe the file at `path` (see [`Probe`]); `None` for anything that is not a regular file
/// holding a disk image of a known format.
pub fn probe(path: &Path) -> Option<Probe> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    // One open for the signature and the probe's reads.
    let file = std::fs::File::open(path).ok()?;
    match format_of(&file) {
        Format::Vhdx => crate::vhdx_layer::probe(file),
        Format::Vhd => crate::vhd_layer::probe(file, meta.len()),
    }
}

/// The number of mapped blocks of `layer` ([`Layer::mapped_blocks`]: the first read error
/// ends it).
pub(crate) fn count_mapped(layer: &(impl Layer + ?Sized)) -> Result<u64> {
    layer
        .mapped_blocks()
        .try_fold(0u64, |n, b| b.map(|_| n + 1))
}
