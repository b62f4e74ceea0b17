//! A first end-to-end check of create, write and read through a chain.
use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};
use vhd_merge::{Chain, ChainOptions};

#[test]
fn chain_reads_child_over_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    let opts = CreateOptions {
        block_size: 512 * 1024,
        ..CreateOptions::default()
    };
    let mut b = create_dynamic(&base, 4 << 20, &opts).unwrap();
    b.write_at(0, &vec![1u8; 1 << 20]).unwrap();
    drop(b);
    let mut c = create_differencing(&child, &base, &CreateOptions::default()).unwrap();
    // Every other sector of the first 64 KiB.
    for i in (0..128).step_by(2) {
        c.write_at(i * 512, &[2u8; 512]).unwrap();
    }
    drop(c);
    let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
    assert_eq!(chain.len(), 2);
    let mut buf = vec![0u8; 4 << 20];
    chain.read_at(0, 0, &mut buf).unwrap();
    for s in 0..8192usize {
        let want = if s < 128 && s % 2 == 0 {
            2
        } else if s < 2048 {
            1
        } else {
            0
        };
        assert!(
            buf[s * 512..s * 512 + 512].iter().all(|&x| x == want),
            "sector {s}"
        );
    }
}
