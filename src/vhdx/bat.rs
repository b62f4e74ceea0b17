//! The BAT of an open VHDX, read on demand so that memory stays bounded whatever the table's
//! size (a 64 TiB disk with 1 MiB blocks has a 512 MiB BAT).
//!
//! Opening streams the table once, in pieces of up to 1 MiB, skipping the file's holes
//! ([`crate::io::Storage::next_data`]: a hole reads as NOT_PRESENT entries), to validate every entry and to
//! note which payload blocks are mapped (one bit per block: 8 MiB for that 64 TiB disk).
//! Afterwards entries are read a chunk at a time through a small cache of at most
//! [`CACHE_CHUNKS`] chunks. A write session's changes are kept as whole 4 KiB pages (the unit
//! the log writes) on top of the file until they are published.

use std::collections::BTreeMap;

use super::format::bat::{BatEntry, EntryKind, Geometry, PayloadState};
use super::format::log::PAGE;
use super::reader::Overlay;
use crate::io::Storage;
use crate::io::paged::{CHUNK, ChunkCache};
use crate::{Error, Result};

/// Chunks the cache holds before it starts over (16 MiB).
const CACHE_CHUNKS: usize = 256;

/// The BAT region of an open file, as it reads with the session's changes.
#[derive(Debug)]
pub(crate) struct PagedBat {
    /// The entries the disk needs, as the file holds them.
    table: ChunkCache,
    geometry: Geometry,
    /// The session's changed 4 KiB pages, by page index: authoritative over the file.
    changed: BTreeMap<u64, Vec<u8>>,
    /// One bit per payload block: its state is not NOT_PRESENT.
    mapped: Vec<u64>,
}

impl PagedBat {
    /// Stream the table at `offset` once, calling `check` with every entry and what it
    /// describes (the caller's validation), and note the mapped payload blocks.
    pub(crate) fn load<S: Storage>(
        file: &Overlay<S>,
        offset: u64,
        geometry: Geometry,
        mut check: impl FnMut(EntryKind, BatEntry) -> Result<()>,
    ) -> Result<PagedBat> {
        let table = ChunkCache::new(offset, geometry.entries_needed() * 8, CHUNK, CACHE_CHUNKS);
        let mut mapped = vec![0u64; geometry.data_blocks().div_ceil(64) as usize];
        // All-zero entries are skipped anyway: so are the holes of a sparse table.
        table.stream_sparse(
            |o, buf| file.read_into(o, buf),
            |o| file.next_data(o),
            |at, bytes| {
                // NOT_PRESENT at offset 0 (all-zero entries): valid in every slot, and not
                // mapped. Most of a large table is this: groups of 8 such entries are
                // skipped by one OR of their bytes, which the compiler vectorizes (the
                // per-entry loop was an eighth of opening a 64 TiB child with 2 MiB blocks).
                let mut scan = |first: u64, entries: &[u8]| -> Result<()> {
                    for (j, e) in entries.chunks_exact(8).enumerate() {
                        let e = BatEntry(u64::from_le_bytes(e.try_into().unwrap_or_default()));
                        if e.0 == 0 {
                            continue;
                        }
                        let kind = geometry.entry_kind(first + j as u64);
                        check(kind, e)?;
                        if let EntryKind::Payload(i) = kind
                            && e.payload_state()? != PayloadState::NotPresent
                        {
                            mapped[(i / 64) as usize] |= 1 << (i % 64);
                        }
                    }
                    Ok(())
                };
                let groups = bytes.chunks_exact(64);
                let rest = groups.remainder();
                for (g, group) in groups.enumerate() {
                    if group.iter().fold(0, |a, &b| a | b) != 0 {
                        scan(at / 8 + g as u64 * 8, group)?;
                    }
                }
                scan(at / 8 + (bytes.len() / 64 * 8) as u64, rest)
            },
        )?;
        Ok(PagedBat {
            table,
            geometry,
            changed: BTreeMap::new(),
            mapped,
        })
    }

    /// The table at `offset` without reading it: entries are read on demand as always, but
    /// no entry was validated and no block is noted as mapped ([`PagedBat::is_mapped`] is
    /// false, [`PagedBat::mapped_blocks`] empty). Only for an open that rewrites metadata
    /// through the log and asks no block question (the reason: a child's BAT can be hundreds
    /// of MiB, streamed again by each of a merge's linkage updates).
    pub(crate) fn unscanned(offset: u64, geometry: Geometry) -> PagedBat {
        PagedBat {
            table: ChunkCache::new(offset, geometry.entries_needed() * 8, CHUNK, CACHE_CHUNKS),
            geometry,
            changed: BTreeMap::new(),
            mapped: Vec::new(),
        }
    }

    /// Entry `k` of the table.
    pub(crate) fn entry<S: Storage>(&self, file: &Overlay<S>, k: u64) -> Result<BatEntry> {
        if k.checked_mul(8).is_none_or(|b| b + 8 > self.table.len()) {
            return Err(Error::format(format!("VHDX BAT: no entry {k}")));
        }
        let page = k * 8 / PAGE as u64;
        if let Some(p) = self.changed.get(&page) {
            return Ok(entry_in(p, (k * 8 % PAGE as u64) as usize));
        }
        let b = self.table.bytes_at::<8>(k * 8, |o, n| file.read(o, n))?;
        Ok(BatEntry(u64::from_le_bytes(b)))
    }

    /// Set entry `k` in the session's pages (and the mapped bit of a payload entry).
    pub(crate) fn set<S: Storage>(&mut self, file: &Overlay<S>, k: u64, e: BatEntry) -> Result<()> {
        self.entry(file, k)?;
        let page = k * 8 / PAGE as u64;
        if !self.changed.contains_key(&page) {
            let bytes = self.page(file, page)?;
            self.changed.insert(page, bytes);
        }
        if let Some(p) = self.changed.get_mut(&page) {
            let at = (k * 8 % PAGE as u64) as usize;
            p[at..at + 8].copy_from_slice(&e.0.to_le_bytes());
        }
        if let EntryKind::Payload(i) = self.geometry.entry_kind(k) {
            let bit = 1 << (i % 64);
            match e.payload_state()? {
                PayloadState::NotPresent => self.mapped[(i / 64) as usize] &= !bit,
                _ => self.mapped[(i / 64) as usize] |= bit,
            }
        }
        Ok(())
    }

    /// The 4 KiB page `k` of the region as it must read: the session's copy, else the file's
    /// bytes (the region's last page may reach past the entries the disk needs).
    pub(crate) fn page<S: Storage>(&self, file: &Overlay<S>, k: u64) -> Result<Vec<u8>> {
        match self.changed.get(&k) {
            Some(p) => Ok(p.clone()),
            None => file.read(self.page_offset(k), PAGE as u64),
        }
    }

    /// The indices of the pages the session changed.
    pub(crate) fn changed_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.changed.keys().copied()
    }

    /// File offset of page `k`.
    pub(crate) fn page_offset(&self, k: u64) -> u64 {
        self.table.file_offset(k * PAGE as u64)
    }

    /// The changed pages are now in place in the file: read them from there again.
    pub(crate) fn published(&mut self) {
        for k in self.changed.keys() {
            let at = k * PAGE as u64;
            self.table.forget(at, at + PAGE as u64);
        }
        self.changed.clear();
    }

    /// Whether payload block `i` is mapped (its state is not NOT_PRESENT).
    pub(crate) fn is_mapped(&self, i: u64) -> bool {
        self.mapped
            .get((i / 64) as usize)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    /// The mapped payload blocks, in order; cost follows the table's size / 64 and the mapped
    /// blocks, no entry is read.
    pub(crate) fn mapped_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.mapped.iter().enumerate().flat_map(|(w, &bits)| {
            let mut bits = bits;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    w as u64 * 64 + b
                })
            })
        })
    }
}

/// The entry at byte `at` of `bytes` (in bounds: the callers checked the index).
fn entry_in(bytes: &[u8], at: usize) -> BatEntry {
    let b = bytes.get(at..at + 8).and_then(|b| b.try_into().ok());
    BatEntry(u64::from_le_bytes(b.unwrap_or_default()))
}
