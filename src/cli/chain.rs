//! `vhd-merge chain`: list a chain child first, with how each parent was found.

use std::path::PathBuf;
use std::process::ExitCode;

use vhd_merge::{Chain, DiskKind, Result};

use super::ChainArgs;

/// Arguments of `vhd-merge chain`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VHD to start from (usually the newest differencing disk).
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
}

/// Run the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let chain = Chain::open(&args.file, &args.chain.options(&args.file))?;
    if args.json {
        let layers: Vec<serde_json::Value> = chain
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mut j = layer_json(l.layer.as_ref());
                j["index"] = i.into();
                j["found_by"] = l.found_by.to_string().into();
                j["warnings"] = all_warnings(l).into();
                j
            })
            .collect();
        super::print_json(&serde_json::json!({
            "path": args.file.display().to_string(),
            "layer_count": layers.len(),
            "layers": layers,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    for (i, l) in chain.layers().iter().enumerate() {
        let v = l.layer.as_ref();
        println!("layer {i}: {}", v.path().display());
        let block = match v.kind() {
            DiskKind::Fixed => String::new(),
            _ => format!(", block size {}", human(v.block_size())),
        };
        println!(
            "  type {}, virtual size {} ({} bytes){block}",
            v.kind().name(),
            human(v.virtual_size()),
            v.virtual_size()
        );
        println!("  unique id {}", v.id());
        if i == 0 {
            println!("  opened as given");
        } else {
            println!("  found by {}", l.found_by);
        }
        for w in all_warnings(l) {
            println!("  warning: {w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `chain` and `create` show of one file: `path`, `disk_type`, `virtual_size`,
/// `block_size` (null for a fixed disk), `unique_id`, `parent_unique_id`, `parent_name`.
pub fn layer_json(v: &dyn vhd_merge::layer::Layer) -> serde_json::Value {
    let link = v.parent_link().ok().flatten();
    serde_json::json!({
        "path": v.path().to_string_lossy(),
        "disk_type": v.kind().name(),
        "virtual_size": v.virtual_size(),
        "block_size": (v.kind() != DiskKind::Fixed).then(|| v.block_size()),
        "unique_id": v.id().to_string(),
        "parent_unique_id": link.as_ref().and_then(|k| k.ids.first()).map(|u| u.to_string()),
        "parent_name": link.map(|k| k.name),
    })
}

/// The link's warnings, then the file's own.
fn all_warnings(l: &vhd_merge::ChainLayer) -> Vec<String> {
    l.warnings
        .iter()
        .chain(l.layer.warnings())
        .cloned()
        .collect()
}

/// Bytes in binary units, e.g. `40 MiB`, `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
