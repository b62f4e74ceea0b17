//! `vhd-merge merge`: merge a differencing VHD into its parent or an ancestor.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};
use vhd_merge::merge::{MergeOptions, MergePlan, MergeReport, Progress, merge};
use vhd_merge::{Error, JobState, Result};

use super::ChainArgs;

/// Arguments of `vhd-merge merge`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The differencing VHD to merge (it is only read).
    pub source: PathBuf,
    /// The ancestor to merge into; the immediate parent when omitted.
    pub destination: Option<PathBuf>,
    /// Show what would be merged (layers, bytes, blocks to allocate, siblings) without writing.
    #[arg(long)]
    pub dry_run: bool,
    /// Afterwards, read the merged ranges back and compare CRC32s with the source's view.
    #[arg(long)]
    pub verify: bool,
    /// Merge even though other differencing disks depend on the destination or an
    /// intermediate (their content changes), or remove a source that has children.
    #[arg(long)]
    pub force: bool,
    /// Delete the source and the intermediates once the destination is durably merged.
    #[arg(long)]
    pub remove_merged: bool,
    /// Re-point CHILD, a child of the source, at the destination; repeatable.
    #[arg(long = "relink", value_name = "CHILD")]
    pub relink: Vec<PathBuf>,
    /// Copy every byte, never clone blocks (physically separate data; by default whole blocks
    /// are cloned where the file system supports it, e.g. XFS with reflink or btrfs).
    #[arg(long)]
    pub no_clone: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
    /// Print one JSON object at the end instead of text (no progress bar).
    #[arg(long)]
    pub json: bool,
    /// Progress: a bar on a terminal, or `json` lines on stderr for programs (docs/json.md).
    #[arg(long, value_enum, value_name = "STYLE", default_value_t)]
    pub progress: super::progress::Style,
}

/// Run the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let t0 = Instant::now();
    let mut options = MergeOptions::default()
        .chain(args.chain.options(&args.source))
        .dry_run(args.dry_run)
        .verify(args.verify)
        .force(args.force)
        .remove_merged(args.remove_merged)
        .relink(args.relink.clone())
        .set_clone(!args.no_clone);
    // An interrupt stops the merge between two units, commits what was written and reports
    // it; re-running finishes the job (see `signal`).
    options.cancel = super::signal::install(super::signal::Mode::Cancel, None);
    let show_bar = !args.json && !args.dry_run && super::summaries();
    let bar = super::progress::Bar::with_style("merging", args.progress, show_bar);
    // The last progress seen, for the JSON of a merge that fails part-way.
    let last: Arc<Mutex<Option<Progress>>> = Arc::new(Mutex::new(None));
    let (b, l) = (bar.clone(), last.clone());
    options.progress = Some(Arc::new(move |p: &Progress| {
        if let Ok(mut slot) = l.lock() {
            *slot = Some(*p);
        }
        b.event(p.state, p.bytes_done, p.bytes_total);
    }));
    let res = merge(&args.source, args.destination.as_deref(), &options);
    bar.clear();
    let seconds = t0.elapsed().as_secs_f64();
    if args.json {
        let mut out = match &res {
            Ok(r) => report_json(r, seconds)?,
            Err(e) => error_json(e, seconds, last.lock().ok().and_then(|g| *g)),
        };
        out["path"] = name(&args.source).into();
        super::print_json(&out)?;
        return Ok(match res {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => super::fail(&e),
        });
    }
    let report = res?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if report.dry_run {
        print_plan(&report.plan);
        if !report.plan.siblings.is_empty() && !args.force {
            eprintln!(
                "note: a real merge would refuse (32775, Invalid state) because of the siblings above, unless --force"
            );
        }
    } else if super::summaries() {
        if super::verbosity() == super::Verbosity::Verbose {
            print_plan(&report.plan);
        }
        println!("{}", summary(&report, seconds));
    }
    Ok(ExitCode::SUCCESS)
}

fn name(p: &Path) -> String {
    p.display().to_string()
}

use super::units::human;

fn summary(r: &MergeReport, seconds: f64) -> String {
    let rate = if seconds > 0.0 {
        human((r.bytes_merged as f64 / seconds) as u64)
    } else {
        "-".into()
    };
    let mut s = format!(
        "merged {} ({} cloned) from {} layer(s) into {} in {seconds:.2} s ({rate}/s), {} new block(s)",
        human(r.bytes_merged),
        human(r.bytes_cloned),
        r.plan.layers.len(),
        name(&r.destination),
        r.blocks_allocated
    );
    if let Some(v) = &r.verified {
        s.push_str(&format!(
            "; verified {} in {} unit(s)",
            human(v.bytes),
            v.units
        ));
    }
    if !r.relinked.is_empty() {
        let list: Vec<String> = r.relinked.iter().map(|p| name(p)).collect();
        s.push_str(&format!(
            "; relinked to {}: {}",
            name(&r.destination),
            list.join(", ")
        ));
    }
    if !r.removed.is_empty() {
        let list: Vec<String> = r.removed.iter().map(|p| name(p)).collect();
        s.push_str(&format!("; removed: {}", list.join(", ")));
    } else if !r.obsolete.is_empty() {
        let list: Vec<String> = r.obsolete.iter().map(|p| name(p)).collect();
        s.push_str(&format!("; now obsolete: {}", list.join(", ")));
    }
    s
}

fn print_plan(p: &MergePlan) {
    println!(
        "dry run: merge into {} (layer {} of the chain, {}, {} units)",
        name(&p.destination),
        p.destination_index,
        p.destination_type.name(),
        human(p.unit_bytes)
    );
    for l in &p.layers {
        println!("  {}: {}", name(&l.path), human(l.bytes));
    }
    if p.zeroed_bytes > 0 {
        println!(
            "  zeros past the end of a smaller intermediate: {}",
            human(p.zeroed_bytes)
        );
    }
    println!(
        "  total {} in {} unit(s), {} of them in whole units one layer provides (cloned where the file system allows); at most {} new block(s), destination grows by at most {}",
        human(p.bytes_total),
        p.units,
        human(p.clone_candidate_bytes),
        p.blocks_to_allocate,
        human(p.destination_growth)
    );
    for s in &p.siblings {
        println!("  sibling (its content would change): {}", name(s));
    }
    for s in &p.source_children {
        println!("  child of the source (unaffected): {}", name(s));
    }
}

/// The library's report (its serde derive) with the job fields of Hyper-V's merge job.
fn report_json(r: &MergeReport, seconds: f64) -> Result<Value> {
    let mut v = super::to_value(r)?;
    v["job_state"] = JobState::Completed.value().into();
    v["job_state_name"] = JobState::Completed.name().into();
    v["percent_complete"] = 100.into();
    v["bytes_copied"] = (r.bytes_merged - r.bytes_cloned).into();
    v["seconds"] = seconds.into();
    Ok(v)
}

fn error_json(e: &Error, seconds: f64, last: Option<Progress>) -> Value {
    let state = super::progress::final_state(Some(e));
    json!({
        "job_state": state.value(),
        "job_state_name": state.name(),
        "error": super::error_json(e),
        "percent_complete": last.map_or(0, |p| p.percent_complete),
        "bytes_merged": last.map_or(0, |p| p.bytes_done),
        "seconds": seconds,
        "obsolete": [],
        "warnings": [],
    })
}
