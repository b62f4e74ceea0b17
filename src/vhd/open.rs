//! Opening a VHD: choosing the footer, validating the footer, the dynamic header, the BAT,
//! the batmap, the blocks' placement and the locators, in one pass that reports every problem
//! to a [`Validator`] (which stops an open at the first fatal one).

use std::path::{Path, PathBuf};

use super::table::Table;
use super::validate::Validator;
use super::writer::Pending;
use super::{
    FooterSource, MAX_BLOCK_SIZE, MAX_HELD_BLOCKS, MAX_TABLE_ENTRIES, OpenOptions, SizeRule,
    SizeSource, Vhd, extents,
};
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;
use crate::format::bat;
use crate::format::batmap::{self, Batmap};
use crate::format::footer::{self, DiskType, FOOTER_SIZE, Footer};
use crate::format::header::{self, DynamicHeader, HEADER_SIZE};
use crate::io::{FileStorage, Storage};
use crate::layer::files::open_regular_file;
use crate::problem::ProblemCode;

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
        open_inner(
            storage,
            path.clone(),
            options,
            &mut Validator::new(false, &path),
        )
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
/// data). The one rule both [`Vhd::open`] and [`super::files::peek_file`] use.
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
fn first_checked(candidates: &[FooterCandidate]) -> Option<usize> {
    candidates
        .iter()
        .position(|c| c.result.as_ref().is_ok_and(Footer::checksum_ok))
}

/// Open and validate in one pass, reporting every problem to `v` (see [`Validator`]): the
/// footer in use, then a fixed disk's data area, or a sparse disk's header, BAT and blocks.
pub(super) fn open_inner(
    storage: Box<dyn Storage>,
    path: PathBuf,
    options: OpenOptions,
    v: &mut Validator,
) -> Result<Vhd> {
    let len = storage
        .len()
        .map_err(|e| Error::io(format!("{}: reading length", path.display()), e))?;
    check_signature(storage.as_ref(), &path, len, v)?;
    let chosen = choose_footer(storage.as_ref(), len, options.lenient, v)?;
    check_footer(storage.as_ref(), &chosen, len, v)?;
    let footer_offset = match chosen.source {
        FooterSource::End => len - 512,
        FooterSource::Short => len - 511,
        FooterSource::Copy => len - 512,
    };
    let (virtual_size, size_source) =
        decide_virtual_size(&chosen.footer, options.size_rule, chosen.offset, v);
    let mut vhd = Vhd {
        storage,
        path,
        footer_source: chosen.source,
        footer_offset,
        original_footer_offset: footer_offset,
        header: None,
        bat: Table::default(),
        virtual_size,
        size_source,
        warnings: Vec::new(),
        writable: options.writable,
        next_free: 0,
        known_zero: 0..0,
        pending: Pending::default(),
        scratch: Vec::new(),
        writeback: Default::default(),
        sync_failed: std::sync::atomic::AtomicBool::new(false),
        footer: chosen.footer,
    };
    if vhd.footer.disk_type == DiskType::Fixed {
        check_fixed(&mut vhd, v)?;
    } else {
        open_sparse(&mut vhd, len, options, v)?;
    }
    vhd.warnings = v.warnings();
    Ok(vhd)
}

/// A file too short for a footer, or a VHDX, is not a VHD.
fn check_signature(storage: &dyn Storage, path: &Path, len: u64, v: &mut Validator) -> Result<()> {
    if len < FOOTER_SIZE as u64 {
        return Err(v.stop(
            ProblemCode::NotAVhd,
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
            ProblemCode::NotAVhd,
            "file",
            Some(0),
            crate::layer::vhdx_not_supported(path),
        ));
    }
    Ok(())
}

/// The footer in use, as [`footer_candidates`] found it.
struct Chosen {
    footer: Footer,
    offset: u64,
    source: FooterSource,
    raw: [u8; FOOTER_SIZE],
}

/// The footer to go by: the first candidate whose checksum is right, else the first that
/// parses (a checksum problem: fatal unless `lenient`), else the file is not a VHD.
fn choose_footer(
    storage: &dyn Storage,
    len: u64,
    lenient: bool,
    v: &mut Validator,
) -> Result<Chosen> {
    let mut candidates = footer_candidates(storage, len);
    let chosen = match first_checked(&candidates) {
        Some(i) => i,
        None => match candidates.iter().position(|c| c.result.is_ok()) {
            Some(i) => {
                note_footer_checksum(&candidates[i], lenient, v)?;
                i
            }
            None => {
                return Err(v.stop(
                    ProblemCode::NotAVhd,
                    "footer",
                    Some(len - 512),
                    not_a_vhd(&candidates[0], len),
                ));
            }
        },
    };
    let FooterCandidate {
        offset,
        source,
        raw,
        result,
    } = candidates.swap_remove(chosen);
    Ok(Chosen {
        footer: result?,
        offset,
        source,
        raw,
    })
}

/// A footer that parses with a wrong checksum: a warning when reading leniently, else fatal.
fn note_footer_checksum(c: &FooterCandidate, lenient: bool, v: &mut Validator) -> Result<()> {
    let f = c.result.as_ref().ok();
    let (offset, stored, computed) = (
        c.offset,
        f.map_or(0, |f| f.checksum),
        f.map_or(0, Footer::computed_checksum),
    );
    if lenient {
        v.warn(
            ProblemCode::FooterChecksum,
            "footer",
            Some(offset),
            format!(
                "footer checksum mismatch at offset {offset} (stored {stored:#010x}, computed {computed:#010x}); accepted because reading leniently"
            ),
        );
        return Ok(());
    }
    v.error(
        ProblemCode::FooterChecksum,
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
    )
}

/// Why no footer parses, going by the end one.
fn not_a_vhd(end: &FooterCandidate, len: u64) -> Error {
    let why = match &end.result {
        Err(Error::Format { detail, .. }) => detail.clone(),
        Err(e) => e.to_string(),
        Ok(_) => String::new(),
    };
    Error::format(format!(
        "not a VHD: {why} at offset {} (end of file), and no valid copy at offset 0",
        len - 512
    ))
}

/// The footer in use: where it was found, its fields, and the offset-0 copy.
fn check_footer(storage: &dyn Storage, c: &Chosen, len: u64, v: &mut Validator) -> Result<()> {
    let (footer, chosen_offset) = (&c.footer, c.offset);
    match c.source {
        FooterSource::End => {}
        FooterSource::Short => v.warn(
            ProblemCode::FooterShort,
            "footer",
            Some(chosen_offset),
            format!(
                "511-byte footer at offset {chosen_offset} (written by a product older than Virtual PC 2004)"
            ),
        ),
        FooterSource::Copy => v.warn(
            ProblemCode::FooterEndBad,
            "footer",
            Some(len - 512),
            format!(
                "end footer missing or damaged at offset {}; using the copy at offset 0",
                len - 512
            ),
        ),
    }
    check_footer_fields(footer, chosen_offset, v)?;
    if footer.disk_type.is_sparse() && c.source != FooterSource::Copy {
        check_footer_copy(storage, c, v);
    }
    if footer.disk_type == DiskType::Fixed && footer.data_offset != footer::NO_DATA_OFFSET {
        v.info(
            ProblemCode::FooterOdd,
            "footer",
            Some(chosen_offset),
            format!(
                "fixed disk footer Data Offset is {:#x}, expected all ones",
                footer.data_offset
            ),
        );
    }
    Ok(())
}

/// Disk type, version, features, saved state and Current Size of the footer at `chosen_offset`.
fn check_footer_fields(footer: &Footer, chosen_offset: u64, v: &mut Validator) -> Result<()> {
    match footer.disk_type {
        DiskType::Fixed | DiskType::Dynamic | DiskType::Differencing => {}
        DiskType::Other(t) => {
            return Err(v.stop(
                ProblemCode::FooterField,
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
            ProblemCode::FooterField,
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
            ProblemCode::FooterOdd,
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
            ProblemCode::FooterOdd,
            "footer",
            Some(chosen_offset),
            "footer Saved State is set: a virtual machine saved its state with this disk attached"
                .into(),
        );
    }
    if !footer.current_size.is_multiple_of(SECTOR_SIZE) {
        return Err(v.stop(
            ProblemCode::FooterField,
            "footer",
            Some(chosen_offset),
            Error::format(format!(
                "footer Current Size {} is not a multiple of 512",
                footer.current_size
            )),
        ));
    }
    Ok(())
}

/// The offset-0 copy of a sparse disk's end footer `c` (byte for byte: a copy whose only
/// difference is its checksum is damaged too, §7.2): warnings only.
fn check_footer_copy(storage: &dyn Storage, c: &Chosen, v: &mut Validator) {
    let (footer, footer_source, chosen_raw) = (&c.footer, c.source, c.raw);
    let copy = read_footer_at(storage, 0, 512, FooterSource::Copy);
    match copy.result {
        Ok(c)
            if copy.raw == chosen_raw
                || (footer_source == FooterSource::Short && c.to_bytes() == footer.to_bytes()) => {}
        Ok(c) if !c.checksum_ok() => v.warn(
            ProblemCode::FooterCopyBad,
            "footer copy",
            Some(0),
            format!(
                "footer copy at offset 0 has a bad checksum (stored {:#010x}, computed {:#010x})",
                c.checksum,
                c.computed_checksum()
            ),
        ),
        Ok(_) => v.warn(
            ProblemCode::FooterCopyDiffers,
            "footer copy",
            Some(0),
            "footer copy at offset 0 differs from the end footer".into(),
        ),
        Err(_) => v.warn(
            ProblemCode::FooterCopyBad,
            "footer copy",
            Some(0),
            "footer copy at offset 0 is missing or damaged".into(),
        ),
    }
}

/// The virtual size by `rule` (see [`virtual_size`]), with a note when it is the CHS size or
/// when another reader could decide otherwise.
fn decide_virtual_size(
    footer: &Footer,
    rule: SizeRule,
    chosen_offset: u64,
    v: &mut Validator,
) -> (u64, SizeSource) {
    let (virtual_size, size_source) = virtual_size(footer, rule);
    if size_source == SizeSource::Chs {
        v.warn(
            ProblemCode::SizeChs,
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
                ProblemCode::SizeChs,
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
    (virtual_size, size_source)
}

/// A fixed disk's data must fit before its footer; new data never goes past it.
fn check_fixed(vhd: &mut Vhd, v: &mut Validator) -> Result<()> {
    let footer_offset = vhd.footer_offset;
    let data_end = vhd.footer.current_size;
    if data_end > footer_offset {
        return Err(v.stop(
            ProblemCode::FixedTruncated,
            "file",
            Some(footer_offset),
            Error::format(format!(
                "fixed disk truncated: Current Size is {data_end} bytes but the footer is at offset {footer_offset}"
            )),
        ));
    }
    if data_end < footer_offset {
        v.warn(
            ProblemCode::FixedGap,
            "file",
            Some(data_end),
            format!(
                "{} bytes between the end of data ({data_end}) and the footer",
                footer_offset - data_end
            ),
        );
    }
    vhd.next_free = footer_offset;
    Ok(())
}

/// The virtual size by `rule` (§1.5), and which rule gave it.
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
    vhd.read_raw(at, &mut b)?;
    let Some(bm) = Batmap::parse(&b, at) else {
        return Ok(None);
    };
    if !bm.fits(h.max_table_entries, len) {
        v.warn(
            ProblemCode::Batmap,
            "batmap",
            Some(at),
            format!(
                "batmap header at offset {at} describes a map of {} sectors at offset {:#x} that is misplaced or too small for {} blocks; the batmap is ignored",
                bm.map_sectors, bm.map_offset, h.max_table_entries
            ),
        );
        return Ok(None);
    }
    if bm.map_bytes() > MAX_BATMAP_BYTES {
        // `check` reads the map whole; blktap's largest (2 TiB at 2 MiB blocks) is 128 KiB.
        v.warn(
            ProblemCode::Batmap,
            "batmap",
            Some(at),
            format!(
                "batmap header at offset {at} describes a map of {} bytes, more than the {MAX_BATMAP_BYTES} supported; the batmap is ignored",
                bm.map_bytes()
            ),
        );
        return Ok(None);
    }
    Ok(Some(bm))
}

/// Largest batmap used: one bit per block of [`MAX_HELD_BLOCKS`] blocks (512 KiB; blktap's
/// largest is 128 KiB).
const MAX_BATMAP_BYTES: u64 = MAX_HELD_BLOCKS as u64 / 8;

/// A dynamic or differencing disk: its header, BAT, batmap and blocks, in file order.
fn open_sparse(vhd: &mut Vhd, len: u64, options: OpenOptions, v: &mut Validator) -> Result<()> {
    // Metadata must end before the end footer in use: a table that runs into the footer would
    // destroy it on the first BAT update (found by fuzzing).
    let meta_limit = if vhd.footer_source == FooterSource::Copy {
        len
    } else {
        vhd.footer_offset
    };
    let header_offset = check_header_offset(vhd.footer.data_offset, len, meta_limit, v)?;
    let h = read_header(vhd, header_offset, options.lenient, v)?;
    check_header_fields(&h, vhd.footer.current_size, header_offset, v)?;
    check_bat_placement(&h, header_offset, len, meta_limit, v)?;
    let mut bat = Table::load(
        vhd,
        h.table_offset,
        h.max_table_entries,
        super::held_blocks(),
    )?;
    let batmap = read_batmap(vhd, &h, len, v)?;
    let next_free =
        extents::check_blocks(vhd, &h, &mut bat, batmap.as_ref(), (len, meta_limit), v)?;
    if vhd.footer.disk_type == DiskType::Dynamic && !h.parent_unique_id.is_nil() {
        v.warn(
            ProblemCode::HeaderOdd,
            "dynamic header",
            Some(header_offset),
            "dynamic disk has a non-zero Parent Unique Id; it is ignored".into(),
        );
    }
    if vhd.footer_source == FooterSource::Copy {
        vhd.footer_offset = next_free.max(len.saturating_sub(FOOTER_SIZE as u64));
    }
    vhd.next_free = next_free;
    vhd.header = Some(h);
    vhd.bat = bat;
    v.batmap = batmap;
    Ok(())
}

/// The footer's Data Offset must point at a dynamic header inside the file and before the
/// end footer (`meta_limit`).
fn check_header_offset(
    header_offset: u64,
    len: u64,
    meta_limit: u64,
    v: &mut Validator,
) -> Result<u64> {
    let header_end = header_offset.checked_add(HEADER_SIZE as u64);
    if header_offset < FOOTER_SIZE as u64 || header_end.is_none_or(|e| e > len) {
        return Err(v.stop(
            ProblemCode::HeaderOffset,
            "footer",
            None,
            Error::format(format!(
                "footer Data Offset {header_offset:#x} does not point to a dynamic header inside the file ({len} bytes)"
            )),
        ));
    }
    let (hs, ho) = ("dynamic header", Some(header_offset));
    if header_offset + HEADER_SIZE as u64 > meta_limit {
        return Err(v.stop(
            ProblemCode::HeaderOffset,
            hs,
            ho,
            Error::format(format!(
                "dynamic header at offset {header_offset:#x} (1024 bytes) overlaps the end footer at offset {meta_limit:#x}"
            )),
        ));
    }
    if !header_offset.is_multiple_of(SECTOR_SIZE) {
        v.warn(
            ProblemCode::HeaderOdd,
            hs,
            ho,
            format!("dynamic header at offset {header_offset} is not sector aligned"),
        );
    }
    Ok(header_offset)
}

/// Read and parse the dynamic header; a wrong checksum is fatal unless `lenient`.
fn read_header(
    vhd: &Vhd,
    header_offset: u64,
    lenient: bool,
    v: &mut Validator,
) -> Result<DynamicHeader> {
    let (hs, ho) = ("dynamic header", Some(header_offset));
    let mut hb = [0u8; HEADER_SIZE];
    vhd.read_raw(header_offset, &mut hb)?;
    let h = match DynamicHeader::parse(&hb) {
        Ok(h) => h,
        Err(e) => {
            let e = match e {
                Error::Format { detail, .. } => {
                    Error::format(format!("{detail} at offset {header_offset}"))
                }
                e => e,
            };
            return Err(v.stop(ProblemCode::HeaderCookie, hs, ho, e));
        }
    };
    if !h.checksum_ok() {
        if lenient {
            v.warn(
                ProblemCode::HeaderChecksum,
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
                ProblemCode::HeaderChecksum,
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
    Ok(h)
}

/// Version, Data Offset, Block Size and Max Table Entries against the footer's Current Size.
fn check_header_fields(
    h: &DynamicHeader,
    current_size: u64,
    header_offset: u64,
    v: &mut Validator,
) -> Result<()> {
    let (hs, ho) = ("dynamic header", Some(header_offset));
    if h.header_version >> 16 != 1 {
        return Err(v.stop(
            ProblemCode::HeaderField,
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
            ProblemCode::HeaderOdd,
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
            ProblemCode::HeaderField,
            hs,
            ho,
            Error::format(format!(
                "dynamic header Block Size {bs} is not a power of two of at least 512"
            )),
        ));
    }
    if bs > MAX_BLOCK_SIZE {
        return Err(v.stop(
            ProblemCode::HeaderField,
            hs,
            ho,
            Error::not_supported(format!(
                "dynamic header Block Size {bs} is larger than the {MAX_BLOCK_SIZE} bytes supported"
            )),
        ));
    }
    let bs64 = u64::from(bs);
    let mte = u64::from(h.max_table_entries);
    if mte * bs64 < current_size {
        return Err(v.stop(
            ProblemCode::HeaderField,
            hs,
            ho,
            Error::format(format!(
                "dynamic header Max Table Entries {mte} x Block Size {bs} covers {} bytes, less than Current Size {}",
                mte * bs64,
                current_size
            )),
        ));
    }
    let needed = current_size.div_ceil(bs64);
    if mte > needed {
        v.info(
            ProblemCode::BatLarger,
            "BAT",
            Some(h.table_offset),
            format!(
                "Max Table Entries {mte} is more than the {needed} blocks Current Size needs; the extra entries are ignored"
            ),
        );
    }
    Ok(())
}

/// The BAT must lie inside the file, before the end footer (`meta_limit`, padding included),
/// clear of the footer copy and the header, and not be larger than supported.
fn check_bat_placement(
    h: &DynamicHeader,
    header_offset: u64,
    len: u64,
    meta_limit: u64,
    v: &mut Validator,
) -> Result<()> {
    let (hs, ho) = ("dynamic header", Some(header_offset));
    let mte = u64::from(h.max_table_entries);
    let table_len = bat::table_bytes(h.max_table_entries);
    let table_end = h.table_offset.checked_add(mte * 4);
    if table_end.is_none_or(|e| e > len) {
        return Err(v.stop(
            ProblemCode::BatPlacement,
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
            ProblemCode::BatTooLarge,
            hs,
            ho,
            Error::not_supported(format!(
                "dynamic header Max Table Entries {mte} is more than the {MAX_TABLE_ENTRIES} BAT entries supported (the blocks of a 2040 GiB disk at 512 bytes each); the table is not read"
            )),
        ));
    }
    // The padding counts: BAT updates write whole sectors.
    if h.table_offset.saturating_add(table_len) > meta_limit {
        return Err(v.stop(
            ProblemCode::BatPlacement,
            "BAT",
            Some(h.table_offset),
            Error::format(format!(
                "BAT at offset {:#x} with {mte} entries ({table_len} bytes padded to a sector) overlaps the end footer at offset {meta_limit:#x}",
                h.table_offset,
            )),
        ));
    }
    if !h.table_offset.is_multiple_of(SECTOR_SIZE) {
        v.warn(
            ProblemCode::HeaderOdd,
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
            ProblemCode::BatPlacement,
            "BAT",
            Some(h.table_offset),
            Error::format(format!(
                "BAT at offset {:#x} overlaps the footer copy or the dynamic header",
                h.table_offset
            )),
        ));
    }
    Ok(())
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
