//! Flatten benchmarks (issue 5, shape 8), kept small so `cargo bench --bench flatten` runs in
//! about a minute: the logical content of a two-layer chain (a 64 MiB dynamic base with every
//! other block written, and a child with 32 full blocks over it) written to a new dynamic,
//! fixed or raw file, on temporary files with a warm page cache. The output is removed before
//! each iteration (not timed). Files go to `$VHD_MERGE_BENCH_DIR` or the system temporary
//! directory. `examples/bench.rs` compares the same with `cp` + `sync` at 1 GiB.

use std::hint::black_box;
use std::path::{Path, PathBuf};

mod common;

use common::{Fill, bench_dir};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};
use vhd_merge::format::SectorBitmap;
use vhd_merge::{Chain, ChainOptions, FlattenFormat, FlattenOptions, flatten};

const BLOCK: u64 = 2 << 20;

/// base (dynamic, `blocks` blocks, every other one written) <- child (every block written).
/// Returns the child.
fn build(dir: &Path, blocks: u64) -> PathBuf {
    let o = CreateOptions::default();
    let base = dir.join("base.vhd");
    let child = dir.join("child.vhd");
    let mut fill = Fill::default();
    let mut buf = vec![0u8; BLOCK as usize];
    let full = SectorBitmap::full((BLOCK / 512) as usize);
    let mut b = create_dynamic(&base, blocks * BLOCK, &o).unwrap();
    b.reserve_blocks(blocks / 2).unwrap();
    for i in (0..blocks).step_by(2) {
        fill.block(&mut buf);
        b.write_block(i, &mut buf, &full).unwrap();
    }
    b.finish().unwrap();
    let mut c = create_differencing(&child, &base, &o).unwrap();
    c.reserve_blocks(blocks / 2).unwrap();
    for i in (0..blocks).filter(|i| i % 4 < 2) {
        fill.block(&mut buf);
        c.write_block(i, &mut buf, &full).unwrap();
    }
    c.finish().unwrap();
    child
}

fn flatten_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("flatten");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(6));
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let blocks = 32;
    let child = build(dir.path(), blocks);
    let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
    g.throughput(Throughput::Bytes(blocks * BLOCK));
    for (name, format) in [
        ("dynamic_64mib", FlattenFormat::Dynamic),
        ("fixed_64mib", FlattenFormat::Fixed),
        ("raw_64mib", FlattenFormat::Raw),
    ] {
        let out = dir.path().join(format!("out-{name}"));
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let _ = std::fs::remove_file(&out);
                },
                |()| {
                    let opts = FlattenOptions::default().format(format);
                    black_box(flatten(&chain, &out, opts).unwrap().data_bytes)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, flatten_benches);
criterion_main!(benches);
