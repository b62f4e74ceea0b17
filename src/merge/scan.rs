//! Finding the other differencing disks that depend on files a merge changes (siblings), by
//! reading only the footer and dynamic header of each file in a few directories.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::layer::DiskKind;
use crate::locator::canonical_or_self;

/// Identity of a disk image read cheaply (VHD: its footer and, for a differencing disk, its
/// header; see [`crate::layer::probe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedVhd {
    /// The path.
    pub path: PathBuf,
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskKind,
    /// The footer's unique id.
    pub unique_id: Uuid,
    /// The parent's unique id, for a differencing disk.
    pub parent_unique_id: Option<Uuid>,
}

/// Read the identity of the VHD at `path` from its footer (the end one, else the offset-0
/// copy) and dynamic header, with checksums checked; `None` for anything that is not a regular
/// file holding a VHD. At most three small reads: cheap enough to run over whole directories.
pub fn peek_vhd(path: &Path) -> Option<ScannedVhd> {
    let probe = crate::layer::probe(path)?;
    let (Some(unique_id), Some(disk_type)) = (probe.id, probe.kind) else {
        return None;
    };
    let parent_unique_id = probe.parent_ids.first().copied();
    if disk_type == DiskKind::Differencing && parent_unique_id.is_none() {
        return None;
    }
    Some(ScannedVhd {
        path: path.to_path_buf(),
        disk_type,
        unique_id,
        parent_unique_id,
    })
}

/// `p` without `.` components (`dir/./a.vhd` as a relative locator resolves is `dir/a.vhd`);
/// `..` is kept, as removing it is only right when no symlink is involved.
pub(crate) fn tidy(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// The directory holding `p` (`.` for a bare file name).
pub(crate) fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Differencing disks in `dirs` (not recursing) whose parent unique id is in `parents`, except
/// the files in `exclude` (canonical paths). Unreadable entries and non-VHD files are skipped.
pub(crate) fn children_in(
    dirs: &[PathBuf],
    parents: &HashSet<Uuid>,
    exclude: &HashSet<PathBuf>,
) -> Vec<ScannedVhd> {
    let mut seen_dirs = HashSet::new();
    let mut seen_files = HashSet::new();
    let mut out = Vec::new();
    for dir in dirs {
        if !seen_dirs.insert(canonical_or_self(dir)) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let canon = canonical_or_self(&path);
            if exclude.contains(&canon) || !seen_files.insert(canon) {
                continue;
            }
            if let Some(v) = peek_vhd(&path)
                && v.parent_unique_id.is_some_and(|p| parents.contains(&p))
            {
                out.push(v);
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}
