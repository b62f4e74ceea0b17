//! Dynamic header parsing, parent name and locator payload decoding: never panic, and a
//! parsed header survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd_merge::format::DynamicHeader;

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; 1024];
    let n = data.len().min(1024);
    b[..n].copy_from_slice(&data[..n]);
    if let Ok(h) = DynamicHeader::parse(&b) {
        let _ = h.checksum_ok();
        let _ = h.parent_name();
        let _ = h.bitmap_bytes();
        let _ = h.sectors_per_block();
        for loc in &h.locators {
            let _ = loc.extent_len();
            let _ = loc.data_space_bytes();
            let _ = loc.platform_code.name();
            // Payload decoding of whatever follows the header in the input.
            let _ = loc
                .platform_code
                .decode_payload(data.get(1024..).unwrap_or(&[]));
        }
        let bytes = h.to_bytes();
        let g = DynamicHeader::parse(&bytes).expect("re-parse of a serialised header");
        assert!(g.checksum_ok());
        assert_eq!(g.to_bytes(), bytes);
        let mut h2 = g.clone();
        let name = h.parent_name();
        if h2.set_parent_name(&name).is_ok() {
            assert_eq!(h2.parent_name(), name);
        }
    }
});
