//! The block allocation table of an open [`Vhd`], read on demand so that memory stays bounded
//! whatever the table's size.
//!
//! Opening streams the table once, [`STREAM`](crate::io::paged::STREAM)-byte pieces at a
//! time, keeping the indices of the allocated entries (4 bytes each) while there are at most
//! [`MAX_HELD_BLOCKS`] of them: nothing is kept per table entry, so a table of 2^32 entries
//! with a few allocated (2040 GiB at 512-byte blocks, a 16 GiB BAT) costs a few bytes. Past
//! that bound nothing is kept per allocated entry either: whether an entry is allocated is
//! read from the table, and the allocated entries are listed by reading it in order. Entries are
//! then read through the shared [`ChunkCache`], [`PAGE`] bytes at a time, at most
//! [`CACHE_PAGES`] pages (a merge asks in block order, so one page read serves 1024 blocks).
//! Entries that differ from the file are kept on top of it: those validation dropped (they
//! read as unallocated), and the blocks a write session allocated, until [`Vhd::commit`] has
//! written their BAT sectors; the allocation state of an entry that changed is kept apart
//! (one map entry per changed entry, never one per table entry).

use std::collections::BTreeMap;

#[cfg(doc)]
use super::held_blocks;
use super::{MAX_HELD_BLOCKS, Vhd};
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;
use crate::format::bat::{self, Bat};
use crate::io::paged::ChunkCache;

/// Bytes of the table read on a cache miss: 1024 entries, one file page. Sequential lookups
/// read the table a page per 1024 blocks; scattered ones (a sparse disk's few blocks) read
/// no more than they need.
const PAGE: u64 = 4096;
/// Pages of the table cached per file (1 MiB): small, as a chain holds one table per layer.
const CACHE_PAGES: usize = 256;

/// The BAT of an open file, as it reads with the entries that differ from the file's.
#[derive(Debug, Default)]
pub(super) struct Table {
    /// The entries as the file holds them (4 bytes each, big-endian).
    file: ChunkCache,
    /// Number of entries.
    len: u32,
    /// Entries that differ from the file's, by block index: dropped at open ([`bat::UNUSED`])
    /// or allocated by this session and not yet committed.
    changed: BTreeMap<u32, u32>,
    /// The indices of the entries allocated in the file at open, in increasing order, when
    /// there are at most [`held_blocks`] of them; `None` past it: whether an entry is
    /// allocated is then read from the table, as it reads with `changed` on top.
    loaded: Option<Vec<u32>>,
    /// With `loaded`, entries whose allocation differs from it: `true` allocated since,
    /// `false` unallocated since (dropped at open, for instance). Not derived from `changed`,
    /// which gives its entries back to the file at each commit ([`Table::written`]): deriving
    /// it would need `changed` to keep every entry of the session, `loaded` to be merged with
    /// each commit's new blocks, or [`Table::is_allocated`] to read the table (it reads
    /// nothing while the indices are held: `is_mapped` asks it per merge unit).
    remapped: BTreeMap<u32, bool>,
    /// Number of allocated entries.
    allocated: usize,
}

impl Table {
    /// Stream the `entries` entries at `offset` (checked against the file length and the
    /// supported size by the caller) once, counting the allocated ones and keeping their
    /// indices while there are at most `held` of them ([`held_blocks`] at open).
    pub(super) fn load(vhd: &Vhd, offset: u64, entries: u32, held: usize) -> Result<Table> {
        let file = ChunkCache::new(offset, u64::from(entries) * 4, PAGE, CACHE_PAGES);
        let mut loaded = Some(Vec::new());
        let mut allocated = 0;
        file.stream(
            |o, buf| vhd.read_raw(o, buf),
            |at, bytes| {
                for (j, e) in bytes.chunks_exact(4).enumerate() {
                    if e != [0xFF; 4] {
                        allocated += 1;
                        if allocated > held {
                            loaded = None;
                        } else if let Some(l) = &mut loaded {
                            // The table has at most u32::MAX entries: the index fits.
                            l.push((at / 4) as u32 + j as u32);
                        }
                    }
                }
                Ok(())
            },
        )?;
        if let Some(l) = &mut loaded {
            l.shrink_to_fit();
        }
        Ok(Table {
            file,
            len: entries,
            changed: BTreeMap::new(),
            loaded,
            remapped: BTreeMap::new(),
            allocated,
        })
    }

    /// Number of entries.
    pub(super) fn len(&self) -> u32 {
        self.len
    }

    /// Whether block `index` is allocated (false past the table). Reads nothing while the
    /// allocated indices are held, else the table's page holding the entry (unless cached).
    pub(super) fn is_allocated(&self, vhd: &Vhd, index: u64) -> Result<bool> {
        let Ok(i) = u32::try_from(index) else {
            return Ok(false);
        };
        match &self.loaded {
            Some(l) => Ok(match self.remapped.get(&i) {
                Some(&now) => now,
                None => l.binary_search(&i).is_ok(),
            }),
            None => Ok(self.raw(vhd, index)? != bat::UNUSED),
        }
    }

    /// Entry `index` as stored ([`bat::UNUSED`] when unallocated or past the table).
    pub(super) fn raw(&self, vhd: &Vhd, index: u64) -> Result<u32> {
        let Ok(i) = u32::try_from(index) else {
            return Ok(bat::UNUSED);
        };
        if i >= self.len {
            return Ok(bat::UNUSED);
        }
        if let Some(&e) = self.changed.get(&i) {
            return Ok(e);
        }
        let b = self
            .file
            .bytes_at::<4>(u64::from(i) * 4, |o, n| vhd.read_vec(o, n))?;
        Ok(u32::from_be_bytes(b))
    }

    /// The byte offset of block `index`'s bitmap, `None` when unallocated or past the table.
    pub(super) fn get(&self, vhd: &Vhd, index: u64) -> Result<Option<u64>> {
        if self.loaded.is_some() && !self.is_allocated(vhd, index)? {
            return Ok(None);
        }
        let e = self.raw(vhd, index)?;
        Ok((e != bat::UNUSED).then_some(u64::from(e) * SECTOR_SIZE))
    }

    /// Set entry `index` (inside the table: the caller checked) in memory until it is
    /// committed; `was` says whether it was allocated ([`Table::is_allocated`]).
    pub(super) fn set(&mut self, index: u32, entry: u32, was: bool) {
        let now = entry != bat::UNUSED;
        match (was, now) {
            (false, true) => self.allocated += 1,
            (true, false) => self.allocated -= 1,
            _ => {}
        }
        if let Some(l) = &self.loaded {
            if now == l.binary_search(&index).is_ok() {
                self.remapped.remove(&index);
            } else {
                self.remapped.insert(index, now);
            }
        }
        self.changed.insert(index, entry);
    }

    /// Entries `from..to` were written to the file as they read now: read them from there.
    pub(super) fn written(&mut self, from: u32, to: u32) {
        let kept = self.changed.split_off(&to);
        self.changed.retain(|&k, _| k < from);
        self.changed.extend(kept);
        self.file.forget(u64::from(from) * 4, u64::from(to) * 4);
    }

    /// Number of allocated entries.
    pub(super) fn allocated(&self) -> usize {
        self.allocated
    }

    /// The indices of the allocated blocks, in order, while they are held (reads nothing):
    /// those allocated at open and still allocated, merged with those allocated since.
    fn held_blocks<'a>(&'a self, loaded: &'a [u32]) -> impl Iterator<Item = u64> + 'a {
        let mut kept = loaded
            .iter()
            .copied()
            .filter(|i| !self.remapped.contains_key(i))
            .peekable();
        let mut added = self
            .remapped
            .iter()
            .filter(|e| *e.1)
            .map(|e| *e.0)
            .peekable();
        std::iter::from_fn(move || match (kept.peek(), added.peek()) {
            (Some(k), Some(a)) if a < k => added.next(),
            (Some(_), _) => kept.next(),
            (None, _) => added.next(),
        })
        .map(u64::from)
    }

    /// The allocated entries in block order: (block index, byte offset of its bitmap). While
    /// the allocated indices are held, only their entries are read; past that, the whole
    /// table, a cached page at a time.
    pub(super) fn allocated_entries<'a>(
        &'a self,
        vhd: &'a Vhd,
    ) -> Box<dyn Iterator<Item = Result<(u64, u64)>> + 'a> {
        match &self.loaded {
            Some(l) => Box::new(
                self.held_blocks(l)
                    .map(move |i| Ok((i, u64::from(self.raw(vhd, i)?) * SECTOR_SIZE))),
            ),
            None => Box::new(self.scanned_entries(vhd)),
        }
    }

    /// [`Table::allocated_entries`], pushed to `each`: past the held indices, the table is
    /// streamed in [`STREAM`](crate::io::paged::STREAM)-byte pieces past the cache (the
    /// passes of validation's windowed sweep), with the changes on top.
    pub(super) fn for_each_allocated(
        &self,
        vhd: &Vhd,
        each: &mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        if self.loaded.is_some() {
            return self.allocated_entries(vhd).try_for_each(|e| {
                let (i, at) = e?;
                each(i, at)
            });
        }
        self.file.stream(
            |o, buf| vhd.read_raw(o, buf),
            |at, bytes| {
                for (j, raw) in bytes.chunks_exact(4).enumerate() {
                    let i = at / 4 + j as u64;
                    let mut b = [0u8; 4];
                    b.copy_from_slice(raw);
                    let e = match self.changed.get(&(i as u32)) {
                        Some(&e) => e,
                        None => u32::from_be_bytes(b),
                    };
                    if e != bat::UNUSED {
                        each(i, u64::from(e) * SECTOR_SIZE)?;
                    }
                }
                Ok(())
            },
        )
    }

    /// The allocated entries, page by page through the cache, with the changes on top.
    fn scanned_entries<'a>(
        &'a self,
        vhd: &'a Vhd,
    ) -> impl Iterator<Item = Result<(u64, u64)>> + 'a {
        let pages = (u64::from(self.len) * 4).div_ceil(PAGE);
        (0..pages).flat_map(move |p| {
            let first = p * PAGE / 4;
            let entries: Box<dyn Iterator<Item = Result<(u64, u64)>>> =
                match self.file.chunk(p, |o, n| vhd.read_vec(o, n)) {
                    Err(e) => Box::new(std::iter::once(Err(e))),
                    Ok(page) => Box::new((0..page.len() / 4).filter_map(move |j| {
                        let i = first + j as u64;
                        let mut b = [0u8; 4];
                        b.copy_from_slice(&page[j * 4..j * 4 + 4]);
                        let e = match self.changed.get(&(i as u32)) {
                            Some(&e) => e,
                            None => u32::from_be_bytes(b),
                        };
                        (e != bat::UNUSED).then(|| Ok((i, u64::from(e) * SECTOR_SIZE)))
                    })),
                };
            entries
        })
    }

    /// The whole table in memory (4 bytes per entry), refused past [`MAX_HELD_BLOCKS`]
    /// entries (16 MiB): a larger table is only read through [`Table::get`].
    pub(super) fn to_bat(&self, vhd: &Vhd) -> Result<Bat> {
        if self.len as usize > MAX_HELD_BLOCKS {
            return Err(Error::not_supported(format!(
                "the BAT has {} entries; building it whole in memory is supported up to {MAX_HELD_BLOCKS}",
                self.len
            )));
        }
        let mut entries = Vec::new();
        entries
            .try_reserve_exact(self.len as usize)
            .map_err(|_| Error::io("building the BAT", std::io::ErrorKind::OutOfMemory.into()))?;
        for i in 0..u64::from(self.len) {
            entries.push(match self.is_allocated(vhd, i)? {
                true => self.raw(vhd, i)?,
                false => bat::UNUSED,
            });
        }
        Ok(Bat { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::OpenOptions;

    #[test]
    fn paged_table_answers_like_the_full_one_and_keeps_changes_on_top() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vhd");
        let mut v =
            crate::create::create_dynamic(&p, 64 << 20, &crate::create::CreateOptions::default())
                .unwrap();
        for b in [0u64, 5, 6, 31] {
            v.write_at(b * (2 << 20) + 512, &[7; 512]).unwrap();
        }
        drop(v);
        let ro = Vhd::open(&p, OpenOptions::read_only()).unwrap();
        let full = ro.bat().unwrap();
        assert_eq!(full.entries.len(), 32);
        for i in 0..40 {
            assert_eq!(
                ro.block_offset(i).unwrap(),
                full.block_offset(i),
                "block {i}"
            );
            assert_eq!(ro.is_allocated(i).unwrap(), full.block_offset(i).is_some());
        }
        let entries: Vec<(u64, u64)> = ro.allocated_entries().map(|e| e.unwrap()).collect();
        assert_eq!(
            entries.iter().map(|e| e.0).collect::<Vec<_>>(),
            [0, 5, 6, 31]
        );
        assert_eq!(entries[1].1, full.block_offset(5).unwrap());
        assert_eq!(ro.allocated_blocks(), 4);

        let mut t = Table::load(&ro, ro.header().unwrap().table_offset, 32, 64).unwrap();
        t.set(1, 99, false);
        t.set(5, bat::UNUSED, true);
        assert_eq!(t.get(&ro, 1).unwrap(), Some(99 * 512));
        assert_eq!(t.get(&ro, 5).unwrap(), None);
        assert_eq!(t.get(&ro, 6).unwrap(), full.block_offset(6));
        assert_eq!(t.allocated(), 4);
        let listed =
            |t: &Table| -> Vec<u64> { t.allocated_entries(&ro).map(|e| e.unwrap().0).collect() };
        assert_eq!(listed(&t), [0, 1, 6, 31]);
        t.written(0, 2);
        assert_eq!(
            t.changed.keys().collect::<Vec<_>>(),
            [&5],
            "1 now reads from the file"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, .. Default::default() })]

        /// Any sequence of entry changes and writes reads like a plain vector of entries:
        /// allocation, the allocated count and the allocated blocks in order, whether an
        /// entry was allocated at open or not.
        #[test]
        fn changes_on_top_read_like_a_plain_table(
            held in proptest::prop_oneof![proptest::strategy::Just(0usize), proptest::strategy::Just(64)],
            at_open in proptest::collection::vec(0u64..48, 0..12),
            ops in proptest::collection::vec((0u32..48, proptest::option::of(1u32..1000), proptest::bool::ANY), 0..40),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("d.vhd");
            let o = crate::create::CreateOptions { block_size: 512, ..Default::default() };
            let mut v = crate::create::create_dynamic(&p, 48 * 512, &o).unwrap();
            for &b in &at_open {
                v.write_at(b * 512, &[1; 512]).unwrap();
            }
            drop(v);
            let ro = Vhd::open(&p, OpenOptions::read_only()).unwrap();
            // Held indices (64) or none (0: every allocated entry read from the table).
            let mut t = Table::load(&ro, ro.header().unwrap().table_offset, 48, held).unwrap();
            let mut model: Vec<Option<u32>> = (0..48u64).map(|i| t.raw(&ro, i).ok().filter(|&e| e != bat::UNUSED)).collect();
            for (i, e, write) in ops {
                let was = t.is_allocated(&ro, u64::from(i)).unwrap();
                t.set(i, e.unwrap_or(bat::UNUSED), was);
                model[i as usize] = e;
                if write && held > 0 {
                    // What commit does: the file now holds the entries; here nothing is
                    // written, so only the allocation state is compared afterwards.
                    t.changed.clear();
                }
                let want: Vec<u64> = (0..48).filter(|&i| model[i as usize].is_some()).collect();
                let listed: Vec<u64> = t.allocated_entries(&ro).map(|e| e.unwrap().0).collect();
                proptest::prop_assert_eq!(listed, want.clone());
                proptest::prop_assert_eq!(t.allocated(), want.len());
                for i in 0..50u64 {
                    proptest::prop_assert_eq!(t.is_allocated(&ro, i).unwrap(), want.contains(&i));
                }
            }
        }
    }
}
