//! The process's own CPU time, memory and file descriptors, read from `/proc/self` when
//! `/metrics` is scraped (Linux only; elsewhere the `process_*` metrics stay at zero).

/// One reading of `/proc/self`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

/// Reads `/proc/self/stat`, `/proc/stat` (boot time), `/proc/self/fd` and the descriptor
/// limit; `None` where `/proc` is not there.
pub fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let mut s = parse_stat(&stat, ticks, page)?;
    if let Some(boot) = boot {
        s.start_time_seconds += boot as f64;
    }
    s.open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    s.max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(0);
    Some(s)
}

/// Parses `/proc/self/stat`: `start_time_seconds` is since boot here.
fn parse_stat(stat: &str, ticks: f64, page: u64) -> Option<Sample> {
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): utime 14, stime 15, starttime 22, vsize 23, rss 24.
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Sample {
        cpu_seconds: (n(14)? + n(15)?) as f64 / ticks,
        start_time_seconds: n(22)? as f64 / ticks,
        virtual_bytes: n(23)?,
        resident_bytes: n(24)?.saturating_mul(page),
        ..Sample::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_a_strange_command_name() {
        let line = "4242 (sto wage) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 9 0 1000 123456789 2048 18446744073709551615";
        let s = parse_stat(line, 100.0, 4096).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.start_time_seconds, 10.0);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.resident_bytes, 2048 * 4096);
        assert!(parse_stat("garbage", 100.0, 4096).is_none());
    }
}
