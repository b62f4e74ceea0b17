//! Issue 10 item 3: read a large block table by pread chunks (what `io::paged::ChunkCache`
//! does) or through a read-only mapping of the table range (what memmap2 would do: memmap2 is
//! a thin wrapper over the same `mmap(PROT_READ, MAP_SHARED)` call, so this example calls libc
//! directly and the crate gains no dependency just to be measured). Linux only.
//!
//! ```text
//! cargo run --release --example table_read -- FILE WORKLOAD METHOD [--cold]
//!   WORKLOAD  vhdx-scan (512 MiB table: a 64 TiB VHDX at 1 MiB blocks) | vhd-scan (16 MiB
//!             table) | random (100k lookups of 8-byte entries in the 512 MiB table)
//!   METHOD    pread | mmap
//!   --cold    sync; echo 3 > /proc/sys/vm/drop_caches first (root)
//! ```
//!
//! FILE is created sparse when missing (the table mostly unallocated: one nonzero entry every
//! 4 KiB page written, the rest holes). Prints the seconds, the entries seen nonzero (both
//! methods must agree), and peak RSS (getrusage ru_maxrss). A mapping's touched pages count in
//! RSS as file-backed (shared page cache, reclaimable, not anonymous memory): the mmap rows'
//! peak RSS grows with the bytes touched, the pread rows' with the cache capacity.

#[cfg(target_os = "linux")]
fn main() -> std::io::Result<()> {
    imp::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("table_read: Linux only");
}

#[cfg(target_os = "linux")]
mod imp {
    use std::collections::HashMap;
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    const CHUNK: u64 = 64 << 10;
    const CAPACITY: usize = 256;
    const TABLE_OFFSET: u64 = 1 << 20;
    const BIG: u64 = 512 << 20;
    const SMALL: u64 = 16 << 20;

    pub fn main() -> std::io::Result<()> {
        let a: Vec<String> = std::env::args().skip(1).collect();
        if a.len() < 3 {
            eprintln!("usage: table_read FILE vhdx-scan|vhd-scan|random pread|mmap [--cold]");
            std::process::exit(2);
        }
        let path = &a[0];
        if !std::path::Path::new(path).exists() {
            create(path)?;
        }
        if a.iter().any(|s| s == "--cold") {
            std::process::Command::new("sync").status()?;
            std::fs::write("/proc/sys/vm/drop_caches", "3\n")?;
        }
        let file = File::open(path)?;
        let len = if a[1] == "vhd-scan" { SMALL } else { BIG };
        let t = Instant::now();
        let seen = match (a[1].as_str(), a[2].as_str()) {
            ("random", "pread") => random(|at| pread_cached(&file, &cache(len), at)),
            ("random", "mmap") => {
                let m = map(&file, len)?;
                random(|at| u64::from_le_bytes(m[at as usize..at as usize + 8].try_into().unwrap()))
            }
            (_, "pread") => scan_pread(&file, len, if len == SMALL { 4 } else { 8 })?,
            (_, "mmap") => scan(&map(&file, len)?, if len == SMALL { 4 } else { 8 }),
            _ => panic!("unknown workload or method"),
        };
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{} {} seconds {secs:.4} nonzero {seen} peak_rss_kib {}",
            a[1],
            a[2],
            max_rss_kib()
        );
        Ok(())
    }

    fn create(path: &str) -> std::io::Result<()> {
        let f = OpenOptions::new().create_new(true).write(true).open(path)?;
        f.set_len(TABLE_OFFSET + BIG)?;
        for page in (0..BIG).step_by(4096 * 7) {
            f.write_all_at(&(page | 6).to_le_bytes(), TABLE_OFFSET + page)?;
        }
        f.sync_all()
    }

    fn scan_pread(file: &File, len: u64, entry: usize) -> std::io::Result<u64> {
        let (mut at, mut seen) = (0, 0);
        while at < len {
            let mut buf = vec![0; CHUNK.min(len - at) as usize];
            file.read_exact_at(&mut buf, TABLE_OFFSET + at)?;
            seen += scan(&buf, entry);
            at += CHUNK;
        }
        Ok(seen)
    }

    fn scan(bytes: &[u8], entry: usize) -> u64 {
        bytes
            .chunks_exact(entry)
            .filter(|e| e.iter().any(|&b| b != 0))
            .count() as u64
    }

    /// 100k lookups at entry offsets from a fixed xorshift sequence (the same for both methods).
    fn random(mut look: impl FnMut(u64) -> u64) -> u64 {
        let (mut x, mut seen) = (0x9e37_79b9_7f4a_7c15u64, 0);
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            seen += u64::from(look((x % (BIG / 8)) * 8) != 0);
        }
        seen
    }

    type Cache = Mutex<HashMap<u64, Arc<Vec<u8>>>>;

    fn cache(_len: u64) -> Cache {
        Mutex::new(HashMap::new())
    }

    /// The ChunkCache rule: a map of at most CAPACITY chunks, cleared when full.
    fn pread_cached(file: &File, cache: &Cache, at: u64) -> u64 {
        let c = at / CHUNK;
        let mut m = cache.lock().unwrap();
        let chunk = match m.get(&c) {
            Some(b) => b.clone(),
            None => {
                let mut buf = vec![0; CHUNK as usize];
                file.read_exact_at(&mut buf, TABLE_OFFSET + c * CHUNK)
                    .unwrap();
                if m.len() >= CAPACITY {
                    m.clear();
                }
                let b = Arc::new(buf);
                m.insert(c, b.clone());
                b
            }
        };
        let i = (at % CHUNK) as usize;
        u64::from_le_bytes(chunk[i..i + 8].try_into().unwrap())
    }

    struct Map(&'static [u8]);

    impl std::ops::Deref for Map {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            self.0
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: the pointer and length are the ones mmap returned in `map`.
            unsafe { libc::munmap(self.0.as_ptr() as *mut _, self.0.len()) };
        }
    }

    /// The table range mapped read-only. TABLE_OFFSET is page-aligned.
    fn map(file: &File, len: u64) -> std::io::Result<Map> {
        // SAFETY: a read-only shared mapping of a range inside the file this example created
        // and nobody else truncates while it runs (a truncation would raise SIGBUS).
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                TABLE_OFFSET as libc::off_t,
            );
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Map(std::slice::from_raw_parts(
                p as *const u8,
                len as usize,
            )))
        }
    }

    fn max_rss_kib() -> i64 {
        // SAFETY: getrusage fills the struct it is given.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut u);
            u.ru_maxrss
        }
    }
}
