//! A differencing chain: the child and its ancestors, found through parent locators and
//! verified by unique id, and reads through it.
//!
//! The composition primitive, [`Chain::plan_span`] plus [`Chain::read_plan`], decides for a
//! range of virtual sectors which layer provides each sector (the nearest layer whose bitmap
//! holds it) and reads them with one read per contributing layer and block. Reading through
//! the chain, flattening and merging all use it.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{Error, ParentCandidate, Result};
use crate::format::{DiskType, PlatformCode, SECTOR_SIZE, SectorBitmap};
use crate::image::{BlockMap, OpenOptions, SizeRule, Vhd};

/// Default limit on the number of layers in a chain.
pub const DEFAULT_MAX_DEPTH: usize = 256;

/// How to find and open the files of a chain.
#[derive(Clone, Debug)]
pub struct ChainOptions {
    /// The parent of the first differencing disk, overriding its locators.
    pub parent: Option<PathBuf>,
    /// Extra directories to look for parents in (by the header's parent name).
    pub search_dirs: Vec<PathBuf>,
    /// Do not follow absolute locators (W2ku, Wi2k, MacX), for files from strangers.
    pub ignore_absolute_locators: bool,
    /// Accept only parent candidates inside these directories (the child's own directory must
    /// be listed too if it is allowed). `None`: no confinement.
    pub confine_to: Option<Vec<PathBuf>>,
    /// Accept checksum mismatches (with warnings).
    pub lenient: bool,
    /// How to decide each layer's virtual size.
    pub size_rule: SizeRule,
    /// At most this many layers.
    pub max_depth: usize,
}

impl Default for ChainOptions {
    fn default() -> ChainOptions {
        ChainOptions {
            parent: None,
            search_dirs: Vec::new(),
            ignore_absolute_locators: false,
            confine_to: None,
            lenient: false,
            size_rule: SizeRule::Auto,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// One file of a chain.
#[derive(Debug)]
pub struct Layer {
    /// The open file (read-only).
    pub vhd: Vhd,
    /// How it was found: `opened` for the first layer, else the locator or rule that named it
    /// (`W2ru`, `W2ku`, `MacX`, `header name`, `--parent`, ...).
    pub found_by: String,
    /// Warnings about the link to this layer (time stamp mismatch, ...).
    pub warnings: Vec<String>,
}

/// A chain of VHDs, child first, ending at a fixed or dynamic disk.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Layer>,
}

/// Where one contiguous piece of a span lives in one layer's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// First sector of the piece, relative to the span.
    pub first: usize,
    /// Sectors in the piece.
    pub len: usize,
    /// File offset of the piece's first sector.
    pub file_offset: u64,
}

/// The sectors one layer provides to a span.
#[derive(Clone, Debug)]
pub struct SpanSource {
    /// Index of the layer in the chain (0 = child).
    pub layer: usize,
    /// The sectors of the span this layer provides (relative to the span).
    pub claimed: SectorBitmap,
    /// Where the layer holds the span's sectors (one piece per layer block).
    pub pieces: Vec<Piece>,
}

/// Which layer provides each sector of a span of virtual sectors (see [`Chain::plan_span`]).
#[derive(Clone, Debug)]
pub struct SpanPlan {
    /// First virtual sector of the span.
    pub start_sector: u64,
    /// Sectors in the span.
    pub sectors: usize,
    /// The layers that provide sectors, nearest first.
    pub sources: Vec<SpanSource>,
    /// Sectors no layer in the range provides.
    pub unclaimed: SectorBitmap,
}

impl SpanPlan {
    /// Sectors some layer provides.
    pub fn claimed(&self) -> SectorBitmap {
        let mut c = SectorBitmap::new(self.sectors);
        for s in &self.sources {
            c.or(&s.claimed);
        }
        c
    }
}

impl Chain {
    /// Open the VHD at `path` and every ancestor, following parent locators and checking each
    /// link by unique id, until a fixed or dynamic disk. Every file is opened read-only.
    pub fn open(path: impl AsRef<Path>, options: &ChainOptions) -> Result<Chain> {
        let path = path.as_ref();
        let open_opts = OpenOptions {
            writable: false,
            lenient: options.lenient,
            size_rule: options.size_rule,
        };
        let first = Vhd::open(path, open_opts)?;
        let mut seen_ids = HashSet::new();
        let mut seen_paths = HashSet::new();
        seen_ids.insert(first.unique_id());
        seen_paths.insert(canonical_or_self(path));
        let mut layers = vec![Layer {
            vhd: first,
            found_by: "opened".into(),
            warnings: Vec::new(),
        }];
        loop {
            let child = &layers[layers.len() - 1].vhd;
            if child.disk_type() != DiskType::Differencing {
                break;
            }
            if layers.len() >= options.max_depth {
                return Err(Error::InvalidState(format!(
                    "{}: chain is deeper than {} layers",
                    path.display(),
                    options.max_depth
                )));
            }
            let (parent, found_by, warnings) =
                resolve_parent(child, options, layers.len() == 1, open_opts)?;
            if !seen_ids.insert(parent.unique_id())
                || !seen_paths.insert(canonical_or_self(parent.path()))
            {
                return Err(Error::InvalidState(format!(
                    "{}: differencing chain cycle: {} (unique id {}) appears twice",
                    path.display(),
                    parent.path().display(),
                    parent.unique_id()
                )));
            }
            layers.push(Layer {
                vhd: parent,
                found_by,
                warnings,
            });
        }
        Ok(Chain { layers })
    }

    /// Build a chain from layers already opened and verified (child first).
    pub fn from_layers(layers: Vec<Layer>) -> Chain {
        Chain { layers }
    }

    /// The layers, child first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Take the layers out.
    pub fn into_layers(self) -> Vec<Layer> {
        self.layers
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Always false: a chain has at least one layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The file of layer `i` (0 = child).
    pub fn vhd(&self, i: usize) -> &Vhd {
        &self.layers[i].vhd
    }

    /// Decide, for virtual sectors `start_sector .. start_sector + sectors`, which of the layers
    /// in `layers` (nearest first) provides each sector: the first whose bitmap holds it and
    /// whose virtual size covers it. Reads only bitmaps (one per layer block).
    pub fn plan_span(
        &self,
        layers: Range<usize>,
        start_sector: u64,
        sectors: usize,
    ) -> Result<SpanPlan> {
        let mut unclaimed = SectorBitmap::full(sectors);
        let mut sources = Vec::new();
        let end_sector = start_sector + sectors as u64;
        for li in layers {
            if unclaimed.none() {
                break;
            }
            let vhd = &self.layers[li].vhd;
            let spb = vhd.sectors_per_block();
            let layer_end = (vhd.virtual_size() / SECTOR_SIZE).min(end_sector);
            let mut claimed = SectorBitmap::new(sectors);
            let mut pieces = Vec::new();
            let mut s = start_sector;
            while s < layer_end {
                let block = s / spb;
                let block_first = block * spb;
                let next = ((block + 1) * spb).min(layer_end);
                let rel = (s - start_sector) as usize;
                let n = (next - s) as usize;
                let in_block = (s - block_first) as usize;
                if let BlockMap::Present {
                    data_offset,
                    bitmap,
                } = vhd.block_map(block)?
                {
                    let mut take = SectorBitmap::new(sectors);
                    match bitmap {
                        Some(bm) => take.copy_bits_from(rel, &bm, in_block, n),
                        None => take.set_range(rel..rel + n),
                    }
                    take.and(&unclaimed);
                    if !take.none() {
                        unclaimed.and_not(&take);
                        claimed.or(&take);
                        pieces.push(Piece {
                            first: rel,
                            len: n,
                            file_offset: data_offset + in_block as u64 * SECTOR_SIZE,
                        });
                    }
                }
                s = next;
            }
            if !pieces.is_empty() {
                sources.push(SpanSource {
                    layer: li,
                    claimed,
                    pieces,
                });
            }
        }
        Ok(SpanPlan {
            start_sector,
            sectors,
            sources,
            unclaimed,
        })
    }

    /// Read the claimed sectors of `plan` into `buf` (`plan.sectors * 512` bytes); unclaimed
    /// sectors are left as they are. Per layer and piece: a few runs are read one by one,
    /// many runs with one read of their span into `scratch` and copies from there.
    pub fn read_plan(&self, plan: &SpanPlan, buf: &mut [u8], scratch: &mut Vec<u8>) -> Result<()> {
        const FEW_RUNS: usize = 8;
        for src in &plan.sources {
            let vhd = &self.layers[src.layer].vhd;
            for p in &src.pieces {
                let range = p.first..p.first + p.len;
                let runs: Vec<Range<usize>> = src
                    .claimed
                    .runs_in(range.clone(), true)
                    .take(FEW_RUNS + 1)
                    .collect();
                let Some(first) = runs.first() else { continue };
                let file_at =
                    |sector: usize| p.file_offset + ((sector - p.first) as u64) * SECTOR_SIZE;
                if runs.len() <= FEW_RUNS {
                    for r in &runs {
                        vhd.read_raw(&mut buf[r.start * 512..r.end * 512], file_at(r.start))?;
                    }
                    continue;
                }
                let lo = first.start;
                let hi = src
                    .claimed
                    .runs_in(range, true)
                    .last()
                    .map_or(lo, |r| r.end);
                scratch.resize((hi - lo) * 512, 0);
                vhd.read_raw(scratch, file_at(lo))?;
                for r in src.claimed.runs_in(lo..hi, true) {
                    buf[r.start * 512..r.end * 512]
                        .copy_from_slice(&scratch[(r.start - lo) * 512..(r.end - lo) * 512]);
                }
            }
        }
        Ok(())
    }

    /// Read layer `layer`'s logical content: `buf.len()` bytes (a multiple of 512) at virtual
    /// `offset` (sector aligned). Each sector comes from the nearest layer at or below `layer`
    /// that holds it; zeros where none does (below a dynamic base, or past the end of an
    /// ancestor smaller than the child).
    pub fn read_at(&self, layer: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.layers[layer].vhd.virtual_size();
        if offset % SECTOR_SIZE != 0
            || buf.len() as u64 % SECTOR_SIZE != 0
            || offset
                .checked_add(buf.len() as u64)
                .is_none_or(|e| e > size)
        {
            return Err(Error::InvalidParameter(format!(
                "read of {} bytes at {offset}: must be sector aligned and inside the virtual size {size}",
                buf.len()
            )));
        }
        const SPAN: u64 = 2 << 20;
        let mut scratch = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((SPAN - pos % SPAN) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            let plan = self.plan_span(layer..self.layers.len(), pos / SECTOR_SIZE, n / 512)?;
            for r in plan.unclaimed.runs() {
                out[r.start * 512..r.end * 512].fill(0);
            }
            self.read_plan(&plan, out, &mut scratch)?;
            done += n;
        }
        Ok(())
    }
}

fn canonical_or_self(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Candidate paths for `child`'s parent, in order, with where each came from.
fn parent_candidates(
    child: &Vhd,
    options: &ChainOptions,
    first_link: bool,
) -> Result<Vec<(PathBuf, String)>> {
    let dir = child
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut out = Vec::new();
    if first_link {
        if let Some(p) = &options.parent {
            out.push((p.clone(), "--parent".to_string()));
        }
    }
    let Some(h) = child.header() else {
        return Ok(out);
    };
    for loc in h.locators.iter() {
        if loc.platform_code != PlatformCode::W2ru {
            continue;
        }
        let len = u64::from(loc.data_length);
        if len == 0
            || len > 64 * 1024
            || loc.data_offset.saturating_add(len) > child.footer_offset()
        {
            continue;
        }
        let mut data = vec![0u8; len as usize];
        child.read_raw(&mut data, loc.data_offset)?;
        if let Some(text) = loc.platform_code.decode_payload(&data) {
            let rel = text.replace('\\', "/");
            out.push((dir.join(rel), loc.platform_code.name()));
        }
    }
    let name = h.parent_name();
    let base = name.rsplit(['\\', '/']).next().unwrap_or("").to_string();
    if !base.is_empty() {
        out.push((dir.join(&base), "header name".to_string()));
        for d in &options.search_dirs {
            out.push((d.join(&base), "header name in search dir".to_string()));
        }
    }
    Ok(out)
}

fn resolve_parent(
    child: &Vhd,
    options: &ChainOptions,
    first_link: bool,
    open_opts: OpenOptions,
) -> Result<(Vhd, String, Vec<String>)> {
    let want = child.parent_unique_id().unwrap_or_default();
    let mut tried = Vec::new();
    for (path, source) in parent_candidates(child, options, first_link)? {
        let reason = match Vhd::open(&path, open_opts) {
            Ok(v) if v.unique_id() == want => {
                let mut warnings = Vec::new();
                if let Some(h) = child.header() {
                    let ts = crate::create::parent_timestamp(&path).unwrap_or(0);
                    if h.parent_timestamp != 0 && h.parent_timestamp != ts {
                        warnings.push(format!(
                            "parent time stamp {} recorded in {} differs from {} ({}); the unique id matches",
                            h.parent_timestamp,
                            child.path().display(),
                            path.display(),
                            ts
                        ));
                    }
                }
                return Ok((v, source, warnings));
            }
            Ok(v) => format!(
                "unique id mismatch: file has {}, child expects {}",
                v.unique_id(),
                want
            ),
            Err(e) => e.to_string(),
        };
        tried.push(ParentCandidate {
            path,
            source,
            reason,
        });
    }
    Err(Error::ParentNotFound {
        child: child.path().to_path_buf(),
        parent_name: child.header().map(|h| h.parent_name()).unwrap_or_default(),
        parent_id: want,
        tried,
    })
}
