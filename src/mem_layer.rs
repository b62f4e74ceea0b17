//! An in-memory [`Layer`] for the engine's unit tests: any sector size, block size and block
//! states (including [`BlockState::Zero`], which no VHD has), without files.

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::bitmap::SectorBitmap;
use crate::chain::{Chain, ChainLayer, FoundBy};
use crate::error::{Error, Result};
use crate::layer::{BlockState, DiskKind, Format, Layer};

/// One layer held in memory: block states and the blocks' bytes.
#[derive(Debug)]
pub(crate) struct MemLayer {
    pub path: PathBuf,
    pub kind: DiskKind,
    pub size: u64,
    pub sector: u32,
    pub block: u64,
    pub id: Uuid,
    pub blocks: BTreeMap<u64, (BlockState, Vec<u8>)>,
}

impl MemLayer {
    pub fn new(name: &str, kind: DiskKind, size: u64, sector: u32, block: u64) -> MemLayer {
        MemLayer {
            path: PathBuf::from(name),
            kind,
            size,
            sector,
            block,
            id: Uuid::new_v4(),
            blocks: BTreeMap::new(),
        }
    }

    /// Block `b` holds `fill` at the sectors of `present` (every sector when `None`).
    pub fn present(mut self, b: u64, present: Option<SectorBitmap>, fill: u8) -> MemLayer {
        let data = vec![fill; self.block as usize];
        self.blocks.insert(b, (BlockState::Present(present), data));
        self
    }

    /// Block `b` declares zeros.
    pub fn zero(mut self, b: u64) -> MemLayer {
        self.blocks.insert(b, (BlockState::Zero, Vec::new()));
        self
    }
}

impl Layer for MemLayer {
    fn path(&self) -> &Path {
        &self.path
    }
    fn format(&self) -> Format {
        Format::Vhdx
    }
    fn kind(&self) -> DiskKind {
        self.kind
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn block_size(&self) -> u64 {
        self.block
    }
    fn id(&self) -> Uuid {
        self.id
    }
    fn parent_link(&self) -> Result<Option<crate::layer::ParentLink>> {
        Ok(None)
    }
    fn mapped_blocks(&self) -> Box<dyn Iterator<Item = Result<u64>> + '_> {
        Box::new(self.blocks.keys().copied().map(Ok))
    }
    fn block_state(&self, block: u64) -> Result<BlockState> {
        Ok(self
            .blocks
            .get(&block)
            .map_or(BlockState::Transparent, |(s, _)| s.clone()))
    }
    fn is_mapped(&self, block: u64) -> Result<bool> {
        Ok(self.blocks.contains_key(&block))
    }
    fn growth_for(&self, blocks: u64) -> u64 {
        blocks * self.block
    }
    fn read_stored(&self, block: u64, first: u64, buf: &mut [u8]) -> Result<()> {
        let at = (first * u64::from(self.sector)) as usize;
        match self.blocks.get(&block) {
            Some((BlockState::Present(_), data)) if at + buf.len() <= data.len() => {
                buf.copy_from_slice(&data[at..at + buf.len()]);
                Ok(())
            }
            _ => Err(Error::InvalidParameter(format!(
                "read_stored of block {block}: not present"
            ))),
        }
    }
    fn warnings(&self) -> &[String] {
        &[]
    }
    fn lock(&self, _exclusive: bool) -> Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A chain of in-memory layers, child first.
pub(crate) fn chain_of(layers: Vec<MemLayer>) -> Chain {
    Chain::from_layers(
        layers
            .into_iter()
            .map(|l| ChainLayer::new(Box::new(l), FoundBy::Opened))
            .collect(),
    )
}

impl crate::layer::LayerWriter for MemLayer {
    fn reserve(&mut self, _blocks: u64) -> Result<()> {
        Ok(())
    }
    fn needs_allocation(&self, block: u64) -> bool {
        !self.blocks.contains_key(&block)
    }
    fn write_sectors(
        &mut self,
        block: u64,
        first: u64,
        data: &mut [u8],
        mask: &SectorBitmap,
    ) -> Result<()> {
        let ss = self.sector as usize;
        let spb = (self.block / u64::from(self.sector)) as usize;
        let len = self.block as usize;
        let (state, bytes) = self.blocks.entry(block).or_insert_with(|| {
            (
                BlockState::Present(Some(SectorBitmap::new(spb))),
                vec![0; len],
            )
        });
        let BlockState::Present(Some(bm)) = state else {
            return Err(Error::InvalidParameter(
                "mem layer: not a bitmap block".into(),
            ));
        };
        for r in mask.runs() {
            let at = first as usize + r.start;
            bytes[at * ss..(at + r.len()) * ss].copy_from_slice(&data[r.start * ss..r.end * ss]);
            bm.set_range(at..at + r.len());
        }
        Ok(())
    }
    fn commit(&mut self) -> Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> Result<Uuid> {
        Ok(self.id)
    }
    fn file_len(&self) -> Result<u64> {
        Ok(self.blocks.len() as u64 * self.block)
    }
}
