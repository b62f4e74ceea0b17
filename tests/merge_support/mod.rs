//! Test support for the merge tests: random chains written through the library, and an
//! independent in-memory model of every layer (bytes + a presence bit per sector) that says
//! what each layer's view must be. The model never reads a file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
use vhd_merge::format::SectorBitmap;
use vhd_merge::{Chain, ChainOptions};

pub use crate::common::Rng;

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
    pub size_sectors: u64,
    pub base: BaseKind,
    /// Block size of each layer (ignored for a fixed base).
    pub block_sizes: Vec<u32>,
    /// Percent of each layer's blocks that hold data.
    pub density: Vec<u64>,
    pub seed: u64,
}

/// One layer of the model: its bytes over the whole virtual size and which sectors it holds.
#[derive(Clone, Debug)]
pub struct LayerModel {
    pub data: Vec<u8>,
    pub present: Vec<bool>,
}

/// All layers, chain order.
#[derive(Clone, Debug)]
pub struct Model {
    pub size: usize,
    pub layers: Vec<LayerModel>,
}

impl Model {
    /// The view of layer `from`: per sector, the nearest layer at or below `from` holding it;
    /// zeros where none does.
    pub fn view(&self, from: usize) -> Vec<u8> {
        let mut out = vec![0u8; self.size];
        for s in 0..self.size / 512 {
            for l in &self.layers[from..] {
                if l.present[s] {
                    out[s * 512..s * 512 + 512].copy_from_slice(&l.data[s * 512..s * 512 + 512]);
                    break;
                }
            }
        }
        out
    }

    /// What the destination (layer `d`) must read after merging layers `0..d` into it: per
    /// sector, the nearest merged layer holding it, else the destination's old view.
    pub fn merged(&self, d: usize) -> Vec<u8> {
        let mut out = self.view(d);
        for s in 0..self.size / 512 {
            for l in &self.layers[..d] {
                if l.present[s] {
                    out[s * 512..s * 512 + 512].copy_from_slice(&l.data[s * 512..s * 512 + 512]);
                    break;
                }
            }
        }
        out
    }
}

/// A built chain: file paths in chain order and the model.
pub struct Built {
    pub paths: Vec<PathBuf>,
    pub model: Model,
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
    let n = spec.block_sizes.len();
    let size = (spec.size_sectors * 512) as usize;
    let mut rng = Rng::new(spec.seed);
    let paths: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("l{i}.vhd"))).collect();
    let mut layers = vec![
        LayerModel {
            data: vec![0; size],
            present: vec![false; size / 512],
        };
        n
    ];
    for i in (0..n).rev() {
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
            create_differencing(&paths[i], &paths[i + 1], &opts).unwrap()
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
        model: Model { size, layers },
    }
}

/// Read the whole view of the VHD at `path` through its chain.
pub fn read_view(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, &ChainOptions::default()).unwrap();
    let size = chain.vhd(0).virtual_size() as usize;
    let mut buf = vec![0u8; size];
    chain.read_at(0, 0, &mut buf).unwrap();
    buf
}

/// CRC32 and length of a file's bytes.
pub fn file_hash(path: &Path) -> (u32, u64) {
    let bytes = std::fs::read(path).unwrap();
    (crc32fast::hash(&bytes), bytes.len() as u64)
}

/// Hashes of every file in `paths`.
pub fn hashes(paths: &[PathBuf]) -> Vec<(u32, u64)> {
    paths.iter().map(|p| file_hash(p)).collect()
}

/// First differing byte of two buffers, for messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

/// Copy every file of `from` into `to` (which must exist).
pub fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A temporary directory on tmpfs when there is one (fsync is free there, and the fault
/// injection, not the disk, decides what a crash keeps), else in the default place.
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

// ---- I/O recording and fault wrappers for the destination (MergeOptions::destination_io). ----

use std::sync::{Arc, Mutex};

use vhd_merge::io::{FaultPlan, FaultyStorage, Storage};
use vhd_merge::merge::StorageWrapper;

/// One operation a merge did on its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEvent {
    /// A write of `len` bytes at `offset`; the file was `file_len` bytes long before it.
    Write {
        offset: u64,
        len: u64,
        file_len: u64,
    },
    /// A flush.
    Sync,
    /// A truncation or extension to this length.
    SetLen(u64),
}

/// What a [`Recording`] storage saw, in order.
#[derive(Debug, Default)]
pub struct IoLog(Mutex<Vec<IoEvent>>);

impl IoLog {
    pub fn new() -> Arc<IoLog> {
        Arc::new(IoLog::default())
    }
    pub fn events(&self) -> Vec<IoEvent> {
        self.0.lock().unwrap().clone()
    }
    /// The writes, in order (write n of a [`FaultPlan`] is element n-1).
    pub fn writes(&self) -> Vec<(u64, u64, u64)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                IoEvent::Write {
                    offset,
                    len,
                    file_len,
                } => Some((offset, len, file_len)),
                _ => None,
            })
            .collect()
    }
    pub fn syncs(&self) -> u64 {
        self.events()
            .iter()
            .filter(|e| matches!(e, IoEvent::Sync))
            .count() as u64
    }
    /// The points where the file grows: for each write that ends past the end of the file,
    /// (1-based write number, file length before it, end of the write).
    pub fn growth_points(&self) -> Vec<(u64, u64, u64)> {
        self.writes()
            .into_iter()
            .enumerate()
            .filter(|(_, (off, len, file_len))| off + len > *file_len)
            .map(|(i, (off, len, file_len))| (i as u64 + 1, file_len, off + len))
            .collect()
    }
}

/// Storage that logs every write, sync and truncation into an [`IoLog`].
#[derive(Debug)]
pub struct Recording {
    inner: Box<dyn Storage>,
    log: Arc<IoLog>,
}

impl Storage for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let file_len = self.inner.len()?;
        self.log.0.lock().unwrap().push(IoEvent::Write {
            offset,
            len: buf.len() as u64,
            file_len,
        });
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.log.0.lock().unwrap().push(IoEvent::SetLen(len));
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.log.0.lock().unwrap().push(IoEvent::Sync);
        self.inner.sync_data()
    }
    fn try_lock(&self, exclusive: bool) -> std::io::Result<bool> {
        self.inner.try_lock(exclusive)
    }
}

/// A destination wrapper that records into `log`.
pub fn recording(log: Arc<IoLog>) -> StorageWrapper {
    Arc::new(move |s| {
        Box::new(Recording {
            inner: s,
            log: log.clone(),
        })
    })
}

/// A destination wrapper that injects the faults of `plan`.
pub fn faulty(plan: Arc<FaultPlan>) -> StorageWrapper {
    Arc::new(move |s| Box::new(FaultyStorage::new(s, plan.clone())))
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
