//! Finding the other differencing disks that depend on files a merge changes (siblings), by
//! a cheap probe of each file in a few directories ([`crate::layer::probe`]: a VHD's footer
//! and dynamic header, a VHDX's headers, log and metadata), whatever their format.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::layer::{DiskKind, Format};
use crate::locator::canonical_or_self;

/// Identity of a disk image read cheaply (see [`crate::layer::probe`]), whatever its format.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScannedLayer {
    /// The path.
    pub path: PathBuf,
    /// Its format, by its signature.
    pub format: Format,
    /// Fixed, dynamic or differencing.
    pub kind: DiskKind,
    /// The identity children link to ([`crate::Layer::id`]).
    pub id: Uuid,
    /// For a differencing disk, the parent identities it accepts (never empty then; a VHD
    /// accepts one, a VHDX up to two: `parent_linkage` and `parent_linkage2`).
    pub parent_ids: Vec<Uuid>,
}

impl ScannedLayer {
    /// Whether this disk is a child of a layer whose identity is `id`.
    pub fn is_child_of(&self, id: Uuid) -> bool {
        self.parent_ids.contains(&id)
    }
}

/// Read the identity of the disk image at `path` cheaply, with checksums checked; `None` for
/// anything that is not a regular file holding an image of a known format whose identity
/// (and, for a differencing disk, parent identity) reads intact. At most a few small reads:
/// cheap enough to run over whole directories.
pub fn peek_layer(path: &Path) -> Option<ScannedLayer> {
    let probe = crate::layer::probe(path)?;
    let (Some(id), Some(kind)) = (probe.id, probe.kind) else {
        return None;
    };
    if kind == DiskKind::Differencing && probe.parent_ids.is_empty() {
        return None;
    }
    Some(ScannedLayer {
        path: path.to_path_buf(),
        format: probe.format,
        kind,
        id,
        parent_ids: probe.parent_ids,
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

/// Differencing disks in `dirs` (not recursing), of any format, that accept a parent identity
/// in `parents`, except the files in `exclude` (canonical paths). Unreadable entries and
/// files that are no disk image are skipped.
pub(crate) fn children_in(
    dirs: &[PathBuf],
    parents: &HashSet<Uuid>,
    exclude: &HashSet<PathBuf>,
) -> Vec<ScannedLayer> {
    let mut seen_dirs = HashSet::new();
    let mut seen_files = HashSet::new();
    let mut out = Vec::new();
    for dir in dirs {
        let canon_dir = std::fs::canonicalize(dir).ok();
        if !seen_dirs.insert(canon_dir.clone().unwrap_or_else(|| dir.clone())) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let canon = canonical_entry(canon_dir.as_deref(), &entry);
            if exclude.contains(&canon) || !seen_files.insert(canon) {
                continue;
            }
            if let Some(v) = peek_layer(&path)
                && v.parent_ids.iter().any(|p| parents.contains(p))
            {
                out.push(v);
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// The canonical path of directory entry `entry` ([`canonical_or_self`] of its path), given
/// the canonical path of its directory when that resolved: on Unix, for an entry that is no
/// symbolic link (by the type the listing gives), that directory joined with its name, which
/// is what resolving the whole path gives, without resolving the directory again per entry.
fn canonical_entry(canon_dir: Option<&Path>, entry: &std::fs::DirEntry) -> PathBuf {
    match (canon_dir, entry.file_type()) {
        (Some(d), Ok(t)) if cfg!(unix) && !t.is_symlink() => d.join(entry.file_name()),
        _ => canonical_or_self(&entry.path()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan finds VHD and VHDX children alike, with every parent identity a VHDX child
    /// accepts, and skips what is not a child of the wanted parents.
    #[test]
    fn children_of_either_format_are_found() {
        use crate::create::{CreateOptions, create_differencing, create_dynamic};
        use crate::vhdx::create as vx;
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let o = CreateOptions::default();
        let vhd_base = create_dynamic(p("b.vhd"), 4 << 20, &o).unwrap().unique_id();
        let vhd_child = create_differencing(p("c.vhd"), p("b.vhd"), &o)
            .unwrap()
            .unique_id();
        let xo = vx::CreateOptions::default();
        let vhdx_base = vx::create_dynamic(p("b.vhdx"), 4 << 20, &xo)
            .unwrap()
            .data_write_guid();
        let vhdx_child = vx::create_differencing(p("c.avhdx"), p("b.vhdx"), &xo)
            .unwrap()
            .data_write_guid();
        std::fs::write(p("junk"), [7u8; 4096]).unwrap();

        let c = peek_layer(&p("c.avhdx")).unwrap();
        assert_eq!(
            (c.format, c.kind, c.id),
            (Format::Vhdx, DiskKind::Differencing, vhdx_child)
        );
        assert!(c.is_child_of(vhdx_base));
        let c = peek_layer(&p("c.vhd")).unwrap();
        assert_eq!(
            (c.format, c.id, c.parent_ids.clone()),
            (Format::Vhd, vhd_child, vec![vhd_base])
        );
        let b = peek_layer(&p("b.vhdx")).unwrap();
        assert!(b.kind == DiskKind::Dynamic && b.parent_ids.is_empty());
        assert!(peek_layer(&p("junk")).is_none());

        let dirs = [dir.path().to_path_buf()];
        let parents: HashSet<Uuid> = [vhd_base, vhdx_base].into();
        let found = children_in(&dirs, &parents, &HashSet::new());
        let names: Vec<_> = found.iter().map(|v| v.path.file_name().unwrap()).collect();
        assert_eq!(names, ["c.avhdx", "c.vhd"]);
        let only_vhdx: HashSet<Uuid> = [vhdx_base].into();
        let exclude: HashSet<PathBuf> = [canonical_or_self(&p("c.avhdx"))].into();
        assert!(children_in(&dirs, &only_vhdx, &exclude).is_empty());
    }

    /// An entry that is a symbolic link is resolved on its own: a link to an excluded file is
    /// excluded, and a link to a file the scan lists is that file (listed once).
    #[cfg(unix)]
    #[test]
    fn a_link_in_the_directory_is_the_file_it_names() {
        use crate::vhdx::create as vx;
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let xo = vx::CreateOptions::default();
        let base = vx::create_dynamic(p("b.vhdx"), 4 << 20, &xo)
            .unwrap()
            .data_write_guid();
        vx::create_differencing(p("c.avhdx"), p("b.vhdx"), &xo).unwrap();
        std::os::unix::fs::symlink(p("c.avhdx"), p("link.avhdx")).unwrap();
        let dirs = [dir.path().to_path_buf()];
        let parents: HashSet<Uuid> = [base].into();
        assert_eq!(children_in(&dirs, &parents, &HashSet::new()).len(), 1);
        let exclude: HashSet<PathBuf> = [canonical_or_self(&p("c.avhdx"))].into();
        assert!(children_in(&dirs, &parents, &exclude).is_empty());
    }
}
