//! Re-pointing a differencing disk at a moved, renamed or replaced parent, like Hyper-V's
//! `Set-VHD -ParentPath`: the child's Parent Unique Id, Parent Time Stamp, Parent Unicode Name
//! and parent locators are rewritten; its data is not touched.
//!
//! # Write order (crash safety)
//!
//! The dynamic header is the commit point: one 1024-byte write inside the first 4 KiB,
//! between two syncs ([`Vhd::rewrite_header`]). Nothing a current header references is ever
//! overwritten:
//!
//! 1. Every new payload goes into fresh space after all data ([`Vhd::append_metadata`]),
//!    which no header references; then a header pointing there is written. A crash before
//!    it leaves the old header with all its locators intact (the old parent); after it,
//!    the new parent.
//! 2. The old locators' extents are now unreferenced. Payloads that fit one (same platform
//!    code first) are written there, and a second header points at them. A crash in between
//!    leaves the first header, still complete. The fresh space of step 1 is then unreferenced
//!    again; it lies after the last block, so the next block allocation or the next
//!    set-parent reuses it: the file grows at most once by a few KiB, however often the
//!    parent is set, and keeps its locators where Windows put them.
//!
//! If a 1024-byte header write were torn (the design assumes it is not: it lies in one 4 KiB
//! page and physical sector), its checksum no longer matches, strict opening says so, and a
//! lenient re-run of set-parent writes a whole header again.
//!
//! Locator space is never placed over blocks: reused extents are checked with
//! [`Vhd::is_metadata_space`], fresh space starts after the last block.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::chain::{Chain, ChainOptions};
use crate::error::{Error, Result};
use crate::format::header::LOCATOR_COUNT;
use crate::format::{DiskType, DynamicHeader, ParentLocator, PlatformCode, SECTOR_SIZE, align_up};
use crate::layer::{Format, Layer, ParentLink};
use crate::locator::{self, LOCATOR_SPACE};
use crate::vhd::{MAX_LOCATOR_PAYLOAD, OpenOptions, Vhd};
use crate::vhdx_layer::VhdxLinkage;

options! {
    /// Options for [`set_parent`].
    #[derive(Clone, Debug)]
    pub struct SetParentOptions {
        /// Accept a new parent whose unique id differs from the one the child records; the child
        /// then adopts the new parent's id (Hyper-V's `IgnoreIdMismatch`). Its view changes unless
        /// the new parent has the same content as the old one.
        pub force: bool,
        /// Open the child and the parent even if their checksums are wrong (the child's header
        /// is written with a correct checksum).
        pub lenient: bool,
        /// Take an exclusive lock on the child while rewriting it (on by default). A caller that
        /// already holds the child locked through another handle turns it off.
        pub lock: bool,
    }
}

impl Default for SetParentOptions {
    fn default() -> SetParentOptions {
        SetParentOptions {
            force: false,
            lenient: false,
            lock: true,
        }
    }
}

/// One parent locator written by [`set_parent`].
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatorWritten {
    /// Its slot in the header (0..8).
    pub slot: usize,
    /// `W2ru`, `W2ku` or `MacX`.
    pub platform_code: PlatformCode,
    /// The path or URL stored.
    pub text: String,
    /// File offset of the payload.
    pub offset: u64,
    /// Bytes reserved for it (Data Space, in bytes).
    pub space: u64,
    /// True when it reuses an old locator's space, false when it was placed after all data.
    pub reused: bool,
}

/// What [`set_parent`] changed.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SetParentReport {
    /// The child that was rewritten.
    #[cfg_attr(feature = "serde", serde(rename = "path"))]
    pub child: PathBuf,
    /// The new parent, as given.
    #[cfg_attr(feature = "serde", serde(rename = "parent_path"))]
    pub parent: PathBuf,
    /// The Parent Unique Id the child recorded before.
    #[cfg_attr(feature = "serde", serde(rename = "old_parent_unique_id"))]
    pub old_parent_id: Uuid,
    /// The Parent Unique Id it records now (the new parent's unique id).
    #[cfg_attr(feature = "serde", serde(rename = "parent_unique_id"))]
    pub parent_id: Uuid,
    /// True when `force` made the child adopt a different parent unique id.
    pub id_changed: bool,
    /// The Parent Unicode Name before.
    pub old_parent_name: String,
    /// The Parent Unicode Name now (the new parent's file name).
    pub parent_name: String,
    /// The Parent Time Stamp now (the parent file's modification time, seconds since 2000).
    pub parent_timestamp: u32,
    /// The locators written, slot order (VHD).
    pub locators: Vec<LocatorWritten>,
    /// The parent locator's keys and values as written (VHDX; empty for a VHD).
    pub locator_keys: Vec<(String, String)>,
    /// Things worth knowing that did not stop the operation.
    pub warnings: Vec<String>,
}

/// Re-point the differencing disk `child` at `new_parent` (see the module documentation for
/// what is written and in which order).
///
/// Fails with [`Error::InvalidParameter`] when `child` is not a differencing disk, when the
/// new parent is the child itself or has it as an ancestor, or when the new parent's unique
/// id differs from the one the child records and `opts.force` is not set (the message shows
/// both ids).
pub fn set_parent(
    child: impl AsRef<Path>,
    new_parent: impl AsRef<Path>,
    opts: &SetParentOptions,
) -> Result<SetParentReport> {
    if crate::layer::detect_format(child.as_ref()) == Some(Format::Vhdx) {
        return set_parent_vhdx(child.as_ref(), new_parent.as_ref(), opts);
    }
    let mut c = Vhd::open_for_writing(
        child.as_ref(),
        OpenOptions {
            lenient: opts.lenient,
            ..OpenOptions::default()
        },
    )?;
    // Locked as it was opened (a second lock on one handle fails on Windows).
    let opts = SetParentOptions {
        lock: false,
        ..opts.clone()
    };
    set_parent_on(&mut c, new_parent, &opts)
}

/// [`set_parent`] on a child already open for writing (its [`Vhd::path`] is used to compute
/// the relative locator and in messages). For callers that hold the child open, such as a
/// merge re-linking the children of its destination, or tests injecting faults through a
/// `io::FaultyStorage` (the `testing` feature).
pub fn set_parent_on(
    c: &mut Vhd,
    new_parent: impl AsRef<Path>,
    opts: &SetParentOptions,
) -> Result<SetParentReport> {
    let child = c.path().to_path_buf();
    let child = child.as_path();
    let new_parent = new_parent.as_ref();
    let old_header = differencing_header(c, opts)?;
    let old_id = old_header.parent_unique_id;
    let link = check_new_parent(&ChildFacts::of(&*c), &[old_id], new_parent, opts)?;
    let name = file_name(new_parent);
    let mut header = old_header.clone();
    header.set_parent_name(&name)?;
    header.parent_unique_id = link.new_id;
    header.parent_timestamp = crate::create::parent_timestamp(new_parent)?;
    let payloads = locator::parent_locators(child, new_parent)?;
    if payloads.len() > LOCATOR_COUNT {
        return Err(Error::InvalidParameter("too many parent locators".into()));
    }
    let homes = locator_homes(c, &old_header, &payloads);
    let placed = write_locators(c, &header, &payloads, &homes)?;
    let locators = payloads
        .iter()
        .zip(&placed)
        .enumerate()
        .map(
            |(slot, ((code, data), &(offset, space, reused)))| LocatorWritten {
                slot,
                platform_code: *code,
                text: code.decode_payload(data).unwrap_or_default(),
                offset,
                space,
                reused,
            },
        )
        .collect();
    Ok(SetParentReport {
        child: child.to_path_buf(),
        parent: new_parent.to_path_buf(),
        old_parent_id: old_id,
        parent_id: link.new_id,
        id_changed: link.id_changed,
        old_parent_name: old_header.parent_name(),
        parent_name: name,
        parent_timestamp: c.header().map_or(0, |h| h.parent_timestamp),
        locators,
        locator_keys: Vec::new(),
        warnings: link.warnings,
    })
}

/// The dynamic header of `c`, which must be writable (locked now when `opts.lock`) and
/// differencing.
fn differencing_header(c: &Vhd, opts: &SetParentOptions) -> Result<DynamicHeader> {
    if !c.is_writable() {
        return Err(Error::AccessDenied(format!(
            "{} was opened read-only: set-parent rewrites its header",
            c.path().display()
        )));
    }
    if opts.lock {
        c.lock(true)?;
    }
    match (c.disk_type(), c.header()) {
        (DiskType::Differencing, Some(h)) => Ok(h.clone()),
        (t, _) => Err(Error::InvalidParameter(format!(
            "{} is a {} disk, not a differencing one: it has no parent to set",
            c.path().display(),
            t.name()
        ))),
    }
}

/// What [`check_new_parent`] found.
struct LinkCheck {
    /// The new parent's identity.
    new_id: Uuid,
    /// It is not one the child accepted before (`force` was given).
    id_changed: bool,
    /// Things the report says.
    warnings: Vec<String>,
}

/// What the link checks need of the child, whichever way it is open (a VHD as a layer, a
/// VHDX for its linkage only, [`VhdxLinkage`], which is no layer).
struct ChildFacts<'a> {
    path: &'a Path,
    format: Format,
    id: Uuid,
    virtual_size: u64,
    sector_size: u32,
}

impl<'a> ChildFacts<'a> {
    fn of(c: &'a dyn Layer) -> ChildFacts<'a> {
        ChildFacts {
            path: c.path(),
            format: c.format(),
            id: c.id(),
            virtual_size: c.virtual_size(),
            sector_size: c.sector_size(),
        }
    }

    fn of_linkage(c: &'a VhdxLinkage) -> ChildFacts<'a> {
        ChildFacts {
            path: c.path(),
            format: Format::Vhdx,
            id: c.id(),
            virtual_size: c.virtual_size(),
            sector_size: c.sector_size(),
        }
    }
}

/// The rules for any child and format: the new parent opens, has the child's format and
/// sector size, is not the child, does not have the child in its chain, and carries one of
/// the identities the child accepts (`old_ids`) unless `opts.force`.
fn check_new_parent(
    child: &ChildFacts<'_>,
    old_ids: &[Uuid],
    new_parent: &Path,
    opts: &SetParentOptions,
) -> Result<LinkCheck> {
    let lenient = OpenOptions {
        lenient: opts.lenient,
        ..OpenOptions::read_only()
    };
    let p = crate::layer::open_layer(new_parent, lenient)?;
    let (id_name, link_name) = match child.format {
        Format::Vhd => ("unique id", "parent unique id"),
        _ => ("DataWriteGuid", "parent_linkage"),
    };
    check_parent_kind(child, p.as_ref(), id_name)?;
    let mut warnings = Vec::new();
    check_no_cycle(
        child.path,
        child.id,
        new_parent,
        opts.lenient,
        &mut warnings,
    )?;
    let new_id = p.id();
    let id_changed = !old_ids.contains(&new_id);
    let old_id = old_ids.first().copied().unwrap_or_default();
    if id_changed && !opts.force {
        return Err(Error::InvalidParameter(format!(
            "{} has {id_name} {new_id}, but {} records {link_name} {old_id}: it is not the same disk (the force option (--force) re-points the child anyway; its content then reads through the new parent)",
            new_parent.display(),
            child.path.display()
        )));
    }
    if id_changed {
        warnings.push(format!(
            "the child adopts {link_name} {new_id} (was {old_id}): its view now reads through the new parent"
        ));
    }
    if p.virtual_size() != child.virtual_size {
        warnings.push(format!(
            "the new parent's virtual size {} differs from the child's {}",
            p.virtual_size(),
            child.virtual_size
        ));
    }
    Ok(LinkCheck {
        new_id,
        id_changed,
        warnings,
    })
}

/// The new parent `p` of `child` has its format and sector size and is another disk.
fn check_parent_kind(child: &ChildFacts<'_>, p: &dyn Layer, id_name: &str) -> Result<()> {
    if p.format() != child.format {
        return Err(Error::InvalidParameter(format!(
            "{} is a {}: the parent of a {} is a {} (a chain holds one format, as Hyper-V requires)",
            p.path().display(),
            p.format().name().to_uppercase(),
            child.format.name().to_uppercase(),
            child.format.name().to_uppercase()
        )));
    }
    if locator::same_file(child.path, p.path()) || p.id() == child.id {
        return Err(Error::InvalidParameter(format!(
            "{} cannot be the parent of {}: it is the same disk ({id_name} {})",
            p.path().display(),
            child.path.display(),
            p.id()
        )));
    }
    if p.sector_size() != child.sector_size {
        return Err(Error::NotSupported {
            path: Some(p.path().to_path_buf()),
            detail: format!(
                "the new parent has {}-byte sectors and the child {}-byte sectors",
                p.sector_size(),
                child.sector_size
            ),
        });
    }
    Ok(())
}

/// Where each payload can go back to: an old locator's extent (its "home") when it fits,
/// decided before anything is written.
fn locator_homes(
    c: &Vhd,
    old: &DynamicHeader,
    payloads: &[(PlatformCode, Vec<u8>)],
) -> Vec<Option<(u64, u64)>> {
    let mut placed: Vec<(u64, u64)> = Vec::new();
    let mut used_slots = [false; LOCATOR_COUNT];
    let mut homes = Vec::new();
    for (code, data) in payloads {
        let home = reusable_slot(c, &old.locators, &used_slots, &placed, *code, data.len());
        homes.push(home.map(|(slot, offset, space)| {
            used_slots[slot] = true;
            placed.push((offset, space));
            (offset, space)
        }));
    }
    homes
}

/// Write the payloads and the header that references them, in the module's two phases;
/// returns where each payload ended up (offset, space, reused an old extent).
fn write_locators(
    c: &mut Vhd,
    header: &DynamicHeader,
    payloads: &[(PlatformCode, Vec<u8>)],
    homes: &[Option<(u64, u64)>],
) -> Result<Vec<(u64, u64, bool)>> {
    // Phase 1: every payload into fresh space, then the header pointing there. Until that
    // header is written, the old header and everything it references are untouched.
    let mut fresh = Vec::new();
    for (_, data) in payloads {
        let space =
            align_up((data.len() as u64).max(LOCATOR_SPACE), SECTOR_SIZE).unwrap_or(LOCATOR_SPACE);
        let mut padded = data.clone();
        padded.resize(space as usize, 0);
        let offset = c.append_metadata(&padded)?;
        fresh.push((offset, space, false));
    }
    c.rewrite_header(with_locators(header, payloads, &fresh))?;
    if homes.iter().all(Option::is_none) {
        return Ok(fresh);
    }
    // Phase 2: the old extents are no longer referenced; payloads that fit move back into
    // them, and a second header points there. The fresh space is then unreferenced again,
    // after the last block, where the next set-parent or block allocation reuses it: the file
    // grows at most once by a few KiB, however often the parent is set.
    let mut last = fresh;
    for (((_, data), home), place) in payloads.iter().zip(homes).zip(last.iter_mut()) {
        if let Some((offset, space)) = *home {
            let mut padded = data.clone();
            padded.resize(space as usize, 0);
            c.write_metadata_at(offset, &padded)?;
            *place = (offset, space, true);
        }
    }
    c.rewrite_header(with_locators(header, payloads, &last))?;
    Ok(last)
}

/// [`set_parent`] for a VHDX child ([MS-VHDX] 2.6.2.6): the parent locator is rewritten
/// through the child's log with `parent_linkage` = the new parent's DataWriteGuid,
/// `parent_linkage2` nil, and the path keys [`crate::vhdx::create::locator_entries`] writes
/// (the old `volume_path` and `absolute_win32_path`, which point at the old place, are
/// dropped; unknown keys are kept). The child's DataWriteGuid and data do not change.
fn set_parent_vhdx(
    child: &Path,
    new_parent: &Path,
    opts: &SetParentOptions,
) -> Result<SetParentReport> {
    let mut c = VhdxLinkage::open(child, None)?;
    let Some(old) = c.parent_locator().cloned() else {
        return Err(Error::InvalidParameter(format!(
            "{} is a {} disk, not a differencing one: it has no parent to set",
            child.display(),
            c.kind().name()
        )));
    };
    let ParentLink {
        ids: old_ids,
        name: old_name,
        ..
    } = crate::vhdx_layer::parent_link_of(&old).map_err(|e| e.in_file(child))?;
    let link = check_new_parent(&ChildFacts::of_linkage(&c), &old_ids, new_parent, opts)?;
    let (new_id, id_changed) = (link.new_id, link.id_changed);
    let old_id = old_ids.first().copied().unwrap_or_default();
    let mut entries = crate::vhdx::create::locator_entries(child, new_parent, new_id)?;
    let ours = crate::vhdx::format::metadata::KNOWN_LOCATOR_KEYS;
    entries.extend(
        old.entries
            .into_iter()
            .filter(|(k, _)| !ours.contains(&k.as_str())),
    );
    let loc = crate::vhdx::format::metadata::ParentLocator {
        locator_type: old.locator_type,
        entries,
    };
    c.set_parent_locator(loc.clone())?;
    c.finish()?;
    Ok(SetParentReport {
        child: child.to_path_buf(),
        parent: new_parent.to_path_buf(),
        old_parent_id: old_id,
        parent_id: new_id,
        id_changed,
        old_parent_name: old_name,
        parent_name: file_name(new_parent),
        parent_timestamp: 0,
        locators: Vec::new(),
        locator_keys: loc.entries,
        warnings: link.warnings,
    })
}

/// The file name of `p`, for messages and reports.
fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `header` with its locator entries replaced by `payloads` placed at (offset, space), in
/// slots 0.. in order.
fn with_locators(
    header: &DynamicHeader,
    payloads: &[(PlatformCode, Vec<u8>)],
    places: &[(u64, u64, bool)],
) -> DynamicHeader {
    let mut h = header.clone();
    h.locators = [ParentLocator::EMPTY; LOCATOR_COUNT];
    for (slot, ((code, data), &(offset, space, _))) in payloads.iter().zip(places).enumerate() {
        if let Some(e) = h.locators.get_mut(slot) {
            *e = ParentLocator {
                platform_code: *code,
                data_space: u32::try_from(space).unwrap_or(u32::MAX),
                data_length: u32::try_from(data.len()).unwrap_or(u32::MAX),
                reserved: 0,
                data_offset: offset,
            };
        }
    }
    h
}

/// An old locator slot whose reserved extent can take a payload of `len` bytes: same platform
/// code first, then any. The extent must be whole sectors of metadata space (clear of the
/// header, the BAT and every block) and must not overlap an extent already chosen (a damaged
/// file may have overlapping locators). Returns (slot, offset, usable bytes).
fn reusable_slot(
    c: &Vhd,
    old: &[ParentLocator; LOCATOR_COUNT],
    used: &[bool; LOCATOR_COUNT],
    placed: &[(u64, u64)],
    code: PlatformCode,
    len: usize,
) -> Option<(usize, u64, u64)> {
    let fits = |slot: usize| -> Option<(usize, u64, u64)> {
        let loc = old.get(slot)?;
        if used[slot] || loc.is_empty() || loc.data_offset % SECTOR_SIZE != 0 {
            return None;
        }
        // Usable space: whole sectors of the reserved extent, and at least one sector so the
        // Data Space written (in bytes) cannot be mistaken for a sector count (§2.2). At most
        // MAX_LOCATOR_PAYLOAD of it: the payload is padded to the space in memory, and the
        // file's Data Space (up to 4 GiB) must not decide an allocation.
        let space =
            (loc.extent_len() / SECTOR_SIZE * SECTOR_SIZE).min(u64::from(MAX_LOCATOR_PAYLOAD));
        if space < SECTOR_SIZE || space < len as u64 {
            return None;
        }
        let clash = placed
            .iter()
            .any(|&(o, l)| loc.data_offset < o + l && o < loc.data_offset + space);
        (!clash && c.is_metadata_space(loc.data_offset, space)).then_some((
            slot,
            loc.data_offset,
            space,
        ))
    };
    (0..LOCATOR_COUNT)
        .filter(|&i| old[i].platform_code == code)
        .chain((0..LOCATOR_COUNT).filter(|&i| old[i].platform_code != code))
        .find_map(fits)
}

/// Refuse a new parent whose own chain contains the child (the child would become its own
/// ancestor). A new parent whose chain does not open is accepted with a warning: its chain
/// is its own business, and the child's link to it is checked by unique id.
fn check_no_cycle(
    child: &Path,
    child_id: Uuid,
    new_parent: &Path,
    lenient: bool,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let opts = ChainOptions {
        lenient,
        ..ChainOptions::default()
    };
    match Chain::open(new_parent, &opts) {
        Ok(chain) => {
            for l in chain.layers() {
                if locator::same_file(child, l.layer.path()) || l.layer.id() == child_id {
                    return Err(Error::InvalidParameter(format!(
                        "{} cannot be the parent of {}: {} (unique id {}) is already in the new parent's chain, so the chain would become a cycle",
                        new_parent.display(),
                        child.display(),
                        l.layer.path().display(),
                        l.layer.id()
                    )));
                }
            }
            Ok(())
        }
        Err(e) => {
            warnings.push(format!(
                "the new parent's own chain does not open ({e}); the link is set anyway"
            ));
            Ok(())
        }
    }
}
