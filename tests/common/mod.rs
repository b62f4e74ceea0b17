//! Helpers shared by the integration tests: `tests/suite/main.rs` (every subject) and
//! `tests/bad_input.rs` include them as `mod common`; in bad_input, the helpers it does not
//! use are dead code: hence the module-wide `allow(dead_code)`.
//!
//! - [`oracles`]: qemu-img, qemu-io and libvhdi, and the rule for a missing one;
//! - [`craft`]: differencing disks with chosen locators, names and ids;
//! - [`fixtures`]: the real files from other tools, decompressed;
//! - [`model`]: random chains for the merge tests and the model of what they must read;
//! - [`merging`]: a VHDX merge under test and the checks every VHDX merge test makes;
//! - [`os`]: running as root, immutable and read-only files, symlinks, a small tmpfs;
//! - [`reflink`]: a file system that clones blocks, and FIEMAP's shared extents;
//! - [`patch`]: small disks with known content, and patching their structures byte by byte;
//! - [`storage`]: recording and fault-injecting wrappers for a merge's destination;
//! - here: the CLI binary, temporary directories, a deterministic random generator, reading
//!   disks whole, hashes and byte comparisons.
#![allow(dead_code)]

pub mod craft;
pub mod fixtures;
pub mod merging;
pub mod model;
pub mod oracles;
pub mod os;
pub mod patch;
pub mod reflink;
pub mod storage;

use std::io::Write;
use std::path::{Path, PathBuf};

use vhd_merge::{Chain, ChainOptions, OpenOptions, Vhd};

/// Print a note that `cargo test` shows even for passing tests (it captures only the print
/// macros, not direct writes to stderr).
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "note: {text}");
}

/// The built `vhd-merge` binary, when Cargo built it (the `cli` feature).
pub fn binary() -> Option<PathBuf> {
    match option_env!("CARGO_BIN_EXE_vhd-merge") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            note("skipping: the vhd-merge binary is not built (feature `cli` off)");
            None
        }
    }
}

/// A small deterministic generator (xorshift64*) for test data and write patterns: a failing
/// case replays exactly from its seed. The seeding is the one the merge tests' saved proptest
/// cases (tests/merge.proptest-regressions) were found with: changing it would make them
/// replay other chains.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with a probability of `percent` in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// Shuffle `v` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Assert two byte strings are equal, naming the first differing 512-byte sector instead of
/// printing megabytes.
pub fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: lengths differ ({} vs {})",
        actual.len(),
        expected.len()
    );
    if actual == expected {
        return;
    }
    let i = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let s = i / 512;
    panic!(
        "{what}: first difference at byte {i} (sector {s}): got {:02x?}, expected {:02x?}",
        &actual[s * 512..(s * 512 + 16).min(actual.len())],
        &expected[s * 512..(s * 512 + 16).min(expected.len())]
    );
}

/// Read a whole file.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Read the whole view of the disk (VHD or VHDX) at `path` through its chain.
pub fn read_view(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, &ChainOptions::default())
        .unwrap_or_else(|e| panic!("open the chain of {}: {e}", path.display()));
    let size = chain.layer(0).unwrap().virtual_size() as usize;
    let mut buf = vec![0u8; size];
    chain.read_at(0, 0, &mut buf).unwrap();
    buf
}

/// The whole virtual disk of the VHD at `path` as its own data (no parent): what
/// `Vhd::read_own` gives.
pub fn read_own(path: &Path) -> Vec<u8> {
    let v = Vhd::open(path, OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; v.virtual_size() as usize];
    v.read_own(0, &mut buf).unwrap();
    buf
}

/// The SHA-256 of `bytes`, in lower-case hex (as PROVENANCE.md gives them).
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> String {
    sha256(&read(path))
}

/// CRC32 and length of a file's bytes, read in pieces (a VHDX with a 256 MiB block is a large
/// sparse file).
pub fn file_hash(path: &Path) -> (u32, u64) {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let (mut h, mut len) = (crc32fast::Hasher::new(), 0u64);
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return (h.finalize(), len);
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
}

/// Hashes of every file in `paths`.
pub fn hashes(paths: &[PathBuf]) -> Vec<(u32, u64)> {
    paths.iter().map(|p| file_hash(p)).collect()
}

/// First differing byte of two buffers, for messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

/// Copy every file of `from` into `to` (which must exist).
pub fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A temporary directory on tmpfs when there is one (fsync is free there, and the fault
/// injection, not the disk, decides what a crash keeps), else in the default place. Unix only:
/// under Wine `/dev/shm` exists too, as `Z:\dev\shm`, which no Windows test should see.
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if cfg!(unix)
        && shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

/// Every file in `dir` with its content, to prove nothing changed.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    out.sort();
    out
}

/// Makes the tests that take it run one at a time (within one test binary). Tests that merge
/// or spawn processes need it: a child process between fork and exec holds copies of this
/// process's descriptors, with the flock locks a merge took on them, which would make a merge
/// in a parallel test report System is in use.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error-level findings of `check --deep` on the file at `path`.
pub fn deep_check_errors(path: &Path) -> Vec<vhd_merge::check::Finding> {
    let options = vhd_merge::check::CheckOptions::default().deep(true);
    vhd_merge::check::check_file(path, &options)
        .unwrap_or_else(|e| panic!("check {}: {e}", path.display()))
        .findings
        .into_iter()
        .filter(|f| f.severity == vhd_merge::check::Severity::Error)
        .collect()
}

/// The layer at `path` as the VHDX reader sees it on its own (no parent): its bytes, and which
/// sectors it holds (all of them for a file without a parent).
pub fn vhdx_own_layer(path: &Path) -> model::LayerModel {
    use vhd_merge::vhdx::{BlockState, Vhdx};
    let v = Vhdx::open_path(path, false).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut m = model::LayerModel::empty(v.virtual_size() as usize);
    v.read_own(0, &mut m.data).unwrap();
    if !v.is_differencing() {
        m.present.fill(true);
        return m;
    }
    let per = v.sector_size() as usize / 512;
    let mut at = 0;
    for b in 0..v.block_count() {
        let state = v.block_state(b).unwrap();
        for i in 0..v.sectors_in_block(b) as usize {
            let held = match &state {
                BlockState::Transparent => false,
                BlockState::Zero | BlockState::Present(None) => true,
                BlockState::Present(Some(map)) => map.get(i),
            };
            m.present[at..at + per].fill(held);
            at += per;
        }
    }
    m
}
