//! Reporting helpers: JSON lines, medians, memory.

use serde_json::Value;

/// Prints one benchmark result as a JSON line.
pub fn emit(result: &Value) {
    println!("{result}");
}

/// The run with the median `key` among `runs` (sorted by that key).
pub fn median_by<T>(mut runs: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let middle = runs.len() / 2;
    runs.into_iter().nth(middle)
}

/// Peak resident set size of this process so far, in MiB (Linux: VmHWM).
pub fn peak_rss_mb() -> f64 {
    status_kib("VmHWM:").map_or(0.0, |kib| kib as f64 / 1024.0)
}

/// Peak resident set size of process `pid`, in MiB (Linux: VmHWM).
pub fn peak_rss_mb_of(pid: u32) -> f64 {
    process_mb(pid, "VmHWM:")
}

/// Resident set size of process `pid` now, in MiB (Linux: VmRSS).
pub fn rss_mb_of(pid: u32) -> f64 {
    process_mb(pid, "VmRSS:")
}

fn process_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| parse_kib(&status, field))
        .map_or(0.0, |kib| kib as f64 / 1024.0)
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib(&status, field)
}

fn parse_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Rounds to three decimals for readable output.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}
