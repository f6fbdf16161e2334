//! The process figures behind the standard `process_*` metrics, read from `/proc` when
//! `/metrics` is asked for. Parsing is separate from reading, so it is tested on fixed text.

use std::fs;

/// One reading of the process's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub open_fds: u64,
    /// The soft RLIMIT_NOFILE; `None` when unlimited.
    pub max_fds: Option<u64>,
    pub start_time_seconds: f64,
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    utime_ticks: u64,
    stime_ticks: u64,
    start_ticks: u64,
    vsize_bytes: u64,
    rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold spaces
/// and parentheses itself, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let after = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; field N is index N - 3 here.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        start_ticks: field(22)?,
        vsize_bytes: field(23)?,
        rss_pages: field(24)?,
    })
}

/// The boot time (`btime`, seconds since the epoch) from `/proc/stat`.
fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft "Max open files" of `/proc/<pid>/limits`; `Some(None)` for "unlimited".
fn parse_max_open_files(text: &str) -> Option<Option<u64>> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(None);
    }
    soft.parse().ok().map(Some)
}

impl ProcessStats {
    /// Reads this process's figures; `None` if `/proc` is not there to read.
    pub fn read() -> Option<ProcessStats> {
        let stat = parse_stat(&fs::read_to_string("/proc/self/stat").ok()?)?;
        let btime = parse_btime(&fs::read_to_string("/proc/stat").ok()?)?;
        let max_fds = fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|t| parse_max_open_files(&t))
            .flatten();
        let open_fds = fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let (ticks, page) = (clock_ticks_per_s(), page_bytes());
        Some(ProcessStats {
            cpu_seconds: (stat.utime_ticks + stat.stime_ticks) as f64 / ticks as f64,
            resident_memory_bytes: stat.rss_pages * page,
            virtual_memory_bytes: stat.vsize_bytes,
            // The directory's own descriptor is among those read.
            open_fds: open_fds.saturating_sub(1),
            max_fds,
            start_time_seconds: btime as f64 + stat.start_ticks as f64 / ticks as f64,
        })
    }
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf reads a configuration value; it has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

fn page_bytes() -> u64 {
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as u64
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with a space and a parenthesis, as a process may set.
        let text = "1234 (lanpush (x) y) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 125 0 0 20 0 \
                    6 0 98765 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 \
                    0 0 0 0 0\n";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                utime_ticks: 250,
                stime_ticks: 125,
                start_ticks: 98765,
                vsize_bytes: 123456789,
                rss_pages: 2048,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn boot_time_and_the_descriptor_limit_parse() {
        assert_eq!(
            parse_btime("cpu 1 2 3\nbtime 1796000000\nprocesses 5\n"),
            Some(1796000000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_max_open_files(limits), Some(Some(20000)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_open_files(unlimited), Some(None));
    }

    #[test]
    fn this_process_can_be_read() {
        let p = ProcessStats::read().expect("/proc is mounted");
        assert!(p.resident_memory_bytes > 0 && p.open_fds > 0);
        let now_s = crate::engine::now_unix_ns() as f64 / 1e9;
        assert!(p.start_time_seconds <= now_s + 1.0 && p.start_time_seconds > now_s - 86_400.0);
    }
}
