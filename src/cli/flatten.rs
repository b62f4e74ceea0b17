//! `vhd-merge flatten`: write a chain's logical content to a new standalone file.

use std::path::PathBuf;
use std::process::ExitCode;

use vhd_merge::{Chain, FlattenFormat, FlattenOptions, Result, flatten};

use super::ChainArgs;

/// Output format of `vhd-merge flatten` (Hyper-V's Convert-VHD targets, and raw).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Format {
    /// Raw image (sparse where zero).
    Raw,
    /// Fixed VHD.
    #[value(name = "vhd-fixed", alias = "fixed")]
    Fixed,
    /// Dynamic VHD; all-zero blocks stay unallocated.
    #[value(name = "vhd-dynamic", alias = "dynamic")]
    Dynamic,
    /// Fixed VHDX (all-zero spans stay holes in the file).
    VhdxFixed,
    /// Dynamic VHDX; all-zero blocks stay unallocated (NOT_PRESENT).
    VhdxDynamic,
}

/// Arguments of `vhd-merge flatten`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VHD whose logical content to write (usually the newest differencing disk).
    pub file: PathBuf,
    /// The new file.
    pub output: PathBuf,
    /// Output format [default: by OUTPUT's extension: .vhdx/.avhdx vhdx-dynamic,
    /// .raw/.img/.bin raw, else vhd-dynamic].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Block size of a dynamic output: bytes, or a number with K, M, G, T (binary), a power of
    /// two from 512 bytes to 32 MiB for VHD, 1 MiB to 256 MiB for VHDX [default: the input's
    /// when the output format allows it, else 2 MiB for VHD and 32 MiB for VHDX].
    #[arg(long, value_name = "SIZE")]
    pub block_size: Option<String>,
    /// Replace OUTPUT if it exists (it is replaced only once the new file is complete).
    #[arg(long)]
    pub force: bool,
    /// Copy every byte, never clone blocks from the inputs (by default whole aligned blocks
    /// are cloned where the file system supports it).
    #[arg(long)]
    pub no_clone: bool,
    /// Print one JSON object instead of text (docs/json.md).
    #[arg(long)]
    pub json: bool,
    /// Progress: a bar on a terminal, or `json` lines on stderr for programs (docs/json.md).
    #[arg(long, value_enum, value_name = "STYLE", default_value_t)]
    pub progress: super::progress::Style,
    #[command(flatten)]
    pub chain: ChainArgs,
}

/// Run the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let block_size = args
        .block_size
        .as_deref()
        .map(super::create::parse_block_size)
        .transpose()?;
    let chain = Chain::open(&args.file, &args.chain.options(&args.file))?;
    let mut warnings = Vec::new();
    for l in chain.layers() {
        for w in l.warnings.iter().chain(l.layer.warnings()) {
            eprintln!("warning: {}: {w}", l.layer.path().display());
            warnings.push(format!("{}: {w}", l.layer.path().display()));
        }
    }
    if super::verbosity() == super::Verbosity::Verbose {
        for l in chain.layers() {
            eprintln!(
                "reading {} ({}, {})",
                l.layer.path().display(),
                l.layer.kind().name(),
                super::units::human(l.layer.virtual_size())
            );
        }
    }
    let t0 = std::time::Instant::now();
    let show = !args.json && super::summaries();
    let bar = super::progress::Bar::with_style("flattening", args.progress, show);
    let last = std::cell::Cell::new((0, 0));
    let mut on_progress = |p: &vhd_merge::FlattenProgress| {
        last.set((p.data_done, p.data_total));
        bar.set(p.data_done, p.data_total)
    };
    let opts = FlattenOptions::default()
        .format(match args.format {
            None => FlattenFormat::from_extension(&args.output),
            Some(Format::Raw) => FlattenFormat::Raw,
            Some(Format::Fixed) => FlattenFormat::Fixed,
            Some(Format::Dynamic) => FlattenFormat::Dynamic,
            Some(Format::VhdxFixed) => FlattenFormat::VhdxFixed,
            Some(Format::VhdxDynamic) => FlattenFormat::VhdxDynamic,
        })
        .force(args.force)
        .block_size(block_size)
        .set_clone(!args.no_clone)
        .progress(Some(&mut on_progress))
        // An interrupt stops it before the next span; the temporary file is removed.
        .cancel(super::signal::install(
            super::signal::Mode::Cancel,
            Some(&args.output),
        ));
    let res = flatten(&chain, &args.output, opts);
    let (done, total) = last.get();
    bar.event(
        super::progress::final_state(res.as_ref().err()),
        done,
        total,
    );
    bar.clear();
    let r = res?;
    if args.json {
        let mut v = super::to_value(&r)?;
        v["path"] = args.file.display().to_string().into();
        v["warnings"] = warnings.into();
        super::print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut line = format!(
        "{}: {} {} from {} layer(s), {} of data ({} cloned)",
        r.output.display(),
        r.format.name(),
        super::units::human(r.virtual_size),
        r.layers,
        super::units::human(r.data_bytes),
        super::units::human(r.bytes_cloned)
    );
    if matches!(
        r.format,
        FlattenFormat::Dynamic | FlattenFormat::VhdxDynamic
    ) {
        line.push_str(&format!(", {} block(s) allocated", r.blocks_allocated));
    }
    if super::verbosity() == super::Verbosity::Verbose {
        line.push_str(&format!(" in {:.2} s", t0.elapsed().as_secs_f64()));
    }
    if super::summaries() {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}
