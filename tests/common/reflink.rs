//! A file system that clones blocks (XFS with reflink=1, btrfs), and proof that a clone really
//! shared extents.
//!
//! `.ci/run` mounts a loop XFS with reflink and exports its path as `VHD_MERGE_REFLINK_DIR`,
//! with `VHD_MERGE_REQUIRE_REFLINK=1`. Without the directory a test that needs it prints a
//! note and skips (it has not passed); with the requirement set it fails instead.

use std::path::{Path, PathBuf};

use super::note;

/// The directory on a reflink file system.
pub const REFLINK_DIR: &str = "VHD_MERGE_REFLINK_DIR";
/// Set to 1 to make a missing reflink directory a failure.
pub const REQUIRE_REFLINK: &str = "VHD_MERGE_REQUIRE_REFLINK";

/// A fresh temporary directory on the reflink file system, or `None` (after a note; a panic
/// when [`REQUIRE_REFLINK`] is set) when there is none.
pub fn tempdir() -> Option<tempfile::TempDir> {
    let required = std::env::var(REQUIRE_REFLINK).is_ok_and(|v| v == "1");
    let dir = std::env::var_os(REFLINK_DIR).map(PathBuf::from);
    let why = match &dir {
        None => format!("{REFLINK_DIR} is not set"),
        Some(d) => match tempfile::tempdir_in(d) {
            Ok(t) if clones(t.path()) => return Some(t),
            Ok(_) => format!("{} does not clone blocks", d.display()),
            Err(e) => format!("{}: {e}", d.display()),
        },
    };
    assert!(
        !required,
        "a reflink file system is required ({REQUIRE_REFLINK}=1) but not usable: {why}"
    );
    note(&format!(
        "skipping (NOT passed): no reflink file system ({why}); .ci/run mounts a loop XFS and sets {REFLINK_DIR}"
    ));
    None
}

/// Whether two files in `dir` can share a block.
fn clones(dir: &Path) -> bool {
    let (a, b) = (dir.join(".probe-a"), dir.join(".probe-b"));
    std::fs::write(&a, [7u8; 4096]).unwrap();
    let src = std::fs::File::open(&a).unwrap();
    let dst = std::fs::File::create(&b).unwrap();
    let r = vhd_merge::io::clone_file_range(&src, 0, &dst, 0, 4096);
    let _ = (std::fs::remove_file(&a), std::fs::remove_file(&b));
    matches!(r, Ok(vhd_merge::CloneOutcome::Cloned))
}

/// Bytes of `path` in extents the file system reports as shared with another file
/// (FIEMAP, flag `FIEMAP_EXTENT_SHARED`), after syncing the file.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn shared_bytes(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const FIEMAP_EXTENT_LAST: u32 = 1;
    const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
    const EXTENTS: usize = 256;
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped: u32,
        count: u32,
        reserved: u32,
        extents: [Extent; EXTENTS],
    }
    let file = std::fs::File::open(path).unwrap();
    let (mut start, mut shared) = (0u64, 0u64);
    loop {
        let mut m = Fiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped: 0,
            count: EXTENTS as u32,
            reserved: 0,
            extents: [Extent::default(); EXTENTS],
        };
        // SAFETY: FS_IOC_FIEMAP reads the header of `m` and writes at most `count` extents
        // into its array, which is that long; `m` outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut m) };
        assert_eq!(
            rc,
            0,
            "FIEMAP {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        let got = &m.extents[..m.mapped as usize];
        for e in got {
            if e.flags & FIEMAP_EXTENT_SHARED != 0 {
                shared += e.length;
            }
        }
        match got.last() {
            Some(e) if e.flags & FIEMAP_EXTENT_LAST == 0 => start = e.logical + e.length,
            _ => return shared,
        }
    }
}

/// Elsewhere no clone works, so [`tempdir`] never gives a directory to look at.
#[cfg(not(target_os = "linux"))]
pub fn shared_bytes(path: &Path) -> u64 {
    panic!("FIEMAP is Linux only ({})", path.display())
}
