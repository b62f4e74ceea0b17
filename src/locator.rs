//! Parent locator payloads: how a parent path is spelled into a child (§2.2, §5.3), and
//! the small path helpers reading them back needs. Finding the parent is [`crate::chain`]'s job.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::PlatformCode;

/// Bytes reserved for each locator written by this crate: room for a path of 2048 UTF-16 units,
/// so that a later set-parent usually rewrites it in place.
pub const LOCATOR_SPACE: u64 = 4096;

/// An absolute, lexically normalised form of `path` (`.` and `..` removed, no symlinks
/// resolved), relative to the current directory when it is relative.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path)
        .map_err(|e| Error::io(format!("{}: making the path absolute", path.display()), e))?;
    Ok(normalize(&abs))
}

/// Remove `.` and `..` components lexically.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(c);
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The path of `target` relative to directory `from`, both absolute and normalised; `None` when
/// they have different roots (another drive on Windows).
pub fn relative_path(from: &Path, target: &Path) -> Option<PathBuf> {
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = target.components().collect();
    if a.first() != b.first() {
        return None;
    }
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c);
    }
    Some(out)
}

/// The W2ru payload text: a relative path in Windows syntax, `.\name` for a parent in the same
/// directory, `..\dir\name` for one elsewhere.
pub fn windows_relative(rel: &Path) -> String {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let joined = parts.join("\\");
    if parts.first().is_some_and(|p| p == "..") {
        joined
    } else {
        format!(".\\{joined}")
    }
}

/// A `file://` URL for an absolute path, percent-encoding bytes outside RFC 3986's unreserved
/// and path characters (the MacX payload, §2.2).
pub fn file_url(abs: &Path) -> String {
    let s = abs.to_string_lossy().replace('\\', "/");
    let mut out = String::from("file://");
    if !s.starts_with('/') {
        out.push('/');
    }
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/!$&'()*+,;=:@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The path in a `file://` URL, with or without `localhost`, percent-decoded. `None` when the
/// text is not a file URL.
pub fn path_from_file_url(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("file://")
        .or_else(|| url.strip_prefix("FILE://"))?;
    let rest = rest.strip_prefix("localhost").unwrap_or(rest);
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// The locators a new or re-pointed child gets for `parent` (§5.3, written like Windows with
/// an addition for other hosts): W2ru relative to the child's directory, W2ku absolute as the
/// host spells it, and on non-Windows hosts MacX as a file URL.
pub fn parent_locators(child: &Path, parent: &Path) -> Result<Vec<(PlatformCode, Vec<u8>)>> {
    let child_abs = absolute(child)?;
    let parent_abs = absolute(parent)?;
    let child_dir = child_abs.parent().unwrap_or(Path::new("/"));
    let mut out = Vec::new();
    if let Some(rel) = relative_path(child_dir, &parent_abs) {
        out.push((
            PlatformCode::W2ru,
            PlatformCode::W2ru.encode_payload(&windows_relative(&rel)),
        ));
    }
    let abs_text = parent_abs.to_string_lossy().into_owned();
    out.push((
        PlatformCode::W2ku,
        PlatformCode::W2ku.encode_payload(&abs_text),
    ));
    if !cfg!(windows) {
        out.push((
            PlatformCode::MacX,
            PlatformCode::MacX.encode_payload(&file_url(&parent_abs)),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let r = relative_path(Path::new("/a/b"), Path::new("/a/b/p.vhd")).unwrap();
        assert_eq!(windows_relative(&r), ".\\p.vhd");
        let r = relative_path(Path::new("/a/b"), Path::new("/a/c/p.vhd")).unwrap();
        assert_eq!(windows_relative(&r), "..\\c\\p.vhd");
        let r = relative_path(Path::new("/a/b/c"), Path::new("/x.vhd")).unwrap();
        assert_eq!(windows_relative(&r), "..\\..\\..\\x.vhd");
    }

    #[test]
    fn normalizing() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    }

    #[test]
    fn urls_round_trip() {
        let u = file_url(Path::new("/home/u/my disk%.vhd"));
        assert_eq!(u, "file:///home/u/my%20disk%25.vhd");
        assert_eq!(path_from_file_url(&u).unwrap(), "/home/u/my disk%.vhd");
        assert_eq!(
            path_from_file_url("file://localhost/dir/parent.vhd").unwrap(),
            "/dir/parent.vhd"
        );
        assert_eq!(path_from_file_url("/plain/path"), None);
        // A stray % at the end is kept as is.
        assert_eq!(path_from_file_url("file:///a%").unwrap(), "/a%");
        assert_eq!(path_from_file_url("file:///a%4").unwrap(), "/a%4");
    }
}
