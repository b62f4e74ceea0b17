//! A table held in a byte region of a file, read on demand: fixed-size chunks kept in a small
//! cache, so that memory stays bounded whatever the region's size. Both formats'
//! block tables read through it (the VHD BAT in `vhd::table`, the VHDX BAT in `vhdx::bat`);
//! each decodes its own entries and keeps its own changes on top.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::Result;

/// Bytes of a region read at once when it is streamed, and the VHDX BAT's chunk (8192
/// entries).
pub(crate) const CHUNK: u64 = 64 << 10;

/// Chunks of `chunk` bytes of a region read from the file, at most `capacity` of them: when
/// full it starts over (a merge reads tables in block order, so the chunk in use is the one
/// just read).
#[derive(Debug, Default)]
pub(crate) struct ChunkCache {
    /// File offset of the region.
    offset: u64,
    /// Bytes of the region.
    len: u64,
    /// Bytes of a chunk (a multiple of every entry size read through it).
    chunk: u64,
    capacity: usize,
    chunks: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
}

impl ChunkCache {
    /// A cache of at most `capacity` chunks of `chunk` bytes over the `len` bytes at file
    /// offset `offset`.
    pub(crate) fn new(offset: u64, len: u64, chunk: u64, capacity: usize) -> ChunkCache {
        ChunkCache {
            offset,
            len,
            chunk: chunk.max(1),
            capacity: capacity.max(1),
            chunks: Mutex::new(HashMap::new()),
        }
    }

    /// Bytes of the region.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// File offset of byte `at` of the region.
    pub(crate) fn file_offset(&self, at: u64) -> u64 {
        self.offset + at
    }

    /// Chunk `c` (the region's bytes from `c` chunks in, shorter at the end), from the cache or
    /// read now with `read(file offset, length)`.
    pub(crate) fn chunk(
        &self,
        c: u64,
        read: impl FnOnce(u64, u64) -> Result<Vec<u8>>,
    ) -> Result<Arc<Vec<u8>>> {
        let mut cache = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = cache.get(&c) {
            return Ok(b.clone());
        }
        let start = c * self.chunk;
        let bytes = Arc::new(read(self.offset + start, self.chunk.min(self.len - start))?);
        if cache.len() >= self.capacity {
            cache.clear();
        }
        cache.insert(c, bytes.clone());
        Ok(bytes)
    }

    /// The `N` bytes at byte `at` of the region (`at + N` inside it: the caller checked).
    pub(crate) fn bytes_at<const N: usize>(
        &self,
        at: u64,
        read: impl FnOnce(u64, u64) -> Result<Vec<u8>>,
    ) -> Result<[u8; N]> {
        let chunk = self.chunk(at / self.chunk, read)?;
        let i = (at % self.chunk) as usize;
        let b = chunk.get(i..i + N).and_then(|b| b.try_into().ok());
        Ok(b.unwrap_or([0; N]))
    }

    /// Bytes `from..to` of the region changed in the file: read them from there again.
    pub(crate) fn forget(&self, from: u64, to: u64) {
        let mut cache = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        if to > from {
            (from / self.chunk..=(to - 1) / self.chunk).for_each(|c| drop(cache.remove(&c)));
        }
    }

    /// Stream the whole region once, [`CHUNK`] bytes at a time, past the cache: `each(byte
    /// offset in the region, bytes)`. Memory is one piece whatever the region's size.
    pub(crate) fn stream(
        &self,
        mut read: impl FnMut(u64, u64) -> Result<Vec<u8>>,
        mut each: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut at = 0;
        while at < self.len {
            let bytes = read(self.offset + at, CHUNK.min(self.len - at))?;
            each(at, &bytes)?;
            at += CHUNK;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn chunks_are_read_once_until_forgotten_or_evicted() {
        let file: Vec<u8> = (0..3 * CHUNK + 10).map(|i| (i % 251) as u8).collect();
        let reads = Cell::new(0);
        let read = |o: u64, n: u64| {
            reads.set(reads.get() + 1);
            Ok(file[o as usize..(o + n) as usize].to_vec())
        };
        let c = ChunkCache::new(10, 3 * CHUNK, CHUNK, 2);
        assert_eq!(c.bytes_at::<2>(0, read).unwrap(), [10, 11]);
        assert_eq!(reads.get(), 1);
        let at = 3 * CHUNK - 4;
        let want = file[(10 + at) as usize..(14 + at) as usize].to_vec();
        assert_eq!(c.bytes_at::<4>(at, read).unwrap().to_vec(), want);
        assert_eq!(reads.get(), 2);
        c.forget(at, at + 4);
        c.bytes_at::<4>(at, read).unwrap();
        assert_eq!(reads.get(), 3, "forgotten");
        c.bytes_at::<4>(CHUNK, read).unwrap();
        c.bytes_at::<4>(0, read).unwrap();
        assert_eq!(reads.get(), 5, "capacity 2: the first chunk was evicted");
        let mut seen = Vec::new();
        c.stream(read, |at, b| {
            seen.push((at, b.len() as u64));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(0, CHUNK), (CHUNK, CHUNK), (2 * CHUNK, CHUNK)]);
    }
}
