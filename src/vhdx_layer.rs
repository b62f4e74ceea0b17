//! [`Vhdx`] behind the layer boundary: [`VhdxLayer`] is [`Layer`] and [`LayerWriter`] for VHDX
//! files, its parent link read from the parent locator ([MS-VHDX] 2.6.2.6), and the cheap
//! probe the directory scans use.
//!
//! What the engine needs from a VHDX maps directly: the identity children link to is the
//! DataWriteGuid; NOT_PRESENT is [`BlockState::Transparent`]; ZERO, UNMAPPED and UNDEFINED are
//! [`BlockState::Zero`] (zeros even in a differencing disk); FULLY_PRESENT and
//! PARTIALLY_PRESENT are [`BlockState::Present`]. Writes go through [`Vhdx::write_sectors`],
//! whose commit publishes BAT and bitmap pages through the log.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::bitmap::SectorBitmap;
use crate::error::{Error, Result};
use crate::io::{CloneOutcome, FileStorage, Storage};
use crate::layer::OpenOptions;
use crate::layer::{
    BlockState, ClonePiece, CloneSource, CreateLimits, DiskKind, Format, Layer, LayerWriter,
    NewImage, ParentLink, PathHint, Probe, Spelling,
};
use crate::vhdx::format::MIB;
use crate::vhdx::format::bat::PayloadState;
use crate::vhdx::format::metadata::{Metadata, ParentLocator};
use crate::vhdx::reader::{Mode, Structures};
use crate::vhdx::{self, Vhdx};

/// The storage a [`VhdxLayer`] reads and writes through (the file, or a test's wrapper).
pub type LayerStorage = Arc<dyn Storage>;

/// Parent locator keys that hold a path, in the order [MS-VHDX] 2.6.2.6.1 says to try them:
/// relative first (it survives moving the whole chain), then the volume path, then the
/// absolute Win32 path.
const PATH_KEYS: [(&str, Spelling); 3] = [
    ("relative_path", Spelling::WindowsRelative),
    ("volume_path", Spelling::VolumePath),
    ("absolute_win32_path", Spelling::WindowsAbsolute),
];

/// One VHDX file as a layer of a chain, or as the destination of a merge.
#[derive(Debug)]
pub struct VhdxLayer {
    path: PathBuf,
    v: Vhdx<LayerStorage>,
    warnings: Vec<String>,
}

impl VhdxLayer {
    /// Open the VHDX at `path` read-only (a dirty log replayed in memory) or, with
    /// `options.writable`, exclusively locked with its log replayed onto the file.
    pub fn open(path: &Path, options: OpenOptions) -> Result<VhdxLayer> {
        let storage: LayerStorage = if options.writable {
            Arc::new(crate::layer::files::open_for_writing(
                path,
                crate::layer::files::WriteMode::Existing,
            )?)
        } else {
            Arc::new(FileStorage::new(crate::layer::files::open_regular_file(
                path, false,
            )?))
        };
        VhdxLayer::from_storage(storage, path, options.writable)
    }

    /// Open the VHDX held by `storage` (the file at `path`, possibly wrapped by a test hook).
    pub fn from_storage(storage: LayerStorage, path: &Path, writable: bool) -> Result<VhdxLayer> {
        let v = Vhdx::open(storage, writable).map_err(|e| e.in_file(path))?;
        Ok(Self::of(v, path))
    }

    fn of(v: Vhdx<LayerStorage>, path: &Path) -> VhdxLayer {
        let mut warnings = Vec::new();
        let replayed = v.reader().replayed_entries();
        if replayed > 0 {
            warnings.push(format!(
                "the log holds {replayed} entr{} not yet applied; read as if replayed (the file is not written)",
                if replayed == 1 { "y" } else { "ies" }
            ));
        }
        VhdxLayer {
            path: path.to_path_buf(),
            v,
            warnings,
        }
    }

    /// The open file, for VHDX-specific tools (info, check, set-parent).
    pub fn vhdx(&self) -> &Vhdx<LayerStorage> {
        &self.v
    }

    /// The open file, writable side (set-parent, merge's linkage update).
    pub fn vhdx_mut(&mut self) -> &mut Vhdx<LayerStorage> {
        &mut self.v
    }

    fn io_error(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{}: {what}", self.path.display()), e)
    }
}

/// A VHDX opened writable to rewrite its parent linkage only ([`Vhdx::open_for_metadata`]:
/// headers, regions, metadata, a dirty log replayed onto the file; the BAT not streamed), for
/// set-parent and a merge's linkage updates. Not a [`Layer`]: it knows no block, so it offers
/// only what those need (its identity, sizes, parent locator, and the locator's rewrite),
/// and no block question can be asked of it.
#[derive(Debug)]
pub(crate) struct VhdxLinkage {
    path: PathBuf,
    v: Vhdx<LayerStorage>,
}

impl VhdxLinkage {
    /// Open the VHDX at `path` (or over `storage`, the file at `path` possibly wrapped by a
    /// test hook; else exclusively locked first).
    pub(crate) fn open(path: &Path, storage: Option<LayerStorage>) -> Result<VhdxLinkage> {
        let storage: LayerStorage = match storage {
            Some(s) => s,
            None => Arc::new(crate::layer::files::open_for_writing(
                path,
                crate::layer::files::WriteMode::Existing,
            )?),
        };
        let v = Vhdx::open_for_metadata(storage).map_err(|e| e.in_file(path))?;
        Ok(VhdxLinkage {
            path: path.to_path_buf(),
            v,
        })
    }

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Fixed, dynamic or differencing (by its metadata, as [`VhdxLayer`] says).
    pub(crate) fn kind(&self) -> DiskKind {
        kind_of(&self.v.reader().metadata)
    }

    /// The DataWriteGuid (unchanged by a linkage rewrite).
    pub(crate) fn id(&self) -> Uuid {
        self.v.data_write_guid()
    }

    /// Virtual size in bytes.
    pub(crate) fn virtual_size(&self) -> u64 {
        self.v.virtual_size()
    }

    /// Logical sector size in bytes.
    pub(crate) fn sector_size(&self) -> u32 {
        self.v.sector_size()
    }

    /// The parent locator, `None` for a disk without a parent.
    pub(crate) fn parent_locator(&self) -> Option<&ParentLocator> {
        self.v.parent_locator()
    }

    /// Replace the parent locator (through the log; durable at [`VhdxLinkage::finish`]).
    pub(crate) fn set_parent_locator(&mut self, loc: ParentLocator) -> Result<()> {
        let path = self.path.clone();
        self.v.set_parent_locator(loc).map_err(|e| e.in_file(&path))
    }

    /// Publish the rewrite and end the session.
    pub(crate) fn finish(&mut self) -> Result<()> {
        let path = self.path.clone();
        self.v.finish().map(drop).map_err(|e| e.in_file(&path))
    }
}

/// The kind a VHDX's metadata says: HasParent is differencing; LeaveBlockAllocated without a
/// parent is what Hyper-V and qemu call fixed ([MS-VHDX] 2.6.2.1 has no type field).
fn kind_of(m: &Metadata) -> DiskKind {
    let fp = m.file_parameters;
    match (fp.has_parent, fp.leave_block_allocated) {
        (true, _) => DiskKind::Differencing,
        (false, true) => DiskKind::Fixed,
        (false, false) => DiskKind::Dynamic,
    }
}

/// The identities a child accepts as its parent: `parent_linkage`, and `parent_linkage2`
/// when set (not nil).
fn accepted_ids(loc: &ParentLocator) -> Result<Vec<Uuid>> {
    let mut ids = vec![loc.parent_linkage()?];
    ids.extend(loc.parent_linkage2().filter(|g| !g.is_nil()));
    Ok(ids)
}

/// What the parent locator records, as a [`ParentLink`]: the accepted ids, the path keys in
/// [`PATH_KEYS`] order, and the file name of the first path as a bare name to look for
/// (next to the child, in the search directories).
pub(crate) fn parent_link_of(loc: &ParentLocator) -> Result<ParentLink> {
    let mut link = ParentLink {
        ids: accepted_ids(loc)?,
        ..ParentLink::default()
    };
    for (key, spelling) in PATH_KEYS {
        let Some(text) = loc.get(key) else {
            continue;
        };
        link.hints.push(PathHint {
            text: text.to_string(),
            spelling,
            source: key,
        });
    }
    if let Some(name) = link
        .hints
        .first()
        .and_then(|h| h.text.rsplit(['\\', '/']).next())
        .filter(|n| !n.is_empty())
    {
        link.name = name.to_string();
        link.hints.push(PathHint {
            text: name.to_string(),
            spelling: Spelling::FileName,
            source: "file name of a path key",
        });
    }
    Ok(link)
}

impl Layer for VhdxLayer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn kind(&self) -> DiskKind {
        kind_of(&self.v.reader().metadata)
    }

    fn virtual_size(&self) -> u64 {
        self.v.virtual_size()
    }

    fn sector_size(&self) -> u32 {
        self.v.sector_size()
    }

    fn block_size(&self) -> u64 {
        self.v.block_size()
    }

    /// The DataWriteGuid ([MS-VHDX] 2.2.2: what a child's parent_linkage records).
    fn id(&self) -> Uuid {
        self.v.data_write_guid()
    }

    fn parent_link(&self) -> Result<Option<ParentLink>> {
        if !self.v.is_differencing() {
            return Ok(None);
        }
        let loc = self.v.parent_locator().ok_or_else(|| {
            Error::format("VHDX: a differencing disk (HasParent) without a parent locator")
                .in_file(&self.path)
        })?;
        parent_link_of(loc)
            .map(Some)
            .map_err(|e| e.in_file(&self.path))
    }

    fn mapped_blocks(&self) -> Box<dyn Iterator<Item = Result<u64>> + '_> {
        Box::new(self.v.mapped_blocks().map(Ok))
    }

    fn block_state(&self, block: u64) -> Result<BlockState> {
        Ok(match self.v.block_state(block)? {
            vhdx::BlockState::Transparent => BlockState::Transparent,
            vhdx::BlockState::Zero => BlockState::Zero,
            vhdx::BlockState::Present(map) => BlockState::Present(map),
        })
    }

    fn is_mapped(&self, block: u64) -> Result<bool> {
        Ok(self.v.is_mapped(block))
    }

    /// Each new block takes its payload block (a multiple of 1 MiB, so no alignment gap) and,
    /// in a differencing disk, at most one new 1 MiB sector bitmap block per block.
    fn growth_for(&self, blocks: u64) -> u64 {
        let bitmap = if self.v.is_differencing() { MIB } else { 0 };
        blocks.saturating_mul(self.v.block_size() + bitmap)
    }

    fn read_stored(&self, block: u64, first: u64, buf: &mut [u8]) -> Result<()> {
        self.v
            .read_stored(block, first, buf)
            .map_err(|e| e.in_file(&self.path))
    }

    fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn lock(&self, exclusive: bool) -> Result<()> {
        crate::layer::files::take_lock(self.v.storage().as_ref(), &self.path, exclusive)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// Present blocks' payload as stored (not while a dirty log is replayed in memory).
    fn clone_source(&self, block: u64, first: u64, sectors: u64) -> Option<CloneSource<'_>> {
        let len = sectors.checked_mul(u64::from(self.v.sector_size()))?;
        let (storage, offset) = self.v.clone_source(block, first, len)?;
        Some(CloneSource {
            file: storage.as_file()?,
            offset,
            len,
        })
    }
}

impl LayerWriter for VhdxLayer {
    /// Extend the file once for the batch's new blocks ([`Vhdx::reserve_space`]).
    fn reserve(&mut self, blocks: u64) -> Result<()> {
        let len = self.growth_for(blocks);
        let path = self.path.clone();
        self.v.reserve_space(len).map_err(|e| e.in_file(&path))
    }

    fn needs_allocation(&self, block: u64) -> bool {
        !matches!(
            self.v.payload_entry(block).and_then(|e| e.payload_state()),
            Ok(PayloadState::FullyPresent | PayloadState::PartiallyPresent)
        )
    }

    fn write_sectors(
        &mut self,
        block: u64,
        first: u64,
        data: &mut [u8],
        mask: &SectorBitmap,
    ) -> Result<()> {
        let path = self.path.clone();
        self.v
            .write_sectors(block, first, data, mask)
            .map_err(|e| e.in_file(&path))
    }

    fn commit(&mut self) -> Result<()> {
        let path = self.path.clone();
        self.v.commit().map_err(|e| e.in_file(&path))
    }

    /// [`Vhdx::commit_live`]: the pages in place of the last entry are flushed by
    /// [`LayerWriter::finish`].
    fn commit_exposed(&mut self) -> Result<()> {
        let path = self.path.clone();
        self.v.commit_live().map_err(|e| e.in_file(&path))
    }

    fn clone_sectors(
        &mut self,
        block: u64,
        first: u64,
        src: &CloneSource<'_>,
    ) -> Result<CloneOutcome> {
        let path = self.path.clone();
        self.v
            .clone_sectors(block, first, src.file, src.offset, src.len)
            .map_err(|e| e.in_file(&path))
    }

    /// Stretches contiguous in both files in one clone each ([`Vhdx::clone_run`]).
    fn clone_run(&mut self, pieces: &[ClonePiece<'_>]) -> Result<(usize, CloneOutcome)> {
        let path = self.path.clone();
        self.v.clone_run(pieces).map_err(|e| e.in_file(&path))
    }

    /// The DataWriteGuid afterwards: new when the session wrote anything.
    fn finish(&mut self) -> Result<Uuid> {
        let path = self.path.clone();
        self.v.finish().map_err(|e| e.in_file(&path))
    }

    fn file_len(&self) -> Result<u64> {
        self.v
            .storage()
            .len()
            .map_err(|e| self.io_error("reading length", e))
    }

    fn next_id(&mut self) -> Option<Uuid> {
        Some(self.v.next_data_write_guid())
    }

    fn set_identity_gate(&mut self, gate: crate::layer::IdentityGate) -> Result<()> {
        let path = self.path.clone();
        self.v.set_identity_gate(gate).map_err(|e| e.in_file(&path))
    }
}

/// The locator `loc` with `key` set to the braced GUID `g` (added at the end when absent).
fn with_guid(mut loc: ParentLocator, key: &str, g: Uuid) -> ParentLocator {
    let text = format!("{{{g}}}");
    match loc.entries.iter_mut().find(|(k, _)| k == key) {
        Some((_, v)) => *v = text,
        None => loc.entries.push((key.to_string(), text)),
    }
    loc
}

/// See [`crate::layer::set_parent_ids`]: `parent_linkage` = `primary`, `parent_linkage2` =
/// `secondary` or the nil GUID (as Hyper-V writes it), through the child's log; the child's
/// DataWriteGuid stays. Nothing is written when the locator says so already.
pub(crate) fn set_parent_ids(
    storage: Box<dyn Storage>,
    child: &Path,
    primary: Uuid,
    secondary: Option<Uuid>,
) -> Result<()> {
    let mut link = VhdxLinkage::open(child, Some(storage.into()))?;
    link.set_parent_ids(primary, secondary, false)?;
    link.finish()
}

impl VhdxLinkage {
    /// `parent_linkage` = `primary`, `parent_linkage2` = `secondary` or the nil GUID (as
    /// Hyper-V writes it), published through the log: with `live`, by
    /// [`Vhdx::commit_live`] (the log left live, the session open: a later call or
    /// [`VhdxLinkage::finish`] ends it), else by [`VhdxLinkage::finish`] when the caller
    /// calls it. Nothing is written when the locator says so already.
    pub(crate) fn set_parent_ids(
        &mut self,
        primary: Uuid,
        secondary: Option<Uuid>,
        live: bool,
    ) -> Result<()> {
        let child = self.path.clone();
        let loc = self.parent_locator().cloned().ok_or_else(|| {
            Error::InvalidParameter(format!(
                "{} is not a differencing disk: no parent linkage to update",
                child.display()
            ))
        })?;
        let ids = accepted_ids(&loc).map_err(|e| e.in_file(&child))?;
        let want: Vec<Uuid> = std::iter::once(primary).chain(secondary).collect();
        if ids == want {
            return Ok(());
        }
        let second = secondary.unwrap_or(Uuid::nil());
        let loc = with_guid(
            with_guid(loc, "parent_linkage", primary),
            "parent_linkage2",
            second,
        );
        self.set_parent_locator(loc)?;
        if live {
            self.v.commit_live().map_err(|e| e.in_file(&child))?;
        }
        Ok(())
    }
}

impl crate::chain::ChainLayer {
    /// The layer as a [`VhdxLayer`], `None` for a layer of another format.
    pub fn vhdx(&self) -> Option<&VhdxLayer> {
        self.layer.as_any().downcast_ref::<VhdxLayer>()
    }
}

/// What a new standalone VHDX allows: 64 TiB, blocks of 1 to 256 MiB ([MS-VHDX] 2.6.2.1),
/// by default Hyper-V's: 32 MiB for a dynamic disk, 2 MiB for a fixed one.
pub(crate) fn create_limits(kind: DiskKind) -> CreateLimits {
    use crate::vhdx::format::metadata::{MAX_BLOCK_SIZE, MAX_VIRTUAL_SIZE, MIN_BLOCK_SIZE};
    CreateLimits {
        max_virtual_size: MAX_VIRTUAL_SIZE,
        block_sizes: MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE,
        default_block_size: match kind {
            DiskKind::Fixed => vhdx::create::DEFAULT_DIFFERENCING_BLOCK,
            _ => vhdx::create::DEFAULT_DYNAMIC_BLOCK,
        },
    }
}

/// A new fixed or dynamic VHDX at `path` with the image's logical sector size, open for
/// writing ([`crate::layer::create_layer`]).
pub(crate) fn create(path: &Path, image: &NewImage) -> Result<Box<dyn LayerWriter>> {
    use crate::vhdx::create as vx;
    let opts = vx::CreateOptions {
        block_size: Some(image.block_size),
        logical_sector_size: image.sector_size,
        ..vx::CreateOptions::default()
    };
    let mut v = match image.kind {
        DiskKind::Fixed => vx::create_fixed(path, image.size, &opts)?,
        _ => vx::create_dynamic(path, image.size, &opts)?,
    };
    v.finish()?;
    drop(v);
    Ok(Box::new(VhdxLayer::open(path, OpenOptions::writable())?))
}

/// Probe the VHDX open as `file` cheaply: headers, log and metadata, not the BAT.
pub(crate) fn probe(file: std::fs::File) -> Option<Probe> {
    let mode = Mode {
        differencing: true,
        ..Mode::default()
    };
    let s = Structures::open(FileStorage::new(file), mode).ok()?;
    let id = s.header.header.data_write_guid;
    let parent_ids = match &s.metadata.parent_locator {
        Some(loc) => accepted_ids(loc).unwrap_or_default(),
        None => Vec::new(),
    };
    Some(Probe {
        format: Format::Vhdx,
        id: Some(id),
        kind: Some(kind_of(&s.metadata)),
        parent_ids,
        ids: vec![id],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhdx::create::{CreateOptions, create_differencing, create_dynamic};

    fn small() -> CreateOptions {
        CreateOptions {
            block_size: Some(MIB as u32),
            ..CreateOptions::default()
        }
    }

    /// A 8 MiB dynamic base with 4 KiB written at 1 MiB, and a differencing child of it
    /// holding one sector at 3 MiB + 512; returns the base's DataWriteGuid.
    fn base_and_child(base: &Path, child: &Path) -> Uuid {
        let mut b = create_dynamic(base, 8 * MIB, &small()).unwrap();
        b.write_at(MIB, &[5; 4096]).unwrap();
        let base_id = b.finish().unwrap();
        drop(b);
        let mut c = create_differencing(child, base, &small()).unwrap();
        c.write_at(3 * MIB + 512, &[7; 512]).unwrap();
        c.finish().unwrap();
        base_id
    }

    #[test]
    fn a_differencing_vhdx_links_to_its_parents_data_write_guid() {
        let dir = tempfile::tempdir().unwrap();
        let (base, child) = (dir.path().join("base.vhdx"), dir.path().join("c.avhdx"));
        let base_id = base_and_child(&base, &child);

        let l = VhdxLayer::open(&child, OpenOptions::read_only()).unwrap();
        assert_eq!(
            (l.format(), l.kind()),
            (Format::Vhdx, DiskKind::Differencing)
        );
        let link = l.parent_link().unwrap().unwrap();
        assert_eq!(link.ids, vec![base_id]);
        assert_eq!(link.name, "base.vhdx");
        assert_eq!(link.hints[0].source, "relative_path");
        assert_eq!(link.hints.last().unwrap().spelling, Spelling::FileName);
        assert_eq!(
            l.mapped_blocks().collect::<Result<Vec<_>>>().unwrap(),
            vec![3]
        );
        let BlockState::Present(Some(map)) = l.block_state(3).unwrap() else {
            panic!("a partly written child block is PARTIALLY_PRESENT");
        };
        assert_eq!(map.runs().collect::<Vec<_>>(), vec![1..2]);
        let mut buf = [0u8; 512];
        l.read_stored(3, 1, &mut buf).unwrap();
        assert_eq!(buf, [7; 512]);

        let b = VhdxLayer::open(&base, OpenOptions::read_only()).unwrap();
        assert_eq!((b.id(), b.kind()), (base_id, DiskKind::Dynamic));
        let p = crate::layer::probe(&child).unwrap();
        assert_eq!((p.format, p.parent_ids), (Format::Vhdx, vec![base_id]));
        assert_eq!(crate::layer::probe(&base).unwrap().id, Some(base_id));
    }

    #[test]
    fn set_parent_ids_keeps_the_childs_view_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (base, child) = (dir.path().join("base.vhdx"), dir.path().join("c.avhdx"));
        let base_id = base_and_child(&base, &child);
        let before = VhdxLayer::open(&child, OpenOptions::read_only()).unwrap();
        let (id_before, mut own_before) = (before.id(), vec![0u8; 8 << 20]);
        before.vhdx().read_own(0, &mut own_before).unwrap();
        drop(before);

        let next = Uuid::new_v4();
        let storage = || -> Box<dyn Storage> {
            Box::new(
                crate::layer::files::open_for_writing(
                    &child,
                    crate::layer::files::WriteMode::Existing,
                )
                .unwrap(),
            )
        };
        set_parent_ids(storage(), &child, base_id, Some(next)).unwrap();
        let l = VhdxLayer::open(&child, OpenOptions::read_only()).unwrap();
        assert_eq!(l.parent_link().unwrap().unwrap().ids, vec![base_id, next]);
        assert_eq!(l.id(), id_before, "a link change is no data change");
        let mut own = vec![0u8; 8 << 20];
        l.vhdx().read_own(0, &mut own).unwrap();
        assert!(own == own_before);
        let loc = l.vhdx().parent_locator().unwrap().clone();
        assert_eq!(loc.get("relative_path"), Some(r".\base.vhdx"));
        drop(l);

        set_parent_ids(storage(), &child, next, None).unwrap();
        let l = VhdxLayer::open(&child, OpenOptions::read_only()).unwrap();
        assert_eq!(l.parent_link().unwrap().unwrap().ids, vec![next]);
        let nil = format!("{{{}}}", Uuid::nil());
        assert_eq!(
            l.vhdx().parent_locator().unwrap().get("parent_linkage2"),
            Some(nil.as_str())
        );
    }

    #[test]
    fn parent_linkage2_is_accepted() {
        let g1 = Uuid::new_v4();
        let g2 = Uuid::new_v4();
        let loc = ParentLocator {
            locator_type: crate::vhdx::format::metadata::VHDX_LOCATOR_TYPE,
            entries: vec![
                ("parent_linkage".into(), format!("{{{g1}}}")),
                ("parent_linkage2".into(), format!("{{{g2}}}")),
                (
                    "absolute_win32_path".into(),
                    r"D:\vms\Base Disk.vhdx".into(),
                ),
            ],
        };
        let link = parent_link_of(&loc).unwrap();
        assert_eq!(link.ids, vec![g1, g2]);
        assert_eq!(link.name, "Base Disk.vhdx");
        let sources: Vec<&str> = link.hints.iter().map(|h| h.source).collect();
        assert_eq!(sources, ["absolute_win32_path", "file name of a path key"]);
    }
}
