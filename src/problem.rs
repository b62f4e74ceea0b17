//! The one vocabulary for what is wrong with a file: a [`Problem`] has a [`Severity`] and a
//! [`ProblemCode`], and says where it is (file, structure, offset, block) and what is wrong.
//!
//! Every report uses it: validation while a VHD is opened ([`crate::vhd::Vhd::inspect`]),
//! `check` (VHD and VHDX, [`crate::check`]), `repair` (what it did not repair) and `info`
//! (what stops a strict open). Which problems stop an open is written once, in
//! [`Problem::stops_open`] (with [`ProblemCode::open_tolerates`]).
//!
//! ```
//! use vhd_merge::problem::{Problem, ProblemCode, Severity};
//!
//! let code = ProblemCode::from_name("footer-copy-bad").unwrap();
//! assert_eq!(code, ProblemCode::FooterCopyBad);
//! assert_eq!(code.to_string(), "footer-copy-bad");
//! // Damage for a checker, but an open goes on with a warning.
//! let p = Problem::new(Severity::Error, code, "disk.vhd", "footer copy", "checksum mismatch");
//! assert!(!p.stops_open() && p.warns_on_open());
//! ```

use std::fmt;
use std::path::PathBuf;

/// How serious a [`Problem`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Severity {
    /// Worth knowing; nothing is wrong (noted by inspections and checks only).
    Info,
    /// Odd, or risky with some tools, but the data is readable as it is; opening succeeds and
    /// lists it in [`crate::vhd::Vhd::warnings`].
    Warning,
    /// The file is damaged or inconsistent: `check` exits non-zero, and a strict open fails
    /// unless the code is one it tolerates ([`ProblemCode::open_tolerates`]).
    Error,
}

#[cfg(feature = "serde")]
serialize_as_name!(Severity);

impl Severity {
    /// `info`, `warning` or `error`.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// The code list, each code written once: the variant, its name (the stable string of the
/// text and JSON reports) and its documentation.
macro_rules! problem_codes {
    ($($(#[doc = $doc:literal])+ $variant:ident = $name:literal,)+) => {
        /// Stable identifier of the kind of a [`Problem`]; [`ProblemCode::name`] is the string
        /// the reports print (`footer-checksum`, `bat-entry-outside`, `header-bad`, ...).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ProblemCode {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl ProblemCode {
            /// Every code, in the order of this list.
            pub const ALL: &'static [ProblemCode] = &[$(ProblemCode::$variant,)+];

            /// The code's stable name, as the reports print it.
            pub fn name(self) -> &'static str {
                match self {
                    $(ProblemCode::$variant => $name,)+
                }
            }

            /// The code named `name` ([`ProblemCode::name`]), if there is one.
            pub fn from_name(name: &str) -> Option<ProblemCode> {
                match name {
                    $($name => Some(ProblemCode::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

problem_codes! {
    // Validation of a VHD (what opening checks).
    /// The file is too small, or no footer parses anywhere.
    NotAVhd = "not-a-vhd",
    /// A footer's checksum does not match (the one in use).
    FooterChecksum = "footer-checksum",
    /// The end footer is missing or damaged; the offset-0 copy is in use.
    FooterEndBad = "footer-end-bad",
    /// The footer is a 511-byte one.
    FooterShort = "footer-short",
    /// The offset-0 copy is missing or damaged.
    FooterCopyBad = "footer-copy-bad",
    /// The offset-0 copy parses but is not byte-for-byte the end footer.
    FooterCopyDiffers = "footer-copy-differs",
    /// A footer field is invalid or unsupported (disk type, version, size).
    FooterField = "footer-field",
    /// A footer field is odd (features, saved state, fixed-disk data offset).
    FooterOdd = "footer-odd",
    /// The virtual size is the CHS size, not Current Size.
    SizeChs = "size-chs",
    /// A fixed disk's data area does not fit before its footer.
    FixedTruncated = "fixed-truncated",
    /// Bytes between a fixed disk's data and its footer.
    FixedGap = "fixed-gap",
    /// The footer's Data Offset does not point at a dynamic header inside the file.
    HeaderOffset = "header-offset",
    /// No dynamic header cookie.
    HeaderCookie = "header-cookie",
    /// The dynamic header's checksum does not match.
    HeaderChecksum = "header-checksum",
    /// A dynamic header field is invalid or unsupported.
    HeaderField = "header-field",
    /// A dynamic header field is odd but usable (alignment, data offset, parent id).
    HeaderOdd = "header-odd",
    /// Max Table Entries is larger than Current Size needs.
    BatLarger = "bat-larger",
    /// The BAT runs past the end of the file or overlaps the header.
    BatPlacement = "bat-placement",
    /// The BAT has more entries than [`crate::vhd::MAX_TABLE_ENTRIES`]: not supported.
    BatTooLarge = "bat-too-large",
    /// A BAT entry points (partly) outside the file.
    BatEntryOutside = "bat-entry-outside",
    /// A block overlaps another block or metadata.
    BlockOverlap = "block-overlap",
    /// Two metadata structures overlap (the batmap and the end footer, ...).
    MetadataOverlap = "metadata-overlap",
    /// A parent locator's data lies outside the file.
    LocatorOutside = "locator-outside",
    /// A parent locator's data overlaps a block or metadata.
    LocatorOverlap = "locator-overlap",
    /// The blktap batmap header or map is damaged.
    Batmap = "batmap",
    /// Reading the file failed.
    Io = "io",
    // What only `check` looks at in a VHD, and the links of a chain.
    /// A structure could not be read (VHD and VHDX).
    Unreadable = "unreadable",
    /// A differencing disk names itself as its parent (VHD and VHDX).
    SelfParent = "self-parent",
    /// A differencing disk's Parent Unique Id is all zero.
    NoParentId = "no-parent-id",
    /// A differencing disk has neither a parent name nor parent locators.
    NoParentHint = "no-parent-hint",
    /// A reserved field is not zero.
    ReservedField = "reserved-field",
    /// A dynamic or differencing disk is larger than Windows and QEMU accept.
    TooLarge = "too-large",
    /// A block is allocated past the virtual size.
    BlockPastEnd = "block-past-end",
    /// Bitmap bits are set for sectors past the virtual size (VHD and VHDX).
    BitmapPastEnd = "bitmap-past-end",
    /// Never-written sectors of a dynamic disk hold non-zero data.
    UnwrittenNotZero = "unwritten-not-zero",
    /// The blktap batmap's checksum does not match.
    BatmapChecksum = "batmap-checksum",
    /// The batmap marks a block full that is not.
    BatmapNotFull = "batmap-not-full",
    /// The chain cannot be opened.
    Chain = "chain",
    /// A parent's time stamp does not match what its child recorded.
    ParentTimestamp = "parent-timestamp",
    /// A child is larger than its parent.
    ChildLarger = "child-larger",
    /// A child's block size differs from its parent's.
    BlockSizeDiffers = "block-size-differs",
    // What the VHDX check finds.
    /// A VHDX is shorter than its 1 MiB header section.
    Truncated = "truncated",
    /// The VHDX file identifier is damaged.
    Identifier = "identifier",
    /// A VHDX header copy is damaged.
    HeaderBad = "header-bad",
    /// No VHDX header can be chosen as the current one.
    HeaderConflict = "header-conflict",
    /// Both VHDX headers are identical.
    HeadersIdentical = "headers-identical",
    /// A VHDX header's DataWriteGuid is zero.
    NilGuid = "nil-guid",
    /// The VHDX log lies outside the file.
    LogOutside = "log-outside",
    /// The VHDX log cannot be replayed.
    LogUnreplayable = "log-unreplayable",
    /// The VHDX log has an active sequence to replay.
    LogDirty = "log-dirty",
    /// A VHDX region table copy is damaged.
    RegionTableBad = "region-table-bad",
    /// The two VHDX region table copies differ.
    RegionTablesDiffer = "region-tables-differ",
    /// The VHDX region table's regions are unusable (missing, misplaced, unknown).
    Regions = "regions",
    /// A VHDX region lies outside the file.
    RegionOutside = "region-outside",
    /// The VHDX metadata table or an item is damaged.
    MetadataBad = "metadata-bad",
    /// A VHDX parent locator has a key this tool does not know.
    LocatorKey = "locator-key",
    /// The VHDX BAT region does not fit the disk's geometry.
    BatSize = "bat-size",
    /// A VHDX BAT entry has an invalid state.
    BatState = "bat-state",
    /// A VHDX BAT entry has reserved bits set.
    BatReserved = "bat-reserved",
    /// A VHDX BAT entry without data has a file offset.
    BatOffset = "bat-offset",
    /// A VHDX payload block lies outside the file.
    BlockOutside = "block-outside",
    /// A PARTIALLY_PRESENT block in a disk without a parent.
    PartialNoParent = "partial-no-parent",
    /// A sector bitmap entry in a disk without a parent (ignored).
    BitmapEntryIgnored = "bitmap-entry-ignored",
    /// A sector bitmap block lies outside the file.
    BitmapOutside = "bitmap-outside",
    /// A PARTIALLY_PRESENT block has no sector bitmap block.
    BitmapMissing = "bitmap-missing",
    /// A PARTIALLY_PRESENT block's bitmap has no bit set.
    PartialEmpty = "partial-empty",
    /// Two objects of a VHDX overlap.
    Overlap = "overlap",
    /// Something a VHDX uses is not supported.
    NotSupported = "not-supported",
}

impl ProblemCode {
    /// Damage an open tolerates, listing it as a warning, where a checker grades it an error:
    /// a missing, damaged or differing footer copy (`repair` rewrites it), locators an open
    /// cannot use, and a damaged batmap (it is not used).
    pub fn open_tolerates(self) -> bool {
        matches!(
            self,
            ProblemCode::FooterEndBad
                | ProblemCode::FooterCopyBad
                | ProblemCode::FooterCopyDiffers
                | ProblemCode::LocatorOutside
                | ProblemCode::LocatorOverlap
                | ProblemCode::Batmap
        )
    }
}

impl fmt::Display for ProblemCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Ordered by name, as the reports list their summaries.
impl Ord for ProblemCode {
    fn cmp(&self, other: &ProblemCode) -> std::cmp::Ordering {
        self.name().cmp(other.name())
    }
}

impl PartialOrd for ProblemCode {
    fn partial_cmp(&self, other: &ProblemCode) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A code equals its name (`code == "footer-checksum"`).
impl PartialEq<str> for ProblemCode {
    fn eq(&self, other: &str) -> bool {
        self.name() == other
    }
}

impl PartialEq<&str> for ProblemCode {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

#[cfg(feature = "serde")]
serialize_as_name!(ProblemCode);

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ProblemCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ProblemCode::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown problem code `{name}`")))
    }
}

/// One thing found wrong (or worth noting) in a file. In JSON, `file` is `path`.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// How serious it is.
    pub severity: Severity,
    /// The kind of problem.
    pub code: ProblemCode,
    /// The file it is in.
    #[cfg_attr(feature = "serde", serde(rename = "path"))]
    pub file: PathBuf,
    /// The structure: `footer`, `footer copy`, `dynamic header`, `BAT`, `block N`,
    /// `locator N`, `batmap`, `file`, `chain`, or a VHDX one (`header 1`, `log`, ...).
    pub structure: String,
    /// Byte offset in the file, when there is one.
    pub offset: Option<u64>,
    /// The block, for problems about one BAT entry or block.
    pub block: Option<u64>,
    /// What is wrong, and what was expected.
    pub message: String,
}

impl Problem {
    /// A problem without offset or block (see [`Problem::at`]).
    pub fn new(
        severity: Severity,
        code: ProblemCode,
        file: impl Into<PathBuf>,
        structure: impl Into<String>,
        message: impl Into<String>,
    ) -> Problem {
        Problem {
            severity,
            code,
            file: file.into(),
            structure: structure.into(),
            offset: None,
            block: None,
            message: message.into(),
        }
    }

    /// The problem at a byte offset and block.
    pub fn at(self, offset: Option<u64>, block: Option<u64>) -> Problem {
        Problem {
            offset,
            block,
            ..self
        }
    }

    /// True when a strict open fails on it: an error whose code an open does not tolerate.
    pub fn stops_open(&self) -> bool {
        self.severity == Severity::Error && !self.code.open_tolerates()
    }

    /// True when an open goes on and lists it as a warning ([`crate::vhd::Vhd::warnings`]).
    pub fn warns_on_open(&self) -> bool {
        self.severity != Severity::Info && !self.stops_open()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_unique_and_round_trips() {
        let mut names: Vec<&str> = ProblemCode::ALL.iter().map(|c| c.name()).collect();
        for &c in ProblemCode::ALL {
            assert_eq!(ProblemCode::from_name(c.name()), Some(c));
            assert_eq!(c.to_string(), c.name());
            assert!(c == c.name());
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ProblemCode::ALL.len());
        assert_eq!(ProblemCode::from_name("no-such-code"), None);
    }

    #[test]
    fn codes_order_by_name() {
        let mut codes = ProblemCode::ALL.to_vec();
        codes.sort();
        let names: Vec<&str> = codes.iter().map(|c| c.name()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }

    #[test]
    fn what_stops_an_open() {
        let p = |severity, code| Problem::new(severity, code, "f.vhd", "footer", "m");
        for &code in ProblemCode::ALL {
            assert_eq!(
                p(Severity::Error, code).stops_open(),
                !code.open_tolerates()
            );
            assert_eq!(
                p(Severity::Error, code).warns_on_open(),
                code.open_tolerates()
            );
            assert!(!p(Severity::Warning, code).stops_open());
            assert!(p(Severity::Warning, code).warns_on_open());
            assert!(!p(Severity::Info, code).stops_open());
            assert!(!p(Severity::Info, code).warns_on_open());
        }
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serde_by_name() {
        let v = serde_json::to_value(ProblemCode::FooterCopyBad).unwrap();
        assert_eq!(v, serde_json::json!("footer-copy-bad"));
        let back: ProblemCode = serde_json::from_value(v).unwrap();
        assert_eq!(back, ProblemCode::FooterCopyBad);
        assert!(serde_json::from_value::<ProblemCode>(serde_json::json!("nope")).is_err());
        let p = Problem::new(
            Severity::Warning,
            ProblemCode::SizeChs,
            "d.vhd",
            "footer",
            "m",
        );
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["path"], "d.vhd");
        assert_eq!(v["severity"], "warning");
        assert_eq!(v["code"], "size-chs");
    }
}
