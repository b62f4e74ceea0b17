//! Storage wrappers for a merge's destination (`MergeOptions::destination_io`): one that
//! records every write, sync and truncation, one that injects the faults of a [`FaultPlan`],
//! and one whose failing sync loses the unsynced writes ([`lossy`]).

use std::fs::File;
use std::sync::{Arc, Mutex};

use vhd_merge::CloneOutcome;
use vhd_merge::io::{FaultPlan, FaultyStorage, FileStorage, Storage};
use vhd_merge::merge::StorageWrapper;

/// One operation a merge did on its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEvent {
    /// A write of `len` bytes at `offset`; the file was `file_len` bytes long before it.
    Write {
        offset: u64,
        len: u64,
        file_len: u64,
    },
    /// A flush.
    Sync,
    /// A truncation or extension to this length.
    SetLen(u64),
    /// A block clone of `len` bytes to `offset` (whatever the file system answered).
    Clone { offset: u64, len: u64 },
}

/// What a [`Recording`] storage saw, in order.
#[derive(Debug, Default)]
pub struct IoLog(Mutex<Vec<IoEvent>>);

impl IoLog {
    pub fn new() -> Arc<IoLog> {
        Arc::new(IoLog::default())
    }
    pub fn events(&self) -> Vec<IoEvent> {
        self.0.lock().unwrap().clone()
    }
    /// The writes, in order (write n of a [`FaultPlan`] is element n-1).
    pub fn writes(&self) -> Vec<(u64, u64, u64)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                IoEvent::Write {
                    offset,
                    len,
                    file_len,
                } => Some((offset, len, file_len)),
                _ => None,
            })
            .collect()
    }
    /// The clones asked for, in order, as (offset, len).
    pub fn clones(&self) -> Vec<(u64, u64)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                IoEvent::Clone { offset, len } => Some((offset, len)),
                _ => None,
            })
            .collect()
    }
    pub fn syncs(&self) -> u64 {
        self.events()
            .iter()
            .filter(|e| matches!(e, IoEvent::Sync))
            .count() as u64
    }
    /// The points where the file grows: for each write that ends past the end of the file,
    /// (1-based write number, file length before it, end of the write).
    pub fn growth_points(&self) -> Vec<(u64, u64, u64)> {
        self.writes()
            .into_iter()
            .enumerate()
            .filter(|(_, (off, len, file_len))| off + len > *file_len)
            .map(|(i, (off, len, file_len))| (i as u64 + 1, file_len, off + len))
            .collect()
    }
}

/// Storage that logs every write, sync and truncation into an [`IoLog`].
#[derive(Debug)]
pub struct Recording {
    inner: Box<dyn Storage>,
    log: Arc<IoLog>,
}

impl Storage for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let file_len = self.inner.len()?;
        self.log.0.lock().unwrap().push(IoEvent::Write {
            offset,
            len: buf.len() as u64,
            file_len,
        });
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.log.0.lock().unwrap().push(IoEvent::SetLen(len));
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.log.0.lock().unwrap().push(IoEvent::Sync);
        self.inner.sync_data()
    }
    fn try_lock(&self, exclusive: bool) -> std::io::Result<bool> {
        self.inner.try_lock(exclusive)
    }
    fn clone_range(
        &self,
        src: &File,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> std::io::Result<CloneOutcome> {
        self.log
            .0
            .lock()
            .unwrap()
            .push(IoEvent::Clone { offset, len });
        self.inner.clone_range(src, src_offset, offset, len)
    }
    fn as_file(&self) -> Option<&File> {
        self.inner.as_file()
    }
}

/// Storage whose clones are copies (read from the source, written here) with the alignment
/// rule of a real reflink file system (4 KiB blocks): the engine's clone path, its fallbacks
/// and its fault injection, on any file system. A real clone is proved in `tests/suite/clone.rs`.
#[derive(Debug)]
pub struct CopyClone {
    inner: Box<dyn Storage>,
    /// Clones longer than this are refused as unaligned (a file system that will not clone
    /// a range that long in one call).
    longest: u64,
}

impl Storage for CopyClone {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn try_lock(&self, exclusive: bool) -> std::io::Result<bool> {
        self.inner.try_lock(exclusive)
    }
    fn clone_range(
        &self,
        src: &File,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> std::io::Result<CloneOutcome> {
        if [src_offset, offset, len].iter().any(|v| v % 4096 != 0) || len > self.longest {
            return Ok(CloneOutcome::Unaligned);
        }
        let mut buf = vec![0u8; len as usize];
        FileStorage::new(src.try_clone()?).read_at(&mut buf, src_offset)?;
        self.inner.write_at(&buf, offset)?;
        Ok(CloneOutcome::Cloned)
    }
    fn as_file(&self) -> Option<&File> {
        self.inner.as_file()
    }
}

/// A destination wrapper whose clones are copies (see [`CopyClone`]).
pub fn copy_clone() -> StorageWrapper {
    copy_clone_up_to(u64::MAX)
}

/// [`copy_clone`] refusing (as unaligned) every clone longer than `longest` bytes.
pub fn copy_clone_up_to(longest: u64) -> StorageWrapper {
    Arc::new(move |s| Box::new(CopyClone { inner: s, longest }))
}

/// `outer` over `inner`: the destination's storage goes through `inner` first.
pub fn stacked(outer: StorageWrapper, inner: StorageWrapper) -> StorageWrapper {
    Arc::new(move |s| outer(inner(s)))
}

/// [`copy_clone`] under the faults of `plan` (clones count as writes).
pub fn faulty_copy_clone(plan: Arc<FaultPlan>) -> StorageWrapper {
    Arc::new(move |s| {
        let s: Box<dyn Storage> = Box::new(CopyClone {
            inner: s,
            longest: u64::MAX,
        });
        Box::new(FaultyStorage::new(s, plan.clone()))
    })
}

/// A destination wrapper that records into `log`.
pub fn recording(log: Arc<IoLog>) -> StorageWrapper {
    Arc::new(move |s| {
        Box::new(Recording {
            inner: s,
            log: log.clone(),
        })
    })
}

/// A destination wrapper that injects the faults of `plan`.
pub fn faulty(plan: Arc<FaultPlan>) -> StorageWrapper {
    Arc::new(move |s| Box::new(FaultyStorage::new(s, plan.clone())))
}

/// What a [`Lossy`] storage must undo if its failing sync comes.
#[derive(Debug)]
enum Undo {
    /// Bytes that were at `offset` (as far as the file reached) and the length before.
    Write(u64, Vec<u8>, u64),
    /// A length change: the length before, and the bytes a truncation removed.
    SetLen(u64, Vec<u8>),
}

/// Storage whose sync number `fail_sync` fails and loses every write since the previous
/// successful sync (the file goes back to its last durable state), as when the kernel cannot
/// write dirty pages back and reports it once; every later operation works. A caller that
/// goes on after such an error must not publish metadata pointing at the lost data.
#[derive(Debug)]
pub struct Lossy {
    inner: Box<dyn Storage>,
    fail_sync: u64,
    /// Syncs so far, counted over every storage the wrapper made (a merge may open a file
    /// more than once).
    syncs: Arc<std::sync::atomic::AtomicU64>,
    undo: Mutex<Vec<Undo>>,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl Storage for Lossy {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let len = self.inner.len()?;
        let keep = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let mut old = vec![0u8; keep];
        if keep > 0 {
            self.inner.read_at(&mut old, offset)?;
        }
        self.undo
            .lock()
            .unwrap()
            .push(Undo::Write(offset, old, len));
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, new: u64) -> std::io::Result<()> {
        let len = self.inner.len()?;
        let mut tail = vec![0u8; len.saturating_sub(new) as usize];
        if !tail.is_empty() {
            self.inner.read_at(&mut tail, new)?;
        }
        self.undo.lock().unwrap().push(Undo::SetLen(len, tail));
        self.inner.set_len(new)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.syncs.fetch_add(1, SeqCst) + 1;
        let mut undo = self.undo.lock().unwrap();
        if n == self.fail_sync {
            for u in undo.drain(..).rev() {
                match u {
                    Undo::Write(offset, old, len) => {
                        if !old.is_empty() {
                            self.inner.write_at(&old, offset)?;
                        }
                        if self.inner.len()? > len {
                            self.inner.set_len(len)?;
                        }
                    }
                    Undo::SetLen(len, tail) => {
                        let now = self.inner.len()?;
                        self.inner.set_len(len)?;
                        if !tail.is_empty() {
                            self.inner.write_at(&tail, now)?;
                        }
                    }
                }
            }
            self.inner.sync_data()?;
            self.failed.store(true, SeqCst);
            return Err(std::io::Error::other(format!(
                "injected fault: sync {n} failed and the writes since the last sync were lost"
            )));
        }
        self.inner.sync_data()?;
        undo.clear();
        Ok(())
    }
    fn try_lock(&self, exclusive: bool) -> std::io::Result<bool> {
        self.inner.try_lock(exclusive)
    }
}

/// A destination wrapper whose sync number `n` fails and loses the writes since the previous
/// sync (see [`Lossy`]), and the flag it sets when that sync came.
pub fn lossy(n: u64) -> (StorageWrapper, Arc<std::sync::atomic::AtomicBool>) {
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f2 = failed.clone();
    let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let wrap: StorageWrapper = Arc::new(move |s| {
        Box::new(Lossy {
            inner: s,
            fail_sync: n,
            syncs: syncs.clone(),
            undo: Mutex::new(Vec::new()),
            failed: f2.clone(),
        })
    });
    (wrap, failed)
}

/// The file at `path`, opened for reading and writing, behind a [`FaultyStorage`] that injects
/// the faults of `plan` (for the format types opened over a storage: `Vhdx::open`, repair).
pub fn faulty_file(path: &std::path::Path, plan: Arc<FaultPlan>) -> FaultyStorage {
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    FaultyStorage::new(Box::new(FileStorage::new(f)), plan)
}
