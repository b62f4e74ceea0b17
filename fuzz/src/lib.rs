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
        vhd.allocated_entries()
            .filter_map(|e| e.ok())
            .map(|(i, _)| i)
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
        let size = chain.layer(i).map_or(0, |l| l.virtual_size());
        let n = size.min(buf.len() as u64) as usize;
        let _ = chain.read_at(i, 0, &mut buf[..n]);
    }
}

/// A [`MemStorage`](vhd_merge::io::MemStorage) the fuzz target keeps a handle to after giving
/// a clone away (`Arc<S>` is itself a `Storage`), to look at what was written.
pub type Shared = std::sync::Arc<vhd_merge::io::MemStorage>;

/// Storage holding `bytes`, growing to at most `limit`.
pub fn shared(bytes: Vec<u8>, limit: u64) -> Shared {
    std::sync::Arc::new(vhd_merge::io::MemStorage::with_limit(bytes, limit))
}

/// The bytes of the parent written by [`write_parent`], made once per process: the merge
/// target restores the parent from them before every input.
pub fn parent_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("parent.vhd");
        write_parent(&p);
        std::fs::read(&p).expect("read parent")
    })
}

/// Chain options for fuzzed children: only the child's own directory, no absolute locators
/// (so a fuzzed locator cannot lead to another process's parent).
pub fn confined(dir: &Path) -> vhd_merge::ChainOptions {
    vhd_merge::ChainOptions {
        ignore_absolute_locators: true,
        confine_to: Some(vec![dir.to_path_buf()]),
        ..vhd_merge::ChainOptions::default()
    }
}

/// What the `merge` target does with one input: `data` becomes `child.vhd` next to a fresh
/// copy of the parent in `dir`; the child's view is read through our chain; a dry run and a
/// real merge with verify follow. Panics when a property fails:
///
/// - no panic anywhere; every error carries a failure return code (32768 to 32779) and is
///   not a verify failure (the engine wrote something other than what it read);
/// - the child's bytes never change; a dry run changes no file;
/// - a merge that succeeds leaves the parent reading exactly the child's pre-merge view;
/// - a merge that fails leaves a parent that opens strictly, each sector old or merged.
pub fn merge_one(dir: &Path, data: &[u8]) {
    use vhd_merge::merge::{MergeOptions, merge};
    use vhd_merge::{Chain, OpenOptions, ReturnCode, Vhd};

    let parent = dir.join("parent.vhd");
    let child = dir.join("child.vhd");
    let original = parent_bytes();
    if std::fs::write(&parent, original).is_err() || std::fs::write(&child, data).is_err() {
        return;
    }
    let opts = confined(dir);
    let parent_size = 64u64 << 10;
    let read_view = |path: &Path| -> Option<Vec<u8>> {
        let chain = Chain::open(path, &opts).ok()?;
        let size = chain.layer(0)?.virtual_size();
        if size > parent_size {
            return None;
        }
        let mut buf = vec![0u8; size as usize];
        chain.read_at(0, 0, &mut buf).ok()?;
        Some(buf)
    };
    let old_parent = read_view(&parent).expect("the parent reads");
    let before = read_view(&child);
    let check_err = |e: &vhd_merge::Error, what: &str| {
        let rc = e.return_code();
        assert!(
            (ReturnCode::Failed.code()..=ReturnCode::FileNotFound.code()).contains(&rc.code()),
            "{what}: return code {rc} for: {e}"
        );
        assert!(
            !matches!(e, vhd_merge::Error::VerifyFailed(_)),
            "{what}: verify failed: {e}"
        );
    };

    let dry = MergeOptions {
        chain: opts.clone(),
        dry_run: true,
        ..MergeOptions::default()
    };
    if let Err(e) = merge(&child, None, &dry) {
        check_err(&e, "dry run");
    }
    assert_eq!(
        std::fs::read(&parent).ok().as_deref(),
        Some(original),
        "the dry run wrote the parent"
    );
    assert_eq!(
        std::fs::read(&child).ok().as_deref(),
        Some(data),
        "the dry run wrote the child"
    );

    let real = MergeOptions {
        chain: opts.clone(),
        verify: true,
        ..MergeOptions::default()
    };
    let res = merge(&child, None, &real);
    assert_eq!(
        std::fs::read(&child).ok().as_deref(),
        Some(data),
        "the merge wrote the child"
    );
    match res {
        Ok(r) => {
            assert_eq!(r.bytes_merged, r.plan.bytes_total);
            let Some(before) = before else {
                panic!("merged a child whose view could not be read: {r:?}");
            };
            let after = read_view(&parent).expect("the parent reads after the merge");
            // The parent keeps its size; the child may be smaller.
            assert_eq!(
                after.get(..before.len()),
                Some(&before[..]),
                "the parent does not read as the child did"
            );
            assert_eq!(
                after.get(before.len()..),
                old_parent.get(before.len()..),
                "the parent changed past the child's size"
            );
        }
        Err(e) => {
            check_err(&e, "merge");
            Vhd::open(&parent, OpenOptions::read_only())
                .expect("the parent opens after a failed merge");
            let after = read_view(&parent).expect("the parent reads after a failed merge");
            if let Some(before) = before {
                for (s, sector) in after.chunks(512).enumerate() {
                    let r = s * 512..(s + 1) * 512;
                    assert!(
                        sector == &old_parent[r.clone()] || before.get(r) == Some(sector),
                        "sector {s} of the parent is neither old nor merged after: {e}"
                    );
                }
            } else {
                assert_eq!(
                    after, old_parent,
                    "a child that does not read changed the parent"
                );
            }
        }
    }
}
