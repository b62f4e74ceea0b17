//! Opening a VHD: choosing the footer, validating the footer, the dynamic header, the BAT,
//! the batmap, the blocks' placement and the locators, in one pass that reports every problem
//! to a [`Validator`] (which stops an open at the first fatal one).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::files::open_regular_file;
use super::table::{Table, read_bat};
use super::validate::{DroppedEntry, MAX_PROBLEMS_PER_CODE, Validator, problem_codes as pc};
use super::writer::Pending;
use super::{
    FooterSource, MAX_BLOCK_SIZE, MAX_TABLE_ENTRIES, OpenOptions, SizeRule, SizeSource, Vhd, sweep,
};
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;
use crate::format::bat::{self, Bat};
use crate::format::batmap::{self, Batmap};
use crate::format::footer::{self, DiskType, FOOTER_SIZE, Footer};
use crate::format::header::{self, DynamicHeader, HEADER_SIZE};
use crate::io::{FileStorage, Storage};

impl Vhd {
    /// Open and validate the VHD at `path`. Only regular files are opened.
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<Vhd> {
        let path = path.as_ref();
        let file = open_regular_file(path, options.writable)?;
        Vhd::from_storage(Box::new(FileStorage::new(file)), path, options)
    }

    /// Open and validate a VHD held by any [`Storage`]; `path` is used in messages and to
    /// resolve relative parent locators.
    pub fn from_storage(
        storage: Box<dyn Storage>,
        path: impl AsRef<Path>,
        options: OpenOptions,
    ) -> Result<Vhd> {
        let path = path.as_ref().to_path_buf();
        open_inner(storage, path.clone(), options, &mut Validator::new(false))
            .map_err(|e| e.in_file(&path))
    }
}

pub(super) struct FooterCandidate {
    pub(super) offset: u64,
    pub(super) source: FooterSource,
    pub(super) raw: [u8; FOOTER_SIZE],
    pub(super) result: Result<Footer>,
}

pub(super) fn read_footer_at(
    storage: &dyn Storage,
    offset: u64,
    len: usize,
    source: FooterSource,
) -> FooterCandidate {
    let mut buf = [0u8; FOOTER_SIZE];
    let result = match storage.read_at(&mut buf[..len], offset) {
        Ok(()) => Footer::parse(&buf),
        Err(e) => Err(Error::io(format!("reading footer at offset {offset}"), e)),
    };
    FooterCandidate {
        offset,
        source,
        raw: buf,
        result,
    }
}

/// The footers a file of `len` bytes (at least [`FOOTER_SIZE`]) may go by, in order of
/// preference (§1.2): the last 512 bytes, a 511-byte footer when the length says one may be
/// there, and the offset-0 copy when it parses as a sparse disk's (a fixed disk's sector 0 is
/// data). The one rule both [`Vhd::open`] and [`peek`] use.
pub(super) fn footer_candidates(storage: &dyn Storage, len: u64) -> Vec<FooterCandidate> {
    let mut candidates = vec![read_footer_at(storage, len - 512, 512, FooterSource::End)];
    if len > 511 && (len - 511).is_multiple_of(512) {
        candidates.push(read_footer_at(storage, len - 511, 511, FooterSource::Short));
    }
    if len >= 512 + FOOTER_SIZE as u64 {
        let copy = read_footer_at(storage, 0, 512, FooterSource::Copy);
        if copy.result.as_ref().is_ok_and(|f| f.disk_type.is_sparse()) {
            candidates.push(copy);
        }
    }
    candidates
}

/// The candidate a strict reader goes by: the first whose checksum is right.
pub(super) fn first_checked(candidates: &[FooterCandidate]) -> Option<usize> {
    candidates
        .iter()
        .position(|c| c.result.as_ref().is_ok_and(Footer::checksum_ok))
}

pub(super) fn open_inner(
    storage: Box<dyn Storage>,
    path: PathBuf,
    options: OpenOptions,
    v: &mut Validator,
) -> Result<Vhd> {
    let io_err = |what: &str, e| Error::io(format!("{}: {what}", path.display()), e);
    let len = storage.len().map_err(|e| io_err("reading length", e))?;
    if len < FOOTER_SIZE as u64 {
        return Err(v.stop(
            pc::NOT_A_VHD,
            "file",
            None,
            Error::format(format!(
                "file is {len} bytes, smaller than a VHD footer (512)"
            )),
        ));
    }

    let mut signature = [0u8; 8];
    if storage.read_at(&mut signature, 0).is_ok() && &signature == b"vhdxfile" {
        // A VHDX, not a damaged VHD: say so (every command opens through here).
        return Err(v.stop(
            pc::NOT_A_VHD,
            "file",
            Some(0),
            crate::layer::vhdx_not_supported(&path),
        ));
    }
    let mut candidates = footer_candidates(storage.as_ref(), len);
    let good = first_checked(&candidates);
    let chosen = match good {
        Some(i) => i,
        None => {
            let parsed = candidates.iter().position(|c| c.result.is_ok());
            match parsed {
                Some(i) => {
                    let c = &candidates[i];
                    let f = c.result.as_ref().ok();
                    let (offset, stored, computed) = (
                        c.offset,
                        f.map_or(0, |f| f.checksum),
                        f.map_or(0, Footer::computed_checksum),
                    );
                    if options.lenient {
                        v.warn(
                            pc::FOOTER_CHECKSUM,
                            "footer",
                            Some(offset),
                            format!(
                                "footer checksum mismatch at offset {offset} (stored {stored:#010x}, computed {computed:#010x}); accepted because reading leniently"
                            ),
                        );
                    } else {
                        v.error(
                            pc::FOOTER_CHECKSUM,
                            "footer",
                            Some(offset),
                            None,
                            Error::Checksum {
                                path: None,
                                structure: "footer",
                                offset,
                                stored,
                                computed,
                            },
                        )?;
                    }
                    i
                }
                None => {
                    let why = match &candidates[0].result {
                        Err(Error::Format { detail, .. }) => detail.clone(),
                        Err(e) => e.to_string(),
                        Ok(_) => String::new(),
                    };
                    return Err(v.stop(
                        pc::NOT_A_VHD,
                        "footer",
                        Some(len - 512),
                        Error::format(format!(
                            "not a VHD: {why} at offset {} (end of file), and no valid copy at offset 0",
                            len - 512
                        )),
                    ));
                }
            }
        }
    };
    let FooterCandidate {
        offset: chosen_offset,
        source: footer_source,
        raw: chosen_raw,
        result,
    } = candidates.swap_remove(chosen);
    let footer = result?;
    match footer_source {
        FooterSource::End => {}
        FooterSource::Short => v.warn(
            pc::FOOTER_SHORT,
            "footer",
            Some(chosen_offset),
            format!(
                "511-byte footer at offset {chosen_offset} (written by a product older than Virtual PC 2004)"
            ),
        ),
        FooterSource::Copy => v.warn(
            pc::FOOTER_END_BAD,
            "footer",
            Some(len - 512),
            format!(
                "end footer missing or damaged at offset {}; using the copy at offset 0",
                len - 512
            ),
        ),
    }

    match footer.disk_type {
        DiskType::Fixed | DiskType::Dynamic | DiskType::Differencing => {}
        DiskType::Other(t) => {
            return Err(v.stop(
                pc::FOOTER_FIELD,
                "footer",
                Some(chosen_offset),
                Error::not_supported(format!(
                    "disk type {t} is not supported (fixed 2, dynamic 3 and differencing 4 are)"
                )),
            ));
        }
    }
    if footer.format_version >> 16 != 1 {
        return Err(v.stop(
            pc::FOOTER_FIELD,
            "footer",
            Some(chosen_offset),
            Error::not_supported(format!(
                "footer File Format Version {:#010x} is not 1.x",
                footer.format_version
            )),
        ));
    }
    if footer.features & footer::FEATURE_RESERVED == 0 {
        v.warn(
            pc::FOOTER_ODD,
            "footer",
            Some(chosen_offset),
            format!(
                "footer Features {:#x} lacks the reserved bit 0x2",
                footer.features
            ),
        );
    }
    if footer.saved_state != 0 {
        v.warn(
            pc::FOOTER_ODD,
            "footer",
            Some(chosen_offset),
            "footer Saved State is set: a virtual machine saved its state with this disk attached"
                .into(),
        );
    }
    if footer.current_size % SECTOR_SIZE != 0 {
        return Err(v.stop(
            pc::FOOTER_FIELD,
            "footer",
            Some(chosen_offset),
            Error::format(format!(
                "footer Current Size {} is not a multiple of 512",
                footer.current_size
            )),
        ));
    }
    if footer.disk_type.is_sparse() && footer_source != FooterSource::Copy {
        // Byte for byte: a copy whose only difference is its checksum is damaged too (§7.2).
        let copy = read_footer_at(storage.as_ref(), 0, 512, FooterSource::Copy);
        match copy.result {
            Ok(c) if copy.raw == chosen_raw || (footer_source == FooterSource::Short && c.to_bytes() == footer.to_bytes()) => {}
            Ok(c) if !c.checksum_ok() => v.warn(
                pc::FOOTER_COPY_BAD,
                "footer copy",
                Some(0),
                format!(
                    "footer copy at offset 0 has a bad checksum (stored {:#010x}, computed {:#010x})",
                    c.checksum,
                    c.computed_checksum()
                ),
            ),
            Ok(_) => v.warn(
                pc::FOOTER_COPY_DIFFERS,
                "footer copy",
                Some(0),
                "footer copy at offset 0 differs from the end footer".into(),
            ),
            Err(_) => v.warn(
                pc::FOOTER_COPY_BAD,
                "footer copy",
                Some(0),
                "footer copy at offset 0 is missing or damaged".into(),
            ),
        }
    }
    if footer.disk_type == DiskType::Fixed && footer.data_offset != footer::NO_DATA_OFFSET {
        v.info(
            pc::FOOTER_ODD,
            "footer",
            Some(chosen_offset),
            format!(
                "fixed disk footer Data Offset is {:#x}, expected all ones",
                footer.data_offset
            ),
        );
    }

    let footer_offset = match footer_source {
        FooterSource::End => len - 512,
        FooterSource::Short => len - 511,
        FooterSource::Copy => len - 512,
    };

    let (virtual_size, size_source) = virtual_size(&footer, options.size_rule);
    if size_source == SizeSource::Chs {
        v.warn(
            pc::SIZE_CHS,
            "footer",
            Some(chosen_offset),
            format!(
                "virtual size is the CHS size {virtual_size} (creator {:?}), not Current Size {}",
                footer.creator_application_str(),
                footer.current_size
            ),
        );
    } else {
        // Only worth a note when another reader could decide otherwise: QEMU's rule trusts
        // Current Size for a few creators only (§1.5).
        let chs = footer.geometry.size();
        if chs != footer.current_size && !footer.current_size_is_authoritative() {
            v.info(
                pc::SIZE_CHS,
                "footer",
                Some(chosen_offset),
                format!(
                    "geometry {}/{}/{} addresses {chs} bytes, Current Size is {} (creator {:?}); the virtual size is Current Size, but readers that follow QEMU's rule see the CHS size",
                    footer.geometry.cylinders,
                    footer.geometry.heads,
                    footer.geometry.sectors_per_track,
                    footer.current_size,
                    footer.creator_application_str()
                ),
            );
        }
    }

    let mut vhd = Vhd {
        storage,
        path: path.clone(),
        footer_source,
        footer_offset,
        original_footer_offset: footer_offset,
        header: None,
        bat: Table::Dense(Bat::default()),
        virtual_size,
        size_source,
        warnings: Vec::new(),
        writable: options.writable,
        next_free: 0,
        known_zero: 0..0,
        pending: Pending::default(),
        scratch: Vec::new(),
        unflushed: 0..0,
        sync_failed: std::sync::atomic::AtomicBool::new(false),
        footer,
    };

    if vhd.footer.disk_type == DiskType::Fixed {
        let data_end = vhd.footer.current_size;
        if data_end > footer_offset {
            return Err(v.stop(
                pc::FIXED_TRUNCATED,
                "file",
                Some(footer_offset),
                Error::format(format!(
                    "fixed disk truncated: Current Size is {data_end} bytes but the footer is at offset {footer_offset}"
                )),
            ));
        }
        if data_end < footer_offset {
            v.warn(
                pc::FIXED_GAP,
                "file",
                Some(data_end),
                format!(
                    "{} bytes between the end of data ({data_end}) and the footer",
                    footer_offset - data_end
                ),
            );
        }
        vhd.next_free = footer_offset;
        vhd.warnings = v.warnings();
        return Ok(vhd);
    }

    open_sparse(&mut vhd, len, options, v)?;
    vhd.warnings = v.warnings();
    Ok(vhd)
}

fn virtual_size(footer: &Footer, rule: SizeRule) -> (u64, SizeSource) {
    let chs = footer.geometry.size().min(footer.current_size);
    let use_chs = match rule {
        SizeRule::CurrentSize => false,
        SizeRule::Chs => true,
        SizeRule::Auto => footer.is_virtual_pc() && !footer.current_size_is_authoritative(),
    };
    if use_chs && chs != footer.current_size {
        (chs, SizeSource::Chs)
    } else {
        (footer.current_size, SizeSource::CurrentSize)
    }
}

/// Tags of the metadata extents in the overlap sweep (blocks use their index).
const TAG_FOOTER_COPY: i64 = -1;
const TAG_HEADER: i64 = -2;
const TAG_BAT: i64 = -3;
const TAG_BATMAP_HEADER: i64 = -4;
const TAG_BATMAP: i64 = -5;
const TAG_FOOTER_END: i64 = -6;

fn extent_name(tag: i64) -> String {
    match tag {
        TAG_FOOTER_COPY => "the footer copy at offset 0".to_string(),
        TAG_HEADER => "the dynamic header".to_string(),
        TAG_BAT => "the BAT".to_string(),
        TAG_BATMAP_HEADER => "the batmap header".to_string(),
        TAG_BATMAP => "the batmap".to_string(),
        TAG_FOOTER_END => "the end footer".to_string(),
        i => format!("block {i}"),
    }
}

/// blktap's batmap (§3.3): a `tdbatmap` header right after the padded BAT in files whose
/// creator is `tap`. Returns the extents it occupies when it is present and sane.
fn read_batmap(
    vhd: &Vhd,
    h: &DynamicHeader,
    len: u64,
    v: &mut Validator,
) -> Result<Option<Batmap>> {
    if &vhd.footer.creator_application[..3] != b"tap" {
        return Ok(None);
    }
    let at = batmap::header_offset(h.table_offset, h.max_table_entries);
    if at.checked_add(SECTOR_SIZE).is_none_or(|e| e > len) {
        return Ok(None);
    }
    let mut b = [0u8; batmap::BATMAP_HEADER_BYTES];
    vhd.read_raw(&mut b, at)?;
    let Some(bm) = Batmap::parse(&b, at) else {
        return Ok(None);
    };
    if !bm.fits(h.max_table_entries, len) {
        v.warn(
            pc::BATMAP,
            "batmap",
            Some(at),
            format!(
                "batmap header at offset {at} describes a map of {} sectors at offset {:#x} that is misplaced or too small for {} blocks; the batmap is ignored",
                bm.map_sectors, bm.map_offset, h.max_table_entries
            ),
        );
        return Ok(None);
    }
    Ok(Some(bm))
}

fn open_sparse(vhd: &mut Vhd, len: u64, options: OpenOptions, v: &mut Validator) -> Result<()> {
    let header_offset = vhd.footer.data_offset;
    let header_end = header_offset.checked_add(HEADER_SIZE as u64);
    if header_offset < FOOTER_SIZE as u64 || header_end.is_none_or(|e| e > len) {
        return Err(v.stop(
            pc::HEADER_OFFSET,
            "footer",
            None,
            Error::format(format!(
                "footer Data Offset {header_offset:#x} does not point to a dynamic header inside the file ({len} bytes)"
            )),
        ));
    }
    let hs = "dynamic header";
    let ho = Some(header_offset);
    // Metadata must end before the end footer in use: a table that runs into the footer would
    // destroy it on the first BAT update (found by fuzzing).
    let meta_limit = if vhd.footer_source == FooterSource::Copy {
        len
    } else {
        vhd.footer_offset
    };
    if header_offset + HEADER_SIZE as u64 > meta_limit {
        return Err(v.stop(
            pc::HEADER_OFFSET,
            hs,
            ho,
            Error::format(format!(
                "dynamic header at offset {header_offset:#x} (1024 bytes) overlaps the end footer at offset {meta_limit:#x}"
            )),
        ));
    }
    if !header_offset.is_multiple_of(SECTOR_SIZE) {
        v.warn(
            pc::HEADER_ODD,
            hs,
            ho,
            format!("dynamic header at offset {header_offset} is not sector aligned"),
        );
    }
    let mut hb = [0u8; HEADER_SIZE];
    vhd.read_raw(&mut hb, header_offset)?;
    let h = match DynamicHeader::parse(&hb) {
        Ok(h) => h,
        Err(e) => {
            let e = match e {
                Error::Format { detail, .. } => {
                    Error::format(format!("{detail} at offset {header_offset}"))
                }
                e => e,
            };
            return Err(v.stop(pc::HEADER_COOKIE, hs, ho, e));
        }
    };
    if !h.checksum_ok() {
        if options.lenient {
            v.warn(
                pc::HEADER_CHECKSUM,
                hs,
                ho,
                format!(
                    "dynamic header checksum mismatch at offset {header_offset} (stored {:#010x}, computed {:#010x}); accepted because reading leniently",
                    h.checksum,
                    h.computed_checksum()
                ),
            );
        } else {
            v.error(
                pc::HEADER_CHECKSUM,
                hs,
                ho,
                None,
                Error::Checksum {
                    path: None,
                    structure: "dynamic header",
                    offset: header_offset,
                    stored: h.checksum,
                    computed: h.computed_checksum(),
                },
            )?;
        }
    }
    if h.header_version >> 16 != 1 {
        return Err(v.stop(
            pc::HEADER_FIELD,
            hs,
            ho,
            Error::not_supported(format!(
                "dynamic header version {:#010x} is not 1.x",
                h.header_version
            )),
        ));
    }
    if h.data_offset != header::NO_NEXT {
        v.warn(
            pc::HEADER_ODD,
            hs,
            ho,
            format!(
                "dynamic header Data Offset is {:#x}, expected all ones",
                h.data_offset
            ),
        );
    }
    let bs = h.block_size;
    if bs < 512 || !bs.is_power_of_two() {
        return Err(v.stop(
            pc::HEADER_FIELD,
            hs,
            ho,
            Error::format(format!(
                "dynamic header Block Size {bs} is not a power of two of at least 512"
            )),
        ));
    }
    if bs > MAX_BLOCK_SIZE {
        return Err(v.stop(
            pc::HEADER_FIELD,
            hs,
            ho,
            Error::not_supported(format!(
                "dynamic header Block Size {bs} is larger than the {MAX_BLOCK_SIZE} bytes supported"
            )),
        ));
    }
    let bs64 = u64::from(bs);
    let mte = u64::from(h.max_table_entries);
    if mte * bs64 < vhd.footer.current_size {
        return Err(v.stop(
            pc::HEADER_FIELD,
            hs,
            ho,
            Error::format(format!(
                "dynamic header Max Table Entries {mte} x Block Size {bs} covers {} bytes, less than Current Size {}",
                mte * bs64,
                vhd.footer.current_size
            )),
        ));
    }
    let needed = vhd.footer.current_size.div_ceil(bs64);
    if mte > needed {
        v.info(
            pc::BAT_LARGER,
            "BAT",
            Some(h.table_offset),
            format!(
                "Max Table Entries {mte} is more than the {needed} blocks Current Size needs; the extra entries are ignored"
            ),
        );
    }
    let table_len = bat::table_bytes(h.max_table_entries);
    let table_end = h.table_offset.checked_add(mte * 4);
    if table_end.is_none_or(|e| e > len) {
        return Err(v.stop(
            pc::BAT_PLACEMENT,
            "BAT",
            Some(h.table_offset),
            Error::format(format!(
                "BAT at offset {:#x} with {mte} entries ({} bytes) runs past the end of the file ({len} bytes)",
                h.table_offset,
                mte * 4
            )),
        ));
    }
    if mte > u64::from(MAX_TABLE_ENTRIES) {
        return Err(v.stop(
            pc::BAT_TOO_LARGE,
            hs,
            ho,
            Error::not_supported(format!(
                "dynamic header Max Table Entries {mte} is more than the {MAX_TABLE_ENTRIES} BAT entries supported (a {} MiB table); the table is not read",
                (u64::from(MAX_TABLE_ENTRIES) * 4) >> 20
            )),
        ));
    }
    // The padding counts: BAT updates write whole sectors.
    if h.table_offset.saturating_add(table_len) > meta_limit {
        return Err(v.stop(
            pc::BAT_PLACEMENT,
            "BAT",
            Some(h.table_offset),
            Error::format(format!(
                "BAT at offset {:#x} with {mte} entries ({table_len} bytes padded to a sector) overlaps the end footer at offset {meta_limit:#x}",
                h.table_offset,
            )),
        ));
    }
    if h.table_offset % SECTOR_SIZE != 0 {
        v.warn(
            pc::HEADER_ODD,
            "BAT",
            Some(h.table_offset),
            format!("BAT at offset {} is not sector aligned", h.table_offset),
        );
    }
    let overlaps = |a: u64, alen: u64, b: u64, blen: u64| a < b + blen && b < a + alen;
    if overlaps(h.table_offset, mte * 4, header_offset, HEADER_SIZE as u64)
        || overlaps(h.table_offset, mte * 4, 0, FOOTER_SIZE as u64)
    {
        return Err(v.stop(
            pc::BAT_PLACEMENT,
            "BAT",
            Some(h.table_offset),
            Error::format(format!(
                "BAT at offset {:#x} overlaps the footer copy or the dynamic header",
                h.table_offset
            )),
        ));
    }
    let mut bat = read_bat(vhd, h.table_offset, h.max_table_entries)?;
    let batmap = read_batmap(vhd, &h, len, v)?;

    let data_limit = if vhd.footer_source == FooterSource::Copy {
        len
    } else {
        vhd.footer_offset
    };
    let mut next_free = metadata_end(header_offset, &h, len);
    let mut ex = sweep::Extents {
        meta: metadata_extents(vhd, &h, len, batmap.as_ref()),
        blocks: Vec::new(),
        stride: h.bitmap_bytes() + bs64,
    };
    if let Some(bm) = &batmap {
        next_free = next_free
            .max(bm.header_offset + SECTOR_SIZE)
            .max(bm.map_offset + bm.map_bytes());
    }
    let mut gone = blocks_inside(&bat, &mut ex, data_limit, v)?;
    let mut reasons: HashMap<usize, String> = HashMap::new();
    gone.union(&ex.sweep(bat.entries.len(), |o| note_overlap(o, &mut reasons, v))?);
    // The end of everything inside the file (dropped blocks included, so that nothing is later
    // allocated over data someone may still want to salvage), then the blocks that stay.
    for (b, blen, _) in ex.iter() {
        if b + blen <= data_limit {
            next_free = next_free.max(b + blen);
        }
    }
    ex.retain(&gone);
    drop_entries(&mut bat, &gone, reasons, (ex.stride, data_limit), v);
    check_locators(&h, &ex, len, v);
    drop(ex);
    if vhd.footer.disk_type == DiskType::Dynamic && !h.parent_unique_id.is_nil() {
        v.warn(
            pc::HEADER_ODD,
            hs,
            ho,
            "dynamic disk has a non-zero Parent Unique Id; it is ignored".into(),
        );
    }
    if vhd.footer_source == FooterSource::Copy {
        vhd.footer_offset = next_free.max(len.saturating_sub(FOOTER_SIZE as u64));
    }
    vhd.next_free = next_free;
    vhd.header = Some(h);
    vhd.bat = Table::new(bat, options.writable);
    v.batmap = batmap;
    Ok(())
}

/// The metadata extents of the overlap sweep: the footer copy, the header, the BAT (padded),
/// the end footer in use (with whatever follows it) and the batmap.
fn metadata_extents(
    vhd: &Vhd,
    h: &DynamicHeader,
    len: u64,
    batmap: Option<&Batmap>,
) -> Vec<sweep::Meta> {
    let table_len = bat::table_bytes(h.max_table_entries);
    let mut meta = vec![
        (0, FOOTER_SIZE as u64, TAG_FOOTER_COPY),
        (vhd.footer.data_offset, HEADER_SIZE as u64, TAG_HEADER),
        (h.table_offset, table_len.max(4), TAG_BAT),
    ];
    if vhd.footer_source != FooterSource::Copy {
        // Blocks are kept before it by the end of data; this catches the batmap and locators.
        meta.push((vhd.footer_offset, len - vhd.footer_offset, TAG_FOOTER_END));
    }
    if let Some(bm) = batmap {
        meta.push((bm.header_offset, SECTOR_SIZE, TAG_BATMAP_HEADER));
        meta.push((bm.map_offset, bm.map_bytes(), TAG_BATMAP));
    }
    meta
}

/// Put the allocated blocks that end inside the data (before `data_limit`) into `ex`, and
/// return the others (each a problem) as the first blocks to drop.
fn blocks_inside(
    bat: &Bat,
    ex: &mut sweep::Extents,
    data_limit: u64,
    v: &mut Validator,
) -> Result<sweep::Bits> {
    let mut outside = sweep::Bits::new(bat.entries.len());
    let n = bat.allocated();
    ex.blocks
        .try_reserve_exact(n)
        .map_err(|_| Error::io("validating the BAT", std::io::ErrorKind::OutOfMemory.into()))?;
    for (i, &e) in bat.entries.iter().enumerate() {
        if e == bat::UNUSED {
            continue;
        }
        let start = u64::from(e) * SECTOR_SIZE;
        let end = start + ex.stride;
        if end > data_limit {
            v.error(
                pc::BAT_ENTRY_OUTSIDE,
                &format!("block {i}"),
                Some(start),
                Some(i as u64),
                Error::format(format!(
                    "BAT entry {i} points to offset {start:#x}; the block ends at {end:#x}, past the end of data at {data_limit:#x}"
                )),
            )?;
            outside.set(i);
            continue;
        }
        // A table has at most MAX_TABLE_ENTRIES entries, so the index fits.
        ex.blocks.push(sweep::Block {
            sector: e,
            index: i as u32,
        });
    }
    Ok(outside)
}

/// One overlap the sweep found: a problem naming both extents, and the first reason for
/// each block in it (bounded like the problems; past it, a generic reason is given). Two
/// metadata structures overlapping stop validation: no block to drop, nothing to go on with.
fn note_overlap(
    o: sweep::Overlap,
    reasons: &mut HashMap<usize, String>,
    v: &mut Validator,
) -> Result<()> {
    let ((a, at), (b, bt)) = (o.first, o.second);
    let block = if bt >= 0 { bt } else { at };
    let message = format!(
        "{} (offset {a:#x}) overlaps {} (offset {b:#x})",
        extent_name(at),
        extent_name(bt)
    );
    if block < 0 {
        return Err(v.stop(
            pc::METADATA_OVERLAP,
            &extent_name(at),
            Some(b),
            Error::format(message),
        ));
    }
    v.error(
        pc::BLOCK_OVERLAP,
        &extent_name(block),
        Some(b),
        u64::try_from(block).ok(),
        Error::format(message.clone()),
    )?;
    for t in [at, bt] {
        if let Ok(t) = usize::try_from(t)
            && reasons.len() < 10 * MAX_PROBLEMS_PER_CODE
        {
            reasons.entry(t).or_insert_with(|| message.clone());
        }
    }
    Ok(())
}

/// Mark the blocks in `gone` unused in `bat`, each recorded as a dropped entry with its
/// reason. `(stride, data_limit)` tell a block past the end of data from an overlapping one.
fn drop_entries(
    bat: &mut Bat,
    gone: &sweep::Bits,
    mut reasons: HashMap<usize, String>,
    (stride, data_limit): (u64, u64),
    v: &mut Validator,
) {
    for (i, e) in bat.entries.iter_mut().enumerate() {
        if !gone.get(i) {
            continue;
        }
        let start = u64::from(*e) * SECTOR_SIZE;
        // Specific reasons for the first entries; past them (a hostile table), a shared
        // static one, so that a million dropped entries cost no million strings.
        let specific = v.dropped.len() < 10 * MAX_PROBLEMS_PER_CODE;
        let outside = start + stride > data_limit;
        let reason: Cow<'static, str> = match reasons.remove(&i) {
            Some(r) => r.into(),
            None if outside && specific => format!(
                "BAT entry {i} points to offset {start:#x}; the block ends at {:#x}, past the end of data at {data_limit:#x}",
                start + stride
            )
            .into(),
            None if outside => "the block ends past the end of data".into(),
            None if specific => {
                format!("block {i} at offset {start:#x} overlaps another block or the metadata")
                    .into()
            }
            None => "the block overlaps another block or the metadata".into(),
        };
        v.dropped.push(DroppedEntry {
            block: i as u64,
            entry: *e,
            reason,
        });
        *e = bat::UNUSED;
    }
}

/// Parent locator data must lie inside the file and clear of the other extents (which no
/// longer overlap each other): warnings only.
fn check_locators(h: &DynamicHeader, ex: &sweep::Extents, len: u64, v: &mut Validator) {
    for (i, loc) in h.locators.iter().enumerate() {
        if loc.is_empty() {
            continue;
        }
        let ls = format!("locator {i}");
        let end = loc.data_offset.saturating_add(u64::from(loc.data_length));
        if end > len {
            v.warn(
                pc::LOCATOR_OUTSIDE,
                &ls,
                Some(loc.data_offset),
                format!(
                    "parent locator {i} ({}) data at offset {:#x} + {} bytes lies outside the file",
                    loc.platform_code.name(),
                    loc.data_offset,
                    loc.data_length
                ),
            );
            continue;
        }
        if let Some((_, tag)) = ex.first_overlapping(loc.data_offset, end) {
            v.warn(
                pc::LOCATOR_OVERLAP,
                &ls,
                Some(loc.data_offset),
                format!(
                    "parent locator {i} ({}) data at offset {:#x} overlaps {}",
                    loc.platform_code.name(),
                    loc.data_offset,
                    extent_name(tag)
                ),
            );
        }
    }
}

/// End of header, BAT and every locator extent that lies inside the file (§4.1).
pub(super) fn metadata_end(header_offset: u64, h: &DynamicHeader, file_len: u64) -> u64 {
    let mut end = (header_offset + HEADER_SIZE as u64)
        .max(h.table_offset + bat::table_bytes(h.max_table_entries))
        .max(FOOTER_SIZE as u64);
    for loc in h.locators.iter().filter(|l| !l.is_empty()) {
        let full = loc.data_offset.saturating_add(loc.extent_len());
        let data = loc.data_offset.saturating_add(u64::from(loc.data_length));
        if full <= file_len {
            end = end.max(full);
        } else if data <= file_len {
            end = end.max(data);
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_rule() {
        let mut f = Footer::parse(&{
            let mut b = [0u8; 512];
            b[0..8].copy_from_slice(b"conectix");
            b
        })
        .unwrap();
        f.current_size = 136_365_211_648;
        f.geometry = crate::format::Geometry {
            cylinders: 16383,
            heads: 16,
            sectors_per_track: 63,
        };
        f.creator_application = *b"vpc ";
        let (s, src) = virtual_size(&f, SizeRule::Auto);
        assert_eq!(src, SizeSource::Chs);
        assert_eq!(s, 16383 * 16 * 63 * 512);
        f.creator_application = *b"win ";
        assert_eq!(
            virtual_size(&f, SizeRule::Auto),
            (136_365_211_648, SizeSource::CurrentSize)
        );
        assert_eq!(virtual_size(&f, SizeRule::Chs).1, SizeSource::Chs);
    }
}
