//! How the command line writes byte counts: one formatter for every verb's messages and for the
//! progress bar, so the bar and the final message show the same numbers.

const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// `n` in binary units: `512 bytes`, `40 MiB` (a whole number of the unit), `1.50 GiB`.
pub fn human(n: u64) -> String {
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >> (10 * (unit + 2)) > 0 {
        unit += 1;
    }
    let size = 1u64 << (10 * (unit + 1));
    if n.is_multiple_of(size) {
        format!("{} {}", n / size, UNITS[unit])
    } else {
        format!("{:.2} {}", n as f64 / size as f64, UNITS[unit])
    }
}

/// `n` exactly, with [`human`] beside it when it is at least 1 KiB: `41943040 (40 MiB)`.
pub fn exact(n: u64) -> String {
    if n < 1024 {
        n.to_string()
    } else {
        format!("{n} ({})", human(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human(0), "0 bytes");
        assert_eq!(human(1023), "1023 bytes");
        assert_eq!(human(1024), "1 KiB");
        assert_eq!(human(1536), "1.50 KiB");
        assert_eq!(human(40 << 20), "40 MiB");
        assert_eq!(human((1 << 30) + (1 << 29)), "1.50 GiB");
        assert_eq!(human((1 << 40) - 1), "1024.00 GiB");
        assert_eq!(human(64 << 40), "64 TiB");
        assert_eq!(human(u64::MAX), "16.00 EiB");
        assert_eq!(exact(40 << 20), "41943040 (40 MiB)");
        assert_eq!(exact(1536), "1536 (1.50 KiB)");
        assert_eq!(exact(100), "100");
    }
}
