//! Inputs shared by the criterion benches (`benches/merge.rs`, `benches/flatten.rs`) and the
//! `cp` comparison (`examples/bench.rs`, which includes this file with `#[path]`): bitmap
//! shapes, a deterministic filler, and chains of 2 MiB-block differencing layers. Each of them
//! compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::error::Error;
use std::path::{Path, PathBuf};

use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
use vhd_merge::format::SectorBitmap;

/// Where the criterion benches put their files: `$VHD_MERGE_BENCH_DIR`, else the system
/// temporary directory.
pub fn bench_dir() -> PathBuf {
    std::env::var_os("VHD_MERGE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// Bitmap shapes of the merged blocks.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    Full,
    EveryOtherSector,
    EveryOther4K,
    /// All but the first 64 KiB of every 512 KiB (7/8 of the sectors, 4 holes): a block
    /// mostly held, which a cloning merge clones whole and then patches.
    Mostly,
}

impl Shape {
    /// The sectors of a 2 MiB block this shape holds.
    pub fn mask(self) -> SectorBitmap {
        let mut m = SectorBitmap::new(4096);
        match self {
            Shape::Full => m.set_range(0..4096),
            Shape::EveryOtherSector => (0..4096).step_by(2).for_each(|s| m.set(s)),
            Shape::EveryOther4K => (0..4096).step_by(16).for_each(|s| m.set_range(s..s + 8)),
            Shape::Mostly => (0..4096)
                .step_by(1024)
                .for_each(|s| m.set_range(s + 128..s + 1024)),
        }
        m
    }
}

/// Which sectors each layer of a chain holds.
#[derive(Clone, Copy, Debug)]
pub enum Spread {
    /// Layer `l` holds the blocks `b` with `b % depth == l`, with the whole shape's mask (so
    /// every depth holds the same total data).
    RoundRobin(Shape),
    /// Every layer holds every block: layer `l` holds the 64 KiB stripes `s` with
    /// `s % depth == l` (32 layers: each block is assembled from 32 layers).
    Striped,
}

/// Deterministic non-zero filler (xorshift64).
pub struct Fill(pub u64);

impl Default for Fill {
    /// The filler the benches start from.
    fn default() -> Fill {
        Fill(0x9E37_79B9_7F4A_7C15)
    }
}

impl Fill {
    /// Fill `buf` with the next bytes.
    pub fn block(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
    }
}

/// A chain of `depth` 2 MiB-block differencing layers over a base (dynamic or fixed) of
/// `size` bytes, with data in `blocks`. Returns the paths, child first.
pub fn build_chain(
    dir: &Path,
    size: u64,
    blocks: &[u64],
    depth: usize,
    spread: Spread,
    fixed: bool,
    fill: &mut Fill,
) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    std::fs::create_dir_all(dir)?;
    let o = CreateOptions::default();
    let base = dir.join("base.vhd");
    if fixed {
        create_fixed(&base, size, &o)?;
    } else {
        create_dynamic(&base, size, &o)?;
    }
    let mut paths = vec![base];
    let mut buf = vec![0u8; 2 << 20];
    for l in 0..depth {
        let p = dir.join(format!("layer{l:02}.vhd"));
        let parent = paths.last().ok_or("no parent")?.clone();
        let mut v = create_differencing(&p, &parent, &o)?;
        let mine: Vec<(u64, SectorBitmap)> = match spread {
            Spread::RoundRobin(shape) => blocks
                .iter()
                .enumerate()
                .filter(|(i, _)| i % depth == l)
                .map(|(_, &b)| (b, shape.mask()))
                .collect(),
            Spread::Striped => {
                let mut m = SectorBitmap::new(4096);
                for s in (0..4096).step_by(128).skip(l).step_by(depth) {
                    m.set_range(s..s + 128);
                }
                blocks.iter().map(|&b| (b, m.clone())).collect()
            }
        };
        v.reserve_blocks(mine.len() as u64)?;
        for (b, mask) in mine {
            fill.block(&mut buf);
            v.write_block(b, &mut buf, &mask)?;
        }
        v.finish()?;
        paths.push(p);
    }
    paths.reverse();
    Ok(paths)
}

/// A dynamic VHDX base of `size` bytes (2 MiB blocks) and a differencing VHDX child holding
/// whole 2 MiB blocks `blocks`. Returns the paths, child first.
pub fn build_vhdx_chain(
    dir: &Path,
    size: u64,
    blocks: &[u64],
    fill: &mut Fill,
) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let spec = VhdxSpec {
        size,
        ..VhdxSpec::default()
    };
    build_vhdx(dir, &spec, blocks, fill)
}

/// The shape of a VHDX chain for [`build_vhdx`].
#[derive(Clone, Copy, Debug)]
pub struct VhdxSpec {
    /// Virtual size.
    pub size: u64,
    /// Block size of the dynamic base.
    pub base_block: u32,
    /// Block size of the differencing layers.
    pub block: u32,
    /// Differencing layers over the base.
    pub depth: usize,
    /// What each layer holds of its 2 MiB units (layers of 1 MiB blocks: whole blocks).
    pub shape: Shape,
}

impl Default for VhdxSpec {
    /// 1 GiB, 2 MiB blocks, one layer of full units.
    fn default() -> VhdxSpec {
        VhdxSpec {
            size: 1 << 30,
            base_block: 2 << 20,
            block: 2 << 20,
            depth: 1,
            shape: Shape::Full,
        }
    }
}

/// A dynamic VHDX base and `spec.depth` differencing VHDX layers over it, layer `l` holding
/// the 2 MiB units `units[i]` with `i % depth == l` (unit `u` covers bytes `u * 2 MiB ..`;
/// with 1 MiB blocks a unit is one block). Returns the paths, child first, base last.
pub fn build_vhdx(
    dir: &Path,
    spec: &VhdxSpec,
    units: &[u64],
    fill: &mut Fill,
) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    use vhd_merge::vhdx::create::{CreateOptions, create_differencing, create_dynamic};
    std::fs::create_dir_all(dir)?;
    let opts = |b: u32| CreateOptions::default().block_size(Some(b));
    let base = dir.join("base.vhdx");
    create_dynamic(&base, spec.size, &opts(spec.base_block))?.finish()?;
    let unit = u64::from(spec.block).min(2 << 20);
    let mask = if unit == 2 << 20 {
        spec.shape.mask()
    } else {
        SectorBitmap::full(unit as usize / 512)
    };
    let mut buf = vec![0u8; unit as usize];
    let mut paths = vec![base];
    for l in 0..spec.depth {
        let name = if spec.depth == 1 {
            "child.vhdx".to_string()
        } else {
            format!("layer{l:02}.vhdx")
        };
        let p = dir.join(name);
        let parent = paths.last().ok_or("no parent")?.clone();
        let mut v = create_differencing(&p, &parent, &opts(spec.block))?;
        for &u in units.iter().skip(l).step_by(spec.depth) {
            fill.block(&mut buf);
            let at = u * unit;
            let bs = u64::from(spec.block);
            v.write_sectors(at / bs, at % bs / 512, &buf, &mask)?;
        }
        v.finish()?;
        paths.push(p);
    }
    paths.reverse();
    Ok(paths)
}
