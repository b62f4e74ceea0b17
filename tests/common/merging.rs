//! A VHDX merge under test: a random chain of [`super::model`], what the merge must leave, and
//! the checks every VHDX merge test makes, after a completed merge and after an interrupted
//! one (tests/suite/vhdx_merge.rs, tests/suite/vhdx_merge_faults.rs).

use std::path::{Path, PathBuf};

use vhd_merge::DiskKind;
use vhd_merge::bitmap::SectorBitmap;
use vhd_merge::merge::{MergeOptions, MergeReport, merge};
use vhd_merge::vhdx::Vhdx;

use super::model::{Built, LayerModel, VhdxCase, build, compose};
use super::{fast_tempdir, first_diff, hashes, read_view, vhdx_own_layer};

/// A built case: the chain, and what the merge must leave.
pub struct Merging {
    pub c: VhdxCase,
    pub built: Built,
    _dir: tempfile::TempDir,
    /// The destination's view before and after (the model's).
    pub old_view: Vec<u8>,
    pub merged: Vec<u8>,
    /// Hashes of the files the merge must not write at all: all but the destination and the
    /// layer linking to it (whose linkage metadata the merge may update, never its view).
    untouched_before: Vec<(u32, u64)>,
    /// Another child of the source (see [`Merging::add_source_child`]) and its view.
    other: Option<(PathBuf, Vec<u8>)>,
}

impl Merging {
    pub fn new(c: VhdxCase) -> Merging {
        let dir = fast_tempdir();
        let built = build(dir.path(), &c.spec, &c.sizes, c.format);
        let d = c.dest;
        let old_view = built.model.view(d);
        let merged = built.model.merged(d);
        let mut m = Merging {
            c,
            built,
            _dir: dir,
            old_view,
            merged,
            untouched_before: Vec::new(),
            other: None,
        };
        m.untouched_before = hashes(&m.untouched());
        m
    }

    pub fn dest(&self) -> &Path {
        &self.built.paths[self.c.dest]
    }

    pub fn untouched(&self) -> Vec<PathBuf> {
        let d = self.c.dest;
        let p = &self.built.paths;
        p.iter()
            .enumerate()
            .filter(|(i, _)| *i != d && *i + 1 != d)
            .map(|(_, p)| p.clone())
            .chain(self.other.iter().map(|(p, _)| p.clone()))
            .collect()
    }

    /// The directory holding every file of the case.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Give the source another child (`other.avhdx`, 1 MiB blocks, random runs written): a
    /// file that links to the source and must stay valid whatever the merge does.
    pub fn add_source_child(&mut self, seed: u64) {
        let src = &self.built.paths[0];
        let path = src.with_file_name("other.avhdx");
        let ss = self.c.sector_size();
        let o = vhd_merge::vhdx::create::CreateOptions::default()
            .block_size(Some(1 << 20))
            .logical_sector_size(ss as u32)
            .force(false);
        let mut v = vhd_merge::vhdx::create::create_differencing(&path, src, &o).unwrap();
        let mut m = LayerModel::empty(v.virtual_size() as usize);
        let mut rng = super::Rng::new(seed);
        let sectors = (m.size() / ss) as u64;
        for _ in 0..6 {
            let first = rng.below(sectors);
            let n = 1 + rng.below((sectors - first).min(600));
            let mut data = vec![0u8; n as usize * ss];
            rng.fill(&mut data);
            v.write_at(first * ss as u64, &data).unwrap();
            m.write(first as usize, &data, &SectorBitmap::full(n as usize), ss);
        }
        v.finish().unwrap();
        let mut layers = vec![m];
        layers.extend(self.built.model.layers.iter().cloned());
        self.other = Some((path, compose(&layers)));
        self.untouched_before = hashes(&self.untouched());
    }

    pub fn merge(&self, opts: &MergeOptions, explicit: bool) -> vhd_merge::Result<MergeReport> {
        let target = (explicit || self.c.dest > 1).then_some(self.dest());
        merge(&self.built.paths[0], target, opts)
    }

    /// What must hold whatever happened to the merge (finished or interrupted): every file
    /// opens, nothing but the destination and its child's linkage changed, the child of the
    /// destination (and so the source) still holds what it held, the source's view is its
    /// view before, the destination's log is clean or replays.
    pub fn check_invariants(&self, what: &str) {
        let d = self.c.dest;
        assert_eq!(
            hashes(&self.untouched()),
            self.untouched_before,
            "{what}: a file other than the destination and its child changed"
        );
        vhdx_own_layer(&self.built.paths[d - 1]).assert_same_as(
            &self.built.model.layers[d - 1],
            &format!("{what}: the destination's child (only its linkage may change)"),
        );
        assert_eq!(
            first_diff(&read_view(&self.built.paths[0]), &self.built.model.view(0)),
            None,
            "{what}: the source's view changed"
        );
        if let Some((other, view)) = &self.other {
            assert_eq!(
                first_diff(&read_view(other), view),
                None,
                "{what}: another child of the source reads otherwise"
            );
        }
    }

    /// After a completed merge: the destination reads the model's merged view, its log is
    /// clean, and the report adds up.
    pub fn check_merged(&self, r: &MergeReport, verify: bool, what: &str) {
        self.check_invariants(what);
        assert_eq!(
            first_diff(&read_view(self.dest()), &self.merged),
            None,
            "{what}: the destination's view differs from the model"
        );
        let v = Vhdx::open_path(self.dest(), false).unwrap();
        assert!(
            v.reader().header.header.log_guid.is_nil(),
            "{what}: the destination's log is left set"
        );
        let child = &self.built.paths[self.c.dest - 1];
        if child.exists() {
            let v = Vhdx::open_path(child, false).unwrap();
            assert!(
                v.reader().header.header.log_guid.is_nil(),
                "{what}: the destination's child's log is left set"
            );
        }
        let (held, hidden) = self.built.model.merge_sectors(self.c.dest);
        let data: u64 = r.plan.layers.iter().map(|l| l.bytes).sum();
        assert_eq!(r.bytes_merged, r.plan.bytes_total, "{what}");
        assert_eq!(r.plan.bytes_total, data + r.plan.zeroed_bytes, "{what}");
        // Zero blocks of merged layers may count as data or as zeros; a dynamic destination
        // skips zeros over its unallocated blocks.
        let decided = (held + hidden) * 512;
        if r.plan.destination_type == DiskKind::Dynamic {
            assert!(data + r.plan.zeroed_bytes <= decided, "{what}: {r:?}");
        } else {
            assert_eq!(data + r.plan.zeroed_bytes, decided, "{what}: {r:?}");
        }
        assert_eq!(
            r.obsolete,
            self.built.paths[..self.c.dest].to_vec(),
            "{what}"
        );
        assert_eq!(r.verified.is_some(), verify, "{what}");
        if let Some(v) = &r.verified {
            assert_eq!(
                v.bytes, r.bytes_merged,
                "{what}: verify covers every written sector"
            );
        }
    }
}
