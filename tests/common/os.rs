//! What some tests need from the operating system: whether they run as root, a file even root
//! cannot write (the immutable attribute), and a small real file system that fills up (a
//! tmpfs; root only). Each returns `None` or `false` where the system does not allow it, and
//! the test says what it checks instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
