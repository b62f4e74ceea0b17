//! Random chains written through the library for the merge tests, VHD or VHDX
//! ([`ChainFormat`]), and an independent in-memory model of every layer (bytes + a presence
//! bit per 512 bytes) that says what each layer's view must be. The model never reads a file.

use std::path::{Path, PathBuf};

use vhd_merge::bitmap::SectorBitmap;
use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
use vhd_merge::io::FileStorage;
use vhd_merge::vhdx::format::bat::PayloadState;
use vhd_merge::vhdx::{self, Vhdx};
use vhd_merge::{OpenOptions, Vhd};

use super::Rng;
use super::patch::{vhdx_set_block_state, vhdx_set_virtual_size};

/// The bottom layer's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseKind {
    Fixed,
    Dynamic,
}

/// A chain to build. Layers are in chain order: 0 is the child (the source), the last is the
/// base.
#[derive(Clone, Debug)]
pub struct ChainSpec {
    /// The virtual size of every layer ([`build_chain_sized`] gives each its own).
    pub size_sectors: u64,
    pub base: BaseKind,
    /// Block size of each layer (ignored for a fixed base).
    pub block_sizes: Vec<u32>,
    /// Percent of each layer's blocks that hold data.
    pub density: Vec<u64>,
    pub seed: u64,
}

/// One layer of the model: its bytes over its whole virtual size and which sectors it holds,
/// per 512 bytes whatever the format's sector size (a 4096-byte sector is 8 entries that are
/// always set together).
#[derive(Clone, Debug)]
pub struct LayerModel {
    pub data: Vec<u8>,
    pub present: Vec<bool>,
}

impl LayerModel {
    /// A layer of `size` bytes (whole sectors) holding no sector.
    pub fn empty(size: usize) -> LayerModel {
        LayerModel {
            data: vec![0; size],
            present: vec![false; size / 512],
        }
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> usize {
        self.data.len()
    }

    /// Panic unless `self` holds the same sectors as `want`, with the same bytes (what lies
    /// under sectors a layer does not hold is not compared).
    pub fn assert_same_as(&self, want: &LayerModel, what: &str) {
        assert_eq!(self.size(), want.size(), "{what}: virtual size");
        let diff = self
            .present
            .iter()
            .zip(&want.present)
            .position(|(a, b)| a != b);
        assert_eq!(
            diff, None,
            "{what}: which sectors are held (512-byte units)"
        );
        let differs = (0..self.present.len()).find(|&s| {
            self.present[s] && self.data[s * 512..][..512] != want.data[s * 512..][..512]
        });
        assert_eq!(
            differs, None,
            "{what}: the data of a held sector (512-byte units)"
        );
    }
}

/// What the first of `layers` (chain order) reads: each sector from the nearest layer holding
/// it, as long as no layer on the way is smaller than the sector's position (a smaller ancestor
/// ends the view there); zeros where none does.
pub fn compose(layers: &[LayerModel]) -> Vec<u8> {
    let size = layers[0].size();
    let mut out = vec![0u8; size];
    for s in 0..size / 512 {
        let mut visible = usize::MAX;
        for l in layers {
            visible = visible.min(l.size() / 512);
            if s >= visible {
                break;
            }
            if l.present[s] {
                out[s * 512..s * 512 + 512].copy_from_slice(&l.data[s * 512..s * 512 + 512]);
                break;
            }
        }
    }
    out
}

/// All layers of a chain, chain order (each with its own virtual size).
#[derive(Clone, Debug)]
pub struct Model {
    /// The source's (layer 0's) virtual size in bytes.
    pub size: usize,
    pub layers: Vec<LayerModel>,
}

impl Model {
    /// The view of layer `from`: per sector, the nearest layer at or below `from` holding it;
    /// zeros where none does.
    pub fn view(&self, from: usize) -> Vec<u8> {
        compose(&self.layers[from..])
    }

    /// What the destination (layer `d`) must read after merging layers `0..d` into it: the
    /// source's view over the source's virtual size (zeros included where a smaller layer
    /// ends it), the destination's old view past it.
    pub fn merged(&self, d: usize) -> Vec<u8> {
        let mut out = self.view(d);
        let source = self.view(0);
        out[..source.len()].copy_from_slice(&source);
        out
    }

    /// The sectors of the source's view that merging layers `0..d` decides, as (held by a
    /// merged layer whose view reaches them, hidden: past the end of a smaller merged layer
    /// and held by no nearer one, so zeros).
    pub fn merge_sectors(&self, d: usize) -> (u64, u64) {
        let (mut held, mut hidden) = (0, 0);
        for s in 0..self.layers[0].size() / 512 {
            let mut visible = usize::MAX;
            for l in &self.layers[..d] {
                visible = visible.min(l.size() / 512);
                if s >= visible {
                    hidden += 1;
                    break;
                }
                if l.present[s] {
                    held += 1;
                    break;
                }
            }
        }
        (held, hidden)
    }
}

/// A built chain: file paths in chain order, their format and the model.
pub struct Built {
    pub paths: Vec<PathBuf>,
    pub format: ChainFormat,
    pub model: Model,
}

impl Built {
    /// Every file of the chain but layer `d` (the files a merge into `d` must not change).
    pub fn paths_except(&self, d: usize) -> Vec<PathBuf> {
        let mut others = self.paths.clone();
        others.remove(d);
        others
    }
}

/// Which sectors of a block of `spb` sectors a random write covers.
fn random_mask(rng: &mut Rng, spb: usize) -> SectorBitmap {
    let mut m = SectorBitmap::new(spb);
    match rng.below(7) {
        0 | 1 => m.set_range(0..spb),
        2 => {
            let density = 10 + rng.below(80);
            for s in 0..spb {
                if rng.chance(density) {
                    m.set(s);
                }
            }
        }
        3 => {
            let first = rng.below(2) as usize;
            for s in (first..spb).step_by(2) {
                m.set(s);
            }
        }
        4 => {
            for _ in 0..1 + rng.below(6) {
                let a = rng.below(spb as u64) as usize;
                let n = 1 + rng.below(200) as usize;
                m.set_range(a..(a + n).min(spb));
            }
        }
        5 => m.set(rng.below(spb as u64) as usize),
        _ => {
            for c in (0..spb).step_by(8) {
                if rng.chance(50) {
                    m.set_range(c..(c + 8).min(spb));
                }
            }
        }
    }
    m
}

/// Random sector data: mostly random bytes, some all-zero sectors of `ss` bytes (a set bit
/// over zero data must overwrite), and sometimes a whole zero block.
fn random_data(rng: &mut Rng, buf: &mut [u8], ss: usize) {
    if rng.chance(10) {
        buf.fill(0);
        return;
    }
    rng.fill(buf);
    for s in buf.chunks_mut(ss) {
        if rng.chance(12) {
            s.fill(0);
        }
    }
}

/// The format of a chain to build: every layer has the same (a chain mixes no formats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainFormat {
    /// VHD: 512-byte sectors, files `l{i}.vhd`.
    Vhd,
    /// VHDX: the base `l{i}.vhdx`, the differencing layers `l{i}.avhdx`.
    Vhdx(VhdxChain),
}

/// What a VHDX chain adds to a [`ChainSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VhdxChain {
    /// Logical sector size of every layer, 512 or 4096.
    pub sector_size: u32,
    /// Percent of the blocks of each dynamic or differencing layer patched, once it is
    /// written and closed, to ZERO, UNMAPPED or UNDEFINED (all read zeros, whatever a parent
    /// holds). Whole zero blocks the writer stores as ZERO come on top.
    pub zero_blocks: u64,
}

impl ChainFormat {
    /// Bytes per logical sector.
    pub fn sector_size(self) -> usize {
        match self {
            ChainFormat::Vhd => 512,
            ChainFormat::Vhdx(x) => x.sector_size as usize,
        }
    }

    fn file_name(self, i: usize, base: bool) -> String {
        match self {
            ChainFormat::Vhd => format!("l{i}.vhd"),
            ChainFormat::Vhdx(_) if base => format!("l{i}.vhdx"),
            ChainFormat::Vhdx(_) => format!("l{i}.avhdx"),
        }
    }
}

/// A new layer being filled, whatever its format.
trait NewLayer {
    /// Logical sectors a write into block `b` covers (a whole VHD block, whatever the virtual
    /// size; only the sectors inside a VHDX).
    fn sectors_in_block(&self, b: u64) -> usize;
    /// Write the sectors `mask` selects from `data` into block `b`.
    fn write_block(&mut self, b: u64, data: &mut [u8], mask: &SectorBitmap);
    /// Write the whole virtual disk (a fixed layer).
    fn write_all(&mut self, data: &[u8]);
    fn commit(&mut self);
    fn finish(&mut self);
}

impl NewLayer for Vhd {
    fn sectors_in_block(&self, _: u64) -> usize {
        (self.block_size() / 512) as usize
    }
    fn write_block(&mut self, b: u64, data: &mut [u8], mask: &SectorBitmap) {
        Vhd::write_block(self, b, data, mask).unwrap();
    }
    fn write_all(&mut self, data: &[u8]) {
        self.write_at(0, data).unwrap();
    }
    fn commit(&mut self) {
        Vhd::commit(self).unwrap();
    }
    fn finish(&mut self) {
        Vhd::finish(self).unwrap();
    }
}

impl NewLayer for Vhdx<FileStorage> {
    fn sectors_in_block(&self, b: u64) -> usize {
        Vhdx::sectors_in_block(self, b) as usize
    }
    fn write_block(&mut self, b: u64, data: &mut [u8], mask: &SectorBitmap) {
        self.write_sectors(b, 0, data, mask).unwrap();
    }
    fn write_all(&mut self, data: &[u8]) {
        self.write_at(0, data).unwrap();
    }
    fn commit(&mut self) {
        Vhdx::commit(self).unwrap();
    }
    fn finish(&mut self) {
        Vhdx::finish(self).unwrap();
    }
}

impl LayerModel {
    /// Record a write of the sectors (of `ss` bytes) `mask` selects from `data`, from logical
    /// sector `first` on; sectors past the virtual size are dropped.
    pub fn write(&mut self, first: usize, data: &[u8], mask: &SectorBitmap, ss: usize) {
        for r in mask.runs() {
            for s in r {
                let at = (first + s) * ss;
                if at >= self.size() {
                    break;
                }
                self.data[at..at + ss].copy_from_slice(&data[s * ss..s * ss + ss]);
                self.present[at / 512..(at + ss) / 512].fill(true);
            }
        }
    }

    /// Record that bytes `range` read zeros whatever lies below (a ZERO, UNMAPPED or
    /// UNDEFINED block).
    fn zero(&mut self, range: std::ops::Range<usize>) {
        self.data[range.clone()].fill(0);
        self.present[range.start / 512..range.end / 512].fill(true);
    }
}

/// Write random blocks of a layer in random order (so they are stored out of order in the
/// file), each with probability `density` percent, a random mask and random data.
fn fill_layer(
    rng: &mut Rng,
    model: &mut LayerModel,
    disk: &mut dyn NewLayer,
    block_size: u32,
    density: u64,
    ss: usize,
) {
    let bs = block_size as usize;
    let mut blocks: Vec<usize> = (0..model.size().div_ceil(bs)).collect();
    rng.shuffle(&mut blocks);
    for b in blocks {
        if !rng.chance(density) {
            continue;
        }
        let spb = disk.sectors_in_block(b as u64);
        let mask = random_mask(rng, spb);
        let mut buf = vec![0u8; spb * ss];
        random_data(rng, &mut buf, ss);
        model.write(b * bs / ss, &buf, &mask, ss);
        disk.write_block(b as u64, &mut buf, &mask);
        if rng.chance(20) {
            disk.commit();
        }
    }
}

/// Patch `percent` of the blocks of the closed VHDX at `path` to ZERO, UNMAPPED or UNDEFINED.
fn zero_blocks(rng: &mut Rng, path: &Path, model: &mut LayerModel, block_size: u32, percent: u64) {
    let bs = block_size as usize;
    for b in 0..model.size().div_ceil(bs) {
        if !rng.chance(percent) {
            continue;
        }
        let state = match rng.below(3) {
            0 => PayloadState::Zero,
            1 => PayloadState::Unmapped,
            _ => PayloadState::Undefined,
        };
        vhdx_set_block_state(path, b as u64, state);
        model.zero(b * bs..((b + 1) * bs).min(model.size()));
    }
}

/// Build the chain of `spec` in `dir` (VHD); blocks are written in random order, so they are
/// stored out of order in the files.
pub fn build_chain(dir: &Path, spec: &ChainSpec) -> Built {
    let sizes = vec![spec.size_sectors; spec.block_sizes.len()];
    build_chain_sized(dir, spec, &sizes)
}

/// Like [`build_chain`], each layer with its own virtual size (`sizes[i]` sectors; `spec`'s
/// `size_sectors` is not used). Equal sizes build the same chain as [`build_chain`].
pub fn build_chain_sized(dir: &Path, spec: &ChainSpec, sizes: &[u64]) -> Built {
    build(dir, spec, sizes, ChainFormat::Vhd)
}

/// Build the chain of `spec` in `format`, layer `i` of `sizes[i]` logical sectors (`spec`'s
/// `size_sectors` is not used). A VHD chain is the one [`build_chain_sized`] builds (same
/// random draws, so saved cases replay).
pub fn build(dir: &Path, spec: &ChainSpec, sizes: &[u64], format: ChainFormat) -> Built {
    let n = spec.block_sizes.len();
    assert_eq!(sizes.len(), n, "one size per layer");
    let ss = format.sector_size();
    let mut rng = Rng::new(spec.seed);
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| dir.join(format.file_name(i, i == n - 1)))
        .collect();
    let mut layers: Vec<LayerModel> = sizes
        .iter()
        .map(|&s| LayerModel::empty(s as usize * ss))
        .collect();
    for i in (0..n).rev() {
        let size = sizes[i] * ss as u64;
        let base = i == n - 1;
        let fixed = base && spec.base == BaseKind::Fixed;
        let bs = spec.block_sizes[i];
        let parent = (!base).then(|| paths[i + 1].as_path());
        let mut disk = new_layer(format, &paths[i], parent, fixed, size, bs);
        let model = &mut layers[i];
        if fixed {
            random_data(&mut rng, &mut model.data, ss);
            disk.write_all(&model.data);
            model.present.fill(true);
        } else {
            fill_layer(&mut rng, model, disk.as_mut(), bs, spec.density[i], ss);
        }
        disk.finish();
        drop(disk);
        if let ChainFormat::Vhdx(x) = format
            && !fixed
        {
            zero_blocks(&mut rng, &paths[i], model, bs, x.zero_blocks);
        }
        if base {
            // A dynamic base reads zeros where it holds nothing.
            model.present.fill(true);
        }
    }
    Built {
        paths,
        format,
        model: Model {
            size: (sizes[0] as usize * ss),
            layers,
        },
    }
}

/// A new, empty layer of `format` at `path`: fixed, dynamic, or a child of `parent`.
fn new_layer(
    format: ChainFormat,
    path: &Path,
    parent: Option<&Path>,
    fixed: bool,
    size: u64,
    block_size: u32,
) -> Box<dyn NewLayer> {
    let ChainFormat::Vhdx(x) = format else {
        let o = CreateOptions::default().block_size(block_size);
        return Box::new(match parent {
            Some(p) => create_child(path, p, size, &o),
            None if fixed => create_fixed(path, size, &o).unwrap(),
            None => create_dynamic(path, size, &o).unwrap(),
        });
    };
    let o = vhdx::create::CreateOptions::default()
        .block_size(Some(block_size))
        .logical_sector_size(x.sector_size)
        .force(false);
    Box::new(match parent {
        Some(p) => create_vhdx_child(path, p, size, &o),
        None if fixed => vhdx::create::create_fixed(path, size, &o).unwrap(),
        None => vhdx::create::create_dynamic(path, size, &o).unwrap(),
    })
}

/// A differencing VHDX of `size` bytes at `path` over the VHDX `parent` (of any size):
/// `create_differencing` gives a child its parent's size, so for another one the child's
/// Virtual Disk Size item is patched before it is opened for writing.
pub fn create_vhdx_child(
    path: &Path,
    parent: &Path,
    size: u64,
    opts: &vhdx::create::CreateOptions,
) -> Vhdx<FileStorage> {
    let child = vhdx::create::create_differencing(path, parent, opts).unwrap();
    if child.virtual_size() == size {
        return child;
    }
    drop(child);
    vhdx_set_virtual_size(path, size);
    Vhdx::open_path(path, true).unwrap()
}

/// A differencing disk of `size` bytes at `path` whose parent is `parent` (of any size).
/// `create_differencing` gives a child its parent's size, so for another size the child is
/// created over a stand-in with the parent's unique id and that size, the parent is put back,
/// and its modification time set to the stand-in's (the time stamp the child recorded).
pub fn create_child(path: &Path, parent: &Path, size: u64, opts: &CreateOptions) -> Vhd {
    let p = Vhd::open(parent, OpenOptions::read_only()).unwrap();
    let (parent_size, id) = (p.virtual_size(), p.unique_id());
    drop(p);
    if parent_size == size {
        return create_differencing(path, parent, opts).unwrap();
    }
    let aside = parent.with_extension("aside");
    std::fs::rename(parent, &aside).unwrap();
    let stand_in = CreateOptions::default().unique_id(Some(id));
    drop(create_dynamic(parent, size, &stand_in).unwrap());
    let stamp = std::fs::metadata(parent).unwrap().modified().unwrap();
    let child = create_differencing(path, parent, opts).unwrap();
    std::fs::rename(&aside, parent).unwrap();
    std::fs::File::options()
        .write(true)
        .open(parent)
        .unwrap()
        .set_modified(stamp)
        .unwrap();
    child
}

/// Check that every sector of `view` is either the destination's old content or the merged
/// one; with `torn`, one sector may be split (merged bytes first, then old ones: the first
/// part of a torn write landed). Returns the number of merged sectors seen, or the first bad
/// sector.
pub fn old_or_merged(view: &[u8], old: &[u8], merged: &[u8], torn: bool) -> Result<usize, String> {
    let mut split = None;
    let mut new = 0;
    for s in 0..view.len() / 512 {
        let r = s * 512..s * 512 + 512;
        let (v, o, m) = (&view[r.clone()], &old[r.clone()], &merged[r]);
        if v == m {
            if v != o {
                new += 1;
            }
            continue;
        }
        if v == o {
            continue;
        }
        let k = v.iter().zip(m).take_while(|(a, b)| a == b).count();
        if torn && split.is_none() && v[k..] == o[k..] {
            split = Some(s);
            continue;
        }
        return Err(format!(
            "sector {s} is neither old nor merged{}",
            split.map_or(String::new(), |t| format!(" (sector {t} is already torn)"))
        ));
    }
    Ok(new)
}

/// Block sizes of random VHDX layers (256 MiB blocks are sparse: a tiny disk's one block).
pub const VHDX_BLOCK_SIZES: [u32; 4] = [1 << 20, 2 << 20, 32 << 20, 256 << 20];

/// A random VHDX chain for the model tests, and a destination for a merge.
#[derive(Clone, Debug)]
pub struct VhdxCase {
    pub spec: ChainSpec,
    /// Each layer's virtual size in logical sectors.
    pub sizes: Vec<u64>,
    pub format: ChainFormat,
    /// A destination layer (1..depth): the source is never larger than it.
    pub dest: usize,
}

/// Draw a VHDX chain from `seed`: 2 to 7 layers (depth 1 to 6), 512- or 4096-byte sectors,
/// block sizes mixed among [`VHDX_BLOCK_SIZES`] (a fixed base: 1 or 2 MiB, as its file is
/// preallocated), virtual sizes of 64 KiB to 6 MiB, in most cases each layer its own
/// (smaller or larger, in every position), some blocks patched to ZERO/UNMAPPED/UNDEFINED.
pub fn random_vhdx_case(seed: u64) -> VhdxCase {
    let mut rng = Rng::new(seed ^ 0x0076_6864_7800);
    let n = 2 + rng.below(6) as usize;
    let sector: u32 = if rng.chance(50) { 512 } else { 4096 };
    let per_mib = u64::from((1u32 << 20) / sector);
    let size = match rng.below(3) {
        0 => per_mib / 16 + rng.below(per_mib),
        1 => per_mib + rng.below(3 * per_mib),
        _ => 2 * per_mib + rng.below(4 * per_mib),
    };
    let base = if rng.chance(30) {
        BaseKind::Fixed
    } else {
        BaseKind::Dynamic
    };
    let mut block_sizes: Vec<u32> = (0..n)
        .map(|_| match rng.below(10) {
            0..=3 => VHDX_BLOCK_SIZES[0],
            4..=6 => VHDX_BLOCK_SIZES[1],
            7 | 8 => VHDX_BLOCK_SIZES[2],
            _ => VHDX_BLOCK_SIZES[3],
        })
        .collect();
    if base == BaseKind::Fixed {
        block_sizes[n - 1] = VHDX_BLOCK_SIZES[rng.below(2) as usize];
    }
    let density = (0..n).map(|_| rng.below(101)).collect();
    let dest = 1 + rng.below(n as u64 - 1) as usize;
    let mut sizes: Vec<u64> = (0..n)
        .map(|_| match rng.below(5) {
            0 | 1 => size,
            2 => size / 2 + 1,
            3 => size + 1 + rng.below(size),
            _ => 1 + rng.below(size),
        })
        .collect();
    if rng.chance(30) {
        sizes.fill(size);
    }
    let zero_blocks = [0, 5, 15][rng.below(3) as usize];
    VhdxCase {
        spec: ChainSpec {
            size_sectors: size,
            base,
            block_sizes,
            density,
            seed,
        },
        sizes,
        format: ChainFormat::Vhdx(VhdxChain {
            sector_size: sector,
            zero_blocks,
        }),
        dest: 1,
    }
    .with_dest(dest)
}

impl VhdxCase {
    /// The case with destination `dest`; the source and the destination swap sizes when the
    /// source would be larger (that merge is refused).
    pub fn with_dest(mut self, dest: usize) -> VhdxCase {
        if self.sizes[0] > self.sizes[dest] {
            self.sizes.swap(0, dest);
        }
        self.dest = dest;
        self
    }

    /// The logical sector size.
    pub fn sector_size(&self) -> usize {
        self.format.sector_size()
    }
}
