//! Fault injection for the crash tests (the `testing` feature): a [`Storage`] that fails,
//! tears or stops at a chosen write or sync, like a machine that loses power.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{CloneOutcome, Storage};

/// What a [`FaultyStorage`] does wrong, shared between the test and the storage it wraps.
///
/// Counting starts at 1: `fail_write = Some(3)` lets writes 1 and 2 land and fails the third.
/// A block clone ([`Storage::clone_range`]) counts as a write: it can fail, tear (its first
/// half, in whole 4 KiB blocks, lands before the failure) or be the point where the machine
/// stops, like any write; a clone that was done but not synced is lost exactly as much as an
/// unsynced write is.
/// After the first injected failure the storage behaves like a crashed machine: every later
/// write and sync fails too, so nothing the caller does afterwards reaches the file.
#[derive(Debug, Default)]
pub struct FaultPlan {
    /// Fail this write (1-based).
    pub fail_write: Option<u64>,
    /// When failing a write, first let its first half land (a torn write).
    pub torn: bool,
    /// Fail this sync (1-based).
    pub fail_sync: Option<u64>,
    /// Fail writes that would make the file longer than this, with "no space left".
    pub space_limit: Option<u64>,
    writes: AtomicU64,
    syncs: AtomicU64,
    crashed: AtomicBool,
}

impl FaultPlan {
    /// A plan that injects nothing (use it to count writes).
    pub fn new() -> Arc<FaultPlan> {
        Arc::new(FaultPlan::default())
    }

    /// Crash at write `n`.
    pub fn crash_at_write(n: u64, torn: bool) -> Arc<FaultPlan> {
        Arc::new(FaultPlan {
            fail_write: Some(n),
            torn,
            ..FaultPlan::default()
        })
    }

    /// Fail sync number `n`.
    pub fn fail_sync_at(n: u64) -> Arc<FaultPlan> {
        Arc::new(FaultPlan {
            fail_sync: Some(n),
            ..FaultPlan::default()
        })
    }

    /// Run out of space when the file would grow past `limit` bytes.
    pub fn out_of_space_at(limit: u64) -> Arc<FaultPlan> {
        Arc::new(FaultPlan {
            space_limit: Some(limit),
            ..FaultPlan::default()
        })
    }

    /// Writes attempted so far (including a failed one).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Syncs attempted so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// True once a fault has been injected.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected fault: {what}"))
}

/// A [`Storage`] that injects the faults of a [`FaultPlan`] into another storage.
#[derive(Debug)]
pub struct FaultyStorage {
    inner: Box<dyn Storage>,
    plan: Arc<FaultPlan>,
}

impl FaultyStorage {
    /// Wrap `inner`.
    pub fn new(inner: Box<dyn Storage>, plan: Arc<FaultPlan>) -> FaultyStorage {
        FaultyStorage { inner, plan }
    }
}

impl FaultyStorage {
    /// Count one write or clone of `len` bytes at `offset` and say whether it may go ahead:
    /// `Err((error, tear))` when the plan fails it, `tear` when part of it lands first.
    fn admit_write(&self, offset: u64, len: u64) -> Result<(), (io::Error, bool)> {
        let n = self.plan.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.plan.crashed() {
            return Err((injected("write after crash"), false));
        }
        if self.plan.fail_write == Some(n) {
            self.plan.crashed.store(true, Ordering::SeqCst);
            return Err((injected(&format!("crash at write {n}")), self.plan.torn));
        }
        if let Some(limit) = self.plan.space_limit {
            let end = offset + len;
            let grows = self.inner.len().map_err(|e| (e, false))? < end;
            if end > limit && grows {
                let e = io::Error::new(
                    io::ErrorKind::StorageFull,
                    "No space left on device (injected)",
                );
                return Err((e, false));
            }
        }
        Ok(())
    }
}

impl Storage for FaultyStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Err((e, tear)) = self.admit_write(offset, buf.len() as u64) {
            if tear && buf.len() > 1 {
                // The first half of the sectors land, the rest do not.
                let half = (buf.len() / 2).max(1);
                self.inner.write_at(&buf[..half], offset)?;
            }
            return Err(e);
        }
        self.inner.write_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn clone_range(
        &self,
        src: &File,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<CloneOutcome> {
        if let Err((e, tear)) = self.admit_write(offset, len) {
            let half = len / 2 / 4096 * 4096;
            if tear && half > 0 {
                self.inner.clone_range(src, src_offset, offset, half)?;
            }
            return Err(e);
        }
        self.inner.clone_range(src, src_offset, offset, len)
    }

    fn as_file(&self) -> Option<&File> {
        self.inner.as_file()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.plan.crashed() {
            return Err(injected("truncate after crash"));
        }
        if let Some(limit) = self.plan.space_limit
            && len > limit
        {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "No space left on device (injected)",
            ));
        }
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        let n = self.plan.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if self.plan.crashed() {
            return Err(injected("sync after crash"));
        }
        if self.plan.fail_sync == Some(n) {
            self.plan.crashed.store(true, Ordering::SeqCst);
            return Err(injected(&format!("sync {n} failed")));
        }
        self.inner.sync_data()
    }

    fn try_lock(&self, exclusive: bool) -> io::Result<bool> {
        self.inner.try_lock(exclusive)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // Not a write: nothing new reaches the file, so it is neither counted nor failed.
        if !self.plan.crashed() {
            self.inner.start_writeback(offset, len);
        }
    }
}
