//! A table held in a byte region of a file, read on demand: fixed-size chunks kept in a small
//! cache, so that memory stays bounded whatever the region's size. Both formats'
//! block tables read through it (the VHD BAT in `vhd::table`, the VHDX BAT in `vhdx::bat`);
//! each decodes its own entries and keeps its own changes on top.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::Result;

/// Bytes of a region read at once when it is streamed, and the VHDX BAT's chunk (8192
/// entries).
pub(crate) const CHUNK: u64 = 64 << 10;

/// Bytes of a region read at once when it is streamed (a multiple of [`CHUNK`]): 16 times
/// fewer reads than chunks for a 512 MiB table.
pub(crate) const STREAM: u64 = 1 << 20;

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

    /// Stream the whole region once, [`STREAM`] bytes at a time, past the cache:
    /// `read(file offset, buffer)` fills the buffer, `each(byte offset in the region, bytes)`
    /// sees it. Memory is one buffer whatever the region's size, allocated once (a fresh
    /// 1 MiB buffer per read was a new mapping to fault in, zero and unmap each time: about
    /// a tenth of streaming a 256 MiB table).
    pub(crate) fn stream(
        &self,
        read: impl FnMut(u64, &mut [u8]) -> Result<()>,
        each: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.stream_sparse(read, |o| Ok(Some(o..u64::MAX)), each)
    }

    /// [`ChunkCache::stream`] for a region whose all-zero bytes mean nothing to `each`:
    /// `data(file offset)` gives the next stretch at or after it that may hold data (a hole
    /// of a sparse file reads as zeros), None when only holes follow, and the bytes outside
    /// those stretches are never read (`each` does not see them). A 512 MiB BAT that is
    /// mostly a hole costs what its data costs.
    pub(crate) fn stream_sparse(
        &self,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
        mut data: impl FnMut(u64) -> Result<Option<Range<u64>>>,
        mut each: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let (mut at, mut data_end) = (0, 0);
        let mut buf = Vec::new();
        while at < self.len {
            if at >= data_end {
                let Some(d) = data(self.offset + at)? else {
                    return Ok(());
                };
                // Stretches widened to whole chunks (multiples of every entry size), so
                // that no entry is split or seen twice.
                let start = d.start.saturating_sub(self.offset);
                at = at.max(start - start % self.chunk);
                let end = d.end.saturating_sub(self.offset).min(self.len);
                data_end = end
                    .div_ceil(self.chunk)
                    .saturating_mul(self.chunk)
                    .max(at + self.chunk);
                continue;
            }
            let n = STREAM.min(self.len - at).min(data_end - at) as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            read(self.offset + at, &mut buf[..n])?;
            each(at, &buf[..n])?;
            at += n as u64;
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
        let fill = |o: u64, b: &mut [u8]| {
            b.copy_from_slice(&file[o as usize..o as usize + b.len()]);
            Ok(())
        };
        c.stream(fill, |at, b| {
            seen.push((at, b.len() as u64));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(0, 3 * CHUNK)], "one read of at most STREAM bytes");
    }

    #[test]
    fn a_sparse_stream_reads_only_the_data_widened_to_whole_chunks() {
        // A region of 80 chunks (5 MiB) at offset 4096; data from the middle of chunk 3 to
        // near the end of chunk 4, and from 2 MiB + 100 bytes into the region to chunk 70.
        let off = 4096;
        let len = 80 * CHUNK;
        let file: Vec<u8> = (0..off + len).map(|i| (i % 253) as u8 | 1).collect();
        let stretches = [
            off + 3 * CHUNK + 500..off + 5 * CHUNK - 7,
            off + 2 * STREAM + 100..off + 70 * CHUNK,
        ];
        let data = |o: u64| {
            Ok(stretches
                .iter()
                .find(|r| r.end > o)
                .map(|r| r.start.max(o)..r.end))
        };
        let fill = |o: u64, b: &mut [u8]| {
            b.copy_from_slice(&file[o as usize..o as usize + b.len()]);
            Ok(())
        };
        let c = ChunkCache::new(off, len, CHUNK, 2);
        let mut seen = Vec::new();
        c.stream_sparse(fill, data, |at, b| {
            assert_eq!(b, &file[(off + at) as usize..(off + at) as usize + b.len()]);
            seen.push(at..at + b.len() as u64);
            Ok(())
        })
        .unwrap();
        let expected = [
            3 * CHUNK..5 * CHUNK,
            2 * STREAM..3 * STREAM,
            3 * STREAM..4 * STREAM,
            4 * STREAM..70 * CHUNK,
        ];
        assert_eq!(seen, expected);
        // Every data byte was seen, no byte twice.
        for r in &stretches {
            let (a, b) = (r.start - off, r.end - off);
            assert!(seen.iter().any(|s| s.start <= a) && seen.iter().any(|s| s.end >= b));
        }
        assert!(seen.windows(2).all(|w| w[0].end <= w[1].start));
    }
}
