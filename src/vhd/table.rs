//! The block allocation table as a [`Vhd`] holds it in memory, and its reading at open.

use super::{MAX_TABLE_ENTRIES, Vhd};
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;
use crate::format::bat::{self, Bat};

/// BAT bytes read at a time when a file is opened, so that no second copy of the table is
/// held while it is decoded.
const BAT_READ_CHUNK: usize = 1 << 20;

/// Read `entries` BAT entries at `offset` (at most [`MAX_TABLE_ENTRIES`], checked against the
/// file length by the caller) in chunks of [`BAT_READ_CHUNK`] bytes.
pub(super) fn read_bat(vhd: &Vhd, offset: u64, entries: u32) -> Result<Bat> {
    let n = entries.min(MAX_TABLE_ENTRIES) as usize;
    let mut table = Vec::new();
    table.try_reserve_exact(n).map_err(|_| {
        Error::io(
            format!("{}: reading the BAT", vhd.path.display()),
            std::io::ErrorKind::OutOfMemory.into(),
        )
    })?;
    let mut buf = vec![0u8; BAT_READ_CHUNK.min(n * 4)];
    let mut at = offset;
    while table.len() < n {
        let take = ((n - table.len()) * 4).min(buf.len());
        let chunk = &mut buf[..take];
        vhd.read_raw(chunk, at)?;
        let part = Bat::parse(chunk, (take / 4) as u32)?;
        table.extend_from_slice(&part.entries);
        at += take as u64;
    }
    Ok(Bat { entries: table })
}

/// A BAT as held in memory by a [`Vhd`].
///
/// A 2 TiB disk has a 4 MiB table; a chain of 32 such layers would hold 128 MiB of tables
/// that are almost all "unallocated" in the sparse disks merges usually meet. So a read-only
/// file whose table is less than half allocated keeps only its allocated entries, sorted by
/// block index: memory is then 8 bytes per allocated block (4 MiB per TiB of data at 2 MiB
/// blocks), whatever the virtual size. Writable files keep the full table, which block
/// allocation and [`Vhd::commit`] update and write back sector by sector.
#[derive(Debug)]
pub(super) enum Table {
    /// Every entry.
    Dense(Bat),
    /// Only the allocated entries.
    Sparse {
        /// Number of entries of the full table.
        len: usize,
        /// (block index, BAT entry) of the allocated entries, by increasing block index.
        allocated: Vec<(u32, u32)>,
        /// The full table, built on demand for [`Vhd::bat`].
        dense: std::sync::OnceLock<Bat>,
    },
}

impl Table {
    pub(super) fn new(bat: Bat, writable: bool) -> Table {
        let n = bat.allocated();
        if writable || n >= bat.entries.len() / 2 {
            return Table::Dense(bat);
        }
        let allocated = bat
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| **e != bat::UNUSED)
            // A table has at most u32::MAX entries (Max Table Entries is a u32).
            .map(|(i, &e)| (i as u32, e))
            .collect();
        Table::Sparse {
            len: bat.entries.len(),
            allocated,
            dense: std::sync::OnceLock::new(),
        }
    }

    pub(super) fn get(&self, index: u64) -> Option<u64> {
        match self {
            Table::Dense(b) => b.block_offset(index),
            Table::Sparse { allocated, .. } => {
                let i = u32::try_from(index).ok()?;
                let k = allocated.binary_search_by_key(&i, |&(b, _)| b).ok()?;
                allocated.get(k).map(|&(_, e)| u64::from(e) * SECTOR_SIZE)
            }
        }
    }

    pub(super) fn allocated(&self) -> usize {
        match self {
            Table::Dense(b) => b.allocated(),
            Table::Sparse { allocated, .. } => allocated.len(),
        }
    }

    pub(super) fn allocated_entries(&self) -> Box<dyn Iterator<Item = (u64, u64)> + '_> {
        let to = |i: usize, e: u32| (i as u64, u64::from(e) * SECTOR_SIZE);
        match self {
            Table::Dense(b) => Box::new(
                b.entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| **e != bat::UNUSED)
                    .map(move |(i, &e)| to(i, e)),
            ),
            Table::Sparse { allocated, .. } => {
                Box::new(allocated.iter().map(move |&(i, e)| to(i as usize, e)))
            }
        }
    }

    fn expand(len: usize, allocated: &[(u32, u32)]) -> Bat {
        let mut entries = vec![bat::UNUSED; len];
        for &(i, e) in allocated {
            if let Some(slot) = entries.get_mut(i as usize) {
                *slot = e;
            }
        }
        Bat { entries }
    }

    pub(super) fn dense(&self) -> &Bat {
        match self {
            Table::Dense(b) => b,
            Table::Sparse {
                len,
                allocated,
                dense,
            } => dense.get_or_init(|| Table::expand(*len, allocated)),
        }
    }

    /// The full table for updating, building it first if only the allocated entries were
    /// kept (`None` cannot happen: the table is full once built).
    pub(super) fn dense_mut(&mut self) -> Option<&mut Bat> {
        if let Table::Sparse {
            len,
            allocated,
            dense,
        } = self
        {
            let b = dense
                .take()
                .unwrap_or_else(|| Table::expand(*len, allocated));
            *self = Table::Dense(b);
        }
        match self {
            Table::Dense(b) => Some(b),
            Table::Sparse { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::OpenOptions;

    #[test]
    fn sparse_table_answers_like_the_full_one() {
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
        let rw = Vhd::open(&p, OpenOptions::writable()).unwrap();
        assert!(matches!(ro.bat, Table::Sparse { .. }), "4 of 32 allocated");
        assert!(
            matches!(rw.bat, Table::Dense(_)),
            "writable files keep every entry"
        );
        for i in 0..40 {
            assert_eq!(ro.block_offset(i), rw.bat().block_offset(i), "block {i}");
        }
        let entries: Vec<(u64, u64)> = ro.allocated_entries().collect();
        assert_eq!(entries, rw.allocated_entries().collect::<Vec<_>>());
        assert_eq!(
            entries.iter().map(|e| e.0).collect::<Vec<_>>(),
            [0, 5, 6, 31]
        );
        assert_eq!(ro.allocated_blocks(), 4);
        assert_eq!(ro.bat(), rw.bat());

        let mut t = Table::new(rw.bat().clone(), false);
        assert!(matches!(t, Table::Sparse { .. }));
        let b = t.dense_mut().unwrap();
        b.entries[1] = 99;
        assert_eq!(t.get(1), Some(99 * 512));
        assert_eq!(t.get(5), rw.block_offset(5));
        assert_eq!(t.allocated(), 5);
    }
}
