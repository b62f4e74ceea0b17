//! Running a merge: checks, locks, the sibling scan, planning, the batched copy, verify, and
//! the clean-up options.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use uuid::Uuid;

use super::job::{JobState, Tracker};
use super::plan::{MergePlan, clone_candidate, mostly_candidate, patch_after_clone_allowed};
use super::scan::{self, dir_of, tidy};
use super::{MergeOptions, MergeReport, VerifyReport};
use crate::bitmap::SectorBitmap;
use crate::chain::{Chain, Piece, SpanPlan};
use crate::error::{Error, Result};
use crate::io::{CloneOutcome, ClonePiece};
use crate::layer::{
    DiskKind, Format, Layer, LayerWriter, open_layer, open_layer_for_writing, open_writer,
};
use crate::layer::{HeldLink, IdentityGate, OpenOptions};
use crate::locator::{canonical_or_self, same_file};

/// Layer `i` of `chain`; callers pass indices below the destination's, checked when the
/// destination was resolved.
fn at(chain: &Chain, i: usize) -> &dyn Layer {
    chain.layers()[i].layer.as_ref()
}

/// Assemble unit `unit` of `plan` in `buf` (one destination unit, `plan.unit_bytes` long): the
/// merged layers' data at the sectors they provide, one read per contributing layer and block,
/// and zeros at the sectors the merged layers decide are zeros
/// ([`crate::chain::SpanPlan::hidden`]). Returns the mask of those sectors (what the source's
/// view decides, [`crate::chain::SpanPlan::decided`]), sized for
/// [`crate::LayerWriter::write_sectors`] on the destination; bytes outside it are unspecified
/// (left as they were, or stale bytes of the layer).
pub fn assemble_unit(
    chain: &Chain,
    plan: &MergePlan,
    unit: u64,
    buf: &mut [u8],
    scratch: &mut Vec<u8>,
) -> Result<SectorBitmap> {
    let ss = plan.sector_bytes as usize;
    let unit_sectors = (plan.unit_bytes / plan.sector_bytes) as usize;
    if buf.len() as u64 != plan.unit_bytes {
        return Err(Error::InvalidParameter(format!(
            "assemble_unit: buffer of {} bytes for units of {} bytes",
            buf.len(),
            plan.unit_bytes
        )));
    }
    let (start, n) = plan.unit_span(unit);
    if n == 0 {
        return Ok(SectorBitmap::new(unit_sectors));
    }
    let span = chain.plan_span(0..plan.destination_index, start, n)?;
    assemble_span(chain, &span, buf, scratch, ss, unit_sectors)
}

/// [`assemble_unit`] once the unit's span is planned: `buf` holds the unit, of
/// `unit_sectors` sectors of `ss` bytes.
fn assemble_span(
    chain: &Chain,
    span: &SpanPlan,
    buf: &mut [u8],
    scratch: &mut Vec<u8>,
    ss: usize,
    unit_sectors: usize,
) -> Result<SectorBitmap> {
    let n = span.sectors;
    let mut mask = SectorBitmap::new(unit_sectors);
    if let [only] = span.sources.as_slice() {
        // One layer provides every merged sector of the unit: read each piece's span of
        // claimed sectors straight into `buf`, without the copy run by run that read_plan
        // does through `scratch` (it must, when several layers interleave). The unclaimed
        // sectors inside the span receive that layer's stale bytes, which is harmless:
        // write_sectors never writes a sector outside the mask as it is.
        let layer = at(chain, only.layer);
        for p in &only.pieces {
            let range = p.first..p.first + p.len;
            let mut runs = only.claimed.runs_in(range, true);
            let Some(lo) = runs.next().map(|r| r.start) else {
                continue;
            };
            let hi = only
                .claimed
                .runs_in(lo..p.first + p.len, true)
                .last()
                .map_or(lo, |r| r.end);
            layer.read_stored(p.block, p.in_block(lo), &mut buf[lo * ss..hi * ss])?;
        }
    } else {
        chain.read_plan(span, &mut buf[..n * ss], scratch)?;
    }
    let decided = span.decided();
    for r in span.hidden().runs() {
        buf[r.start * ss..r.end * ss].fill(0);
    }
    mask.copy_bits_from(0, &decided, 0, n);
    Ok(mask)
}

/// Read back the destination's view of `unit` through `chain` (whose layer
/// `plan.destination_index` is the destination as written) and return the CRC32 of the merged
/// sectors (those the source's view decides: data of a merged layer, or zeros where the merged
/// layers hide the destination), with the mask of those sectors (recomputed from the merged
/// layers' block states and sizes).
pub fn read_assembled(
    chain: &Chain,
    plan: &MergePlan,
    unit: u64,
    buf: &mut [u8],
) -> Result<(u32, SectorBitmap)> {
    let (start, n) = plan.unit_span(unit);
    let span = chain.plan_span(0..plan.destination_index, start, n)?;
    let claimed = span.decided();
    let bytes = n * plan.sector_bytes as usize;
    if buf.len() < bytes {
        return Err(Error::InvalidParameter(format!(
            "read_assembled: buffer of {} bytes for a unit of {bytes}",
            buf.len()
        )));
    }
    chain.read_at(
        plan.destination_index,
        start * plan.sector_bytes,
        &mut buf[..bytes],
    )?;
    Ok((masked_crc(buf, &claimed, plan.sector_bytes), claimed))
}

/// CRC32 of the sectors (of `sector_bytes` each) of `buf` selected by `mask`, in order.
fn masked_crc(buf: &[u8], mask: &SectorBitmap, sector_bytes: u64) -> u32 {
    let ss = sector_bytes as usize;
    let mut h = crc32fast::Hasher::new();
    for r in mask.runs() {
        h.update(&buf[r.start * ss..r.end * ss]);
    }
    h.finalize()
}

/// The whole operation behind [`super::merge`] and [`super::MergeJob::start`]: open and check
/// the chain, take the destination (and make its link follow its identity), refuse what the
/// merge would corrupt, plan, write, then verify, re-link and remove as asked.
pub(crate) fn run(
    source: &Path,
    destination: Option<&Path>,
    options: &MergeOptions,
    tracker: &Tracker,
) -> Result<MergeReport> {
    let t0 = Instant::now();
    tracker.set_state(JobState::Starting);
    let (chain, d) = open_chain(source, destination, options)?;
    let dest_path = tidy(at(&chain, d).path());
    let merged: Vec<PathBuf> = (0..d).map(|i| tidy(at(&chain, i).path())).collect();
    let relink = check_relink(&chain, d, &options.relink)?;
    let mut dest = match options.dry_run {
        true => None,
        false => Some(open_destination(&dest_path, at(&chain, d), options)?),
    };
    let mut warnings = chain_warnings(&chain);
    let mut plan = MergePlan::build(&chain, d)?;
    check_dependents(&chain, d, &relink, options, &mut plan, &mut warnings)?;
    let link = match &mut dest {
        Some(dest) => prepare_links(&chain, d, dest.as_mut(), &relink, options)?,
        None => None,
    };
    tracker.set_total(plan.bytes_total);
    let mut report = MergeReport {
        source: source.to_path_buf(),
        destination: dest_path,
        plan,
        dry_run: dest.is_none(),
        bytes_merged: 0,
        bytes_cloned: 0,
        blocks_allocated: 0,
        destination_growth: 0,
        obsolete: Vec::new(),
        removed: Vec::new(),
        relinked: Vec::new(),
        verified: None,
        elapsed: t0.elapsed(),
        warnings,
    };
    let Some(dest) = dest else {
        return Ok(report);
    };
    tracker.set_state(JobState::Running);
    write_and_finish(chain, dest, link, options, tracker, &mut report)?;
    for child in &relink {
        relink_child(child, &report.destination, false)?;
        report.relinked.push(child.clone());
    }
    if options.remove_merged {
        report.removed = remove_merged(&merged, &report.destination)?;
    }
    report.obsolete = merged;
    report.elapsed = t0.elapsed();
    Ok(report)
}

/// The source's chain and the index of the destination in it (1 = the immediate parent),
/// checked: a differencing source, no larger than the destination.
fn open_chain(
    source: &Path,
    destination: Option<&Path>,
    options: &MergeOptions,
) -> Result<(Chain, usize)> {
    let chain = Chain::open(source, &options.chain)?;
    let src = at(&chain, 0);
    if src.kind() != DiskKind::Differencing {
        return Err(Error::InvalidParameter(format!(
            "{} is a {} disk: only a differencing disk can be merged into a parent",
            source.display(),
            src.kind().name()
        )));
    }
    let d = resolve_destination(&chain, destination)?;
    let dest = at(&chain, d);
    if src.virtual_size() > dest.virtual_size() {
        return Err(Error::InvalidParameter(format!(
            "{} ({} bytes) is larger than the destination {} ({} bytes): growing the destination is not supported",
            source.display(),
            src.virtual_size(),
            dest.path().display(),
            dest.virtual_size()
        )));
    }
    Ok((chain, d))
}

/// Before the first write: check that the children to relink can be written, make the layer
/// linking to the destination accept its next identity (see [`link_to_destination`]), and
/// lock every other layer shared. Runs once the merge is known to go ahead (the destination
/// open and locked, the dependents checked), so a refused merge writes no file. The
/// destination was locked exclusively as it was opened, like every file a command writes; the
/// chain's own read-only handle of it is not locked (flock locks belong to the open file, so
/// it would conflict with the writable one). Nor is the chain's handle of the layer linking to
/// the destination, when its linkage is updated: the returned [`HeldLink`] holds that file
/// open for writing, exclusively locked, from before its first update to after its last
/// ([`write_and_finish`]), so no other process can open it for writing or take a lock on it
/// in between, and the chain's reader of it (opened before, its blocks untouched by the
/// update) reads what it read.
fn prepare_links(
    chain: &Chain,
    d: usize,
    dest: &mut dyn LayerWriter,
    relink: &[PathBuf],
    options: &MergeOptions,
) -> Result<Option<Link>> {
    let dest_path = tidy(at(chain, d).path());
    for child in relink {
        relink_child(child, &dest_path, true)?;
    }
    let link = match dest.next_id() {
        Some(next) => {
            let child = at(chain, d - 1);
            let ids = (at(chain, d).id(), Some(next));
            Some(start_link(
                (child.path(), child.format()),
                ids,
                dest,
                options,
            )?)
        }
        None => None,
    };
    for (i, layer) in chain.layers().iter().enumerate() {
        if i == d || (link.is_some() && i == d - 1) {
            continue;
        }
        if let Err(e) = layer.layer.lock(false) {
            close_link(link);
            return Err(e);
        }
    }
    Ok(link)
}

/// End the session of `link` after an error, as far as the storage still works (its pages in
/// place flushed and its log cleared, so that qemu opens it read-only); if it does not, the
/// log stays live and the next open replays it: the link accepts both the destination's
/// current and its next identity either way.
fn close_link(link: Option<Link>) {
    if let Some(Ok(link)) = link.map(Link::settle) {
        let _ = link.finish();
    }
}

/// The layer linking to the destination during a merge: its first linkage update running on
/// a thread of its own ([`start_link`]), or done.
enum Link {
    Updating(std::thread::JoinHandle<(HeldLink, Result<()>)>),
    Held(HeldLink),
}

impl Link {
    /// Wait for the first update: the held link, or the update's error (the link then
    /// closed, [`close_link`]).
    fn settle(self) -> Result<HeldLink> {
        match self {
            Link::Held(h) => Ok(h),
            Link::Updating(t) => match t.join() {
                Ok((h, Ok(()))) => Ok(h),
                Ok((h, Err(e))) => {
                    close_link(Some(Link::Held(h)));
                    Err(e)
                }
                Err(_) => Err(Error::InvalidState(
                    "the linkage update thread panicked".into(),
                )),
            },
        }
    }
}

/// Each link's warnings, then the file's own (such as a checksum mismatch `lenient`
/// accepted), as flatten reports them.
fn chain_warnings(chain: &Chain) -> Vec<String> {
    chain
        .layers()
        .iter()
        .flat_map(|l| {
            let own = l.layer.warnings().iter();
            let own = own.map(|w| format!("{}: {w}", l.layer.path().display()));
            l.warnings.iter().cloned().chain(own)
        })
        .collect()
}

/// Find the disks that depend on what the merge changes and record them in the plan: siblings
/// (children of the destination or of an intermediate) are refused unless forced, and so are
/// children of the source that `remove_merged` would orphan (a dry run only lists them).
fn check_dependents(
    chain: &Chain,
    d: usize,
    relink: &[PathBuf],
    options: &MergeOptions,
    plan: &mut MergePlan,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let found = find_dependents(chain, d, options);
    let siblings: Vec<PathBuf> = found.siblings.iter().map(|v| v.path.clone()).collect();
    if !siblings.is_empty() && !options.dry_run {
        let list = list_paths(&siblings);
        if !options.force {
            return Err(Error::InvalidState(format!(
                "other differencing disks depend on {} or on a merged intermediate and would be corrupted by this merge:{list}\n(merge them first, move them away, or pass --force to merge anyway)",
                tidy(at(chain, d).path()).display()
            )));
        }
        warnings.push(format!(
            "merged although these differencing disks depend on a changed file; their content changed:{list}"
        ));
    }
    let orphans: Vec<PathBuf> = found
        .source_children
        .iter()
        .filter(|v| !relink.iter().any(|r| same_file(r, &v.path)))
        .map(|v| v.path.clone())
        .collect();
    if options.remove_merged && !orphans.is_empty() && !options.dry_run {
        let list = list_paths(&orphans);
        if !options.force {
            return Err(Error::InvalidState(format!(
                "removing {} would orphan its children:{list}\n(relink them with --relink, or pass --force)",
                at(chain, 0).path().display()
            )));
        }
        warnings.push(format!(
            "removed the source although these children depend on it:{list}"
        ));
    }
    plan.siblings = siblings;
    plan.source_children = found.source_children.into_iter().map(|v| v.path).collect();
    Ok(())
}

/// Write the plan into `dest` and end its session; then verify (when asked), and re-link the
/// layer that linked to the destination's old identity to the new one alone, once the chain's
/// locks are gone, unless it is about to be removed: through `link`, the session of its first
/// update (held since [`prepare_links`]), which this ends in every case (after an error, as
/// far as its storage works: [`close_link`]). Fills the report's byte and block counts.
fn write_and_finish(
    chain: Chain,
    dest: Box<dyn LayerWriter>,
    mut link: Option<Link>,
    options: &MergeOptions,
    tracker: &Tracker,
    report: &mut MergeReport,
) -> Result<()> {
    let relink_above = match write_and_verify(chain, dest, &mut link, options, tracker, report) {
        Ok(r) => r,
        Err(e) => {
            // The child's first update failing is the cause (the destination then stopped
            // at its identity gate): its error is the one to report.
            return match link.map(Link::settle) {
                Some(Err(first)) => Err(first),
                Some(Ok(held)) => {
                    close_link(Some(Link::Held(held)));
                    Err(e)
                }
                None => Err(e),
            };
        }
    };
    let link = link.map(Link::settle).transpose()?;
    if let Some((path, format, new_id)) = relink_above {
        // No held link only when the destination had no next identity to announce, yet took
        // a new one: link it now, in a session of its own.
        let held = match link {
            Some(l) => l,
            None => link_to_destination((&path, format), (new_id, None), options)?,
        };
        return final_link(Some(held), Some(new_id));
    }
    final_link(link, None)
}

/// The linking child's last update through `link`: linked to `new_id` alone when given
/// (dropping the destination's old identity), then its session ended ([`HeldLink::finish`]);
/// after an error of the update, ended as far as the storage works ([`close_link`]).
fn final_link(link: Option<HeldLink>, new_id: Option<Uuid>) -> Result<()> {
    let Some(mut held) = link else {
        return Ok(());
    };
    if let Some(id) = new_id
        && let Err(e) = held.set_parent_ids(id, None, false)
    {
        close_link(Some(Link::Held(held)));
        return Err(e);
    }
    held.finish()
}

/// [`write_and_finish`] up to the destination's end (and verify): the layer to re-link to the
/// destination's new identity, if any (path, format, the identity).
///
/// Without verify, the linking child's last update (through `link`, taken) runs on another
/// thread while the destination ends its session: the destination's last commit stops once
/// its new identity and content are durably exposed ([`LayerWriter::commit_exposed`]: a
/// VHDX's header naming its log, with the new DataWriteGuid, flushed), which is all the
/// child's update has to follow; the destination's remaining flush (its pages in place)
/// and the child's two overlap (docs/design.md, "Identity"). With verify the order stays
/// sequential: the child is re-linked after the destination verified.
fn write_and_verify(
    chain: Chain,
    mut dest: Box<dyn LayerWriter>,
    link: &mut Option<Link>,
    options: &MergeOptions,
    tracker: &Tracker,
    report: &mut MergeReport,
) -> Result<Option<(PathBuf, Format, Uuid)>> {
    let d = report.plan.destination_index;
    let len_before = dest.file_len()?;
    let blocks_before = crate::layer::count_mapped(&*dest)?;
    let mut crcs = options.verify.then(Vec::new);
    let overlap = link.is_some() && !options.verify;
    let copied = copy_units(
        &chain,
        &report.plan,
        dest.as_mut(),
        options,
        tracker,
        &mut crcs,
        overlap,
    );
    let copied = match copied {
        Ok(n) => n,
        Err(e) => {
            // Publish what was written before the error and end the session cleanly when the
            // storage still works (out of space, a bad source sector...; a VHDX's log is then
            // clear, so that qemu opens it read-only): the ordering keeps the file valid
            // either way.
            let _ = dest.finish();
            return Err(e);
        }
    };
    let new_id = match link.take() {
        Some(l) if overlap => {
            let held = match l.settle() {
                Ok(h) => h,
                Err(e) => {
                    let _ = dest.finish();
                    return Err(e);
                }
            };
            // The destination's identity as exposed (its last commit named it durably).
            let exposed = dest.id();
            let relink =
                (exposed != at(&chain, d).id() && !options.remove_merged).then_some(exposed);
            let (finished, linked) = std::thread::scope(|s| {
                let child = s.spawn(move || final_link(Some(held), relink));
                let finished = dest.finish();
                let linked = child.join().unwrap_or_else(|_| {
                    Err(Error::InvalidState(
                        "the linkage update thread panicked".into(),
                    ))
                });
                (finished, linked)
            });
            let new_id = finished?;
            linked?;
            if new_id != exposed {
                return Err(Error::InvalidState(format!(
                    "{}: identity {new_id} at the end of the session, {exposed} exposed before",
                    report.destination.display()
                )));
            }
            new_id
        }
        other => {
            *link = other;
            dest.finish()?
        }
    };
    report.bytes_merged = copied.bytes;
    report.bytes_cloned = copied.cloned;
    report.blocks_allocated = crate::layer::count_mapped(&*dest)?.saturating_sub(blocks_before);
    report.destination_growth = dest.file_len()?.saturating_sub(len_before);
    // Its path and format are all the relink needs: it opens the file for its metadata
    // alone (reopening it as a layer streamed its whole BAT again, 256 MiB for a 64 TiB
    // child with 2 MiB blocks).
    let relink_above =
        (new_id != at(&chain, d).id() && !options.remove_merged && !overlap).then(|| {
            let above = at(&chain, d - 1);
            (above.path().to_path_buf(), above.format(), new_id)
        });
    // The chain (and its shared locks) goes here: by verify, or now.
    report.verified = match crcs {
        Some(crcs) => Some(verify(
            chain,
            &report.plan,
            &report.destination,
            options,
            &crcs,
        )?),
        None => {
            drop(chain);
            None
        }
    };
    drop(dest);
    Ok(relink_above)
}

/// Delete the merged files (`--remove-merged`) once the merge into `destination` completed.
fn remove_merged(merged: &[PathBuf], destination: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for p in merged {
        std::fs::remove_file(p).map_err(|e| {
            Error::io(
                format!(
                    "the merge into {} completed, but removing {} failed",
                    destination.display(),
                    p.display()
                ),
                e,
            )
        })?;
        removed.push(p.clone());
    }
    sync_dirs(merged);
    Ok(removed)
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| format!("\n  {}", p.display()))
        .collect()
}

/// Which layer of `chain` the caller's destination is (1 = the immediate parent).
fn resolve_destination(chain: &Chain, destination: Option<&Path>) -> Result<usize> {
    let Some(want) = destination else {
        return Ok(1);
    };
    let listing = || -> String {
        chain
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| format!("\n  {i}: {} ({})", l.layer.path().display(), l.layer.id()))
            .collect()
    };
    let source = at(chain, 0).path();
    let peek = scan::peek_layer(want);
    for (i, layer) in chain.layers().iter().enumerate() {
        if !same_file(layer.layer.path(), want) {
            continue;
        }
        if i == 0 {
            return Err(Error::InvalidParameter(format!(
                "the destination {} is the source itself: give an ancestor of it",
                want.display()
            )));
        }
        if peek.as_ref().map(|p| p.id) != Some(layer.layer.id()) {
            return Err(Error::InvalidParameter(format!(
                "the destination {} changed since the chain was opened (unique id {} expected)",
                want.display(),
                layer.layer.id()
            )));
        }
        return Ok(i);
    }
    let Some(peek) = peek else {
        if let Err(e) = std::fs::metadata(want)
            && e.kind() == std::io::ErrorKind::NotFound
        {
            return Err(Error::io(
                format!("{}: cannot open the destination", want.display()),
                e,
            ));
        }
        return Err(Error::InvalidParameter(format!(
            "the destination {} is not a readable VHD or VHDX, and not an ancestor of {}; its chain is:{}",
            want.display(),
            source.display(),
            listing()
        )));
    };
    if let Some((i, l)) = chain
        .layers()
        .iter()
        .enumerate()
        .find(|(_, l)| l.layer.id() == peek.id)
    {
        return Err(Error::InvalidParameter(format!(
            "the destination {} has the unique id of layer {i} of {}'s chain, but the chain uses another file, {} (a copy?); give that file, or point the chain at this one with --parent / set-parent",
            want.display(),
            source.display(),
            l.layer.path().display()
        )));
    }
    Err(Error::InvalidParameter(format!(
        "the destination {} is not an ancestor of {}; its chain is:{}",
        want.display(),
        source.display(),
        listing()
    )))
}

/// Open the destination for writing (exclusively locked) through the caller's storage hook
/// and check that it is still the file the chain found (`found`, the chain's read-only layer).
fn open_destination(
    path: &Path,
    found: &dyn Layer,
    options: &MergeOptions,
) -> Result<Box<dyn LayerWriter>> {
    let unique_id = found.id();
    let file =
        crate::layer::files::open_for_writing(path, crate::layer::files::WriteMode::Existing)?;
    let storage = options.hooked(Box::new(file), false);
    let opts = OpenOptions {
        writable: true,
        lenient: options.chain.lenient,
        size_rule: options.chain.size_rule,
    };
    let dest = open_writer(found.format(), storage, path, opts)?;
    if dest.id() != unique_id {
        return Err(Error::InvalidState(format!(
            "{} changed while the merge was starting (unique id {} instead of {unique_id})",
            path.display(),
            dest.id()
        )));
    }
    Ok(dest)
}

/// The layer that links to the destination accepts `ids` (primary, secondary) as its
/// parent's identity: (current, next) before the destination is written, when writing gives
/// it a new one (a VHDX's DataWriteGuid), and (new, none) once it is finished, so that the
/// chain holds at every instant and an interrupted merge can be re-run (docs/design.md,
/// "Identity"). Opens that layer for writing (exclusively locked: no shared lock of this
/// process may be held on it) and publishes the first update with its session left open
/// ([`HeldLink::set_parent_ids`] live: a VHDX's log stays live, its pages in place
/// unflushed); the caller makes the second update through the returned handle and finishes
/// it, one session of four flushes in all instead of two of three each.
fn link_to_destination(
    child: (&Path, Format),
    ids: (Uuid, Option<Uuid>),
    options: &MergeOptions,
) -> Result<HeldLink> {
    let (_, mut link) = open_link(child, options)?;
    if let Err(e) = link.set_parent_ids(ids.0, ids.1, true) {
        close_link(Some(Link::Held(link)));
        return Err(e);
    }
    Ok(link)
}

/// Open the layer linking to the destination for its linkage updates (exclusively locked,
/// through the caller's storage hook): its tidied path and the held handle.
fn open_link(child: (&Path, Format), options: &MergeOptions) -> Result<(PathBuf, HeldLink)> {
    let path = tidy(child.0);
    let file =
        crate::layer::files::open_for_writing(&path, crate::layer::files::WriteMode::Existing)?;
    let storage = options.hooked(Box::new(file), true);
    let held = HeldLink::open(child.1, storage, &path)?;
    Ok((path, held))
}

/// [`link_to_destination`] with the first update (the child accepting `ids`, the
/// destination's current and next identity) on a thread of its own, concurrent with the
/// destination's writes: the child is opened (and locked) here, and `dest` waits for the
/// update to be durable before its identity changes ([`LayerWriter::set_identity_gate`]).
/// Until then the destination writes only what nothing refers to (new blocks past every
/// object, a log entry no header names), so the child accepts the destination as it reads
/// at every instant either way (docs/design.md, "Identity").
fn start_link(
    child: (&Path, Format),
    ids: (Uuid, Option<Uuid>),
    dest: &mut dyn LayerWriter,
    options: &MergeOptions,
) -> Result<Link> {
    let (path, mut held) = open_link(child, options)?;
    let (tx, rx) = mpsc::channel::<bool>();
    let update = std::thread::Builder::new()
        .name("vhd-merge link".into())
        .spawn(move || {
            let r = held.set_parent_ids(ids.0, ids.1, true);
            let _ = tx.send(r.is_ok());
            (held, r)
        })
        .map_err(|e| Error::io("starting the linkage update thread", e))?;
    let gate = IdentityGate::new(move || match rx.recv() {
        Ok(true) => Ok(()),
        _ => Err(Error::InvalidState(format!(
            "{}: its parent linkage was not updated to accept the destination's next identity",
            path.display()
        ))),
    });
    let link = Link::Updating(update);
    match dest.set_identity_gate(gate) {
        Ok(()) => Ok(link),
        Err(e) => {
            let first = link.settle();
            match first {
                Err(first) => Err(first),
                Ok(held) => {
                    close_link(Some(Link::Held(held)));
                    Err(e)
                }
            }
        }
    }
}

/// Differencing disks next to the chain that depend on it.
struct Dependents {
    /// Children of the destination or of an intermediate, outside the merged chain.
    siblings: Vec<scan::ScannedLayer>,
    /// Children of the source.
    source_children: Vec<scan::ScannedLayer>,
}

/// Scan the directories of the destination, the intermediates and the source, and the search
/// directories, for differencing disks whose parent is a layer the merge changes (siblings) or
/// the source.
fn find_dependents(chain: &Chain, d: usize, options: &MergeOptions) -> Dependents {
    let mut dirs: Vec<PathBuf> = (0..=d).map(|i| dir_of(at(chain, i).path())).collect();
    dirs.extend(options.chain.search_dirs.iter().cloned());
    let source_id = at(chain, 0).id();
    let mut parents: HashSet<Uuid> = (1..=d).map(|i| at(chain, i).id()).collect();
    parents.insert(source_id);
    let exclude: HashSet<PathBuf> = (0..d)
        .map(|i| canonical_or_self(at(chain, i).path()))
        .collect();
    let (source_children, siblings) = scan::children_in(&dirs, &parents, &exclude)
        .into_iter()
        .partition(|v| v.is_child_of(source_id));
    Dependents {
        siblings,
        source_children,
    }
}

/// Check the children the caller asked to relink: each must be a differencing disk whose
/// parent is the source.
fn check_relink(chain: &Chain, d: usize, children: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let source = at(chain, 0);
    let mut out = Vec::new();
    for child in children {
        if chain
            .layers()
            .iter()
            .any(|l| same_file(l.layer.path(), child))
        {
            return Err(Error::InvalidParameter(format!(
                "cannot relink {}: it is part of the merged chain",
                child.display()
            )));
        }
        let Some(v) = scan::peek_layer(child) else {
            return Err(Error::InvalidParameter(format!(
                "cannot relink {}: not a readable VHD or VHDX file",
                child.display()
            )));
        };
        let Some(&parent) = v.parent_ids.first() else {
            return Err(Error::InvalidParameter(format!(
                "cannot relink {}: it is a {} disk, not a differencing one",
                child.display(),
                v.kind.name()
            )));
        };
        if v.is_child_of(source.id()) {
            out.push(child.clone());
            continue;
        }
        if let Some(i) = (1..d).find(|&i| v.is_child_of(at(chain, i).id())) {
            return Err(Error::InvalidParameter(format!(
                "cannot relink {}: its parent is the intermediate {}, not the source. Its sectors that {} lacks come from the intermediate, which the destination does not reproduce after the merge (the destination takes the source's view), so re-pointing it at the destination would change its content. Merge it into {} separately instead",
                child.display(),
                at(chain, i).path().display(),
                child.display(),
                at(chain, d).path().display()
            )));
        }
        if v.is_child_of(at(chain, d).id()) {
            return Err(Error::InvalidParameter(format!(
                "cannot relink {}: it is already a child of the destination (a sibling of the merged chain, whose content the merge changes)",
                child.display()
            )));
        }
        return Err(Error::InvalidParameter(format!(
            "cannot relink {}: its parent ({parent}) is not the source {} ({})",
            child.display(),
            source.path().display(),
            source.id()
        )));
    }
    Ok(out)
}

/// Re-point `child` (a child of the source) at `destination`. With `check_only`, only check
/// that it can be done (the child opens for writing and nobody holds it locked), before the
/// merge writes anything.
///
/// The child's view does not change: its sectors come first, then the source's view, which
/// the destination holds after the merge. The destination's unique id differs from the
/// source's, so this is set-parent with the id mismatch accepted (Hyper-V's
/// `IgnoreIdMismatch`).
fn relink_child(child: &Path, destination: &Path, check_only: bool) -> Result<()> {
    if check_only {
        return open_layer_for_writing(child, OpenOptions::writable()).map(drop);
    }
    let opts = crate::setparent::SetParentOptions {
        force: true,
        ..crate::setparent::SetParentOptions::default()
    };
    crate::setparent::set_parent(child, destination, &opts).map(|_| ())
}

/// Memory for unit buffers in flight between the reader and the writer (at least two buffers).
const PIPELINE_BYTES: u64 = 16 << 20;

/// A unit assembled by the reader thread.
struct Assembled {
    unit: u64,
    buf: Vec<u8>,
    mask: SectorBitmap,
    crc: Option<u32>,
    /// The unit can be cloned from this layer's pieces (see [`clone_candidate`]).
    clone: Option<(usize, Vec<Piece>)>,
    /// The unit is mostly this layer's piece, the sectors it provides (see
    /// [`mostly_candidate`]); `buf` and `mask` hold the whole unit.
    mostly: Option<(usize, Piece, SectorBitmap)>,
    /// `buf` and `mask` hold the unit (false for a clone candidate that was not read).
    read: bool,
}

/// What [`copy_units`] wrote: bytes of merged sectors, and how many of them were cloned.
#[derive(Clone, Copy, Debug, Default)]
struct Copied {
    bytes: u64,
    cloned: u64,
}

/// The writer's count of what it placed ([`Copied`]) together with the job's progress
/// tracker, advanced by the same amounts: one value, so that the two cannot drift apart.
struct Placed<'t> {
    tracker: &'t Tracker,
    copied: Copied,
}

impl Placed<'_> {
    /// `bytes` more merged bytes placed, `cloned` of them by cloning.
    fn add(&mut self, bytes: u64, cloned: u64) {
        self.copied.bytes += bytes;
        self.copied.cloned += cloned;
        self.tracker.advance(bytes);
    }
}

/// Copy every unit of `plan` into `dest` in batches; returns the bytes of merged sectors.
///
/// A reader thread assembles units (plan_span + read_plan: reads of the merged layers, and the
/// CRC for verify) while this thread writes them, so reading and writing overlap on two cores.
/// A fixed set of buffers circulates between the two, bounding memory whatever the size.
/// With [`MergeOptions::clone`], a unit one layer wholly provides is not read but cloned
/// (see [`clone_unit`]), until the destination says it never can.
fn copy_units(
    chain: &Chain,
    plan: &MergePlan,
    dest: &mut dyn LayerWriter,
    options: &MergeOptions,
    tracker: &Tracker,
    crcs: &mut Option<Vec<u32>>,
    exposed_end: bool,
) -> Result<Copied> {
    let buffers = (PIPELINE_BYTES / plan.unit_bytes).clamp(2, 4) as usize;
    let want_crc = crcs.is_some();
    let cloning = AtomicBool::new(options.clone);
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = mpsc::sync_channel::<Result<Vec<Assembled>>>(buffers);
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..buffers {
            // The receiver is alive: it is dropped only by the reader below.
            let _ = free_tx.send(vec![0u8; plan.unit_bytes as usize]);
        }
        let cloning = &cloning;
        scope.spawn(move || {
            let mut scratch = Vec::new();
            // Unread clone candidates, sent together (see [`CLONE_MESSAGE`]), and the pool
            // buffer they did not use.
            let mut unread: Vec<Assembled> = Vec::new();
            let mut spare: Option<Vec<u8>> = None;
            for unit in plan.unit_indices() {
                // Both channels fail only when the writer stopped: then stop too.
                let Some(buf) = spare.take().or_else(|| free_rx.recv().ok()) else {
                    return;
                };
                let try_clone = cloning.load(Ordering::Relaxed);
                let item = read_unit(chain, plan, unit, buf, &mut scratch, try_clone, want_crc);
                let mut item = match item {
                    Ok(item) => item,
                    Err(e) => {
                        let _ = full_tx.send(Ok(std::mem::take(&mut unread)));
                        let _ = full_tx.send(Err(e));
                        return;
                    }
                };
                if !item.read {
                    spare = Some(std::mem::take(&mut item.buf));
                    unread.push(item);
                    if unread.len() < CLONE_MESSAGE {
                        continue;
                    }
                } else if !unread.is_empty() {
                    if full_tx.send(Ok(std::mem::take(&mut unread))).is_err() {
                        return;
                    }
                    unread.push(item);
                } else {
                    unread.push(item);
                }
                if full_tx.send(Ok(std::mem::take(&mut unread))).is_err() {
                    return;
                }
            }
            let _ = full_tx.send(Ok(unread));
        });
        let pipe = Pipe {
            full_rx: &full_rx,
            free_tx: &free_tx,
            received: Default::default(),
            spare: Default::default(),
            cloning,
            unaligned: std::cell::Cell::new(0),
            proven: std::cell::Cell::new(false),
            exposed_end,
        };
        write_units(chain, plan, dest, options, tracker, crcs, &pipe)
        // Dropping the channel ends here stop the reader if the writer stopped early.
    })
}

/// The reader side of [`copy_units`] for one unit: plan its span; a clone candidate (when
/// cloning) is read only when verify needs its CRC.
fn read_unit(
    chain: &Chain,
    plan: &MergePlan,
    unit: u64,
    mut buf: Vec<u8>,
    scratch: &mut Vec<u8>,
    try_clone: bool,
    want_crc: bool,
) -> Result<Assembled> {
    let (ss, unit_sectors) = (
        plan.sector_bytes,
        (plan.unit_bytes / plan.sector_bytes) as usize,
    );
    let (start, n) = plan.unit_span(unit);
    let span = chain.plan_span(0..plan.destination_index, start, n)?;
    let clone = try_clone
        .then(|| clone_candidate(&span))
        .flatten()
        .map(|s| (s.layer, s.pieces.clone()));
    let mostly = try_clone
        .then(|| mostly_candidate(&span))
        .flatten()
        .map(|s| (s.layer, s.pieces[0], s.claimed.clone()));
    let read = clone.is_none() || want_crc;
    let mask = if read {
        assemble_span(chain, &span, &mut buf, scratch, ss as usize, unit_sectors)?
    } else {
        SectorBitmap::new(unit_sectors)
    };
    let crc = want_crc.then(|| masked_crc(&buf, &mask, ss));
    Ok(Assembled {
        unit,
        buf,
        mask,
        crc,
        clone,
        mostly,
        read,
    })
}

/// The channel ends the writer side of [`copy_units`] uses, and the switch that turns
/// cloning off for the reader once the destination says it never works.
struct Pipe<'a> {
    full_rx: &'a mpsc::Receiver<Result<Vec<Assembled>>>,
    free_tx: &'a mpsc::Sender<Vec<u8>>,
    /// Units received and not taken yet ([`Pipe::next`]), in order.
    received: std::cell::RefCell<std::collections::VecDeque<Assembled>>,
    /// A buffer for unread units that end up written (allocated when first needed): their
    /// pool buffer stayed with the reader.
    spare: std::cell::Cell<Vec<u8>>,
    cloning: &'a AtomicBool,
    /// Clone candidates refused as unaligned in a row: files whose data is not 4 KiB aligned
    /// (qemu-img's VHDs) refuse every unit, and a skipped read done by the writer costs the
    /// pipeline its overlap, so cloning stops after [`UNALIGNED_STREAK`] of them.
    unaligned: std::cell::Cell<u32>,
    /// A clone has worked in this merge. Until one has, at most [`UNPROVEN_HOLD`] candidates
    /// are held: on a file system without cloning the first refusal then turns cloning off
    /// before a whole batch of unread units piles up for the writer to read alone (which
    /// costs the pipeline its overlap: 2.4x the time of `--no-clone` on ext4).
    proven: std::cell::Cell<bool>,
    /// The last batch's commit stops once its changes are durably exposed
    /// ([`LayerWriter::commit_exposed`]; the caller finishes the destination).
    exposed_end: bool,
}

/// See [`Pipe::proven`].
const UNPROVEN_HOLD: usize = 8;

/// See [`Pipe::unaligned`].
const UNALIGNED_STREAK: u32 = 8;

/// Clone candidates the reader did not read (no buffer) go to the writer in messages of up
/// to this many units: one channel hand-over (and thread wake-up) per unit cost more than
/// the clones themselves (1 GiB of 2 MiB blocks: about 900 context switches before).
const CLONE_MESSAGE: usize = 64;

impl Pipe<'_> {
    /// The next unit from the reader.
    fn next(&self) -> Result<Assembled> {
        let mut received = self.received.borrow_mut();
        while received.is_empty() {
            let units = self
                .full_rx
                .recv()
                .map_err(|_| Error::InvalidState("the merge reader thread stopped".into()))??;
            received.extend(units);
        }
        received
            .pop_front()
            .ok_or_else(|| Error::InvalidState("the merge reader sent no unit".into()))
    }

    /// Give `item`'s buffer back: to the reader's pool, or to [`Pipe::spare`] when it is
    /// the spare (an unread unit's).
    fn give_back(&self, item: Assembled) {
        if item.read {
            let _ = self.free_tx.send(item.buf);
        } else if !item.buf.is_empty() {
            self.spare.set(item.buf);
        }
    }

    /// A unit buffer for an unread unit `item` that has to be written after all.
    fn lend_spare(&self, item: &mut Assembled, unit_bytes: u64) {
        if item.buf.is_empty() {
            let mut buf = self.spare.take();
            buf.resize(unit_bytes as usize, 0);
            item.buf = buf;
        }
    }

    /// Whether a clone's outcome `r` is [`CloneOutcome::Cloned`]; otherwise turn cloning off
    /// when the destination says it never works (or after [`UNALIGNED_STREAK`] unaligned
    /// refusals in a row).
    fn cloned(&self, r: CloneOutcome) -> bool {
        match r {
            CloneOutcome::Cloned => {
                self.unaligned.set(0);
                self.proven.set(true);
                return true;
            }
            CloneOutcome::Unsupported => self.cloning.store(false, Ordering::Relaxed),
            CloneOutcome::Unaligned => {
                self.unaligned.set(self.unaligned.get() + 1);
                if self.unaligned.get() >= UNALIGNED_STREAK {
                    self.cloning.store(false, Ordering::Relaxed);
                }
            }
        }
        false
    }
}

/// The writer side of [`copy_units`]: batches of units, each batch reserved, written and
/// committed.
fn write_units(
    chain: &Chain,
    plan: &MergePlan,
    dest: &mut dyn LayerWriter,
    options: &MergeOptions,
    tracker: &Tracker,
    crcs: &mut Option<Vec<u32>>,
    pipe: &Pipe<'_>,
) -> Result<Copied> {
    let batch_units = (options.batch_bytes / plan.unit_bytes).max(1) as usize;
    let mut units = plan.unit_indices().peekable();
    let mut batch: Vec<u64> = Vec::with_capacity(batch_units.min(4096));
    let mut done = Placed {
        tracker,
        copied: Copied::default(),
    };
    let mut scratch = Vec::new();
    let mut held = HeldClones::default();
    loop {
        batch.clear();
        batch.extend(units.by_ref().take(batch_units));
        if batch.is_empty() {
            break;
        }
        dest.reserve(new_blocks(plan, dest, &batch))?;
        for &unit in &batch {
            if tracker.cancelled() {
                return Err(cancelled(plan, dest, &done.copied));
            }
            let mut item = pipe.next()?;
            if item.unit != unit {
                return Err(Error::InvalidState(format!(
                    "merge reader sent unit {} where {unit} was expected",
                    item.unit
                )));
            }
            if let (Some(c), Some(crc)) = (crcs.as_mut(), item.crc) {
                c.push(crc);
            }
            if held.hold(chain, plan, &mut item, pipe) {
                pipe.give_back(item);
                continue;
            }
            if !held.place(chain, plan, dest, &mut scratch, pipe, &mut done)? {
                return Err(cancelled(plan, dest, &done.copied));
            }
            let (bytes, cloned) = place_unit(chain, plan, dest, &mut item, &mut scratch, pipe)?;
            pipe.give_back(item);
            done.add(bytes, cloned);
        }
        if !held.place(chain, plan, dest, &mut scratch, pipe, &mut done)? {
            return Err(cancelled(plan, dest, &done.copied));
        }
        if pipe.exposed_end && units.peek().is_none() {
            dest.commit_exposed()?;
        } else {
            dest.commit()?;
        }
    }
    Ok(done.copied)
}

/// The error of a merge an interrupt stopped, after committing what it wrote (`finish`).
fn cancelled(plan: &MergePlan, dest: &mut dyn LayerWriter, done: &Copied) -> Error {
    if let Err(e) = dest.finish() {
        return e;
    }
    Error::Cancelled(format!(
        "merge into {} stopped after {} of {} bytes; what was written is committed and running the same merge again finishes it",
        dest.path().display(),
        done.bytes,
        plan.bytes_total
    ))
}

/// Clone candidate units received and not placed yet: placed together by one
/// [`LayerWriter::clone_run`], so that units whose bytes are contiguous in both files cost
/// one clone call for the whole stretch (the destination decides; the engine sees no file
/// offset). Held only within a batch: placed before its commit and before any other unit
/// is written, so units are placed in order and the cloned data is synced by the commit
/// before any table entry points at it, as for one unit. A unit held when the merge stops
/// (cancel, error) is not placed: nothing points at it.
#[derive(Default)]
struct HeldClones<'c> {
    units: Vec<HeldUnit>,
    pieces: Vec<ClonePiece<'c>>,
    /// A unit buffer for held units that end up written (allocated when first needed).
    buf: Vec<u8>,
}

/// A unit of [`HeldClones`]: the layer that provides it, its pieces, and where they end in
/// [`HeldClones::pieces`].
struct HeldUnit {
    unit: u64,
    layer: usize,
    pieces: Vec<Piece>,
    end: usize,
}

impl<'c> HeldClones<'c> {
    /// Hold `item` when it is a clone candidate, while cloning is on (and, until a clone has
    /// worked, up to [`UNPROVEN_HOLD`] units: [`Pipe::proven`]; its buffer is then free: a held
    /// unit that does not clone is read again); false leaves it to the caller.
    fn hold(
        &mut self,
        chain: &'c Chain,
        plan: &MergePlan,
        item: &mut Assembled,
        pipe: &Pipe<'_>,
    ) -> bool {
        if !pipe.cloning.load(Ordering::Relaxed)
            || (!pipe.proven.get() && self.units.len() >= UNPROVEN_HOLD)
        {
            return false;
        }
        let Some((layer, pieces)) = item.clone.take() else {
            return false;
        };
        let (block, first) = plan.unit_place(item.unit);
        if !clone_pieces(at(chain, layer), block, first, &pieces, &mut self.pieces) {
            item.clone = Some((layer, pieces));
            return false;
        }
        let end = self.pieces.len();
        let unit = item.unit;
        self.units.push(HeldUnit {
            unit,
            layer,
            pieces,
            end,
        });
        true
    }

    /// Place the held units with one [`LayerWriter::clone_run`]. From the unit it stopped in
    /// on, units go in as they would have without holding, one by one ([`place_unit`]: a
    /// clone of the unit's own pieces, written when that does not work, over any of its
    /// pieces already cloned: the same bytes). A stretch refused as unaligned says nothing
    /// about its units alone, so only their own refusals count towards giving up; a refusal
    /// for good turns cloning off first, and they are written. Adds the merged bytes placed
    /// (and how many were cloned) to `done`, count and progress; false when an interrupt
    /// stopped it before a unit it had to write (units not placed are not pointed at).
    fn place(
        &mut self,
        chain: &Chain,
        plan: &MergePlan,
        dest: &mut dyn LayerWriter,
        scratch: &mut Vec<u8>,
        pipe: &Pipe<'_>,
        done: &mut Placed<'_>,
    ) -> Result<bool> {
        if self.units.is_empty() {
            return Ok(true);
        }
        let (placed, r) = dest.clone_run(&self.pieces)?;
        self.pieces.clear();
        if r == CloneOutcome::Unsupported {
            pipe.cloned(r);
        }
        for u in std::mem::take(&mut self.units) {
            if u.end <= placed {
                let sectors: usize = u.pieces.iter().map(|p| p.len).sum();
                let bytes = sectors as u64 * plan.sector_bytes;
                pipe.cloned(CloneOutcome::Cloned);
                done.add(bytes, bytes);
                continue;
            }
            if done.tracker.cancelled() {
                return Ok(false);
            }
            self.buf.resize(plan.unit_bytes as usize, 0);
            let mut item = Assembled {
                unit: u.unit,
                buf: std::mem::take(&mut self.buf),
                mask: SectorBitmap::new(0),
                crc: None,
                clone: Some((u.layer, u.pieces)),
                mostly: None,
                read: false,
            };
            let (b, c) = place_unit(chain, plan, dest, &mut item, scratch, pipe)?;
            self.buf = item.buf;
            done.add(b, c);
        }
        Ok(true)
    }
}

/// Put one unit into the destination: cloned when it is a clone candidate and the clone
/// works, cloned whole and patched when it is a [`mostly_candidate`] that may be, otherwise
/// written (read here first if the reader skipped it). Returns its merged bytes and how many
/// of them were cloned.
fn place_unit(
    chain: &Chain,
    plan: &MergePlan,
    dest: &mut dyn LayerWriter,
    item: &mut Assembled,
    scratch: &mut Vec<u8>,
    pipe: &Pipe<'_>,
) -> Result<(u64, u64)> {
    let (block, first) = plan.unit_place(item.unit);
    if let Some((layer, pieces)) = &item.clone
        && pipe.cloning.load(Ordering::Relaxed)
    {
        let r = clone_unit(at(chain, *layer), dest, block, first, pieces)?;
        if pipe.cloned(r) {
            let sectors: usize = pieces.iter().map(|p| p.len).sum();
            let bytes = sectors as u64 * plan.sector_bytes;
            return Ok((bytes, bytes));
        }
    }
    if let Some(cloned) = clone_and_patch(chain, plan, dest, item, pipe)? {
        return Ok((item.mask.count_ones() as u64 * plan.sector_bytes, cloned));
    }
    if !item.read {
        pipe.lend_spare(item, plan.unit_bytes);
        item.mask = assemble_unit(chain, plan, item.unit, &mut item.buf, scratch)?;
    }
    // The destination's last block may be short (its virtual size ends inside it): only the
    // unit's sectors inside the merged extent are handed over.
    let n = plan.unit_span(item.unit).1;
    if n < item.mask.len() {
        let mut mask = SectorBitmap::new(n);
        mask.copy_bits_from(0, &item.mask, 0, n);
        let bytes = n * plan.sector_bytes as usize;
        dest.write_sectors(block, first, &mut item.buf[..bytes], &mask)?;
    } else {
        dest.write_sectors(block, first, &mut item.buf, &item.mask)?;
    }
    Ok((item.mask.count_ones() as u64 * plan.sector_bytes, 0))
}

/// A [`mostly_candidate`] unit, where [`patch_after_clone_allowed`]: clone the layer's whole
/// piece, then write the unit's other sectors over it (the other layers' data and the zeros
/// the merge decides from `item`, zeros where it decides nothing: the new block's content).
/// Both are data of a block nothing points at before the batch's commit. Returns the bytes
/// cloned, or None when the unit is not such a candidate or the clone did not work (nothing
/// written; the caller writes the unit).
fn clone_and_patch(
    chain: &Chain,
    plan: &MergePlan,
    dest: &mut dyn LayerWriter,
    item: &mut Assembled,
    pipe: &Pipe<'_>,
) -> Result<Option<u64>> {
    let (block, first) = plan.unit_place(item.unit);
    let Some((layer, piece, claimed)) = &item.mostly else {
        return Ok(None);
    };
    let allowed = patch_after_clone_allowed(plan.destination_type, dest.needs_allocation(block));
    if !allowed || !pipe.cloning.load(Ordering::Relaxed) || claimed.len() != item.mask.len() {
        return Ok(None);
    }
    let r = clone_unit(
        at(chain, *layer),
        dest,
        block,
        first,
        std::slice::from_ref(piece),
    )?;
    if !pipe.cloned(r) {
        return Ok(None);
    }
    let ss = plan.sector_bytes as usize;
    for r in item.mask.runs_in(0..item.mask.len(), false) {
        item.buf[r.start * ss..r.end * ss].fill(0);
    }
    let mut patch = SectorBitmap::full(claimed.len());
    patch.and_not(claimed);
    dest.write_sectors(block, first, &mut item.buf, &patch)?;
    Ok(Some(claimed.count_ones() as u64 * plan.sector_bytes))
}

/// Clone a unit whose every sector `layer` provides (one piece per layer block) into
/// destination `block` from sector `first` on, with one [`LayerWriter::clone_run`]. When it
/// does not clone whole, the caller writes the whole unit, over any pieces already cloned
/// (the same bytes).
fn clone_unit(
    layer: &dyn Layer,
    dest: &mut dyn LayerWriter,
    block: u64,
    first: u64,
    pieces: &[Piece],
) -> Result<CloneOutcome> {
    let mut clones = Vec::with_capacity(pieces.len());
    if !clone_pieces(layer, block, first, pieces, &mut clones) {
        return Ok(CloneOutcome::Unsupported);
    }
    Ok(dest.clone_run(&clones)?.1)
}

/// Append to `out` the clones that put `pieces` of `layer` into destination `block` from
/// sector `first` on. False, with `out` as it was, when a piece's bytes cannot be a clone
/// source.
fn clone_pieces<'c>(
    layer: &'c dyn Layer,
    block: u64,
    first: u64,
    pieces: &[Piece],
    out: &mut Vec<ClonePiece<'c>>,
) -> bool {
    let start = out.len();
    for p in pieces {
        let Some(src) = layer.clone_source(p.block, p.first_in_block, p.len as u64) else {
            out.truncate(start);
            return false;
        };
        let first = first + p.first as u64;
        out.push(ClonePiece { block, first, src });
    }
    true
}

/// The destination blocks that units `batch` (ascending) allocate: each block once, however
/// many of its parts are in the batch.
fn new_blocks(plan: &MergePlan, dest: &dyn LayerWriter, batch: &[u64]) -> u64 {
    let mut last = None;
    let mut n = 0;
    for &u in batch {
        let (block, _) = plan.unit_place(u);
        if last != Some(block) && dest.needs_allocation(block) {
            n += 1;
        }
        last = Some(block);
    }
    n
}

/// Read every merged unit back through the destination's chain (a fresh read-only open of the
/// destination over the same ancestors) and compare CRC32s with those of the source's view.
fn verify(
    chain: Chain,
    plan: &MergePlan,
    dest_path: &Path,
    options: &MergeOptions,
    crcs: &[u32],
) -> Result<VerifyReport> {
    let d = plan.destination_index;
    let mut layers = chain.into_layers();
    let fresh = open_layer(
        dest_path,
        OpenOptions {
            writable: false,
            lenient: options.chain.lenient,
            size_rule: options.chain.size_rule,
        },
    )?;
    if let Some(l) = layers.get_mut(d) {
        l.layer = fresh;
    }
    let chain = Chain::from_layers(layers);
    let mut buf = vec![0u8; plan.unit_bytes as usize];
    let mut bytes = 0u64;
    let mut bad = Vec::new();
    // CRCs were recorded in plan order, one per unit.
    if crcs.len() as u64 != plan.units {
        return Err(Error::InvalidState(format!(
            "verify: {} CRCs recorded for {} units",
            crcs.len(),
            plan.units
        )));
    }
    for (unit, &want) in plan.unit_indices().zip(crcs) {
        let (got, mask) = read_assembled(&chain, plan, unit, &mut buf)?;
        bytes += mask.count_ones() as u64 * plan.sector_bytes;
        if got != want {
            let (start, n) = plan.unit_span(unit);
            bad.push(format!(
                "\n  bytes {}..{} (unit {unit}): source CRC32 {want:#010x}, destination {got:#010x}",
                start * plan.sector_bytes,
                (start + n as u64) * plan.sector_bytes
            ));
        }
    }
    if !bad.is_empty() {
        let n = bad.len();
        bad.truncate(20);
        return Err(Error::VerifyFailed(format!(
            "verify: {n} merged range(s) of {} differ from the source's view:{}{}",
            dest_path.display(),
            bad.concat(),
            if n > 20 { "\n  ..." } else { "" }
        )));
    }
    Ok(VerifyReport {
        units: crcs.len() as u64,
        bytes,
    })
}

/// Make the removal of files durable (best effort: not every platform syncs directories).
fn sync_dirs(files: &[PathBuf]) {
    let dirs: HashSet<PathBuf> = files.iter().map(|p| dir_of(p)).collect();
    for d in dirs {
        if let Ok(f) = std::fs::File::open(&d) {
            let _ = f.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::BlockState;
    use crate::mem_layer::{MemLayer, chain_of};

    const MIB: u64 = 1 << 20;

    /// Two parts of one 64 MiB destination block are written where they belong, by
    /// write_sectors at their first sector in the block, and nothing else is.
    #[test]
    fn parts_of_a_large_block_are_written_in_place() {
        let child = MemLayer::new("c", DiskKind::Differencing, 128 * MIB, 512, MIB)
            .present(10, None, 10)
            .present(40, None, 40);
        let dest = || MemLayer::new("d", DiskKind::Dynamic, 128 * MIB, 512, 64 * MIB);
        let chain = chain_of(vec![child, dest()]);
        let plan = MergePlan::build(&chain, 1).unwrap();
        let units = vec![
            10 * MIB / crate::merge::MAX_UNIT_BYTES,
            40 * MIB / crate::merge::MAX_UNIT_BYTES,
        ];
        assert!(
            units[0] != units[1],
            "the test wants two units of one block"
        );
        assert_eq!(plan.unit_indices().collect::<Vec<_>>(), units);
        let options = MergeOptions::default();
        let tracker = Tracker::new(None, &options);
        let mut out = dest();
        let done = copy_units(
            &chain, &plan, &mut out, &options, &tracker, &mut None, false,
        )
        .unwrap();
        assert_eq!((done.bytes, done.cloned), (2 * MIB, 0));
        assert_eq!(out.blocks.len(), 1);
        let (BlockState::Present(Some(bm)), data) = &out.blocks[&0] else {
            panic!("block 0 should hold a bitmap");
        };
        let s = |mib: u64| (mib * MIB / 512) as usize;
        assert_eq!(
            bm.runs().collect::<Vec<_>>(),
            vec![s(10)..s(11), s(40)..s(41)]
        );
        let at = |mib: u64| (mib * MIB) as usize;
        assert!(data[at(10)..at(11)].iter().all(|&b| b == 10));
        assert!(data[at(40)..at(41)].iter().all(|&b| b == 40));
        assert!(data[at(11)..at(40)].iter().all(|&b| b == 0));
    }
}
