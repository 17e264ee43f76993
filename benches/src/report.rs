//! Reporting helpers: JSON lines, medians, memory, CPU time.

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
    peak_rss_mb_of(std::process::id())
}

/// Peak resident set size of process `pid`, in MiB (Linux: VmHWM), since it
/// started or since [`reset_peak_rss_of`].
pub fn peak_rss_mb_of(pid: u32) -> f64 {
    process_mb(pid, "VmHWM:")
}

/// Resets the peak resident set size of process `pid` (`std::process::id()`
/// for this one) to its current size, so the next peak is one run's own
/// (Linux: `5` to `/proc/PID/clear_refs`). Best effort: a failure leaves the
/// peak since the process started.
pub fn reset_peak_rss_of(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
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

fn parse_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// CPU time (user + system, all threads) that process `pid` has used so far,
/// in seconds (Linux: `/proc/PID/stat`); 0 when it cannot be read.
pub fn cpu_secs_of(pid: u32) -> f64 {
    proc_stat_fields(pid).map_or(0.0, |fields| fields.cpu_secs)
}

/// CPU time used so far by process `pid` and its children (e.g. a
/// postmaster and its backends), in seconds: its own, its live children's,
/// and that of the children it has reaped (a backend that ended still counts).
pub fn cpu_secs_of_tree(pid: u32) -> f64 {
    let children: f64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat_fields)
        .filter(|fields| fields.parent == pid)
        .map(|fields| fields.cpu_secs)
        .sum();
    let own = proc_stat_fields(pid).map_or(0.0, |fields| fields.cpu_secs + fields.reaped_cpu_secs);
    own + children
}

/// The whole machine's CPU time so far, summed over its cores, in seconds
/// (Linux: `/proc/stat`).
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    /// Running code: user, nice, system, irq and softirq (guest time is
    /// already inside user and nice).
    pub busy: f64,
    /// Taken by the hypervisor while this machine wanted to run.
    pub steal: f64,
}

impl std::ops::Sub for MachineCpu {
    type Output = Self;

    /// The CPU time between two readings.
    fn sub(self, earlier: Self) -> Self {
        Self {
            busy: self.busy - earlier.busy,
            steal: self.steal - earlier.steal,
        }
    }
}

/// The machine's CPU time so far; zeros when `/proc/stat` cannot be read.
pub fn machine_cpu() -> MachineCpu {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return MachineCpu::default();
    };
    let Some(line) = stat.lines().find(|line| line.starts_with("cpu ")) else {
        return MachineCpu::default();
    };
    // user nice system idle iowait irq softirq steal guest guest_nice
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    let sum = |fields: &[usize]| {
        fields.iter().filter_map(|&i| ticks.get(i)).sum::<u64>() as f64 / clock_ticks_per_sec()
    };
    MachineCpu {
        busy: sum(&[0, 1, 2, 5, 6]),
        steal: sum(&[7]),
    }
}

struct ProcStat {
    parent: u32,
    cpu_secs: f64,
    /// CPU of the children it has waited for.
    reaped_cpu_secs: f64,
}

fn proc_stat_fields(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // state ppid … utime (14th field of the line) stime cutime cstime (17th).
    let parent = fields.get(1)?.parse().ok()?;
    let ticks = |index: usize| fields.get(index)?.parse::<u64>().ok();
    let secs = |ticks: u64| ticks as f64 / clock_ticks_per_sec();
    Some(ProcStat {
        parent,
        cpu_secs: secs(ticks(11)? + ticks(12)?),
        reaped_cpu_secs: secs(ticks(13)? + ticks(14)?),
    })
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Rounds to three decimals for readable output.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}
