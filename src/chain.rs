//! A differencing chain: the child and its ancestors, found through parent locators and
//! verified by unique id, and reads through it.
//!
//! The composition primitive, [`Chain::plan_span`] plus [`Chain::read_plan`], decides for a
//! range of virtual sectors which layer provides each sector (the nearest layer whose bitmap
//! holds it) and reads them with one read per contributing layer and block.
//! Reading through the chain, flattening and merging all use it.
//!
//! # Finding parents (§5)
//!
//! For each differencing disk the candidates are tried in this order, and the first whose
//! footer Unique Id equals the child's Parent Unique Id is the parent:
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

use crate::error::{Error, ParentCandidate, Result};
use crate::format::{DiskType, PlatformCode, SECTOR_SIZE, SectorBitmap};
use crate::image::{BlockMap, OpenOptions, SizeRule, Vhd};
use crate::locator::canonical_or_self;

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
    /// Also probe every regular file in the search directories for the wanted unique id, to
    /// find a parent that was renamed (on by default; only footers are read).
    pub scan_search_dirs: bool,
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

    /// Sectors no layer of the range provides that lie past the end of a smaller layer of the
    /// range: the range's view reads zeros there, and the layers after the range are hidden
    /// (a merge of the range must write these zeros into its destination).
    pub fn hidden(&self) -> SectorBitmap {
        let mut h = self.unclaimed.clone();
        h.clear_range(0..self.visible.min(self.sectors));
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
        let first = Vhd::open(path, open_opts)?;
        let confine = canonical_confinement(options);
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
                    "{}: the chain is deeper than the limit of {} layers (the last one reached is {}, whose parent would be layer {})",
                    path.display(),
                    options.max_depth,
                    child.path().display(),
                    layers.len() + 1
                )));
            }
            let (parent, found_by, warnings) = resolve_parent(
                child,
                options,
                layers.len() == 1,
                open_opts,
                confine.as_deref(),
            )?;
            let canonical = canonical_or_self(parent.path());
            if !seen_ids.insert(parent.unique_id()) || !seen_paths.insert(canonical.clone()) {
                let first = layers
                    .iter()
                    .position(|l| {
                        l.vhd.unique_id() == parent.unique_id()
                            || canonical_or_self(l.vhd.path()) == canonical
                    })
                    .unwrap_or(0);
                return Err(Error::InvalidState(format!(
                    "{}: the differencing chain has a cycle: the parent of {} is {} (unique id {}), which is already layer {first} ({}, unique id {})",
                    path.display(),
                    child.path().display(),
                    parent.path().display(),
                    parent.unique_id(),
                    layers[first].vhd.path().display(),
                    layers[first].vhd.unique_id()
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
        let mut unclaimed = SectorBitmap::full(sectors);
        let mut sources = Vec::new();
        let end_sector = start_sector.saturating_add(sectors as u64);
        let mut visible_end = end_sector;
        for li in layers {
            let vhd = &self.layers[li].vhd;
            visible_end = visible_end.min(vhd.virtual_size() / SECTOR_SIZE);
            if unclaimed.none() {
                // Nothing left to claim; the loop only goes on to find the visible end.
                continue;
            }
            let spb = vhd.sectors_per_block();
            let layer_end = visible_end;
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
            visible: visible_end.saturating_sub(start_sector).min(sectors as u64) as usize,
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
        let Some(top) = self.layers.get(layer) else {
            return Err(Error::InvalidParameter(format!(
                "layer {layer} does not exist: the chain has {} layer(s)",
                self.layers.len()
            )));
        };
        let size = top.vhd.virtual_size();
        if !offset.is_multiple_of(SECTOR_SIZE)
            || !(buf.len() as u64).is_multiple_of(SECTOR_SIZE)
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
        let size = match chain.borrow().layers.get(layer) {
            Some(l) => l.vhd.virtual_size(),
            None => {
                return Err(Error::InvalidParameter(format!(
                    "layer {layer} does not exist: the chain has {} layer(s)",
                    chain.borrow().len()
                )));
            }
        };
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
        let start = self.pos - self.pos % SECTOR_SIZE;
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
            let aligned = want - want % SECTOR_SIZE as usize;
            if self.pos.is_multiple_of(SECTOR_SIZE) && aligned >= READ_WINDOW {
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

/// Locator payloads longer than this are not read (a path is at most 32767 UTF-16 units).
pub const MAX_LOCATOR_PAYLOAD: u64 = 64 * 1024;

/// At most this many directory entries are probed per search directory when looking for a
/// renamed parent by unique id.
pub const MAX_SCAN_ENTRIES: usize = 10_000;

/// Platform codes in the order their locators are tried (§5.4): the relative Windows path
/// first (it survives moving the whole chain), then the absolute one, the file URL, and the
/// deprecated 8-bit forms.
const LOCATOR_ORDER: [PlatformCode; 5] = [
    PlatformCode::W2ru,
    PlatformCode::W2ku,
    PlatformCode::MacX,
    PlatformCode::Wi2r,
    PlatformCode::Wi2k,
];

/// A place the parent may be.
#[derive(Debug)]
struct Candidate {
    path: PathBuf,
    source: String,
    /// From an absolute path in a locator: skipped when absolute locators are ignored.
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
    fn push(&mut self, path: PathBuf, source: String, absolute: bool) {
        let path = crate::locator::normalize(&path);
        let only_absolute = self.seen.get(&path).copied();
        if only_absolute.is_none() || (only_absolute == Some(true) && !absolute) {
            self.seen.insert(path.clone(), absolute);
            self.list.push(Candidate {
                path,
                source,
                absolute,
                skip: None,
            });
        }
    }

    fn note(&mut self, path: PathBuf, source: String, reason: String) {
        self.list.push(Candidate {
            path,
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

/// The path text a locator names and whether it is in Windows syntax (`\` separates
/// components): MacX holds a file URL (POSIX syntax unless it names a drive or a server), the
/// others Windows paths. `None` for a MacX payload that is not a file URL.
fn locator_path(code: PlatformCode, text: &str) -> Option<(String, bool)> {
    match code {
        PlatformCode::MacX => {
            crate::locator::path_from_file_url(text).map(|p| (p.text, p.windows_syntax))
        }
        _ => Some((text.to_string(), true)),
    }
}

/// The last component of a locator's path text (see [`locator_path`]), if a plain file name.
fn path_file_name(text: &str, windows_syntax: bool) -> Option<&str> {
    if windows_syntax {
        file_name_of(text)
    } else {
        plain_name(text.rsplit('/').next()?)
    }
}

/// The decoded locators of a differencing disk, in [`LOCATOR_ORDER`], as (code, slot, text);
/// locators whose payload cannot be read are noted in `cands` instead.
fn read_locators(
    child: &Vhd,
    cands: &mut Candidates,
) -> Result<Vec<(PlatformCode, usize, String)>> {
    let Some(h) = child.header() else {
        return Ok(Vec::new());
    };
    let file_len = child
        .storage()
        .len()
        .map_err(|e| Error::io(format!("{}: reading length", child.path().display()), e))?;
    let mut out = Vec::new();
    for code in LOCATOR_ORDER {
        for (slot, loc) in h.locators.iter().enumerate() {
            if loc.platform_code != code {
                continue;
            }
            let len = u64::from(loc.data_length);
            let source = format!("{} (locator {slot})", code.name());
            let pseudo = PathBuf::from(format!("<{} locator {slot}>", code.name()));
            if len == 0 {
                cands.note(pseudo, source, "locator data is empty".into());
                continue;
            }
            if len > MAX_LOCATOR_PAYLOAD {
                cands.note(
                    pseudo,
                    source,
                    format!(
                        "locator data is {len} bytes, more than the {MAX_LOCATOR_PAYLOAD} read"
                    ),
                );
                continue;
            }
            if loc
                .data_offset
                .checked_add(len)
                .is_none_or(|e| e > file_len)
            {
                cands.note(
                    pseudo,
                    source,
                    format!(
                        "locator data at offset {} + {len} bytes lies outside the file ({file_len} bytes)",
                        loc.data_offset
                    ),
                );
                continue;
            }
            // Bounded by MAX_LOCATOR_PAYLOAD and checked against the file length above.
            let mut data = vec![0u8; len as usize];
            child.read_raw(&mut data, loc.data_offset)?;
            if let Some(text) = code.decode_payload(&data) {
                out.push((code, slot, text));
            }
        }
    }
    Ok(out)
}

/// Every candidate for `child`'s parent, in the order tried (see [`Chain::open`]).
fn parent_candidates(
    child: &Vhd,
    child_dir: &Path,
    options: &ChainOptions,
    first_link: bool,
    want: uuid::Uuid,
) -> Result<Candidates> {
    let mut cands = Candidates::default();
    if first_link && let Some(p) = &options.parent {
        // The caller's word overrides everything the file says.
        cands.push(crate::locator::absolute(p)?, "--parent".into(), false);
        return Ok(cands);
    }
    let header_name = child.header().map(|h| h.parent_name()).unwrap_or_default();
    let locators = read_locators(child, &mut cands)?;

    // File names to look for in the search directories: the header's, then each locator's.
    let mut names: Vec<(String, String)> = Vec::new();
    for n in header_names(&header_name) {
        names.push((n.to_string(), "header name".into()));
    }
    for (code, _, text) in &locators {
        let Some((t, windows_syntax)) = locator_path(*code, text) else {
            continue;
        };
        if let Some(n) = path_file_name(&t, windows_syntax)
            && !names.iter().any(|(m, _)| m == n)
        {
            names.push((n.to_string(), format!("{} file name", code.name())));
        }
    }
    for d in &options.search_dirs {
        let d = crate::locator::absolute(d)?;
        for (n, origin) in &names {
            cands.push(d.join(n), format!("search dir, {origin}"), false);
        }
    }

    for (code, slot, text) in &locators {
        let Some((text, windows_syntax)) = locator_path(*code, text) else {
            cands.note(
                PathBuf::from(text),
                format!("MacX (locator {slot})"),
                "not a file:// URL".into(),
            );
            continue;
        };
        for m in crate::locator::map_locator_path(&text, child_dir, windows_syntax) {
            let source = match m.rule {
                "as written" | "relative to child" => code.name(),
                rule => format!("{} {rule}", code.name()),
            };
            cands.push(m.path, source, m.absolute);
        }
    }

    for n in header_names(&header_name) {
        cands.push(child_dir.join(n), "header name".into(), false);
    }
    if options.scan_search_dirs {
        for d in &options.search_dirs {
            scan_dir(&crate::locator::absolute(d)?, want, &mut cands);
        }
    }
    Ok(cands)
}

/// Probe the regular files of `dir` for one whose footer (at the end or the copy at offset 0)
/// carries unique id `want`: finds a parent that was renamed.
fn scan_dir(dir: &Path, want: uuid::Uuid, cands: &mut Candidates) {
    let source = "search dir, by unique id".to_string();
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            cands.note(dir.to_path_buf(), source, format!("cannot list: {e}"));
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
        let Some(peek) = crate::image::peek(&p) else {
            continue;
        };
        probed += 1;
        if peek.carries_id(want) {
            found = true;
            cands.push(p, source.clone(), false);
        }
    }
    if !found {
        cands.note(
            dir.to_path_buf(),
            source,
            format!("none of the {probed} regular file(s) has unique id {want}"),
        );
    }
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
            crate::image::file_kind(&m)
        )),
        Ok(_) => Ok(path),
    }
}

/// Warnings about the link from `child` to `parent` that do not stop it: the Parent Time Stamp
/// is advisory (§2.3). It is compared with the parent file's modification time (what blktap,
/// VirtualBox and DiscUtils record) and with the parent's footer Time Stamp (its creation
/// time); matching either is fine. Zero (Windows 10 writes it) means "not recorded".
fn link_warnings(child: &Vhd, parent: &Vhd) -> Vec<String> {
    let mut out = Vec::new();
    let Some(h) = child.header() else {
        return out;
    };
    let recorded = h.parent_timestamp;
    if recorded == 0 {
        return out;
    }
    let mtime = crate::create::parent_timestamp(parent.path()).ok();
    let created = parent.footer().timestamp;
    if Some(recorded) != mtime && recorded != created {
        out.push(format!(
            "parent time stamp {} recorded in {} matches neither the parent's file modification time ({}) nor its footer time stamp ({}); the unique id matches, so the link is used",
            crate::format::vhd_time_utc(recorded),
            child.path().display(),
            mtime.map_or_else(|| "unknown".into(), crate::format::vhd_time_utc),
            crate::format::vhd_time_utc(created)
        ));
    }
    out
}

/// Find, open and verify `child`'s parent. Never writes.
fn resolve_parent(
    child: &Vhd,
    options: &ChainOptions,
    first_link: bool,
    open_opts: OpenOptions,
    confine: Option<&[PathBuf]>,
) -> Result<(Vhd, String, Vec<String>)> {
    let want = child.parent_unique_id().unwrap_or_default();
    let parent_name = child.header().map(|h| h.parent_name()).unwrap_or_default();
    if want.is_nil() {
        return Err(Error::NotSupported {
            path: Some(child.path().to_path_buf()),
            detail: format!(
                "differencing disk with an all-zero Parent Unique Id (parent \"{parent_name}\"): blktap marks a raw, non-VHD parent this way, which is not supported"
            ),
        });
    }
    let child_dir = crate::locator::absolute(child.path())?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let cands = parent_candidates(child, &child_dir, options, first_link, want)?;
    let mut tried = Vec::new();
    // The first candidate that carries the wanted unique id but is damaged: if no intact
    // copy turns up, its own error (Incorrect data type) says more than "not found".
    let mut damaged: Option<Error> = None;
    for c in cands.list {
        let reason = match admit(&c, options, confine) {
            Err(r) => r,
            Ok(path) => match Vhd::open(&path, open_opts) {
                Ok(v) if v.unique_id() == want => {
                    let warnings = link_warnings(child, &v);
                    return Ok((v, c.source, warnings));
                }
                Ok(v) => format!(
                    "unique id mismatch: the file has {}, the child expects {want}",
                    v.unique_id()
                ),
                Err(e) => {
                    let msg = e.to_string();
                    let prefix = format!("{}: ", path.display());
                    let msg = msg.strip_prefix(&prefix).unwrap_or(&msg).to_string();
                    if !matches!(e, Error::Io { .. })
                        && damaged.is_none()
                        && crate::image::peek(&path).is_some_and(|p| p.carries_id(want))
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
                        _ => format!("not a usable VHD: {msg}"),
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
        parent_name,
        parent_id: want,
        tried,
    })
}
