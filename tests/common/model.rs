//! Random chains written through the library for the merge tests, and an independent
//! in-memory model of every layer (bytes + a presence bit per sector) that says what each
//! layer's view must be. The model never reads a file.

use std::path::{Path, PathBuf};

use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
use vhd_merge::format::SectorBitmap;
use vhd_merge::{OpenOptions, Vhd};

use super::Rng;

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

/// One layer of the model: its bytes over its whole virtual size and which sectors it holds.
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

/// A built chain: file paths in chain order and the model.
pub struct Built {
    pub paths: Vec<PathBuf>,
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

/// Random sector data: mostly random bytes, some all-zero sectors (a set bit over zero data
/// must overwrite), and sometimes a whole zero block.
fn random_data(rng: &mut Rng, buf: &mut [u8]) {
    if rng.chance(10) {
        buf.fill(0);
        return;
    }
    rng.fill(buf);
    for s in buf.chunks_mut(512) {
        if rng.chance(12) {
            s.fill(0);
        }
    }
}

/// Build the chain of `spec` in `dir`; blocks are written in random order, so they are stored
/// out of order in the files.
pub fn build_chain(dir: &Path, spec: &ChainSpec) -> Built {
    let sizes = vec![spec.size_sectors; spec.block_sizes.len()];
    build_chain_sized(dir, spec, &sizes)
}

/// Like [`build_chain`], each layer with its own virtual size (`sizes[i]` sectors; `spec`'s
/// `size_sectors` is not used). Equal sizes build the same chain as [`build_chain`].
pub fn build_chain_sized(dir: &Path, spec: &ChainSpec, sizes: &[u64]) -> Built {
    let n = spec.block_sizes.len();
    assert_eq!(sizes.len(), n, "one size per layer");
    let mut rng = Rng::new(spec.seed);
    let paths: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("l{i}.vhd"))).collect();
    let mut layers: Vec<LayerModel> = sizes
        .iter()
        .map(|&s| LayerModel::empty((s * 512) as usize))
        .collect();
    for i in (0..n).rev() {
        let size = (sizes[i] * 512) as usize;
        let base = i == n - 1;
        let opts = CreateOptions {
            block_size: spec.block_sizes[i],
            ..CreateOptions::default()
        };
        let model = &mut layers[i];
        if base && spec.base == BaseKind::Fixed {
            let mut v = create_fixed(&paths[i], size as u64, &opts).unwrap();
            random_data(&mut rng, &mut model.data);
            v.write_at(0, &model.data).unwrap();
            model.present.fill(true);
            continue;
        }
        let mut v = if base {
            create_dynamic(&paths[i], size as u64, &opts).unwrap()
        } else {
            create_child(&paths[i], &paths[i + 1], size as u64, &opts)
        };
        let bs = spec.block_sizes[i] as usize;
        let spb = bs / 512;
        let mut blocks: Vec<usize> = (0..size.div_ceil(bs)).collect();
        rng.shuffle(&mut blocks);
        let density = spec.density[i];
        for b in blocks {
            if !rng.chance(density) {
                continue;
            }
            let mask = random_mask(&mut rng, spb);
            let mut buf = vec![0u8; bs];
            random_data(&mut rng, &mut buf);
            for r in mask.runs() {
                for s in r {
                    let vs = b * spb + s;
                    if vs >= size / 512 {
                        break;
                    }
                    model.present[vs] = true;
                    model.data[vs * 512..vs * 512 + 512]
                        .copy_from_slice(&buf[s * 512..s * 512 + 512]);
                }
            }
            v.write_block(b as u64, &mut buf.clone(), &mask).unwrap();
            if rng.chance(20) {
                v.commit().unwrap();
            }
        }
        v.finish().unwrap();
        if base {
            // A dynamic base reads zeros where it holds nothing.
            model.present.fill(true);
        }
    }
    Built {
        paths,
        model: Model {
            size: (sizes[0] * 512) as usize,
            layers,
        },
    }
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
    let stand_in = CreateOptions {
        unique_id: Some(id),
        ..CreateOptions::default()
    };
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
