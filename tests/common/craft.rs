//! Differencing disks crafted with chosen parent locators, header name, parent id and time
//! stamp, for the chain, flatten and set-parent tests: what other tools write, and what a
//! hostile file might.

use std::path::Path;

use uuid::Uuid;
use vhd_merge::create::{self, CreateOptions};
use vhd_merge::format::{Footer, ParentLocator, PlatformCode};
use vhd_merge::{OpenOptions, Vhd};

/// A locator entry to write into a crafted child.
#[derive(Clone, Debug)]
pub enum Loc {
    /// A payload stored in new space, with this code.
    Payload(PlatformCode, Vec<u8>),
    /// A raw entry, written as is (for hostile offsets and lengths).
    Raw(ParentLocator),
}

impl Loc {
    /// A W2ru/W2ku/Wi2r/Wi2k/MacX payload from text, encoded as the code wants.
    pub fn text(code: PlatformCode, text: &str) -> Loc {
        Loc::Payload(code, code.encode_payload(text))
    }
}

/// What a crafted differencing disk records about its parent.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    /// Parent Unique Id.
    pub parent_id: Uuid,
    /// Parent Unicode Name.
    pub header_name: String,
    /// Parent Time Stamp.
    pub parent_timestamp: u32,
    /// Locator entries, slot order.
    pub locators: Vec<Loc>,
    /// Virtual size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// The child's own unique id (random when None).
    pub unique_id: Option<Uuid>,
}

impl ChildSpec {
    /// A spec for a child of `parent` (its id and size), with no locators and no name.
    pub fn of(parent: &Path) -> ChildSpec {
        let p = Vhd::open(parent, OpenOptions::read_only()).expect("open parent");
        ChildSpec {
            parent_id: p.unique_id(),
            header_name: String::new(),
            parent_timestamp: 0,
            locators: Vec::new(),
            size: p.virtual_size(),
            block_size: 2 << 20,
            unique_id: None,
        }
    }

    /// Builder: header name.
    pub fn name(mut self, n: &str) -> ChildSpec {
        self.header_name = n.into();
        self
    }

    /// Builder: add a locator with text.
    pub fn loc(mut self, code: PlatformCode, text: &str) -> ChildSpec {
        self.locators.push(Loc::text(code, text));
        self
    }
}

/// Write a differencing disk at `path` as `spec` says: a dynamic disk turned differencing
/// (footer type patched in both copies), then its header rewritten with the parent id, time
/// stamp, name and locators, payloads appended after the BAT.
pub fn craft_child(path: &Path, spec: &ChildSpec) -> Vhd {
    let opts = CreateOptions::default()
        .block_size(spec.block_size)
        .unique_id(spec.unique_id);
    drop(create::create_dynamic(path, spec.size, &opts).expect("create"));
    let mut bytes = std::fs::read(path).unwrap();
    let len = bytes.len();
    let mut fb = [0u8; 512];
    fb.copy_from_slice(&bytes[len - 512..]);
    let mut f = Footer::parse(&fb).unwrap();
    f.disk_type = vhd_merge::DiskType::Differencing;
    f.fix_checksum();
    let fb = f.to_bytes();
    bytes[..512].copy_from_slice(&fb);
    bytes[len - 512..].copy_from_slice(&fb);
    std::fs::write(path, &bytes).unwrap();

    let mut v = Vhd::open(path, OpenOptions::writable()).expect("reopen");
    let mut h = v.header().unwrap().clone();
    h.parent_unique_id = spec.parent_id;
    h.parent_timestamp = spec.parent_timestamp;
    h.set_parent_name(&spec.header_name).unwrap();
    h.locators = [ParentLocator::EMPTY; 8];
    for (i, l) in spec.locators.iter().enumerate() {
        h.locators[i] = match l {
            Loc::Raw(e) => *e,
            Loc::Payload(code, data) => {
                let space = (data.len() as u64).div_ceil(512).max(1) * 512;
                let mut padded = data.clone();
                padded.resize(space as usize, 0);
                let off = v.append_metadata(&padded).unwrap();
                ParentLocator {
                    platform_code: *code,
                    data_space: space as u32,
                    data_length: data.len() as u32,
                    reserved: 0,
                    data_offset: off,
                }
            }
        };
    }
    v.rewrite_header(h).unwrap();
    v
}
