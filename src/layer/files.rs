//! Opening files, whatever their format: the one rule for a file a command writes (open it
//! and take the exclusive lock first), regular files only, advisory locks with their retry,
//! and what a path that is not a regular file is.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{FileStorage, Storage};

/// Take an advisory lock (exclusive or shared) on `storage`, the file at `path`; see
/// [`crate::Layer::lock`]. A conflicting lock is retried for about 60 ms before giving up: a
/// process that forks between another thread's release of a lock and its own `exec` holds a
/// copy of the released descriptor (and so of its lock) for that moment, which must not look
/// like a real holder. A real holder keeps its lock far longer.
pub(crate) fn take_lock(storage: &dyn Storage, path: &Path, exclusive: bool) -> Result<()> {
    let mut wait_ms = 1;
    loop {
        match storage.try_lock(exclusive) {
            Ok(true) => return Ok(()),
            Ok(false) if wait_ms <= 32 => {
                std::thread::sleep(std::time::Duration::from_millis(wait_ms));
                wait_ms *= 2;
            }
            Ok(false) => {
                return Err(Error::InUse(format!(
                    "{} is in use: another process holds a lock on it (a merge or another tool)",
                    path.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("{}: locking", path.display()), e)),
        }
    }
}

/// What a command that writes a file expects to find at its path (see [`open_for_writing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// A file that exists, opened for reading and writing.
    Existing,
    /// No file: a new one is created (an existing one is refused).
    CreateNew,
    /// A new file, or an existing one emptied in place (`create --force`): truncated only
    /// once the lock is held.
    Truncate,
    /// An existing file that is about to be replaced by renaming another over it (`flatten
    /// --force`): opened read-only, only to hold the lock until the rename.
    Replace,
}

/// The one rule for every command that writes a file (create, set-parent, repair, flatten
/// over an existing output, merge): open it and take the exclusive advisory lock a merge
/// takes on its destination (the other layers of a merge are locked shared, which conflicts
/// too), before any byte changes. Another holder gives [`Error::InUse`] (32774). The lock
/// lasts as long as the returned storage.
pub(crate) fn open_for_writing(path: &Path, mode: WriteMode) -> Result<FileStorage> {
    let exists = match std::fs::symlink_metadata(path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(format!("{}: cannot open", path.display()), e)),
    };
    let file = match mode {
        WriteMode::Existing => open_regular_file(path, true)?,
        WriteMode::Replace => open_regular_file(path, false)?,
        WriteMode::CreateNew => create_file(path, false)?,
        WriteMode::Truncate if exists => {
            // Never open a FIFO or a device (an open could block or write to it).
            let _ = open_regular_file(path, false)?;
            create_file(path, true)?
        }
        WriteMode::Truncate => create_file(path, true)?,
    };
    let storage = FileStorage::new(file);
    take_lock(&storage, path, true)?;
    if mode == WriteMode::Truncate {
        storage
            .set_len(0)
            .map_err(|e| Error::io(format!("{}: truncating", path.display()), e))?;
    }
    Ok(storage)
}

/// Create `path` for reading and writing; `existing_ok` opens an existing file without
/// truncating it (the caller truncates once it holds the lock).
fn create_file(path: &Path, existing_ok: bool) -> Result<File> {
    let mut o = File::options();
    o.read(true).write(true);
    if existing_ok {
        o.create(true);
    } else {
        o.create_new(true);
    }
    o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::InvalidParameter(format!(
                "{} already exists (the overwrite option (--force) replaces it)",
                path.display()
            ))
        } else {
            Error::io(format!("{}: cannot create", path.display()), e)
        }
    })
}

/// Open a path that must be a regular file (not a directory, FIFO or device).
pub(crate) fn open_regular_file(path: &Path, writable: bool) -> Result<File> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("{}: cannot open", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::InvalidParameter(format!(
            "{} is not a regular file ({})",
            path.display(),
            file_kind(&meta)
        )));
    }
    let file = File::options()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| {
            let what = if writable {
                "cannot open for writing"
            } else {
                "cannot open"
            };
            Error::io(format!("{}: {what}", path.display()), e)
        })?;
    Ok(file)
}

/// What a path that is not a regular file is, for messages.
pub(crate) fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_block_device() || ft.is_char_device() {
            return "a device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}
