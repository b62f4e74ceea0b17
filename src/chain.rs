//! A differencing chain: the child and its ancestors, found through parent locators and
//! verified by unique id, and reads through it.
//!
//! The chain sees its files only through the layer boundary ([`crate::layer::Layer`]): no
//! format's types, constants or file offsets appear here, and every size is in the chain's
//! logical sectors ([`Chain::sector_size`]).
//!
//! The composition primitive, [`Chain::plan_span`] plus [`Chain::read_plan`], decides for a
//! range of virtual sectors which layer provides each sector (the nearest layer whose block
//! holds it; a block that declares zeros claims them as zeros) and reads them with one
//! [`crate::layer::Layer::read_stored`] per contributing layer and block.
//! Reading through the chain, flattening and merging all use it.
//!
//! # Finding parents (§5)
//!
//! A differencing layer's [`crate::layer::Layer::parent_link`] gives the parent ids it accepts
//! and its path hints, in the format's order. For a VHD the candidates are tried in this
//! order, and the first whose footer Unique Id equals the child's Parent Unique Id is the
//! parent:
//!
//! 1. the caller's overrides: [`ChainOptions::parent`] (for the first link it is the only
//!    candidate), then in each of [`ChainOptions::search_dirs`] the file names the child gives
//!    (header name, then each locator's file name);
//! 2. the locators, W2ru, W2ku, MacX, Wi2r, Wi2k (slot order within a code), each mapped
//!    onto this host by [`crate::locator::map_locator_path`];
//! 3. the header's Parent Unicode Name (its last component) in the child's directory;
//! 4. every regular file in the search directories whose footer carries the wanted unique id
//!    (a renamed parent), unless [`ChainOptions::scan_search_dirs`] is off.
//!
//! Identical paths are tried once (a path that only absolute locators gave, again when a relative
//! rule gives it). A missing parent fails with [`Error::ParentNotFound`]
//! listing each candidate and why it failed. Resolving opens files read-only and never writes.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::bitmap::SectorBitmap;
use crate::error::{Error, ParentCandidate, Result};
use crate::layer::{BlockState, Layer, ParentLink, PathHint, Spelling, open_layer};
use crate::layer::{OpenOptions, SizeRule};
use crate::locator::canonical_or_self;

/// Default limit on the number of layers in a chain.
pub const DEFAULT_MAX_DEPTH: usize = 256;

options! {
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
        /// Also probe every regular file in the search directories for the wanted unique id, to
        /// find a parent that was renamed (on by default; only footers are read).
        pub scan_search_dirs: bool,
    }
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
            scan_search_dirs: true,
        }
    }
}

/// How a layer of a chain was found. Displays as the rule's name (`opened`, `W2ru`,
/// `W2ku without drive`, `search dir, header name`, ...), and compares equal to that text.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FoundBy {
    /// The file the chain was opened from (layer 0).
    Opened,
    /// The caller's [`ChainOptions::parent`].
    ParentOption,
    /// A file name the child gives, in one of [`ChainOptions::search_dirs`].
    SearchDir {
        /// The hint that gave the name (`header name`, `W2ru`, ...).
        source: &'static str,
        /// The name was the last component of a path hint (not a bare file name).
        from_path: bool,
    },
    /// One of the child's path hints, mapped onto this host.
    Hint {
        /// Where the hint came from (`W2ru`, `header name`, ...).
        source: &'static str,
        /// The mapping rule when it was not the path as written (`without drive`, ...).
        rule: Option<&'static str>,
    },
    /// A file in a search directory that carries the wanted identity (a renamed parent).
    IdScan,
}

impl std::fmt::Display for FoundBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FoundBy::Opened => f.write_str("opened"),
            FoundBy::ParentOption => f.write_str("--parent"),
            FoundBy::SearchDir {
                source,
                from_path: false,
            } => write!(f, "search dir, {source}"),
            FoundBy::SearchDir {
                source,
                from_path: true,
            } => write!(f, "search dir, {source} file name"),
            FoundBy::Hint { source, rule: None } => f.write_str(source),
            FoundBy::Hint {
                source,
                rule: Some(r),
            } => write!(f, "{source} {r}"),
            FoundBy::IdScan => f.write_str("search dir, by unique id"),
        }
    }
}

impl PartialEq<&str> for FoundBy {
    fn eq(&self, other: &&str) -> bool {
        self.to_string().as_str() == *other
    }
}

/// One file of a chain.
#[derive(Debug)]
pub struct ChainLayer {
    /// The open file (read-only).
    pub layer: Box<dyn Layer>,
    /// How it was found.
    pub found_by: FoundBy,
    /// Warnings about the link to this layer (time stamp mismatch, ...).
    pub warnings: Vec<String>,
}

impl ChainLayer {
    /// A layer found by `found_by`, without link warnings.
    pub fn new(layer: Box<dyn Layer>, found_by: FoundBy) -> ChainLayer {
        ChainLayer {
            layer,
            found_by,
            warnings: Vec::new(),
        }
    }
}

/// What `vhd-merge chain` shows: every layer, child first, with how it was found
/// ([`Chain::report`]).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChainReport {
    /// The file the chain was opened from (layer 0's path).
    pub path: PathBuf,
    /// The number of layers.
    pub layer_count: usize,
    /// The layers, child first.
    pub layers: Vec<ChainLayerReport>,
}

/// One layer of a [`ChainReport`].
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChainLayerReport {
    /// Its place in the chain, 0 for the child.
    pub index: usize,
    /// How it was found ([`FoundBy`]'s text in JSON).
    pub found_by: FoundBy,
    /// The file (in JSON its fields are the layer's).
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub layer: crate::layer::LayerSummary,
    /// The link's warnings ([`ChainLayer::warnings`]), then the file's own.
    pub warnings: Vec<String>,
}

#[cfg(feature = "serde")]
impl serde::Serialize for FoundBy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A chain of disk images, child first, ending at a layer without a parent.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<ChainLayer>,
}

/// Where one contiguous piece of a span lives in one layer: a stretch of one of its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// First sector of the piece, relative to the span.
    pub first: usize,
    /// Sectors in the piece.
    pub len: usize,
    /// The layer's block holding the piece.
    pub block: u64,
    /// The piece's first sector, counted from the start of that block.
    pub first_in_block: u64,
}

impl Piece {
    /// The block sector holding span sector `sector` (inside the piece).
    pub fn in_block(&self, sector: usize) -> u64 {
        self.first_in_block + (sector - self.first) as u64
    }
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
    /// Sectors a layer of the range declares zeros whatever its ancestors hold (a VHDX ZERO
    /// block; a VHD never does): part of [`SpanPlan::hidden`].
    pub zeros: SectorBitmap,
    /// Sectors of the span, from its start, below the end of every layer of the range (the
    /// smallest virtual size among them). Past it the range's view is decided by the range
    /// alone: a sector no layer of the range provides reads as zeros there, whatever the
    /// layers after the range hold (see [`SpanPlan::hidden`]).
    pub visible: usize,
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

    /// Sectors the range decides are zeros: those no layer of the range provides that lie
    /// past the end of a smaller layer of the range, and those a layer of it declares zeros
    /// ([`SpanPlan::zeros`]). The layers after the range are hidden there (a merge of the
    /// range must write these zeros into its destination). One rule for both.
    pub fn hidden(&self) -> SectorBitmap {
        let mut h = self.unclaimed.clone();
        h.clear_range(0..self.visible.min(self.sectors));
        h.or(&self.zeros);
        h
    }

    /// The sectors whose content the range decides: those a layer of it provides, and the
    /// [hidden](SpanPlan::hidden) ones (zeros). The others read through to the layers after
    /// the range.
    pub fn decided(&self) -> SectorBitmap {
        let mut d = self.claimed();
        d.or(&self.hidden());
        d
    }
}

impl Chain {
    /// Open the VHD at `path` and every ancestor, following parent locators and checking each
    /// link by unique id, until a fixed or dynamic disk. Every file is opened read-only; see
    /// the module documentation for the order in which parents are looked for.
    ///
    /// Errors: [`Error::ParentNotFound`] (File not found) listing every candidate tried;
    /// [`Error::InvalidState`] for a cycle (the same unique id or the same file twice) or a
    /// chain deeper than [`ChainOptions::max_depth`].
    pub fn open(path: impl AsRef<Path>, options: &ChainOptions) -> Result<Chain> {
        let path = path.as_ref();
        let open_opts = OpenOptions {
            writable: false,
            lenient: options.lenient,
            size_rule: options.size_rule,
        };
        let first = open_layer(path, open_opts)?;
        let confine = canonical_confinement(options);
        let mut seen_ids = HashSet::new();
        let mut seen_paths = HashSet::new();
        seen_ids.insert(first.id());
        seen_paths.insert(canonical_or_self(path));
        let mut layers = vec![ChainLayer::new(first, FoundBy::Opened)];
        loop {
            let child = layers[layers.len() - 1].layer.as_ref();
            let Some(link) = child.parent_link()? else {
                break;
            };
            if layers.len() >= options.max_depth {
                return Err(Error::InvalidState(format!(
                    "{}: the chain is deeper than the limit of {} layers (the last one reached is {}, whose parent would be layer {})",
                    path.display(),
                    options.max_depth,
                    child.path().display(),
                    layers.len() + 1
                )));
            }
            let found = resolve_parent(
                child,
                &link,
                options,
                layers.len() == 1,
                open_opts,
                confine.as_deref(),
            )?;
            let parent = found.layer.as_ref();
            let canonical = canonical_or_self(parent.path());
            if !seen_ids.insert(parent.id()) || !seen_paths.insert(canonical.clone()) {
                let first = layers
                    .iter()
                    .position(|l| {
                        l.layer.id() == parent.id()
                            || canonical_or_self(l.layer.path()) == canonical
                    })
                    .unwrap_or(0);
                return Err(Error::InvalidState(format!(
                    "{}: the differencing chain has a cycle: the parent of {} is {} (unique id {}), which is already layer {first} ({}, unique id {})",
                    path.display(),
                    child.path().display(),
                    parent.path().display(),
                    parent.id(),
                    layers[first].layer.path().display(),
                    layers[first].layer.id()
                )));
            }
            layers.push(found);
        }
        Ok(Chain { layers })
    }

    /// Build a chain from layers already opened and verified (child first).
    pub fn from_layers(layers: Vec<ChainLayer>) -> Chain {
        Chain { layers }
    }

    /// What `vhd-merge chain` shows of the chain.
    pub fn report(&self) -> ChainReport {
        let layers: Vec<ChainLayerReport> = self
            .layers
            .iter()
            .enumerate()
            .map(|(index, l)| ChainLayerReport {
                index,
                found_by: l.found_by.clone(),
                layer: crate::layer::LayerSummary::of(l.layer.as_ref()),
                warnings: l
                    .warnings
                    .iter()
                    .chain(l.layer.warnings())
                    .cloned()
                    .collect(),
            })
            .collect();
        ChainReport {
            path: layers
                .first()
                .map(|l| l.layer.path.clone())
                .unwrap_or_default(),
            layer_count: layers.len(),
            layers,
        }
    }

    /// The layers, child first.
    pub fn layers(&self) -> &[ChainLayer] {
        &self.layers
    }

    /// Take the layers out.
    pub fn into_layers(self) -> Vec<ChainLayer> {
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

    /// Layer `i` (0 = child), or `None` past the chain's end.
    pub fn layer(&self, i: usize) -> Option<&dyn Layer> {
        self.layers.get(i).map(|l| l.layer.as_ref())
    }

    /// The logical sector size of the chain's layers (all agree; the child's).
    pub fn sector_size(&self) -> u32 {
        // An empty chain (from_layers) has no sectors to read; 512 keeps divisions defined.
        self.layers.first().map_or(512, |l| l.layer.sector_size())
    }

    /// Layer `i`, or an Invalid parameter error naming the chain's length.
    fn get(&self, i: usize) -> Result<&dyn Layer> {
        self.layer(i).ok_or_else(|| {
            Error::InvalidParameter(format!(
                "layer {i} does not exist: the chain has {} layer(s)",
                self.layers.len()
            ))
        })
    }

    /// A `Read + Seek` view of layer `layer`'s logical content (0 = the child).
    pub fn reader(&self, layer: usize) -> Result<ChainReader<&Chain>> {
        ChainReader::new(self, layer)
    }

    /// Like [`Chain::reader`], owning the chain.
    pub fn into_reader(self, layer: usize) -> Result<ChainReader<Chain>> {
        ChainReader::new(self, layer)
    }

    /// Decide, for virtual sectors `start_sector .. start_sector + sectors`, which of the layers
    /// in `layers` (nearest first) provides each sector: the first whose bitmap holds it and
    /// whose virtual size covers it. Reads only bitmaps (one per layer block).
    ///
    /// A layer's content ends at its own virtual size, so a layer sees its ancestors only up
    /// to the smallest virtual size between them: a sector past the end of any layer from
    /// the first of the range down to `li` is never taken from layer `li` (zeros past the end
    /// of a smaller ancestor, even when an older ancestor is larger again). Such sectors that
    /// no layer of the range holds are [`SpanPlan::hidden`]: the range alone decides them.
    pub fn plan_span(
        &self,
        layers: Range<usize>,
        start_sector: u64,
        sectors: usize,
    ) -> Result<SpanPlan> {
        if layers.end > self.layers.len() {
            return Err(Error::InvalidParameter(format!(
                "layers {layers:?}: the chain has {} layer(s)",
                self.layers.len()
            )));
        }
        let ss = u64::from(self.sector_size());
        let mut plan = SpanPlan {
            start_sector,
            sectors,
            sources: Vec::new(),
            unclaimed: SectorBitmap::full(sectors),
            zeros: SectorBitmap::new(sectors),
            visible: 0,
        };
        let mut visible_end = start_sector.saturating_add(sectors as u64);
        for li in layers {
            let layer = self.layers[li].layer.as_ref();
            visible_end = visible_end.min(layer.virtual_size() / ss);
            if plan.unclaimed.none() {
                // Nothing left to claim; the loop only goes on to find the visible end.
                continue;
            }
            if let Some(src) = claim_from(&mut plan, layer, li, visible_end)? {
                plan.sources.push(src);
            }
        }
        plan.visible = visible_end.saturating_sub(start_sector).min(sectors as u64) as usize;
        Ok(plan)
    }

    /// Read the claimed sectors of `plan` into `buf` (`plan.sectors` logical sectors) and
    /// zero its [`SpanPlan::zeros`]; unclaimed sectors are left as they are. Per layer and
    /// piece: a few runs are read one by one, many runs with one read of their span into
    /// `scratch` and copies from there.
    pub fn read_plan(&self, plan: &SpanPlan, buf: &mut [u8], scratch: &mut Vec<u8>) -> Result<()> {
        const FEW_RUNS: usize = 8;
        let ss = self.sector_size() as usize;
        let bytes = |r: &Range<usize>| r.start * ss..r.end * ss;
        for r in plan.zeros.runs() {
            buf[bytes(&r)].fill(0);
        }
        for src in &plan.sources {
            let layer = self.layers[src.layer].layer.as_ref();
            for p in &src.pieces {
                let range = p.first..p.first + p.len;
                let runs: Vec<Range<usize>> = src
                    .claimed
                    .runs_in(range.clone(), true)
                    .take(FEW_RUNS + 1)
                    .collect();
                let Some(first) = runs.first() else { continue };
                if runs.len() <= FEW_RUNS {
                    for r in &runs {
                        layer.read_stored(p.block, p.in_block(r.start), &mut buf[bytes(r)])?;
                    }
                    continue;
                }
                let lo = first.start;
                let hi = src
                    .claimed
                    .runs_in(range, true)
                    .last()
                    .map_or(lo, |r| r.end);
                scratch.resize((hi - lo) * ss, 0);
                layer.read_stored(p.block, p.in_block(lo), scratch)?;
                for r in src.claimed.runs_in(lo..hi, true) {
                    buf[bytes(&r)]
                        .copy_from_slice(&scratch[(r.start - lo) * ss..(r.end - lo) * ss]);
                }
            }
        }
        Ok(())
    }

    /// Read layer `layer`'s logical content: `buf.len()` bytes (whole logical sectors) at virtual
    /// `offset` (sector aligned). Each sector comes from the nearest layer at or below `layer`
    /// that holds it; zeros where none does (below a dynamic base, or past the end of an
    /// ancestor smaller than the child).
    pub fn read_at(&self, layer: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.get(layer)?.virtual_size();
        let ss = u64::from(self.sector_size());
        if !offset.is_multiple_of(ss)
            || !(buf.len() as u64).is_multiple_of(ss)
            || offset
                .checked_add(buf.len() as u64)
                .is_none_or(|e| e > size)
        {
            return Err(Error::InvalidParameter(format!(
                "read of {} bytes at {offset}: must be sector aligned and inside the virtual size {size}",
                buf.len()
            )));
        }
        // A multiple of every logical sector size.
        const SPAN: u64 = 2 << 20;
        let ssz = ss as usize;
        let mut scratch = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((SPAN - pos % SPAN) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            let plan = self.plan_span(layer..self.layers.len(), pos / ss, n / ssz)?;
            for r in plan.unclaimed.runs() {
                out[r.start * ssz..r.end * ssz].fill(0);
            }
            self.read_plan(&plan, out, &mut scratch)?;
            done += n;
        }
        Ok(())
    }
}

/// What layer `layer` (index `li`) provides to `plan` below virtual sector `layer_end`: the
/// sectors its present blocks hold that no nearer layer claimed (taken out of
/// `plan.unclaimed`), and, for its zero blocks, the same sectors claimed as zeros (into
/// `plan.zeros`). Reads one block state per layer block of the span.
fn claim_from(
    plan: &mut SpanPlan,
    layer: &dyn Layer,
    li: usize,
    layer_end: u64,
) -> Result<Option<SpanSource>> {
    let (start_sector, sectors) = (plan.start_sector, plan.sectors);
    let spb = (layer.block_size() / u64::from(layer.sector_size())).max(1);
    let mut claimed = SectorBitmap::new(sectors);
    let mut pieces = Vec::new();
    let mut s = start_sector;
    while s < layer_end {
        let block = s / spb;
        let next = ((block + 1) * spb).min(layer_end);
        let rel = (s - start_sector) as usize;
        let n = (next - s) as usize;
        let in_block = s - block * spb;
        s = next;
        let mut take = SectorBitmap::new(sectors);
        let zero = match layer.block_state(block)? {
            BlockState::Transparent => continue,
            BlockState::Zero => {
                take.set_range(rel..rel + n);
                true
            }
            BlockState::Present(Some(bm)) => {
                take.copy_bits_from(rel, &bm, in_block as usize, n);
                false
            }
            BlockState::Present(None) => {
                take.set_range(rel..rel + n);
                false
            }
        };
        take.and(&plan.unclaimed);
        if take.none() {
            continue;
        }
        plan.unclaimed.and_not(&take);
        if zero {
            plan.zeros.or(&take);
            continue;
        }
        claimed.or(&take);
        pieces.push(Piece {
            first: rel,
            len: n,
            block,
            first_in_block: in_block,
        });
    }
    Ok((!pieces.is_empty()).then_some(SpanSource {
        layer: li,
        claimed,
        pieces,
    }))
}

/// A `Read + Seek` view of one layer's logical content (see [`Chain::reader`]).
///
/// Any position and length work: reads that are not sector aligned go through a window of
/// whole sectors read ahead; large aligned reads go straight into the caller's buffer.
#[derive(Debug)]
pub struct ChainReader<C: Borrow<Chain> = Chain> {
    chain: C,
    layer: usize,
    size: u64,
    pos: u64,
    window: Vec<u8>,
    window_start: u64,
}

/// Bytes a [`ChainReader`] reads ahead for small or unaligned reads.
const READ_WINDOW: usize = 1 << 20;

impl<C: Borrow<Chain>> ChainReader<C> {
    /// A reader of layer `layer`'s logical content (0 = the child), at position 0.
    pub fn new(chain: C, layer: usize) -> Result<ChainReader<C>> {
        let size = chain.borrow().get(layer)?.virtual_size();
        Ok(ChainReader {
            chain,
            layer,
            size,
            pos: 0,
            window: Vec::new(),
            window_start: 0,
        })
    }

    /// The logical size in bytes (the layer's virtual size).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chain read through.
    pub fn chain(&self) -> &Chain {
        self.chain.borrow()
    }

    /// Take the chain back.
    pub fn into_inner(self) -> C {
        self.chain
    }

    fn fill_window(&mut self) -> Result<()> {
        let ss = u64::from(self.chain.borrow().sector_size());
        let start = self.pos - self.pos % ss;
        let len = (self.size - start).min(READ_WINDOW as u64) as usize;
        self.window.resize(len, 0);
        self.window_start = start;
        if let Err(e) = self
            .chain
            .borrow()
            .read_at(self.layer, start, &mut self.window)
        {
            self.window.clear();
            return Err(e);
        }
        Ok(())
    }
}

impl<C: Borrow<Chain>> std::io::Read for ChainReader<C> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.size - self.pos) as usize;
        let ws = self.window_start;
        let we = ws + self.window.len() as u64;
        if !(ws..we).contains(&self.pos) {
            let ss = self.chain.borrow().sector_size() as usize;
            let aligned = want - want % ss;
            if self.pos.is_multiple_of(ss as u64) && aligned >= READ_WINDOW {
                // Large aligned read: no copy through the window.
                self.chain
                    .borrow()
                    .read_at(self.layer, self.pos, &mut buf[..aligned])
                    .map_err(std::io::Error::other)?;
                self.pos += aligned as u64;
                return Ok(aligned);
            }
            self.fill_window().map_err(std::io::Error::other)?;
        }
        let off = (self.pos - self.window_start) as usize;
        let n = want.min(self.window.len() - off);
        buf[..n].copy_from_slice(&self.window[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl<C: Borrow<Chain>> std::io::Seek for ChainReader<C> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => self.size.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }
}

/// At most this many directory entries are probed per search directory when looking for a
/// renamed parent by unique id.
pub const MAX_SCAN_ENTRIES: usize = 10_000;

/// A place the parent may be.
#[derive(Debug)]
struct Candidate {
    path: PathBuf,
    /// How it was found, when it is tried (`None`: listed only).
    found_by: Option<FoundBy>,
    /// For the listing in [`Error::ParentNotFound`].
    source: String,
    /// From an absolute path in a hint: skipped when absolute locators are ignored.
    absolute: bool,
    /// Listed for the error message but never opened, with the reason.
    skip: Option<String>,
}

/// Candidates in the order to try, without duplicate paths (a path seen only from absolute
/// locators is listed again when a relative rule gives it, which is still followed when
/// absolute locators are ignored).
#[derive(Debug, Default)]
struct Candidates {
    list: Vec<Candidate>,
    /// Each path listed, with whether all its entries so far are absolute.
    seen: HashMap<PathBuf, bool>,
}

impl Candidates {
    fn push(&mut self, path: PathBuf, found_by: FoundBy, absolute: bool) {
        let path = crate::locator::normalize(&path);
        let only_absolute = self.seen.get(&path).copied();
        if only_absolute.is_none() || (only_absolute == Some(true) && !absolute) {
            self.seen.insert(path.clone(), absolute);
            self.list.push(Candidate {
                path,
                source: found_by.to_string(),
                found_by: Some(found_by),
                absolute,
                skip: None,
            });
        }
    }

    fn note(&mut self, path: PathBuf, source: String, reason: String) {
        self.list.push(Candidate {
            path,
            found_by: None,
            source,
            absolute: false,
            skip: Some(reason),
        });
    }
}

/// The last component of a name that may be a full Windows or POSIX path (Windows 10 writes
/// the full path into the header's Parent Unicode Name, §2.1), if it is a plain file name.
fn file_name_of(name: &str) -> Option<&str> {
    plain_name(name.rsplit(['\\', '/']).next()?)
}

/// `name` if it is one plain POSIX file name component.
fn plain_name(name: &str) -> Option<&str> {
    (!name.is_empty() && name != "." && name != ".." && !name.contains(['\0', '/'])).then_some(name)
}

/// The file names the header's Parent Unicode Name may mean, in the order to try: on
/// non-Windows hosts a name such as `back\slash.vhd` (no `/`, no drive colon) first whole, as
/// this crate writes a POSIX file name holding a backslash; then its last component.
fn header_names(name: &str) -> Vec<&str> {
    let mut out = Vec::new();
    if !cfg!(windows)
        && name.contains('\\')
        && !name.contains(':')
        && let Some(n) = plain_name(name)
        && name.split('\\').all(|c| plain_name(c).is_some())
    {
        out.push(n);
    }
    out.extend(file_name_of(name));
    out
}

/// The last component of a hint's path text (see [`hint_path`]), if a plain file name.
fn path_file_name(text: &str, windows_syntax: bool) -> Option<&str> {
    if windows_syntax {
        file_name_of(text)
    } else {
        plain_name(text.rsplit('/').next()?)
    }
}

/// A hint as a host path to map: the text (a `file://` URL decoded) and whether it is in
/// Windows syntax; `None` for a URL that does not decode.
fn hint_path(h: &PathHint) -> Option<(String, bool)> {
    match h.spelling {
        Spelling::FileUrl => {
            crate::locator::path_from_file_url(&h.text).map(|p| (p.text, p.windows_syntax))
        }
        Spelling::FileName => Some((h.text.clone(), false)),
        _ => Some((h.text.clone(), true)),
    }
}

/// Every candidate for `child`'s parent, in the order tried (see [`Chain::open`]): the
/// caller's override, the hints' file names in the search directories (bare file names
/// first), the path hints mapped onto this host, the bare file names next to the child, and
/// the files of the search directories that carry a wanted id.
fn parent_candidates(
    link: &ParentLink,
    child_dir: &Path,
    options: &ChainOptions,
    first_link: bool,
) -> Result<Candidates> {
    let mut cands = Candidates::default();
    if first_link && let Some(p) = &options.parent {
        // The caller's word overrides everything the file says.
        cands.push(crate::locator::absolute(p)?, FoundBy::ParentOption, false);
        return Ok(cands);
    }
    for u in &link.unusable {
        cands.note(u.path.clone(), u.source.clone(), u.reason.clone());
    }
    let (names_only, paths): (Vec<&PathHint>, Vec<&PathHint>) = link
        .hints
        .iter()
        .partition(|h| h.spelling == Spelling::FileName);

    // File names to look for in the search directories: the bare names', then each path's.
    let mut names: Vec<(String, FoundBy)> = Vec::new();
    for h in &names_only {
        for n in header_names(&h.text) {
            if !names.iter().any(|(m, _)| m == n) {
                let found_by = FoundBy::SearchDir {
                    source: h.source,
                    from_path: false,
                };
                names.push((n.to_string(), found_by));
            }
        }
    }
    for h in &paths {
        let Some((text, windows_syntax)) = hint_path(h) else {
            continue;
        };
        if let Some(n) = path_file_name(&text, windows_syntax)
            && !names.iter().any(|(m, _)| m == n)
        {
            let found_by = FoundBy::SearchDir {
                source: h.source,
                from_path: true,
            };
            names.push((n.to_string(), found_by));
        }
    }
    for d in &options.search_dirs {
        let d = crate::locator::absolute(d)?;
        for (n, found_by) in &names {
            cands.push(d.join(n), found_by.clone(), false);
        }
    }

    for h in &paths {
        let Some((text, windows_syntax)) = hint_path(h) else {
            cands.note(
                PathBuf::from(&h.text),
                h.source.to_string(),
                "not a file:// URL".into(),
            );
            continue;
        };
        for m in crate::locator::map_locator_path(&text, child_dir, windows_syntax) {
            let rule = match m.rule {
                "as written" | "relative to child" => None,
                rule => Some(rule),
            };
            let found_by = FoundBy::Hint {
                source: h.source,
                rule,
            };
            cands.push(m.path, found_by, m.absolute);
        }
    }

    for h in &names_only {
        for n in header_names(&h.text) {
            let found_by = FoundBy::Hint {
                source: h.source,
                rule: None,
            };
            cands.push(child_dir.join(n), found_by, false);
        }
    }
    if options.scan_search_dirs {
        for d in &options.search_dirs {
            scan_dir(&crate::locator::absolute(d)?, &link.ids, &mut cands);
        }
    }
    Ok(cands)
}

/// Probe the regular files of `dir` for one that carries one of the ids `want` (see
/// [`crate::layer::probe`]): finds a parent that was renamed.
fn scan_dir(dir: &Path, want: &[Uuid], cands: &mut Candidates) {
    let source = FoundBy::IdScan;
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            cands.note(
                dir.to_path_buf(),
                source.to_string(),
                format!("cannot list: {e}"),
            );
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .take(MAX_SCAN_ENTRIES)
        .collect();
    paths.sort();
    let mut probed = 0usize;
    let mut found = false;
    for p in paths {
        let Some(probe) = crate::layer::probe(&p) else {
            continue;
        };
        probed += 1;
        if probe.ids.iter().any(|id| want.contains(id)) {
            found = true;
            cands.push(p, source.clone(), false);
        }
    }
    if !found {
        cands.note(
            dir.to_path_buf(),
            source.to_string(),
            format!(
                "none of the {probed} regular file(s) has unique id {}",
                ids_text(want)
            ),
        );
    }
}

/// The wanted ids for messages: one, or several separated by ` or `.
fn ids_text(ids: &[Uuid]) -> String {
    ids.iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The allowed directories of [`ChainOptions::confine_to`], canonicalised; directories that
/// do not exist allow nothing and are dropped.
fn canonical_confinement(options: &ChainOptions) -> Option<Vec<PathBuf>> {
    options.confine_to.as_ref().map(|dirs| {
        dirs.iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect()
    })
}

/// Why a candidate was not opened, or the path to open (canonical under confinement).
fn admit(
    c: &Candidate,
    options: &ChainOptions,
    confine: Option<&[PathBuf]>,
) -> Result<PathBuf, String> {
    if let Some(r) = &c.skip {
        return Err(r.clone());
    }
    if c.absolute && options.ignore_absolute_locators {
        return Err("absolute locator ignored (untrusted input)".into());
    }
    let path = match confine {
        None => c.path.clone(),
        Some(dirs) => match std::fs::canonicalize(&c.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("absent".into()),
            Err(e) => return Err(format!("cannot resolve: {e}")),
            Ok(real) if !dirs.iter().any(|d| crate::locator::is_inside(&real, d)) => {
                return Err(format!(
                    "outside the allowed directories (resolves to {})",
                    real.display()
                ));
            }
            // Opening the canonical path keeps a symlink swapped in later from leading out.
            Ok(real) => real,
        },
    };
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("absent".into()),
        Err(e) => Err(format!("cannot open: {e}")),
        Ok(m) if !m.is_file() => Err(format!(
            "not a regular file ({})",
            crate::layer::files::file_kind(&m)
        )),
        Ok(_) => Ok(path),
    }
}

/// Find, open and verify `child`'s parent, as `link` describes it. Never writes.
fn resolve_parent(
    child: &dyn Layer,
    link: &ParentLink,
    options: &ChainOptions,
    first_link: bool,
    open_opts: OpenOptions,
    confine: Option<&[PathBuf]>,
) -> Result<ChainLayer> {
    let want = ids_text(&link.ids);
    let child_dir = crate::locator::absolute(child.path())?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let cands = parent_candidates(link, &child_dir, options, first_link)?;
    let mut tried = Vec::new();
    // The first candidate that carries the wanted identity but is damaged: if no intact
    // copy turns up, its own error (Incorrect data type) says more than "not found".
    let mut damaged: Option<Error> = None;
    for c in cands.list {
        let reason = match (admit(&c, options, confine), c.found_by) {
            (Err(r), _) => r,
            (Ok(_), None) => "listed only".into(),
            (Ok(path), Some(found_by)) => match open_layer(&path, open_opts) {
                Ok(v) if v.format() != child.format() => format!(
                    "a {} cannot be the parent of a {}: a chain holds one format, as Hyper-V requires",
                    v.format().name().to_uppercase(),
                    child.format().name().to_uppercase()
                ),
                Ok(v) if link.ids.contains(&v.id()) => {
                    if v.sector_size() != child.sector_size() {
                        return Err(Error::NotSupported {
                            path: Some(path),
                            detail: format!(
                                "the parent has {}-byte sectors and its child {} has {}-byte sectors",
                                v.sector_size(),
                                child.path().display(),
                                child.sector_size()
                            ),
                        });
                    }
                    let warnings = child.link_warnings(v.as_ref());
                    return Ok(ChainLayer {
                        layer: v,
                        found_by,
                        warnings,
                    });
                }
                Ok(v) => format!(
                    "unique id mismatch: the file has {}, the child expects {want}",
                    v.id()
                ),
                Err(e) => {
                    let msg = e.to_string();
                    let prefix = format!("{}: ", path.display());
                    let msg = msg.strip_prefix(&prefix).unwrap_or(&msg).to_string();
                    if !matches!(e, Error::Io { .. })
                        && damaged.is_none()
                        && crate::layer::probe(&path)
                            .is_some_and(|p| p.ids.iter().any(|id| link.ids.contains(id)))
                    {
                        damaged = Some(Error::Format {
                            path: Some(path.clone()),
                            detail: format!(
                                "{msg} (this file is the parent of {}: its unique id {want} matches, but it is damaged; `vhd-merge check` lists what is wrong)",
                                child.path().display()
                            ),
                        });
                    }
                    match e {
                        Error::Io { .. } => format!("cannot open: {msg}"),
                        _ => format!(
                            "not a usable {}: {msg}",
                            child.format().name().to_uppercase()
                        ),
                    }
                }
            },
        };
        tried.push(ParentCandidate {
            path: c.path,
            source: c.source,
            reason,
        });
    }
    if let Some(e) = damaged {
        return Err(e);
    }
    Err(Error::ParentNotFound {
        child: child.path().to_path_buf(),
        parent_name: link.name.clone(),
        parent_id: link.ids.first().copied().unwrap_or_default(),
        tried,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::DiskKind;
    use crate::mem_layer::{MemLayer, chain_of};

    const KIB: u64 = 1024;

    /// 4096-byte sectors, 64 KiB blocks (16 sectors), 4 blocks.
    fn two_layers() -> Chain {
        let mut bm = SectorBitmap::new(16);
        bm.set_range(0..4);
        let child = MemLayer::new("child", DiskKind::Differencing, 256 * KIB, 4096, 64 * KIB)
            .zero(0)
            .present(1, Some(bm), 0xCC);
        let parent = MemLayer::new("parent", DiskKind::Dynamic, 256 * KIB, 4096, 64 * KIB)
            .present(0, None, 0xAA)
            .present(1, None, 0xBB)
            .present(2, None, 0xDD);
        chain_of(vec![child, parent])
    }

    #[test]
    fn a_zero_block_reads_zeros_whatever_the_parent_holds() {
        let chain = two_layers();
        assert_eq!(chain.sector_size(), 4096);
        let mut buf = vec![1u8; (192 * KIB) as usize];
        chain.read_at(0, 0, &mut buf).unwrap();
        let (b0, rest) = buf.split_at((64 * KIB) as usize);
        let (b1, b2) = rest.split_at((64 * KIB) as usize);
        assert!(
            b0.iter().all(|&b| b == 0),
            "the zero block hides the parent"
        );
        assert!(b1[..(16 * KIB) as usize].iter().all(|&b| b == 0xCC));
        assert!(b1[(16 * KIB) as usize..].iter().all(|&b| b == 0xBB));
        assert!(b2.iter().all(|&b| b == 0xDD));
        // The parent's own view is unchanged.
        chain
            .read_at(1, 0, &mut buf[..(64 * KIB) as usize])
            .unwrap();
        assert!(buf[..(64 * KIB) as usize].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn zero_blocks_join_the_hidden_set_of_a_plan() {
        let chain = two_layers();
        let span = chain.plan_span(0..1, 0, 48).unwrap();
        assert_eq!(span.zeros.runs().collect::<Vec<_>>(), vec![0..16]);
        assert_eq!(span.hidden().runs().collect::<Vec<_>>(), vec![0..16]);
        assert_eq!(span.claimed().runs().collect::<Vec<_>>(), vec![16..20]);
        assert_eq!(span.decided().runs().collect::<Vec<_>>(), vec![0..20]);
        let piece = span.sources[0].pieces[0];
        assert_eq!((piece.block, piece.first_in_block), (1, 0));
        // Through the whole chain the parent provides only what the child leaves open.
        let span = chain.plan_span(0..2, 0, 48).unwrap();
        assert_eq!(span.sources.len(), 2);
        assert_eq!(
            span.sources[1].claimed.runs().collect::<Vec<_>>(),
            vec![20..48]
        );
        assert!(span.unclaimed.none());
    }

    #[test]
    fn found_by_displays_as_the_rule_it_names() {
        let hint = FoundBy::Hint {
            source: "W2ku",
            rule: Some("without drive"),
        };
        assert_eq!(hint, "W2ku without drive");
        let by_name = FoundBy::SearchDir {
            source: "W2ru",
            from_path: true,
        };
        assert_eq!(by_name.to_string(), "search dir, W2ru file name");
        assert_eq!(FoundBy::IdScan, "search dir, by unique id");
        assert_eq!(FoundBy::ParentOption, "--parent");
    }
}
