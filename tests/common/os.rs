//! What some tests need from the operating system: whether they run as root, a file even root
//! cannot write (the immutable attribute), a read-only file, symbolic links, the space a file
//! occupies, and a small real file system that fills up (a tmpfs; root only). Each returns
//! `None` or `false` where the system does not allow it, and the test says what it checks
//! instead.
//!
//! Every test compiles on every OS. One that needs what only some systems have (FIFOs, device
//! files, POSIX signals, a pseudo-terminal, mounting) is marked
//! `#[cfg_attr(not(unix), ignore = "why")]` (or `not(target_os = "linux")`, or `windows` for a
//! POSIX-only rule), so the test report lists it as ignored with the reason instead of leaving
//! it out.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Make `link` a symbolic link to `target` (a file or a directory). False, with a note, where
/// that is not possible or the link does not lead to `target` (Windows without the symbolic
/// link privilege; Wine 8); a panic on Unix, where it must work.
pub fn symlink(target: &Path, link: &Path) -> bool {
    #[cfg(unix)]
    let r = std::os::unix::fs::symlink(target, link);
    #[cfg(windows)]
    let r = if target.is_dir() {
        std::os::windows::fs::symlink_dir(target, link)
    } else {
        std::os::windows::fs::symlink_file(target, link)
    };
    let what = format!("symlink {} -> {}", link.display(), target.display());
    let resolves = r.is_ok() && same_file::is_same_file(target, link).unwrap_or(false);
    assert!(resolves || !cfg!(unix), "{what}: {r:?}");
    if !resolves {
        super::note(&format!(
            "{what} not possible here ({r:?}): that case is not checked"
        ));
    }
    resolves
}

/// Clear the write permission bits of `p` (on Windows: set the read-only attribute).
pub fn set_read_only(p: &Path) {
    let mut perms = std::fs::metadata(p).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(p, perms).unwrap();
}

/// The bytes the files of `dir` occupy on the device (their allocated blocks), or `None` where
/// std does not tell (not Unix).
pub fn used_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let files = std::fs::read_dir(dir).unwrap();
        Some(
            files
                .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
                .sum(),
        )
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// True when the tests run as root (effective user id 0), which ignores permission bits.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A file made immutable (`chattr +i`: even root cannot open it for writing) until dropped,
/// so that the temporary directory can be deleted.
pub struct Immutable(PathBuf);

impl Immutable {
    /// Make `p` immutable, or `None` when the file system or the user does not allow it.
    pub fn new(p: &Path) -> Option<Immutable> {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(p)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Immutable(p.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A file this process cannot open for writing, until dropped (see [`unwritable`]).
pub struct Unwritable {
    path: PathBuf,
    immutable: Option<Immutable>,
}

/// Make `p` read-only ([`set_read_only`]) and, when the tests run as root (which ignores
/// permission bits), immutable too. `None` when this process can still open it for writing:
/// root without `chattr`, or Wine run by root (the read-only attribute becomes permission
/// bits, which root ignores).
pub fn unwritable(p: &Path) -> Option<Unwritable> {
    set_read_only(p);
    let mut guard = Unwritable {
        path: p.to_path_buf(),
        immutable: None,
    };
    if is_root() {
        guard.immutable = Some(Immutable::new(p)?);
    }
    let writable = std::fs::OpenOptions::new().write(true).open(p).is_ok();
    (!writable).then_some(guard)
}

impl Drop for Unwritable {
    /// Writable again, so that the test can go on with the file and Windows can delete it.
    #[allow(clippy::permissions_set_readonly_false)] // the owner's test file, not a shared one
    fn drop(&mut self) {
        drop(self.immutable.take());
        if let Ok(meta) = std::fs::metadata(&self.path) {
            let mut perms = meta.permissions();
            perms.set_readonly(false);
            let _ = std::fs::set_permissions(&self.path, perms);
        }
    }
}

/// A tmpfs mounted at a directory, unmounted when dropped.
pub struct Mount(PathBuf);

impl Mount {
    /// Mount a tmpfs of `bytes` at `dir`, or `None` when that is not possible (not root).
    pub fn tmpfs(dir: &Path, bytes: u64) -> Option<Mount> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes}"))
            .arg("tmpfs")
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Mount(dir.to_path_buf()))
    }

    /// Change the size limit to `bytes`; panics when the remount fails.
    pub fn resize(&self, bytes: u64) {
        let ok = Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={bytes}"))
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount of {} failed", self.0.display());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
