//! Shared setup for the fuzz targets: a fixed parent disk for the chain target, and the
//! exercise each target runs on a successfully opened file.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vhd_merge::create::{CreateOptions, create_dynamic};
use vhd_merge::{Chain, Vhd};

/// Unique id of the parent every chain seed points at.
pub const PARENT_ID: [u8; 16] = *b"vhd-merge-fuzzP!";

/// Creation options used for the fixed parent (deterministic id and time stamp).
pub fn parent_options() -> CreateOptions {
    CreateOptions {
        block_size: 4096,
        unique_id: Some(uuid::Uuid::from_bytes(PARENT_ID)),
        timestamp: Some(1),
        ..CreateOptions::default()
    }
}

/// Write the parent (64 KiB dynamic, 4 KiB blocks, a few blocks written) at `path`.
pub fn write_parent(path: &Path) {
    let mut p = create_dynamic(path, 64 << 10, &parent_options()).expect("create parent");
    p.write_at(0, &[0x11; 4096]).expect("write parent");
    p.write_at(20 << 10, &[0x22; 1024]).expect("write parent");
}

/// A directory in RAM (when /dev/shm exists) holding `parent.vhd`, made once per process.
pub fn chain_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("vhd-merge-fuzz-")
            .tempdir_in(base)
            .expect("tempdir")
            .keep();
        write_parent(&dir.join("parent.vhd"));
        dir
    })
}

/// Read what a caller would read from an opened file: the first blocks and every allocated
/// block (at most 64), through the public read API.
pub fn exercise_vhd(vhd: &Vhd) {
    let bs = vhd.block_size();
    let size = vhd.virtual_size();
    let mut buf = vec![0u8; bs.min(1 << 20) as usize];
    let mut blocks: Vec<u64> = (0..4).collect();
    blocks.extend(
        vhd.bat()
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| **e != u32::MAX)
            .map(|(i, _)| i as u64)
            .take(64),
    );
    for b in blocks {
        let off = b.saturating_mul(bs);
        if off >= size {
            continue;
        }
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = vhd.block_map(b);
        let _ = vhd.read_own(off, &mut buf[..n]);
    }
}

/// Read the first 64 KiB of every layer of a chain.
pub fn exercise_chain(chain: &Chain) {
    let mut buf = vec![0u8; 64 << 10];
    for i in 0..chain.len() {
        let size = chain.vhd(i).virtual_size();
        let n = size.min(buf.len() as u64) as usize;
        let _ = chain.read_at(i, 0, &mut buf[..n]);
    }
}

/// A [`MemStorage`](vhd_merge::io::MemStorage) the fuzz target keeps a handle to after giving
/// it away, to look at what was written.
#[derive(Clone, Debug)]
pub struct Shared(std::sync::Arc<vhd_merge::io::MemStorage>);

impl Shared {
    /// Storage holding `bytes`, growing to at most `limit`.
    pub fn new(bytes: Vec<u8>, limit: u64) -> Shared {
        Shared(std::sync::Arc::new(vhd_merge::io::MemStorage::with_limit(
            bytes, limit,
        )))
    }

    /// The current bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

impl vhd_merge::io::Storage for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}
