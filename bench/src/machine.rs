//! What the numbers were measured on: CPU, cores, memory, kernel, date,
//! the sluice commit, tool versions, and how busy the machine was.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::util;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    pub date_utc: String,
    pub git_commit: String,
    /// The work tree had uncommitted changes when the suite ran.
    pub git_dirty: bool,
    pub tools: Vec<(String, String)>,
    /// /proc/loadavg when the suite started (other work on the machine
    /// shows here).
    pub loadavg_start: String,
    pub loadavg_end: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a time since the epoch (civil-from-days).
pub fn iso_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn first_line(argv: &[&str]) -> String {
    util::run_timed(argv, None, Duration::from_secs(10))
        .ok()
        .filter(|f| f.ok())
        .map(|f| f.stdout().lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|| "unavailable".into())
}

pub fn repo_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

impl Machine {
    pub fn collect() -> Self {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_bytes = read("/proc/meminfo")
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix("MemTotal:")?;
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kb| kb * 1024);
        let repo = repo_dir().to_string_lossy().into_owned();
        // Built outside a git work tree (an exported copy): the commit it was
        // exported from can be given in SLUICE_BENCH_GIT_COMMIT.
        let mut git_commit = first_line(&["git", "-C", &repo, "rev-parse", "HEAD"]);
        if git_commit == "unavailable"
            && let Ok(c) = std::env::var("SLUICE_BENCH_GIT_COMMIT")
        {
            git_commit = c;
        }
        let git_dirty = util::run_timed(
            &[
                "git",
                "-C",
                &repo,
                "status",
                "--porcelain",
                "--untracked-files=no",
            ],
            None,
            Duration::from_secs(10),
        )
        .ok()
        .is_some_and(|f| f.ok() && !f.stdout().trim().is_empty());
        let mut tools = Vec::new();
        for (name, argv) in [
            ("iptables", &["iptables", "--version"][..]),
            ("iptables-legacy", &["iptables-legacy", "--version"][..]),
            ("nft", &["nft", "--version"][..]),
            ("ipset", &["ipset", "--version"][..]),
        ] {
            tools.push((name.to_string(), first_line(argv)));
        }
        Self {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            date_utc: iso_utc(SystemTime::now()),
            git_commit,
            git_dirty,
            tools,
            loadavg_start: read("/proc/loadavg").trim().to_string(),
            loadavg_end: String::new(),
        }
    }

    pub fn finish(&mut self) {
        self.loadavg_end = read("/proc/loadavg").trim().to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            iso_utc(UNIX_EPOCH + Duration::from_secs(1_709_210_096)),
            "2024-02-29T12:34:56Z"
        );
    }
}
