//! Footer parsing: never panics, and a parsed footer survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd_merge::format::Footer;

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; 512];
    let n = data.len().min(512);
    b[..n].copy_from_slice(&data[..n]);
    if let Ok(f) = Footer::parse(&b) {
        let _ = f.checksum_ok();
        let _ = f.creator_application_str();
        let _ = f.creator_version_str();
        let _ = f.creator_host_os_str();
        let _ = f.geometry.size();
        let _ = f.disk_type.name();
        let bytes = f.to_bytes();
        let g = Footer::parse(&bytes).expect("re-parse of a serialised footer");
        assert!(g.checksum_ok());
        assert_eq!(g.to_bytes(), bytes);
    }
    // The geometry algorithm takes any size.
    let size = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
    let _ = vhd_merge::format::Geometry::for_size(size);
});
