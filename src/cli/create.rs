//! `vhd-merge create fixed|dynamic FILE --size SIZE` and
//! `vhd-merge create differencing FILE --parent PARENT`: new VHD or VHDX disks laid out like
//! Windows writes them (the format by `--format`, else by FILE's extension: `.vhdx` and
//! `.avhdx` are VHDX).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vhd_merge::create::{self, CreateOptions};
use vhd_merge::{DiskKind, Error, Format, OpenOptions, Result, Vhd};

/// Arguments of `vhd-merge create`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    kind: Kind,
}

/// SIZE values: bytes, or a number with a binary suffix K, M, G, T (or KiB, MiB, GiB, TiB),
/// case-insensitive.
const SIZE_HELP: &str = "bytes, or a number with K, M, G, T (= KiB, MiB, GiB, TiB; binary)";

/// The file format of a new disk.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ImageFormat {
    /// VHD (v1).
    Vhd,
    /// VHDX (v2).
    Vhdx,
}

/// What every kind takes.
#[derive(clap::Args, Debug)]
struct Common {
    /// The new file.
    file: PathBuf,
    /// Replace FILE if it exists (never a differencing disk's parent).
    #[arg(long)]
    force: bool,
    /// The format [default: vhdx for a .vhdx or .avhdx FILE, else vhd].
    #[arg(long, value_enum)]
    format: Option<ImageFormat>,
    /// Logical sector size of a VHDX, 512 or 4096 [default: 512; a differencing disk takes
    /// its parent's]. A VHD always has 512.
    #[arg(long, value_name = "BYTES")]
    sector_size: Option<u32>,
    /// Print one JSON object instead of text (docs/json.md).
    #[arg(long)]
    json: bool,
}

impl Args {
    /// `--json`, whatever the kind.
    pub fn json(&self) -> bool {
        match &self.kind {
            Kind::Fixed { common, .. }
            | Kind::Dynamic { common, .. }
            | Kind::Differencing { common, .. } => common.json,
        }
    }
}

#[derive(clap::Subcommand, Debug)]
enum Kind {
    /// A fixed disk: every block allocated (a sparse file where the file system allows).
    Fixed {
        #[command(flatten)]
        common: Common,
        /// Virtual size: bytes, or a number with K, M, G, T (= KiB, MiB, GiB, TiB; binary).
        #[arg(long, value_name = "SIZE")]
        size: String,
        /// VHDX only: block size, a power of two from 1M to 256M [default: 2M]. A fixed VHD
        /// has no blocks.
        #[arg(long, value_name = "SIZE")]
        block_size: Option<String>,
    },
    /// A dynamic disk: blocks are allocated as data is written.
    Dynamic {
        #[command(flatten)]
        common: Common,
        /// Virtual size: bytes, or a number with K, M, G, T (= KiB, MiB, GiB, TiB; binary).
        #[arg(long, value_name = "SIZE")]
        size: String,
        /// Block size: for a VHD a power of two from 512 bytes to 32M (Windows uses 2M, the
        /// default, or 512K); for a VHDX from 1M to 256M [default: 32M, as Hyper-V].
        #[arg(long, value_name = "SIZE")]
        block_size: Option<String>,
    },
    /// A differencing disk over PARENT (of the same format), inheriting its size.
    Differencing {
        #[command(flatten)]
        common: Common,
        /// The parent (any type).
        #[arg(long, value_name = "PARENT")]
        parent: PathBuf,
        /// Block size [default: for a VHD the parent's when it is dynamic or differencing,
        /// else 2M; for a VHDX 2M, as Hyper-V].
        #[arg(long, value_name = "SIZE")]
        block_size: Option<String>,
    },
}

/// One `create` request, whatever its kind.
struct Request {
    kind: DiskKind,
    common: Common,
    size: Option<String>,
    parent: Option<PathBuf>,
    block_size: Option<String>,
}

impl From<Kind> for Request {
    fn from(k: Kind) -> Request {
        let (kind, common, size, parent, block_size) = match k {
            Kind::Fixed {
                common,
                size,
                block_size,
            } => (DiskKind::Fixed, common, Some(size), None, block_size),
            Kind::Dynamic {
                common,
                size,
                block_size,
            } => (DiskKind::Dynamic, common, Some(size), None, block_size),
            Kind::Differencing {
                common,
                parent,
                block_size,
            } => (
                DiskKind::Differencing,
                common,
                None,
                Some(parent),
                block_size,
            ),
        };
        Request {
            kind,
            common,
            size,
            parent,
            block_size,
        }
    }
}

impl Request {
    /// The format: `--format`, else by FILE's extension.
    fn image_format(&self) -> ImageFormat {
        let ext = self
            .common
            .file
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match (self.common.format, ext.as_deref()) {
            (Some(f), _) => f,
            (None, Some("vhdx" | "avhdx")) => ImageFormat::Vhdx,
            _ => ImageFormat::Vhd,
        }
    }

    fn size(&self) -> Result<u64> {
        parse_size(self.size.as_deref().unwrap_or(""), "--size")
    }

    /// A differencing disk's parent must have the new disk's format (a chain mixes none).
    fn check_parent_format(&self, want: Format) -> Result<()> {
        let Some(parent) = &self.parent else {
            return Ok(());
        };
        match vhd_merge::layer::detect_format(parent) {
            Some(f) if f != want => Err(Error::InvalidParameter(format!(
                "--parent {}: a {} parent for a {} differencing disk; a chain mixes no formats",
                parent.display(),
                f.name(),
                want.name()
            ))),
            _ => Ok(()),
        }
    }
}

/// Run the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let req = Request::from(args.kind);
    let format = req.image_format();
    match format {
        ImageFormat::Vhd => run_vhd(&req),
        ImageFormat::Vhdx => run_vhdx(&req),
    }?;
    if req.common.json {
        super::print_json(&super::to_value(&create::report_file(&req.common.file)?)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_vhd(req: &Request) -> Result<()> {
    if req.common.sector_size.is_some_and(|s| s != 512) {
        return Err(Error::InvalidParameter(
            "--sector-size: a VHD has 512-byte sectors; 4096 needs a VHDX (--format vhdx)".into(),
        ));
    }
    req.check_parent_format(Format::Vhd)?;
    let bs = req
        .block_size
        .as_deref()
        .map(parse_block_size)
        .transpose()?;
    let vhd = match (req.kind, &req.parent) {
        (DiskKind::Fixed, _) if bs.is_some() => {
            return Err(Error::InvalidParameter(
                "--block-size: a fixed disk has no blocks in a VHD; it applies to dynamic and differencing disks, and to a fixed VHDX"
                    .into(),
            ));
        }
        (DiskKind::Fixed, _) => create::create_fixed(
            &req.common.file,
            req.size()?,
            &options(req.common.force, None),
        )?,
        (DiskKind::Differencing, Some(parent)) => {
            let bs = match bs {
                Some(bs) => bs,
                None => parent_block_size(parent)?,
            };
            create::create_differencing(
                &req.common.file,
                parent,
                &options(req.common.force, Some(bs)),
            )?
        }
        _ => {
            let bs = bs.unwrap_or(create::DEFAULT_BLOCK_SIZE);
            create::create_dynamic(
                &req.common.file,
                req.size()?,
                &options(req.common.force, Some(bs)),
            )?
        }
    };
    if super::summaries() && !req.common.json {
        print_created(&vhd);
    }
    Ok(())
}

/// A Format error of the VHDX rules on a parameter is a parameter error (32773).
fn param(e: Error) -> Error {
    match e {
        Error::Format { detail, .. } => Error::InvalidParameter(detail),
        e => e,
    }
}

fn run_vhdx(req: &Request) -> Result<()> {
    use vhd_merge::vhdx::create as vx;
    use vhd_merge::vhdx::format::metadata::{
        check_block_size, check_sector_size, check_virtual_size,
    };
    req.check_parent_format(Format::Vhdx)?;
    let sector = req.common.sector_size;
    if req.kind == DiskKind::Differencing && sector.is_some() {
        return Err(Error::InvalidParameter(
            "--sector-size: a differencing VHDX takes its parent's logical sector size".into(),
        ));
    }
    let sector = sector.unwrap_or(512);
    check_sector_size("logical", sector).map_err(param)?;
    let bs = req
        .block_size
        .as_deref()
        .map(parse_block_size)
        .transpose()?;
    if let Some(bs) = bs {
        check_block_size(bs).map_err(param)?;
    }
    let opts = vx::CreateOptions::default()
        .block_size(bs)
        .logical_sector_size(sector)
        .force(req.common.force);
    let v = match (req.kind, &req.parent) {
        (DiskKind::Differencing, Some(parent)) => {
            vx::create_differencing(&req.common.file, parent, &opts)?
        }
        (kind, _) => {
            let size = req.size()?;
            check_virtual_size(size, sector).map_err(param)?;
            if kind == DiskKind::Fixed {
                vx::create_fixed(&req.common.file, size, &opts)?
            } else {
                vx::create_dynamic(&req.common.file, size, &opts)?
            }
        }
    };
    if super::summaries() && !req.common.json {
        print_created_vhdx(&req.common.file, req.kind, &v);
    }
    Ok(())
}

fn print_created_vhdx<S: vhd_merge::io::Storage>(
    file: &Path,
    kind: DiskKind,
    v: &vhd_merge::vhdx::Vhdx<S>,
) {
    let mut line = format!(
        "created {} VHDX {}: {} bytes, block size {}, logical sector size {}",
        kind.name(),
        file.display(),
        v.virtual_size(),
        v.block_size(),
        v.sector_size()
    );
    if let Some(Ok(id)) = v.parent_locator().map(|p| p.parent_linkage()) {
        line.push_str(&format!(", parent linkage {id}"));
    }
    line.push_str(&format!(", data write guid {}", v.data_write_guid()));
    println!("{line}");
}

fn options(force: bool, block_size: Option<u32>) -> CreateOptions {
    let mut o = CreateOptions::default().overwrite(force);
    if let Some(bs) = block_size {
        o.block_size = bs;
    }
    o
}

/// The parent's block size when it has one, so that the chain merges block for block;
/// otherwise the Windows default.
fn parent_block_size(parent: &Path) -> Result<u32> {
    let p = Vhd::open(parent, OpenOptions::read_only())?;
    Ok(p.header()
        .map_or(create::DEFAULT_BLOCK_SIZE, |h| h.block_size))
}

fn print_created(vhd: &Vhd) {
    let mut line = format!(
        "created {} VHD {}: {} bytes",
        vhd.disk_type().name(),
        vhd.path().display(),
        vhd.virtual_size()
    );
    if let Some(h) = vhd.header() {
        line.push_str(&format!(", block size {}", h.block_size));
    }
    if let Some(id) = vhd.parent_unique_id() {
        line.push_str(&format!(", parent unique id {id}"));
    }
    line.push_str(&format!(", unique id {}", vhd.unique_id()));
    println!("{line}");
}

/// Parse a `--block-size` SIZE (see [`parse_size`]) for every command that takes one.
pub(crate) fn parse_block_size(text: &str) -> Result<u32> {
    let v = parse_size(text, "--block-size")?;
    u32::try_from(v).map_err(|_| {
        Error::InvalidParameter(format!(
            "--block-size {text:?} is {v} bytes; a block size is at most 32 MiB (VHD) or 256 MiB (VHDX)"
        ))
    })
}

/// Parse a SIZE: decimal bytes, or a decimal number followed by K, M, G, T, KiB, MiB, GiB or
/// TiB (binary multiples, case-insensitive, optional space before the suffix). Rejects zero,
/// overflow and values that are not a multiple of 512; `what` names the option in messages.
pub(crate) fn parse_size(text: &str, what: &str) -> Result<u64> {
    let bad =
        |why: String| Error::InvalidParameter(format!("{what} {text:?}: {why} ({SIZE_HELP})"));
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    if digits.is_empty() {
        return Err(bad("expected a whole number of bytes".into()));
    }
    let shift = match suffix.trim_start().to_ascii_lowercase().as_str() {
        "" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        s if s.starts_with('.') || s.starts_with(',') => {
            return Err(bad("fractions are not accepted".into()));
        }
        s => return Err(bad(format!("unknown unit {s:?}"))),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| bad("the number is too large".into()))?;
    let v = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("the size is too large (it does not fit in 64 bits)".into()))?;
    if v == 0 {
        return Err(bad("the size must not be zero".into()));
    }
    if !v.is_multiple_of(512) {
        return Err(bad(format!(
            "{v} bytes is not a multiple of the 512-byte sector"
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512", "x").unwrap(), 512);
        assert_eq!(parse_size("1k", "x").unwrap(), 1024);
        assert_eq!(parse_size("1KiB", "x").unwrap(), 1024);
        assert_eq!(parse_size("3 MiB", "x").unwrap(), 3 << 20);
        assert_eq!(parse_size("2g", "x").unwrap(), 2 << 30);
        assert_eq!(parse_size("2gib", "x").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T", "x").unwrap(), 1 << 40);
        assert_eq!(parse_size("1tIb", "x").unwrap(), 1 << 40);
        for bad in [
            "",
            "0",
            "0M",
            "1000",
            "1.5M",
            "M",
            "-1M",
            "10 MB",
            "10X",
            "16777216T",
            "99999999999999999999999",
        ] {
            let e = parse_size(bad, "--size").unwrap_err();
            assert_eq!(e.return_code(), vhd_merge::ReturnCode::InvalidParameter);
            assert!(e.to_string().starts_with("--size"), "{e}");
        }
        assert!(
            parse_size("16777216T", "x")
                .unwrap_err()
                .to_string()
                .contains("64 bits")
        );
        assert!(
            parse_size("1000", "x")
                .unwrap_err()
                .to_string()
                .contains("multiple of the 512")
        );
    }
}
