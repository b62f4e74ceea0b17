//! A VHD's lock and writable open (through the format-agnostic rules of
//! `crate::layer::files`), and [`peek_file`], the cheap look at a file's footers for directory
//! scans.

use std::fs::File;
use std::path::Path;

use uuid::Uuid;

use super::open::{footer_candidates, read_footer_at};
use super::{FooterSource, OpenOptions, Vhd};
use crate::error::Result;
use crate::format::footer::{DiskType, FOOTER_SIZE, Footer};
use crate::format::header::{DynamicHeader, HEADER_SIZE};
use crate::io::{FileStorage, Storage};
use crate::layer::files::{WriteMode, open_for_writing, take_lock};

impl Vhd {
    /// Take an advisory lock (exclusive or shared) for the duration of the open file.
    /// Fails with [`Error::InUse`](crate::Error::InUse) when another process holds a conflicting lock (after a
    /// retry of about 60 ms: a process that forks may hold a copy of a released lock briefly).
    pub fn lock(&self, exclusive: bool) -> Result<()> {
        take_lock(self.storage.as_ref(), &self.path, exclusive)
    }

    /// Open the existing VHD at `path` for writing the way every command that writes one does
    /// (merge, set-parent, repair): with the exclusive advisory lock a merge takes on its
    /// destination, taken before the file is even read, so a file another process is merging
    /// gives [`Error::InUse`](crate::Error::InUse) (32774).
    pub fn open_for_writing(path: impl AsRef<Path>, options: OpenOptions) -> Result<Vhd> {
        let path = path.as_ref();
        let storage = open_for_writing(path, WriteMode::Existing)?;
        let options = OpenOptions {
            writable: true,
            ..options
        };
        Vhd::from_storage(Box::new(storage), path, options)
    }
}

/// What a cheap look at a file finds: its footers and, for a differencing disk, its parent's
/// unique id. Nothing else is validated; at most three small reads. For scanning whole
/// directories for a renamed parent or for siblings, where most files are not wanted.
#[derive(Clone, Debug)]
pub(crate) struct Peek {
    /// The footers [`Vhd::open`] would consider, in its order of preference, those that parse
    /// (checksums not checked).
    pub footers: Vec<Footer>,
    /// The first sector parsed as a footer whatever its disk type (checksum not checked): a
    /// fixed disk that holds a copy of its own footer there.
    pub sector0: Option<Footer>,
    /// For a differencing disk (by [`Peek::footer`]): the Parent Unique Id of its dynamic
    /// header, when the header lies inside the file and its checksum is right.
    pub parent_unique_id: Option<Uuid>,
}

impl Peek {
    /// The footer a strict [`Vhd::open`] goes by: the first candidate whose checksum is right.
    pub fn footer(&self) -> Option<&Footer> {
        self.footers.iter().find(|f| f.checksum_ok())
    }

    /// Whether any footer, checksum right or not, carries unique id `id`: how a damaged copy
    /// of a wanted disk is still recognised (see [`crate::layer::Probe::ids`]).
    #[cfg(test)]
    pub fn carries_id(&self, id: Uuid) -> bool {
        self.footers
            .iter()
            .chain(&self.sector0)
            .any(|f| f.unique_id == id)
    }
}

/// Peek at the file at `path` (for tests; [`crate::layer::probe`] opens the file itself and
/// peeks through that descriptor): `None` when it is not a regular file at least a footer
/// long (its metadata cannot be read, or it is a directory, FIFO, device or shorter file). A
/// file that cannot be opened peeks as one without footers.
#[cfg(test)]
pub(crate) fn peek(path: &Path) -> Option<Peek> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() < FOOTER_SIZE as u64 {
        return None;
    }
    let Ok(file) = File::open(path) else {
        return Some(Peek {
            footers: Vec::new(),
            sector0: None,
            parent_unique_id: None,
        });
    };
    peek_file(file, meta.len())
}

/// Peek at the regular file open as `file`, `len` bytes long: `None` when it is shorter than
/// a footer; a file that cannot be read peeks as one without footers.
pub(crate) fn peek_file(file: File, len: u64) -> Option<Peek> {
    if len < FOOTER_SIZE as u64 {
        return None;
    }
    let mut peek = Peek {
        footers: Vec::new(),
        sector0: None,
        parent_unique_id: None,
    };
    let storage = FileStorage::new(file);
    let candidates = footer_candidates(&storage, len);
    peek.footers = candidates
        .into_iter()
        .filter_map(|c| c.result.ok())
        .collect();
    if len >= 512 + FOOTER_SIZE as u64 {
        peek.sector0 = read_footer_at(&storage, 0, 512, FooterSource::Copy)
            .result
            .ok();
    }
    let header_at = peek
        .footer()
        .filter(|f| f.disk_type == DiskType::Differencing)
        .map(|f| f.data_offset)
        .filter(|at| at.checked_add(HEADER_SIZE as u64).is_some_and(|e| e <= len));
    if let Some(at) = header_at {
        let mut b = [0u8; HEADER_SIZE];
        peek.parent_unique_id = storage
            .read_at(&mut b, at)
            .ok()
            .and_then(|()| DynamicHeader::parse(&b).ok())
            .filter(DynamicHeader::checksum_ok)
            .map(|h| h.parent_unique_id);
    }
    Some(peek)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_reads_footers_and_the_parent_id_without_validating() {
        use crate::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
        let dir = tempfile::tempdir().unwrap();
        let opts = CreateOptions::default();
        let base = dir.path().join("base.vhd");
        let base_id = create_dynamic(&base, 4 << 20, &opts).unwrap().unique_id();
        let child = dir.path().join("child.vhd");
        let child_id = create_differencing(&child, &base, &opts)
            .unwrap()
            .unique_id();
        let fixed = dir.path().join("fixed.vhd");
        let fixed_id = create_fixed(&fixed, 1 << 20, &opts).unwrap().unique_id();
        let flip = |p: &Path, at: usize| {
            let mut b = std::fs::read(p).unwrap();
            b[at] ^= 0xFF;
            std::fs::write(p, b).unwrap();
        };
        let len = |p: &Path| std::fs::metadata(p).unwrap().len() as usize;

        let p = peek(&base).unwrap();
        assert_eq!(p.footer().unwrap().unique_id, base_id);
        assert!(p.footers.len() == 2 && p.carries_id(base_id));
        assert_eq!(p.parent_unique_id, None);
        let p = peek(&child).unwrap();
        assert_eq!(p.footer().unwrap().disk_type, DiskType::Differencing);
        assert_eq!(p.parent_unique_id, Some(base_id));
        let p = peek(&fixed).unwrap();
        assert_eq!(p.footer().unwrap().unique_id, fixed_id);
        assert_eq!(p.footers.len(), 1);

        // A bad end footer checksum: a sparse disk goes by its copy, both still carry the id.
        // The fixed disk's data starts with a copy of its footer (a disk holding a VHD image):
        // a fixed disk has no offset-0 copy, so that is data, not a footer to go by.
        let mut data = std::fs::read(&fixed).unwrap();
        let end = data.len() - 512;
        data.copy_within(end.., 0);
        std::fs::write(&fixed, data).unwrap();
        for path in [&child, &fixed] {
            flip(path, len(path) - 512 + 64);
        }
        let p = peek(&child).unwrap();
        assert_eq!(p.footer().unwrap().unique_id, child_id);
        assert!(!p.footers[0].checksum_ok());
        assert_eq!(p.parent_unique_id, Some(base_id));
        let header_at = p.footer().unwrap().data_offset as usize;
        let p = peek(&fixed).unwrap();
        assert!(p.sector0.as_ref().unwrap().checksum_ok());
        assert!(p.footer().is_none(), "a fixed disk has no copy to go by");
        assert!(p.carries_id(fixed_id));

        // A 511-byte footer (a fixed disk's, truncated by its last byte): found, as open finds it.
        let short = dir.path().join("short.vhd");
        let short_id = create_fixed(&short, 1 << 20, &opts).unwrap().unique_id();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&short)
            .unwrap();
        f.set_len(len(&short) as u64 - 1).unwrap();
        let p = peek(&short).unwrap();
        assert_eq!(p.footer().unwrap().unique_id, short_id);
        assert!(p.carries_id(short_id));

        // A damaged header (a byte of the parent id flipped): no parent id.
        flip(&child, header_at + 40);
        assert_eq!(peek(&child).unwrap().parent_unique_id, None);

        // Not a regular file of at least a footer.
        let tiny = dir.path().join("tiny");
        std::fs::write(&tiny, [0u8; 511]).unwrap();
        assert!(peek(&tiny).is_none());
        assert!(peek(dir.path()).is_none());
        assert!(peek(&dir.path().join("absent")).is_none());
        let junk = dir.path().join("junk");
        std::fs::write(&junk, [0u8; 4096]).unwrap();
        let p = peek(&junk).unwrap();
        assert!(p.footers.is_empty() && p.sector0.is_none() && p.footer().is_none());
    }
}
