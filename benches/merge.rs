//! Merge engine benchmarks (issue 5 shapes), kept small so `cargo bench --bench merge` runs in
//! a few minutes (`cargo test --benches` runs each once, in seconds):
//!
//! - `plan/*`: [`MergePlan::build`] on in-memory chains (a 2 TiB sparse disk with a full-size
//!   BAT; 1 GiB of every-other-sector blocks), and opening + planning from files (a 2 TiB
//!   sparse disk; 32 layers of 2 TiB sparse disks: shape 5 and the memory case of shape 7).
//! - `assemble/*`: [`assemble_unit`] of one 2 MiB block from in-memory layers, per bitmap shape
//!   (full, every other sector, every other 4 KiB, 8 layers, 32 layers each holding a 64 KiB
//!   stripe of the block).
//! - `merge/*`: whole merges on temporary files (each iteration gets a fresh copy of the
//!   destination; the copy is not timed), one per shape: full blocks (1), every-other-sector
//!   bitmaps (2), every-other 4 KiB bitmaps (3), a fixed destination (4), a 2 TiB sparse disk
//!   (5), a 32-layer chain with blocks spread round-robin and one with every block striped
//!   over the 32 layers (6).
//!
//! Flatten (shape 8) is in `benches/flatten.rs`; ratios against `cp` + `sync` and peak memory
//! (shape 7) come from `cargo run --release --example bench`.
//!
//! Files go to `$VHD_MERGE_BENCH_DIR` or the system temporary directory; the page cache is
//! warm (the inputs were just written).

use std::hint::black_box;
use std::path::{Path, PathBuf};

mod common;

use common::{Fill, Shape, Spread, bench_dir, build_chain};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use vhd_merge::chain::{ChainLayer, FoundBy};
use vhd_merge::io::MemStorage;
use vhd_merge::merge::{MergeOptions, MergePlan, assemble_unit, merge};
use vhd_merge::{Chain, ChainOptions, OpenOptions, Vhd};

/// [`build_chain`] with a fresh [`Fill`]: a chain of `depth` 2 MiB-block differencing
/// layers over a base (dynamic or fixed) of `size` bytes. Returns the paths, child first.
fn build(
    dir: &Path,
    size: u64,
    blocks: &[u64],
    depth: usize,
    spread: Spread,
    fixed: bool,
) -> Vec<PathBuf> {
    build_chain(
        dir,
        size,
        blocks,
        depth,
        spread,
        fixed,
        &mut Fill::default(),
    )
    .unwrap()
}

/// Load the files of a chain into memory.
fn in_memory(paths: &[PathBuf]) -> Chain {
    let layers = paths
        .iter()
        .map(|p| {
            let vhd = Vhd::from_storage(
                Box::new(MemStorage::new(std::fs::read(p).unwrap())),
                p,
                OpenOptions::read_only(),
            )
            .unwrap();
            ChainLayer::new(Box::new(vhd), FoundBy::Opened)
        })
        .collect();
    Chain::from_layers(layers)
}

const TIB2: u64 = 0xFF00_0000 * 512;

fn plan_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan");
    g.sample_size(20);
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    // 2 TiB virtual, full-size BAT (1 044 480 entries), 32 blocks (64 MiB) spread out.
    let sparse: Vec<u64> = (0..32).map(|i| i * 32_000 + 7).collect();
    let paths = build(
        dir.path(),
        TIB2,
        &sparse,
        1,
        Spread::RoundRobin(Shape::Full),
        false,
    );
    let chain = in_memory(&paths);
    g.bench_function("2tib_sparse_64mib", |b| {
        b.iter(|| black_box(MergePlan::build(&chain, 1).unwrap().bytes_total))
    });
    g.bench_function("open_and_plan_2tib_sparse_files", |b| {
        b.iter(|| {
            let chain = Chain::open(&paths[0], &ChainOptions::default()).unwrap();
            black_box(MergePlan::build(&chain, 1).unwrap().units)
        })
    });
    let dir2 = tempfile::tempdir_in(bench_dir()).unwrap();
    let full: Vec<u64> = (0..512).collect();
    let chain = in_memory(&build(
        dir2.path(),
        1 << 30,
        &full,
        1,
        Spread::RoundRobin(Shape::EveryOtherSector),
        false,
    ));
    g.bench_function("1gib_every_other_sector", |b| {
        b.iter(|| black_box(MergePlan::build(&chain, 1).unwrap().bytes_total))
    });
    // 32 layers of 2 TiB, 4 blocks each: 32 full-size BATs (shape 7's memory case).
    let dir3 = tempfile::tempdir_in(bench_dir()).unwrap();
    let deep: Vec<u64> = (0..128).map(|i| i * 8000 + 3).collect();
    let deep_paths = build(
        dir3.path(),
        TIB2,
        &deep,
        32,
        Spread::RoundRobin(Shape::Full),
        false,
    );
    g.bench_function("open_and_plan_32_layers_2tib_sparse_files", |b| {
        b.iter(|| {
            let chain = Chain::open(&deep_paths[0], &ChainOptions::default()).unwrap();
            black_box(MergePlan::build(&chain, 32).unwrap().units)
        })
    });
    g.finish();
}

fn assemble_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("assemble");
    g.sample_size(30);
    for (name, spread, depth) in [
        ("full", Spread::RoundRobin(Shape::Full), 1),
        (
            "every_other_sector",
            Spread::RoundRobin(Shape::EveryOtherSector),
            1,
        ),
        ("every_other_4k", Spread::RoundRobin(Shape::EveryOther4K), 1),
        ("full_8_layers", Spread::RoundRobin(Shape::Full), 8),
        ("striped_32_layers", Spread::Striped, 32),
    ] {
        let dir = tempfile::tempdir_in(bench_dir()).unwrap();
        // Every layer holds block 0, so depth layers contribute to block 0 with the nearest
        // winning (or, striped, each with its own stripes).
        let blocks: Vec<u64> = match spread {
            Spread::Striped => vec![0],
            _ => (0..depth as u64).map(|_| 0).collect(),
        };
        let chain = in_memory(&build(dir.path(), 8 << 20, &blocks, depth, spread, false));
        let plan = MergePlan::build(&chain, depth).unwrap();
        let mut buf = vec![0u8; 2 << 20];
        let mut scratch = Vec::new();
        g.throughput(Throughput::Bytes(2 << 20));
        g.bench_function(name, |b| {
            b.iter(|| black_box(assemble_unit(&chain, &plan, 0, &mut buf, &mut scratch).unwrap()))
        });
    }
    g.finish();
}

/// Whole merges: `blocks` 2 MiB blocks spread as `spread` over `depth` layers, into the base.
fn merge_bench(
    c: &mut Criterion,
    name: &str,
    size: u64,
    blocks: &[u64],
    depth: usize,
    spread: Spread,
    fixed: bool,
) {
    let mut g = c.benchmark_group("merge");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(8));
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let paths = build(dir.path(), size, blocks, depth, spread, fixed);
    let base = paths.last().unwrap().clone();
    let pristine = dir.path().join("base.pristine");
    std::fs::copy(&base, &pristine).unwrap();
    let bytes = MergePlan::build(
        &Chain::open(&paths[0], &ChainOptions::default()).unwrap(),
        depth,
    )
    .unwrap()
    .bytes_total;
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function(name, |b| {
        b.iter_batched(
            || {
                std::fs::copy(&pristine, &base).unwrap();
            },
            |()| {
                black_box(
                    merge(&paths[0], Some(&base), &MergeOptions::default())
                        .unwrap()
                        .bytes_merged,
                )
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn merge_benches(c: &mut Criterion) {
    let blocks: Vec<u64> = (0..32).collect();
    merge_bench(
        c,
        "full_64mib",
        128 << 20,
        &blocks,
        1,
        Spread::RoundRobin(Shape::Full),
        false,
    );
    merge_bench(
        c,
        "every_other_sector_32_blocks",
        128 << 20,
        &blocks,
        1,
        Spread::RoundRobin(Shape::EveryOtherSector),
        false,
    );
    merge_bench(
        c,
        "every_other_4k_32_blocks",
        128 << 20,
        &blocks,
        1,
        Spread::RoundRobin(Shape::EveryOther4K),
        false,
    );
    merge_bench(
        c,
        "full_64mib_32_layers",
        128 << 20,
        &blocks,
        32,
        Spread::RoundRobin(Shape::Full),
        false,
    );
    merge_bench(
        c,
        "striped_64mib_32_layers",
        128 << 20,
        &blocks,
        32,
        Spread::Striped,
        false,
    );
    merge_bench(
        c,
        "full_64mib_fixed_destination",
        128 << 20,
        &blocks,
        1,
        Spread::RoundRobin(Shape::Full),
        true,
    );
    let sparse: Vec<u64> = (0..32).map(|i| i * 32_000 + 7).collect();
    merge_bench(
        c,
        "sparse_2tib_64mib",
        TIB2,
        &sparse,
        1,
        Spread::RoundRobin(Shape::Full),
        false,
    );
}

criterion_group!(benches, plan_benches, assemble_benches, merge_benches);
criterion_main!(benches);
