//! `vhd-merge create fixed|dynamic FILE --size SIZE` and
//! `vhd-merge create differencing FILE --parent PARENT`: new disks laid out like Windows
//! writes them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vhd_merge::create::{self, CreateOptions};
use vhd_merge::{Error, OpenOptions, Result, Vhd};

/// Arguments of `vhd-merge create`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    kind: Kind,
}

/// SIZE values: bytes, or a number with a binary suffix K, M, G, T (or KiB, MiB, GiB, TiB),
/// case-insensitive.
const SIZE_HELP: &str = "bytes, or a number with K, M, G, T (= KiB, MiB, GiB, TiB; binary)";

#[derive(clap::Subcommand, Debug)]
enum Kind {
    /// A fixed disk: the data area followed by the footer (a sparse file where the file
    /// system allows).
    Fixed {
        /// The new file.
        file: PathBuf,
        /// Virtual size: bytes, or a number with K, M, G, T (= KiB, MiB, GiB, TiB; binary).
        #[arg(long, value_name = "SIZE")]
        size: String,
        /// Not used: a fixed disk has no blocks (accepted so that the error says so).
        #[arg(long, value_name = "SIZE", hide = true)]
        block_size: Option<String>,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// A dynamic disk: blocks are allocated as data is written.
    Dynamic {
        /// The new file.
        file: PathBuf,
        /// Virtual size: bytes, or a number with K, M, G, T (= KiB, MiB, GiB, TiB; binary).
        #[arg(long, value_name = "SIZE")]
        size: String,
        /// Block size, a power of two from 512 bytes to 32 MiB (Windows uses 2M or 512K).
        #[arg(long, value_name = "SIZE", default_value = "2M")]
        block_size: String,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// A differencing disk over PARENT, inheriting its size.
    Differencing {
        /// The new file.
        file: PathBuf,
        /// The parent VHD (any type).
        #[arg(long, value_name = "PARENT")]
        parent: PathBuf,
        /// Block size, a power of two from 512 bytes to 32 MiB [default: the parent's when it
        /// is dynamic or differencing, else 2M].
        #[arg(long, value_name = "SIZE")]
        block_size: Option<String>,
        /// Replace FILE if it exists (never the parent).
        #[arg(long)]
        force: bool,
    },
}

/// Run the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let vhd = match args.kind {
        Kind::Fixed {
            file,
            size,
            block_size,
            force,
        } => {
            if block_size.is_some() {
                return Err(Error::InvalidParameter(
                    "--block-size: a fixed disk has no blocks; it applies to dynamic and differencing disks"
                        .into(),
                ));
            }
            let size = parse_size(&size, "--size")?;
            create::create_fixed(&file, size, &options(force, None))?
        }
        Kind::Dynamic {
            file,
            size,
            block_size,
            force,
        } => {
            let size = parse_size(&size, "--size")?;
            let bs = parse_block_size(&block_size)?;
            create::create_dynamic(&file, size, &options(force, Some(bs)))?
        }
        Kind::Differencing {
            file,
            parent,
            block_size,
            force,
        } => {
            let bs = match block_size {
                Some(s) => parse_block_size(&s)?,
                None => parent_block_size(&parent)?,
            };
            create::create_differencing(&file, &parent, &options(force, Some(bs)))?
        }
    };
    if super::summaries() {
        print_created(&vhd);
    }
    Ok(ExitCode::SUCCESS)
}

fn options(force: bool, block_size: Option<u32>) -> CreateOptions {
    let mut o = CreateOptions {
        overwrite: force,
        ..CreateOptions::default()
    };
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
            "--block-size {text:?} is {v} bytes; a VHD block size is at most 32 MiB"
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
