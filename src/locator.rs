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
                // `..` at the root stays at the root, as the OS resolves it; a leading run of
                // `..` in a relative path is kept.
                let last_is_parent =
                    matches!(out.components().next_back(), Some(Component::ParentDir));
                if last_is_parent || (!out.pop() && !out.has_root()) {
                    out.push(c);
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The canonical form of `p`, or `p` itself when it cannot be resolved (it does not exist):
/// for telling files apart by path.
pub(crate) fn canonical_or_self(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// True when both paths exist and name the same file (through hard or symbolic links or
/// different spellings), by file identity: on Unix the device and inode numbers a `stat` of
/// each gives (nothing opened: a merge asks this of every layer), elsewhere the `same-file`
/// crate's (a handle's volume and file index on Windows).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        same_file::is_same_file(a, b).unwrap_or(false)
    }
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
/// and path characters (the MacX payload, §2.2). On Windows `\` separates components and
/// becomes `/`; elsewhere it is a file name character and is encoded (`%5C`).
pub fn file_url(abs: &Path) -> String {
    let s = abs.to_string_lossy();
    let s = if cfg!(windows) {
        s.replace('\\', "/")
    } else {
        s.into_owned()
    };
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

/// The path a `file:` URL names, as text for [`map_locator_path`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlPath {
    /// The path, percent-decoded (bytes that are not UTF-8 replaced).
    pub text: String,
    /// True when the path is a Windows one (`C:\dir\p.vhd` from `file:///C:/dir/p.vhd`, or
    /// `\\server\share\p.vhd` from `file://server/share/p.vhd`), to be mapped with `\` as
    /// separator; false for a POSIX path, in which `\` is a name character.
    pub windows_syntax: bool,
}

/// The path in a `file:` URL (the MacX payload), parsed by the `url` crate: `localhost` or no
/// host is the local machine, a drive-letter path (`file:///Z:/dir/x.vhd`, also `Z|`) becomes
/// `Z:\dir\x.vhd`, another host (`file://server/share/x.vhd`) a UNC path
/// (`\\server\share\x.vhd`). `None` when the text is not a file URL.
pub fn path_from_file_url(text: &str) -> Option<UrlPath> {
    let url = url::Url::parse(text.trim()).ok()?;
    if url.scheme() != "file" {
        return None;
    }
    let decoded: Vec<String> = url
        .path()
        .split('/')
        .map(|seg| {
            percent_encoding::percent_decode_str(seg)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let host = url
        .host_str()
        .filter(|h| !h.is_empty() && *h != "localhost");
    let windows = |parts: &[String]| parts.join("\\");
    // `decoded[0]` is the empty text before the path's leading `/`.
    let rest = decoded.get(1..).unwrap_or_default();
    if let Some(h) = host {
        return Some(UrlPath {
            text: format!("\\\\{h}\\{}", windows(rest)),
            windows_syntax: true,
        });
    }
    if let Some(first) = rest.first()
        && let [d, b':' | b'|'] = first.as_bytes()
        && d.is_ascii_alphabetic()
    {
        let tail = windows(rest.get(1..).unwrap_or_default());
        return Some(UrlPath {
            text: format!("{}:\\{tail}", char::from(*d)),
            windows_syntax: true,
        });
    }
    Some(UrlPath {
        text: decoded.join("/"),
        windows_syntax: false,
    })
}

/// The locators a new or re-pointed child gets for `parent` (§5.3, written like Windows with
/// an addition for other hosts): W2ru relative to the child's directory, W2ku absolute as the
/// host spells it, and on non-Windows hosts MacX as a file URL.
///
/// A POSIX path with a `\` in a component cannot be spelled in the Windows locators (every
/// reader, this crate's included, splits their text at `\`, and Windows cannot name such a
/// file at all): for such a parent only MacX is written, which carries the exact path.
pub fn parent_locators(child: &Path, parent: &Path) -> Result<Vec<(PlatformCode, Vec<u8>)>> {
    let child_abs = absolute(child)?;
    let parent_abs = absolute(parent)?;
    let child_dir = child_abs.parent().unwrap_or(Path::new("/"));
    let mut out = Vec::new();
    let abs_text = parent_abs.to_string_lossy().into_owned();
    if cfg!(windows) || !abs_text.contains('\\') {
        if let Some(rel) = relative_path(child_dir, &parent_abs) {
            out.push((
                PlatformCode::W2ru,
                PlatformCode::W2ru.encode_payload(&windows_relative(&rel)),
            ));
        }
        out.push((
            PlatformCode::W2ku,
            PlatformCode::W2ku.encode_payload(&abs_text),
        ));
    }
    if !cfg!(windows) {
        out.push((
            PlatformCode::MacX,
            PlatformCode::MacX.encode_payload(&file_url(&parent_abs)),
        ));
    }
    Ok(out)
}

/// One place on this host that a locator's path text may name (see [`map_locator_path`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedPath {
    /// The path to try, absolute and lexically normalised.
    pub path: PathBuf,
    /// Which mapping rule produced it: `as written`, `without drive`, `tail in child dir`,
    /// `file name in child dir`, `relative to child`.
    pub rule: &'static str,
    /// True when the path comes from an absolute path in the locator (and so is skipped for
    /// untrusted input); false when it is relative to the child's directory.
    pub absolute: bool,
}

/// At most this many trailing components of an absolute locator path are tried relative to
/// the child's directory (bounding the candidates a hostile locator can produce).
const MAX_TAILS: usize = 8;

/// Map a locator's path text onto this host, relative to the child's directory `child_dir`
/// (absolute), in the order to try (§5.3, §5.4).
///
/// With `windows_syntax` (W2ru, W2ku, Wi2r, Wi2k payloads) `\` separates components on every
/// host. On non-Windows hosts:
///
/// - a relative path (`.\parent.vhd`, `..\dir\parent.vhd`, or a bare name, as blktap writes
///   even into W2ku) is joined to `child_dir`;
/// - a drive-letter path `C:\dir\parent.vhd` is tried without the drive (`/dir/parent.vhd`),
///   then its tails in `child_dir` (`dir/parent.vhd`, then `parent.vhd`);
/// - a rooted path (`\dir\p.vhd`, or a POSIX path as VirtualBox writes into W2ku on Linux) is
///   tried as written, then its tails in `child_dir`;
/// - a UNC path `\\server\share\dir\p.vhd` only by its tails.
///
/// Paths are normalised lexically (`..` removes the previous component, as Windows does).
/// Empty text or text with NUL characters maps to nothing.
pub fn map_locator_path(text: &str, child_dir: &Path, windows_syntax: bool) -> Vec<MappedPath> {
    if text.is_empty() || text.contains('\0') {
        return Vec::new();
    }
    if cfg!(windows) {
        let p = Path::new(text);
        let absolute = p.is_absolute() || p.has_root();
        let path = if absolute {
            normalize(p)
        } else {
            normalize(&child_dir.join(p))
        };
        return vec![MappedPath {
            path,
            rule: if absolute {
                "as written"
            } else {
                "relative to child"
            },
            absolute,
        }];
    }
    let is_sep = |c: char| c == '/' || (windows_syntax && c == '\\');
    let mut rest = text;
    if windows_syntax {
        // Win32 long-path prefixes: `\\?\C:\...`, `\\?\UNC\server\share\...`, and
        // VHDX's volume_path `\\?\Volume{GUID}\dir\p.vhdx` (a volume no other host can
        // name: only its tails mean anything here).
        if let Some(r) = rest.strip_prefix("\\\\?\\") {
            if r.starts_with("Volume{") {
                let mut out = Vec::new();
                push_tails(
                    &mut out,
                    child_dir,
                    components(r, is_sep).get(1..).unwrap_or(&[]),
                );
                return out;
            }
            rest = match r.strip_prefix("UNC\\") {
                Some(unc) => return unc_tails(unc, child_dir, is_sep),
                None => r,
            };
        }
        if rest.starts_with("\\\\") || rest.starts_with("//") {
            return unc_tails(&rest[2..], child_dir, is_sep);
        }
    }
    let bytes = rest.as_bytes();
    let drive =
        windows_syntax && bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    let mut out = Vec::new();
    if drive {
        let after = &rest[2..];
        let comps = components(after, is_sep);
        if !after.starts_with(is_sep) {
            // `C:dir\p.vhd`: relative to the current directory of drive C; read it as relative
            // to the child.
            push_relative(&mut out, child_dir, &comps);
            return out;
        }
        out.push(MappedPath {
            path: normalize(&root_join(&comps)),
            rule: "without drive",
            absolute: true,
        });
        push_tails(&mut out, child_dir, &comps);
    } else if rest.starts_with(is_sep) {
        let comps = components(rest, is_sep);
        out.push(MappedPath {
            path: normalize(&root_join(&comps)),
            rule: "as written",
            absolute: true,
        });
        push_tails(&mut out, child_dir, &comps);
    } else {
        push_relative(&mut out, child_dir, &components(rest, is_sep));
    }
    out
}

fn components(text: &str, is_sep: impl Fn(char) -> bool) -> Vec<&str> {
    text.split(is_sep).filter(|c| !c.is_empty()).collect()
}

fn root_join(comps: &[&str]) -> PathBuf {
    let mut p = PathBuf::from("/");
    for c in comps {
        p.push(c);
    }
    p
}

fn push_relative(out: &mut Vec<MappedPath>, child_dir: &Path, comps: &[&str]) {
    if comps.is_empty() {
        return;
    }
    let mut p = child_dir.to_path_buf();
    for c in comps {
        p.push(c);
    }
    out.push(MappedPath {
        path: normalize(&p),
        rule: "relative to child",
        absolute: false,
    });
}

/// The trailing components of an absolute path, longest first, in the child's directory:
/// a chain copied to another machine keeps its relative layout, and the last one is the file
/// name beside the child. `.` and `..` components are dropped: a tail is a plain descent.
fn push_tails(out: &mut Vec<MappedPath>, child_dir: &Path, comps: &[&str]) {
    let plain: Vec<&str> = comps
        .iter()
        .copied()
        .filter(|c| *c != "." && *c != "..")
        .collect();
    let first = plain.len().saturating_sub(MAX_TAILS);
    for k in first..plain.len() {
        let mut p = child_dir.to_path_buf();
        for c in &plain[k..] {
            p.push(c);
        }
        out.push(MappedPath {
            path: p,
            rule: if k + 1 == plain.len() {
                "file name in child dir"
            } else {
                "tail in child dir"
            },
            absolute: false,
        });
    }
}

fn unc_tails(
    after_slashes: &str,
    child_dir: &Path,
    is_sep: impl Fn(char) -> bool,
) -> Vec<MappedPath> {
    // Skip the server and share names; what follows is the path on the share.
    let comps = components(after_slashes, is_sep);
    let mut out = Vec::new();
    push_tails(&mut out, child_dir, comps.get(2..).unwrap_or(&[]));
    out
}

/// True when `path` is `dir` or lies inside it (both absolute, canonical).
pub fn is_inside(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
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

    #[cfg(not(windows))]
    fn mapped(text: &str, win: bool) -> Vec<(String, &'static str, bool)> {
        map_locator_path(text, Path::new("/vm/child"), win)
            .into_iter()
            .map(|m| (m.path.to_string_lossy().into_owned(), m.rule, m.absolute))
            .collect()
    }

    #[cfg(not(windows))]
    #[test]
    fn locator_path_mapping() {
        assert_eq!(
            mapped(".\\parent.vhd", true),
            [("/vm/child/parent.vhd".into(), "relative to child", false)]
        );
        assert_eq!(
            mapped("..\\base\\p.vhd", true),
            [("/vm/base/p.vhd".into(), "relative to child", false)]
        );
        assert_eq!(
            mapped("C:\\some\\dir\\p.vhd", true),
            [
                ("/some/dir/p.vhd".into(), "without drive", true),
                (
                    "/vm/child/some/dir/p.vhd".into(),
                    "tail in child dir",
                    false
                ),
                ("/vm/child/dir/p.vhd".into(), "tail in child dir", false),
                ("/vm/child/p.vhd".into(), "file name in child dir", false),
            ]
        );
        // POSIX path in a Windows slot (VirtualBox on Linux).
        assert_eq!(mapped("/home/u/p.vhd", true)[0].0, "/home/u/p.vhd");
        assert!(mapped("/home/u/p.vhd", true)[0].2);
        // UNC: only tails.
        assert_eq!(
            mapped("\\\\srv\\share\\d\\p.vhd", true),
            [
                ("/vm/child/d/p.vhd".into(), "tail in child dir", false),
                ("/vm/child/p.vhd".into(), "file name in child dir", false),
            ]
        );
        assert_eq!(mapped("\\\\?\\C:\\x.vhd", true)[0].0, "/x.vhd");
        // A VHDX volume_path: the volume means nothing here, only the tails do.
        assert_eq!(
            mapped(
                "\\\\?\\Volume{9cdf8dfa-0000-0000-0000-501f00000000}\\d\\p.vhdx",
                true
            ),
            [
                ("/vm/child/d/p.vhdx".into(), "tail in child dir", false),
                ("/vm/child/p.vhdx".into(), "file name in child dir", false),
            ]
        );
        // Escapes are normalised but kept: confinement decides.
        assert_eq!(mapped("..\\..\\..\\etc\\p", true)[0].0, "/etc/p");
        assert!(
            mapped("C:\\a\\..\\..\\p", true)
                .iter()
                .all(|m| !m.0.contains(".."))
        );
        // Backslash is a file name character in POSIX syntax (MacX).
        assert_eq!(mapped("/a\\b.vhd", false)[0].0, "/a\\b.vhd");
        assert!(mapped("", true).is_empty());
        assert!(mapped("a\0b", true).is_empty());
        // Hostile depth is bounded.
        let deep = "C:".to_string() + &"\\d".repeat(1000);
        assert!(mapped(&deep, true).len() <= 1 + MAX_TAILS);
    }

    /// On Windows a locator's text is a Windows path: one candidate, as written or relative to
    /// the child, normalised.
    #[cfg(windows)]
    #[test]
    fn locator_path_mapping_on_windows() {
        let child = Path::new(r"C:\vm\child");
        let one = |text: &str| {
            let m = map_locator_path(text, child, true);
            assert_eq!(m.len(), 1, "{text}: {m:?}");
            (m[0].path.clone(), m[0].rule, m[0].absolute)
        };
        let relative = (
            PathBuf::from(r"C:\vm\child\p.vhd"),
            "relative to child",
            false,
        );
        assert_eq!(one(r".\p.vhd"), relative);
        assert_eq!(one("p.vhd"), relative);
        assert_eq!(
            one(r"..\base\p.vhd"),
            (
                PathBuf::from(r"C:\vm\base\p.vhd"),
                "relative to child",
                false
            )
        );
        assert_eq!(
            one(r"D:\a\..\b\p.vhd"),
            (PathBuf::from(r"D:\b\p.vhd"), "as written", true)
        );
        assert_eq!(
            one(r"\\srv\share\d\p.vhd"),
            (PathBuf::from(r"\\srv\share\d\p.vhd"), "as written", true)
        );
        assert!(map_locator_path("", child, true).is_empty());
        assert!(map_locator_path("a\0b", child, true).is_empty());
    }

    #[test]
    fn normalizing() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("/a/../../c")), PathBuf::from("/c"));
        assert_eq!(normalize(Path::new("../../c")), PathBuf::from("../../c"));
        assert_eq!(normalize(Path::new("a/../../c")), PathBuf::from("../c"));
    }

    #[test]
    fn urls_round_trip() {
        let posix = |t: &str| {
            Some(UrlPath {
                text: t.into(),
                windows_syntax: false,
            })
        };
        let win = |t: &str| {
            Some(UrlPath {
                text: t.into(),
                windows_syntax: true,
            })
        };
        let u = file_url(Path::new("/home/u/my disk%.vhd"));
        assert_eq!(u, "file:///home/u/my%20disk%25.vhd");
        assert_eq!(path_from_file_url(&u), posix("/home/u/my disk%.vhd"));
        assert_eq!(
            path_from_file_url("file://localhost/dir/parent.vhd"),
            posix("/dir/parent.vhd")
        );
        assert_eq!(
            path_from_file_url("FILE:///dir/parent.vhd"),
            posix("/dir/parent.vhd")
        );
        assert_eq!(path_from_file_url("/plain/path"), None);
        assert_eq!(path_from_file_url("http://host/p.vhd"), None);
        // A stray % at the end is kept as is.
        assert_eq!(path_from_file_url("file:///a%"), posix("/a%"));
        assert_eq!(path_from_file_url("file:///a%4"), posix("/a%4"));
        // Percent-encoded UTF-8.
        assert_eq!(
            path_from_file_url("file:///d/%C3%A9t%C3%A9%20x.vhd"),
            posix("/d/été x.vhd")
        );
        // Drive letters: an absolute Windows path, not the drive-relative `Z:dir\x.vhd`.
        assert_eq!(
            path_from_file_url("file:///Z:/dir/x.vhd"),
            win("Z:\\dir\\x.vhd")
        );
        assert_eq!(
            path_from_file_url("file:///c|/my%20dir/x.vhd"),
            win("c:\\my dir\\x.vhd")
        );
        assert_eq!(
            path_from_file_url("file://localhost/C:/x.vhd"),
            win("C:\\x.vhd")
        );
        // UNC-ish: another host is a server; four slashes are an empty host, whose path the
        // URL rules reduce to a POSIX one.
        assert_eq!(
            path_from_file_url("file://server/share/d/x.vhd"),
            win("\\\\server\\share\\d\\x.vhd")
        );
        assert_eq!(
            path_from_file_url("file:////server/share/x.vhd"),
            posix("/server/share/x.vhd")
        );
        // A backslash in a POSIX name is a name character: encoded, and decoded back.
        #[cfg(not(windows))]
        {
            let u = file_url(Path::new("/d/back\\slash.vhd"));
            assert_eq!(u, "file:///d/back%5Cslash.vhd");
            assert_eq!(path_from_file_url(&u), posix("/d/back\\slash.vhd"));
        }
    }

    /// A MacX drive-letter URL maps like a W2ku drive-letter path.
    #[cfg(not(windows))]
    #[test]
    fn macx_drive_letter_maps_without_the_drive() {
        let p = path_from_file_url("file:///Z:/dir/x.vhd").unwrap();
        let m = map_locator_path(&p.text, Path::new("/vm/child"), p.windows_syntax);
        assert_eq!(m[0].path, PathBuf::from("/dir/x.vhd"));
        assert_eq!(m[0].rule, "without drive");
        assert_eq!(m.last().unwrap().path, PathBuf::from("/vm/child/x.vhd"));
    }
}
