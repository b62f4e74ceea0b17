//! One error type for the whole crate, and the `MergeVirtualHardDisk` return codes it maps to.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The return values of Hyper-V's `Msvm_ImageManagementService.MergeVirtualHardDisk`.
///
/// Every [`Error`] maps to one of these through [`Error::return_code`], so a caller that
/// speaks the WMI API's language can keep doing so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ReturnCode {
    /// Completed with No Error (0).
    Completed = 0,
    /// Method Parameters Checked - Job Started (4096).
    JobStarted = 4096,
    /// Failed (32768).
    Failed = 32768,
    /// Access Denied (32769).
    AccessDenied = 32769,
    /// Not Supported (32770).
    NotSupported = 32770,
    /// Status is unknown (32771).
    StatusUnknown = 32771,
    /// Timeout (32772).
    Timeout = 32772,
    /// Invalid parameter (32773).
    InvalidParameter = 32773,
    /// System is in use (32774).
    SystemInUse = 32774,
    /// Invalid state for this operation (32775).
    InvalidState = 32775,
    /// Incorrect data type (32776).
    IncorrectDataType = 32776,
    /// System is not available (32777).
    SystemNotAvailable = 32777,
    /// Out of memory (32778).
    OutOfMemory = 32778,
    /// File not found (32779).
    FileNotFound = 32779,
}

impl ReturnCode {
    /// The numeric value, as `MergeVirtualHardDisk` returns it.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The name Microsoft's documentation gives the value.
    pub fn name(self) -> &'static str {
        match self {
            ReturnCode::Completed => "Completed with No Error",
            ReturnCode::JobStarted => "Method Parameters Checked - Job Started",
            ReturnCode::Failed => "Failed",
            ReturnCode::AccessDenied => "Access Denied",
            ReturnCode::NotSupported => "Not Supported",
            ReturnCode::StatusUnknown => "Status is unknown",
            ReturnCode::Timeout => "Timeout",
            ReturnCode::InvalidParameter => "Invalid parameter",
            ReturnCode::SystemInUse => "System is in use",
            ReturnCode::InvalidState => "Invalid state for this operation",
            ReturnCode::IncorrectDataType => "Incorrect data type",
            ReturnCode::SystemNotAvailable => "System is not available",
            ReturnCode::OutOfMemory => "Out of memory",
            ReturnCode::FileNotFound => "File not found",
        }
    }
}

impl fmt::Display for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.name())
    }
}

/// Why one candidate path for a parent was not accepted (see [`Error::ParentNotFound`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentCandidate {
    /// The path that was tried.
    pub path: PathBuf,
    /// Where the path came from: a locator code such as `W2ru`, `header name`, `--parent`.
    pub source: String,
    /// What was wrong with it.
    pub reason: String,
}

/// The crate's error type.
///
/// Messages name the file, the offset or field, and what was expected. [`Error::return_code`]
/// gives the `MergeVirtualHardDisk` value for each.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is not a VHD, or a structure in it is damaged or inconsistent.
    #[error("{}{detail}", path_prefix(.path))]
    Format {
        /// The file, when known.
        path: Option<PathBuf>,
        /// What is wrong, where, and what was expected.
        detail: String,
    },
    /// A checksum does not match; reading with `lenient` accepts it.
    #[error(
        "{}{structure} checksum mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x} (reading leniently, with the lenient option (--lenient), accepts it; `vhd-merge repair` rewrites it)",
        path_prefix(.path)
    )]
    Checksum {
        /// The file, when known.
        path: Option<PathBuf>,
        /// `footer` or `dynamic header`.
        structure: &'static str,
        /// Byte offset of the structure in the file.
        offset: u64,
        /// The value stored in the file.
        stored: u32,
        /// The value computed from the bytes.
        computed: u32,
    },
    /// A caller passed something that cannot work (a wrong destination, a bad size, ...).
    #[error("{0}")]
    InvalidParameter(String),
    /// The files are in a state that forbids the operation (siblings that a merge would corrupt, ...).
    #[error("{0}")]
    InvalidState(String),
    /// The file uses a feature this crate does not handle.
    #[error("{}{detail}", path_prefix(.path))]
    NotSupported {
        /// The file, when known.
        path: Option<PathBuf>,
        /// What is not supported.
        detail: String,
    },
    /// Another process holds a lock on a file of the operation.
    #[error("{0}")]
    InUse(String),
    /// The operation may not write a file.
    #[error("{0}")]
    AccessDenied(String),
    /// A parent could not be found; every candidate tried is listed.
    #[error("{}", parent_not_found_message(.child, .parent_name, .parent_id, .tried))]
    ParentNotFound {
        /// The child whose parent is missing.
        child: PathBuf,
        /// The parent name recorded in the child's header.
        parent_name: String,
        /// The parent unique id recorded in the child.
        parent_id: uuid::Uuid,
        /// Every candidate tried, and why each failed.
        tried: Vec<ParentCandidate>,
    },
    /// The operation was cancelled; nothing is lost and re-running finishes it.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A verify pass found data that differs from what was expected.
    #[error("{0}")]
    VerifyFailed(String),
}

fn path_prefix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!("{}: ", p.display()),
        None => String::new(),
    }
}

fn parent_not_found_message(
    child: &Path,
    name: &str,
    id: &uuid::Uuid,
    tried: &[ParentCandidate],
) -> String {
    let mut s = format!(
        "{}: parent \"{}\" (unique id {}) not found; tried {} candidate(s)",
        child.display(),
        name,
        id,
        tried.len()
    );
    for c in tried {
        s.push_str(&format!(
            "\n  {} [{}]: {}",
            c.path.display(),
            c.source,
            c.reason
        ));
    }
    s.push_str("\n  (give the parent with --parent PATH or --search-dir DIR, or fix the link with set-parent)");
    s
}

impl Error {
    /// The `MergeVirtualHardDisk` return code for this error.
    pub fn return_code(&self) -> ReturnCode {
        match self {
            Error::Io { source, .. } => io_return_code(source),
            Error::Format { .. } | Error::Checksum { .. } => ReturnCode::IncorrectDataType,
            Error::InvalidParameter(_) => ReturnCode::InvalidParameter,
            Error::InvalidState(_) => ReturnCode::InvalidState,
            Error::NotSupported { .. } => ReturnCode::NotSupported,
            Error::InUse(_) => ReturnCode::SystemInUse,
            Error::AccessDenied(_) => ReturnCode::AccessDenied,
            Error::ParentNotFound { .. } => ReturnCode::FileNotFound,
            Error::Cancelled(_) | Error::VerifyFailed(_) => ReturnCode::Failed,
        }
    }

    /// An I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A format error in a file that is not yet known (see [`Error::in_file`]).
    pub fn format(detail: impl Into<String>) -> Error {
        Error::Format {
            path: None,
            detail: detail.into(),
        }
    }

    /// A "not supported" error in a file that is not yet known.
    pub fn not_supported(detail: impl Into<String>) -> Error {
        Error::NotSupported {
            path: None,
            detail: detail.into(),
        }
    }

    /// Attach the file name to an error that was raised without one.
    pub fn in_file(mut self, file: &Path) -> Error {
        match &mut self {
            Error::Format { path, .. }
            | Error::Checksum { path, .. }
            | Error::NotSupported { path, .. }
                if path.is_none() =>
            {
                *path = Some(file.to_path_buf());
            }
            _ => {}
        }
        self
    }

    /// True when the error is a checksum mismatch (which lenient opening accepts).
    pub fn is_checksum(&self) -> bool {
        matches!(self, Error::Checksum { .. })
    }
}

fn io_return_code(e: &io::Error) -> ReturnCode {
    match e.kind() {
        io::ErrorKind::NotFound => ReturnCode::FileNotFound,
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            ReturnCode::AccessDenied
        }
        io::ErrorKind::OutOfMemory => ReturnCode::OutOfMemory,
        io::ErrorKind::WouldBlock | io::ErrorKind::ResourceBusy => ReturnCode::SystemInUse,
        io::ErrorKind::TimedOut => ReturnCode::Timeout,
        _ => ReturnCode::Failed,
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_seed() {
        let all = [
            (ReturnCode::Completed, 0),
            (ReturnCode::JobStarted, 4096),
            (ReturnCode::Failed, 32768),
            (ReturnCode::AccessDenied, 32769),
            (ReturnCode::NotSupported, 32770),
            (ReturnCode::StatusUnknown, 32771),
            (ReturnCode::Timeout, 32772),
            (ReturnCode::InvalidParameter, 32773),
            (ReturnCode::SystemInUse, 32774),
            (ReturnCode::InvalidState, 32775),
            (ReturnCode::IncorrectDataType, 32776),
            (ReturnCode::SystemNotAvailable, 32777),
            (ReturnCode::OutOfMemory, 32778),
            (ReturnCode::FileNotFound, 32779),
        ];
        for (rc, v) in all {
            assert_eq!(rc.code(), v);
        }
    }

    #[test]
    fn io_errors_map_by_kind() {
        let e = Error::io("open x", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.return_code(), ReturnCode::FileNotFound);
        let e = Error::io("open x", io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(e.return_code(), ReturnCode::AccessDenied);
        let e = Error::io("write x", io::Error::other("disk on fire"));
        assert_eq!(e.return_code(), ReturnCode::Failed);
    }

    #[test]
    fn format_errors_name_the_file() {
        let e = Error::format("bad cookie at offset 0").in_file(Path::new("/x/a.vhd"));
        assert_eq!(e.to_string(), "/x/a.vhd: bad cookie at offset 0");
        assert_eq!(e.return_code(), ReturnCode::IncorrectDataType);
    }
}
