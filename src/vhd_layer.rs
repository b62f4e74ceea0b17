//! [`Vhd`] behind the layer boundary: [`Layer`] and [`LayerWriter`] for VHD files, the parent
//! link read from the dynamic header and the parent locators, and the cheap probe.
//!
//! Everything VHD-specific the chain, the planner, merge and flatten used to know (512-byte
//! sectors, 2 MiB chunks of a fixed disk, BAT offsets, locator platform codes and their
//! order, the parent time stamp, the growth per new block) is here.

use std::any::Any;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::bitmap::SectorBitmap;
use crate::chain::{Chain, ChainLayer};
use crate::error::{Error, Result};
use crate::format::{DiskType, PlatformCode, SECTOR_SIZE};
use crate::io::{CloneOutcome, ClonePiece};
use crate::layer::{
    BlockState, CloneSource, CreateLimits, DiskKind, Format, Layer, LayerWriter, NewImage,
    ParentLink, PathHint, Probe, Spelling, UnusableHint,
};
use crate::vhd::{BlockMap, DATA_ALIGNMENT, FIXED_CHUNK, Vhd};

/// Platform codes in the order their locators are tried (§5.4): the relative Windows path
/// first (it survives moving the whole chain), then the absolute one, the file URL, and the
/// deprecated 8-bit forms; with how each spells its path and its name as a hint source.
const LOCATOR_ORDER: [(PlatformCode, Spelling, &str); 5] = [
    (PlatformCode::W2ru, Spelling::WindowsRelative, "W2ru"),
    (PlatformCode::W2ku, Spelling::WindowsAbsolute, "W2ku"),
    (PlatformCode::MacX, Spelling::FileUrl, "MacX"),
    (PlatformCode::Wi2r, Spelling::WindowsRelative, "Wi2r"),
    (PlatformCode::Wi2k, Spelling::WindowsAbsolute, "Wi2k"),
];

impl From<DiskType> for DiskKind {
    fn from(t: DiskType) -> DiskKind {
        match t {
            DiskType::Fixed => DiskKind::Fixed,
            DiskType::Differencing => DiskKind::Differencing,
            // Validation refuses other types; a dynamic disk is the safe reading.
            _ => DiskKind::Dynamic,
        }
    }
}

impl PartialEq<DiskType> for DiskKind {
    fn eq(&self, other: &DiskType) -> bool {
        match other {
            DiskType::Fixed => *self == DiskKind::Fixed,
            DiskType::Dynamic => *self == DiskKind::Dynamic,
            DiskType::Differencing => *self == DiskKind::Differencing,
            DiskType::Other(_) => false,
        }
    }
}

impl Vhd {
    /// The decoded locators in [`LOCATOR_ORDER`] as hints; locators whose payload cannot be
    /// read or decoded are listed as unusable instead.
    fn locator_hints(&self, link: &mut ParentLink) -> Result<()> {
        let Some(h) = self.header() else {
            return Ok(());
        };
        for (code, spelling, name) in LOCATOR_ORDER {
            for (slot, loc) in h.locators.iter().enumerate() {
                if loc.platform_code != code {
                    continue;
                }
                let unusable = |reason: String| UnusableHint {
                    path: PathBuf::from(format!("<{name} locator {slot}>")),
                    source: format!("{name} (locator {slot})"),
                    reason,
                };
                // The one payload reader: bounded, and checked against the file first.
                let data = match self.read_locator_payload(slot) {
                    Ok(Some(data)) if !data.is_empty() => data,
                    Ok(_) => {
                        link.unusable.push(unusable("locator data is empty".into()));
                        continue;
                    }
                    Err(Error::Format { detail, .. }) => {
                        link.unusable.push(unusable(detail));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let Some(text) = code.decode_payload(&data) else {
                    continue;
                };
                if spelling == Spelling::FileUrl
                    && crate::locator::path_from_file_url(&text).is_none()
                {
                    link.unusable.push(UnusableHint {
                        path: PathBuf::from(text),
                        ..unusable("not a file:// URL".into())
                    });
                    continue;
                }
                link.hints.push(PathHint {
                    text,
                    spelling,
                    source: name,
                });
            }
        }
        Ok(())
    }

    /// Absolute file offset of sector `first` of block `block`, for `sectors` sectors the
    /// block holds.
    fn stored_offset(&self, block: u64, first: u64, sectors: u64) -> Result<u64> {
        let spb = self.sectors_per_block();
        let bad = |why: &str| {
            Error::InvalidParameter(format!(
                "{}: read of {sectors} sector(s) at sector {first} of block {block}: {why}",
                self.path().display()
            ))
        };
        if first.checked_add(sectors).is_none_or(|e| e > spb) {
            return Err(bad("past the end of the block"));
        }
        // From the block table alone: no bitmap read per call (read_plan reads run by run).
        let data_offset = match self.header() {
            _ if block >= self.block_count() => None,
            None => Some(block * FIXED_CHUNK),
            Some(h) => self.block_offset(block)?.map(|o| o + h.bitmap_bytes()),
        };
        match data_offset {
            Some(at) => Ok(at + first * SECTOR_SIZE),
            None => Err(bad("the block is not allocated")),
        }
    }
}

impl Layer for Vhd {
    fn path(&self) -> &Path {
        Vhd::path(self)
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn kind(&self) -> DiskKind {
        self.disk_type().into()
    }

    fn virtual_size(&self) -> u64 {
        Vhd::virtual_size(self)
    }

    fn sector_size(&self) -> u32 {
        SECTOR_SIZE as u32
    }

    fn block_size(&self) -> u64 {
        Vhd::block_size(self)
    }

    fn id(&self) -> Uuid {
        self.unique_id()
    }

    /// The parent unique id, the locators in the order of §5.4, then the header's Parent
    /// Unicode Name (its last component) as a file name. An all-zero parent id is refused:
    /// blktap marks a raw, non-VHD parent that way.
    fn parent_link(&self) -> Result<Option<ParentLink>> {
        let (DiskType::Differencing, Some(h)) = (self.disk_type(), self.header()) else {
            return Ok(None);
        };
        let name = h.parent_name();
        if h.parent_unique_id.is_nil() {
            return Err(Error::NotSupported {
                path: Some(self.path().to_path_buf()),
                detail: format!(
                    "differencing disk with an all-zero Parent Unique Id (parent \"{name}\"): blktap marks a raw, non-VHD parent this way, which is not supported"
                ),
            });
        }
        let mut link = ParentLink {
            ids: vec![h.parent_unique_id],
            name: name.clone(),
            ..ParentLink::default()
        };
        self.locator_hints(&mut link)?;
        if !name.is_empty() {
            link.hints.push(PathHint {
                text: name,
                spelling: Spelling::FileName,
                source: "header name",
            });
        }
        Ok(Some(link))
    }

    fn mapped_blocks(&self) -> Box<dyn Iterator<Item = Result<u64>> + '_> {
        let count = self.block_count();
        if self.header().is_none() {
            return Box::new((0..count).map(Ok));
        }
        Box::new(
            self.allocated_indices()
                .take_while(move |i| i.as_ref().map_or(true, |&i| i < count)),
        )
    }

    fn block_state(&self, block: u64) -> Result<BlockState> {
        Ok(match self.block_map(block)? {
            BlockMap::Absent => BlockState::Transparent,
            BlockMap::Present { bitmap, .. } => BlockState::Present(bitmap),
        })
    }

    fn is_mapped(&self, block: u64) -> Result<bool> {
        match self.header() {
            None => Ok(block < self.block_count()),
            Some(_) => self.is_allocated(block),
        }
    }

    /// Each new block takes its bitmap and data, and may need up to one alignment gap in
    /// front of it.
    fn growth_for(&self, blocks: u64) -> u64 {
        if !self.disk_type().is_sparse() {
            return 0;
        }
        let stride = self.bitmap_bytes() + Vhd::block_size(self);
        blocks.saturating_mul(stride + DATA_ALIGNMENT)
    }

    fn read_stored(&self, block: u64, first: u64, buf: &mut [u8]) -> Result<()> {
        if !(buf.len() as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(Error::InvalidParameter(format!(
                "read_stored: {} bytes is not a whole number of sectors",
                buf.len()
            )));
        }
        let at = self.stored_offset(block, first, buf.len() as u64 / SECTOR_SIZE)?;
        self.read_raw(at, buf)
    }

    fn warnings(&self) -> &[String] {
        Vhd::warnings(self)
    }

    fn lock(&self, exclusive: bool) -> Result<()> {
        Vhd::lock(self, exclusive)
    }

    /// The Parent Time Stamp is advisory (§2.3). It is compared with the parent file's
    /// modification time (what blktap, VirtualBox and DiscUtils record) and with the parent's
    /// footer Time Stamp (its creation time); matching either is fine. Zero (Windows 10 writes
    /// it) means "not recorded".
    fn link_warnings(&self, parent: &dyn Layer) -> Vec<String> {
        let mut out = Vec::new();
        let Some(recorded) = self.header().map(|h| h.parent_timestamp) else {
            return out;
        };
        let Some(parent_vhd) = parent.as_any().downcast_ref::<Vhd>() else {
            return out;
        };
        if recorded == 0 {
            return out;
        }
        let mtime = crate::create::parent_timestamp(parent.path()).ok();
        let created = parent_vhd.footer().timestamp;
        if Some(recorded) != mtime && recorded != created {
            out.push(format!(
                "parent time stamp {} recorded in {} matches neither the parent's file modification time ({}) nor its footer time stamp ({}); the unique id matches, so the link is used",
                crate::format::vhd_time_utc(recorded),
                self.path().display(),
                mtime.map_or_else(|| "unknown".into(), crate::format::vhd_time_utc),
                crate::format::vhd_time_utc(created)
            ));
        }
        out
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// Any allocated range of a file-backed VHD: its data is contiguous within a block (the
    /// bitmap is in front of it). Whether the offsets suit a clone is the writer's call.
    fn clone_source(&self, block: u64, first: u64, sectors: u64) -> Option<CloneSource<'_>> {
        let file = self.storage().as_file()?;
        let offset = self.stored_offset(block, first, sectors).ok()?;
        Some(CloneSource {
            file,
            offset,
            len: sectors * SECTOR_SIZE,
        })
    }
}

impl LayerWriter for Vhd {
    fn reserve(&mut self, blocks: u64) -> Result<()> {
        self.reserve_blocks(blocks)
    }

    fn needs_allocation(&self, block: u64) -> bool {
        self.disk_type().is_sparse() && !self.is_allocated(block).is_ok_and(|a| a)
    }

    /// A whole block goes straight to [`Vhd::write_block`]; a part of one is placed in a
    /// block-sized buffer first (VHD blocks are at most 32 MiB).
    fn write_sectors(
        &mut self,
        block: u64,
        first: u64,
        data: &mut [u8],
        mask: &SectorBitmap,
    ) -> Result<()> {
        let spb = self.sectors_per_block();
        let n = mask.len() as u64;
        if data.len() as u64 != n * SECTOR_SIZE || first.checked_add(n).is_none_or(|e| e > spb) {
            return Err(Error::InvalidParameter(format!(
                "{}: write of {} bytes with a mask of {n} sector(s) at sector {first} of a block of {spb}",
                Vhd::path(self).display(),
                data.len()
            )));
        }
        if first == 0 && n == spb {
            return self.write_block(block, data, mask);
        }
        let (at, len) = ((first * SECTOR_SIZE) as usize, data.len());
        let mut whole = vec![0u8; (spb * SECTOR_SIZE) as usize];
        whole[at..at + len].copy_from_slice(data);
        let mut whole_mask = SectorBitmap::new(spb as usize);
        whole_mask.copy_bits_from(first as usize, mask, 0, n as usize);
        self.write_block(block, &mut whole, &whole_mask)
    }

    fn commit(&mut self) -> Result<()> {
        Vhd::commit(self)
    }

    fn file_len(&self) -> Result<u64> {
        self.storage()
            .len()
            .map_err(|e| Error::io(format!("{}: reading length", Vhd::path(self).display()), e))
    }

    fn clone_sectors(
        &mut self,
        block: u64,
        first: u64,
        src: &CloneSource<'_>,
    ) -> Result<CloneOutcome> {
        if !src.len.is_multiple_of(SECTOR_SIZE) {
            return Ok(CloneOutcome::Unaligned);
        }
        self.clone_into_block(block, first, src.file, src.offset, src.len / SECTOR_SIZE)
    }

    /// Whole blocks into consecutive new blocks in one clone each stretch ([`Vhd::clone_run`]).
    fn clone_run(&mut self, pieces: &[ClonePiece<'_>]) -> Result<(usize, CloneOutcome)> {
        Vhd::clone_run(self, pieces)
    }

    /// The unique id does not change: a merge keeps the destination's identity.
    fn finish(&mut self) -> Result<Uuid> {
        Vhd::finish(self)?;
        Ok(self.unique_id())
    }
}

impl Chain {
    /// Layer `i` as a [`Vhd`], for VHD-specific tools (check, info, set-parent) and tests;
    /// `None` past the end of the chain or for a layer of another format. The format-agnostic
    /// accessor is [`Chain::layer`].
    pub fn vhd(&self, i: usize) -> Option<&Vhd> {
        self.layers().get(i).and_then(ChainLayer::vhd)
    }
}

impl ChainLayer {
    /// The layer as a [`Vhd`], `None` for a layer of another format.
    pub fn vhd(&self) -> Option<&Vhd> {
        self.layer.as_any().downcast_ref::<Vhd>()
    }
}

/// What a new standalone VHD allows: 2040 GiB for either kind (the dynamic disk's limit,
/// which Windows applies to fixed VHDs too), blocks of 512 bytes to
/// [`crate::vhd::MAX_BLOCK_SIZE`], 2 MiB by default ([`crate::create::DEFAULT_BLOCK_SIZE`]).
pub(crate) fn create_limits(kind: DiskKind) -> CreateLimits {
    let _ = kind;
    CreateLimits {
        max_virtual_size: crate::format::MAX_DYNAMIC_SIZE,
        block_sizes: SECTOR_SIZE as u32..=crate::vhd::MAX_BLOCK_SIZE,
        default_block_size: crate::create::DEFAULT_BLOCK_SIZE,
    }
}

/// A new fixed or dynamic VHD at `path`, open for writing ([`crate::layer::create_layer`]).
pub(crate) fn create(path: &Path, image: &NewImage) -> Result<Box<dyn LayerWriter>> {
    use crate::create::{CreateOptions, create_dynamic, create_fixed};
    let opts = CreateOptions {
        block_size: image.block_size,
        ..CreateOptions::default()
    };
    Ok(match image.kind {
        DiskKind::Fixed => Box::new(create_fixed(path, image.size, &CreateOptions::default())?),
        _ => Box::new(create_dynamic(path, image.size, &opts)?),
    })
}

/// Probe the VHD open as `file`, `len` bytes long, cheaply (footers only, see
/// [`crate::vhd::peek_file`]).
pub(crate) fn probe(file: std::fs::File, len: u64) -> Option<Probe> {
    let peek = crate::vhd::peek_file(file, len)?;
    let ids = peek
        .footers
        .iter()
        .chain(&peek.sector0)
        .map(|f| f.unique_id)
        .collect();
    let footer = peek.footer();
    Some(Probe {
        format: Format::Vhd,
        id: footer.map(|f| f.unique_id),
        kind: footer
            .map(|f| f.disk_type)
            .filter(|t| !matches!(t, DiskType::Other(_)))
            .map(DiskKind::from),
        ids,
        parent_ids: peek.parent_unique_id.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
    use crate::layer::{open_layer, probe};
    use crate::vhd::OpenOptions;

    fn small_blocks() -> CreateOptions {
        CreateOptions {
            block_size: 64 << 10,
            ..CreateOptions::default()
        }
    }

    #[test]
    fn dynamic_disk_as_a_layer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vhd");
        let mut v = create_dynamic(&p, 1 << 20, &small_blocks()).unwrap();
        v.write_at(3 * (64 << 10) + 1024, &[7; 1024]).unwrap();
        let l: &dyn Layer = &v;
        assert_eq!((l.format(), l.kind()), (Format::Vhd, DiskKind::Dynamic));
        assert_eq!((l.sector_size(), l.block_size()), (512, 64 << 10));
        assert_eq!(l.id(), v.unique_id());
        assert_eq!(l.parent_link().unwrap(), None);
        assert_eq!(
            l.mapped_blocks().collect::<Result<Vec<_>>>().unwrap(),
            vec![3]
        );
        assert_eq!(l.block_state(2).unwrap(), BlockState::Transparent);
        let BlockState::Present(Some(bm)) = l.block_state(3).unwrap() else {
            panic!("block 3 should be present with a bitmap");
        };
        assert_eq!(bm.runs().collect::<Vec<_>>(), vec![2..4]);
        let mut buf = [0u8; 1024];
        l.read_stored(3, 2, &mut buf).unwrap();
        assert_eq!(buf, [7; 1024]);
        // Past the block, an unallocated block and a partial sector are refused, not read.
        assert!(l.read_stored(3, 127, &mut buf).is_err());
        assert!(l.read_stored(2, 0, &mut buf).is_err());
        assert!(l.read_stored(3, 0, &mut buf[..100]).is_err());
    }

    #[test]
    fn fixed_disk_is_all_present() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.vhd");
        let v = create_fixed(&p, 5 << 20, &CreateOptions::default()).unwrap();
        let l: &dyn Layer = &v;
        assert_eq!(l.kind(), DiskKind::Fixed);
        assert_eq!(
            l.mapped_blocks().collect::<Result<Vec<_>>>().unwrap(),
            vec![0, 1, 2]
        );
        assert_eq!(l.block_state(2).unwrap(), BlockState::Present(None));
        assert_eq!(l.block_state(3).unwrap(), BlockState::Transparent);
    }

    #[test]
    fn write_sectors_into_part_of_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vhd");
        let mut v = create_dynamic(&p, 1 << 20, &small_blocks()).unwrap();
        v.write_at(0, &[1; 4096]).unwrap();
        let mut data = vec![9u8; 4 * 512];
        let mut mask = SectorBitmap::new(4);
        mask.set_range(1..3);
        let w: &mut dyn LayerWriter = &mut v;
        assert!(!w.needs_allocation(0));
        assert!(w.needs_allocation(1));
        assert_eq!(w.growth_for(2), 2 * (512 + (64 << 10) + 4096));
        w.write_sectors(0, 6, &mut data, &mask).unwrap();
        assert!(w.write_sectors(0, 126, &mut data, &mask).is_err());
        let id = w.finish().unwrap();
        assert_eq!(id, v.unique_id());
        let v = Vhd::open(&p, OpenOptions::read_only()).unwrap();
        let mut got = vec![0u8; 10 * 512];
        v.read_own(0, &mut got).unwrap();
        let mut want = vec![1u8; 8 * 512];
        want[7 * 512..].fill(9);
        want.resize(10 * 512, 0);
        want[8 * 512..9 * 512].fill(9);
        assert_eq!(got, want);
    }

    #[test]
    fn parent_link_of_a_differencing_disk() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        let child = dir.path().join("child.vhd");
        let b = create_dynamic(&base, 1 << 20, &small_blocks()).unwrap();
        let c = create_differencing(&child, &base, &CreateOptions::default()).unwrap();
        let link = Layer::parent_link(&c).unwrap().unwrap();
        assert_eq!(link.ids, vec![b.unique_id()]);
        assert_eq!(link.name, "base.vhd");
        let sources: Vec<&str> = link.hints.iter().map(|h| h.source).collect();
        assert_eq!(sources.first(), Some(&"W2ru"));
        assert_eq!(sources.last(), Some(&"header name"));
        assert!(link.unusable.is_empty());
        let b: &dyn Layer = &b;
        assert!(c.link_warnings(b).is_empty());
        let pr = probe(&base).unwrap();
        assert_eq!((pr.format, pr.ids.contains(&b.id())), (Format::Vhd, true));
    }

    #[test]
    fn a_vhdx_signature_goes_to_the_vhdx_reader() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.vhdx");
        let mut bytes = vec![0u8; 1 << 16];
        bytes[..8].copy_from_slice(b"vhdxfile");
        std::fs::write(&p, bytes).unwrap();
        // A signature and nothing else: a damaged VHDX (no headers), not an unknown file.
        let e = open_layer(&p, OpenOptions::read_only()).unwrap_err();
        assert_eq!(e.return_code().code(), 32776, "{e}");
        assert!(e.to_string().contains("VHDX"), "{e}");
        assert!(probe(&p).is_none());
        // The VHD type reads VHD only, and says what the file is.
        let e = Vhd::open(&p, OpenOptions::read_only()).unwrap_err();
        assert_eq!(e.return_code().code(), 32770, "{e}");
        assert!(e.to_string().contains("VHDX file"), "{e}");
        assert!(e.to_string().contains("VHD only"), "{e}");
    }
}
