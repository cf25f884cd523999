//! The report: one table per section on stdout, the JSON results, and the
//! Markdown page (docs/benchmarks.md), all from the same data.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{
    machine::Machine,
    stats::{Measurement, Section},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub suite: String,
    pub smoke: bool,
    pub runs: usize,
    pub machine: Machine,
    pub sections: Vec<Section>,
    /// Sections that failed as a whole.
    pub errors: Vec<String>,
    pub seconds: f64,
    pub command: String,
}

/// Significant-enough digits for a value of this size.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        let r = x.round();
        let s = group(r.abs() as usize);
        if r < 0.0 { format!("-{s}") } else { s }
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else if a >= 0.01 {
        format!("{x:.3}")
    } else if a >= 0.0001 {
        format!("{x:.4}")
    } else {
        format!("{x:.2e}")
    }
}

/// A fraction as a percentage with two significant digits below 10%.
fn percent(x: f64) -> String {
    let p = x * 100.0;
    if p >= 10.0 {
        format!("{p:.0}%")
    } else if p >= 1.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.2}%")
    }
}

/// A status short enough for a table cell; the full text goes to the notes.
fn short_status(status: &str) -> String {
    if status.chars().count() <= 44 {
        return status.to_string();
    }
    let kind = status.split(':').next().unwrap_or(status);
    format!("{kind} (see notes)")
}

/// "median [min–max]" or the status.
pub(crate) fn cell(m: Option<&Measurement>) -> String {
    match m {
        None => "-".into(),
        Some(m) if !m.ok() => short_status(&m.status),
        Some(m) => match (m.median, m.min, m.max) {
            (Some(med), Some(lo), Some(hi)) if m.runs > 1 => {
                format!("{} [{}–{}]", num(med), num(lo), num(hi))
            }
            (Some(med), _, _) => num(med),
            _ => "-".into(),
        },
    }
}

pub(crate) fn extra(m: Option<&Measurement>, key: &str, fmt: impl Fn(f64) -> String) -> String {
    m.and_then(|m| m.extra.get(key).copied())
        .map_or_else(|| "-".into(), fmt)
}

/// A table: header and rows of cells.
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn new(title: &str, header: &[&str]) -> Self {
        Self {
            title: title.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn text(&self) -> String {
        let n = self.header.len();
        let mut w = vec![0usize; n];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let mut s = String::new();
            for (i, c) in r.iter().enumerate().take(n) {
                let pad = w[i] - c.chars().count();
                if i == 0 {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str("  ");
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
            }
            s.trim_end().to_string()
        };
        let mut out = format!("{}\n", self.title);
        out.push_str(&line(&self.header));
        out.push('\n');
        out.push_str(&"-".repeat(w.iter().sum::<usize>() + 2 * (n - 1)));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let esc = |s: &str| s.replace('|', "\\|");
        let _ = writeln!(
            out,
            "| {} |",
            self.header
                .iter()
                .map(|h| esc(h))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(
            out,
            "|{}",
            self.header
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} |",
                r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")
            );
        }
        out
    }
}

fn sizes_of(sec: &Section, key: &str) -> Vec<usize> {
    sec.facts
        .get(key)
        .and_then(|v| serde_json::from_value::<Vec<usize>>(v.clone()).ok())
        .unwrap_or_default()
}

pub fn tables(sec: &Section) -> Vec<Table> {
    match sec.key.as_str() {
        "per_packet" => {
            let mut t = Table::new(
                &sec.title,
                &[
                    "frame",
                    "deny list",
                    "sluice ns/pkt",
                    "reference ns/pkt",
                    "sluice/ref",
                ],
            );
            let mut frames: Vec<String> = Vec::new();
            for m in &sec.measurements {
                if let Some(f) = m.params.get("frame").and_then(|v| v.as_str())
                    && !frames.iter().any(|x| x == f)
                {
                    frames.push(f.to_string());
                }
            }
            for n in sizes_of(sec, "list_sizes") {
                for f in &frames {
                    let s = sec.get(&format!("sluice/{f}/{n}"));
                    let r = sec.get(&format!("reference/{f}/{n}"));
                    t.rows.push(vec![
                        f.clone(),
                        group(n),
                        cell(s),
                        if r.is_some() {
                            cell(r)
                        } else {
                            "n/a (untagged only)".into()
                        },
                        extra(s, "ratio_to_reference", |x| format!("{x:.2}x")),
                    ]);
                }
            }
            vec![t]
        }
        "ddos" => {
            let mut t = Table::new(
                &sec.title,
                &["case", "rules", "ns/pkt", "+ns over no rules"],
            );
            for m in &sec.measurements {
                t.rows.push(vec![
                    m.label.clone(),
                    m.params
                        .get("rules")
                        .and_then(|v| v.as_str())
                        .filter(|s| !s.is_empty())
                        .unwrap_or("none")
                        .to_string(),
                    cell(Some(m)),
                    extra(Some(m), "over_baseline_ns", |x| format!("{x:+.0}")),
                ]);
            }
            vec![t]
        }
        "lb" => lb_tables(sec),
        "sock" | "socklb" => {
            let over = if sec.key == "sock" {
                "+ns over no workload"
            } else {
                "+ns over direct from the same place"
            };
            let mut t = Table::new(&sec.title, &["case", "ns/connect", over]);
            for m in &sec.measurements {
                t.rows.push(vec![
                    m.label.clone(),
                    cell(Some(m)),
                    extra(Some(m), "over_baseline_ns", |x| format!("{x:+.0}")),
                ]);
            }
            vec![t]
        }
        "live" => {
            let mut t = Table::new(
                &sec.title,
                &[
                    "receiver",
                    "dropped Mpps",
                    "vs ceiling",
                    "offered Mpps",
                    "arrived/offered",
                ],
            );
            for m in &sec.measurements {
                let label = match (
                    m.params.get("tool").and_then(|v| v.as_str()),
                    m.params.get("rules").and_then(serde_json::Value::as_u64),
                ) {
                    (Some(t), Some(n)) if t != "xdp-drop-all" => format!(
                        "{t} ({} rule{})",
                        group(n as usize),
                        if n == 1 { "" } else { "s" }
                    ),
                    _ => m.label.clone(),
                };
                t.rows.push(vec![
                    label,
                    cell(Some(m)),
                    extra(Some(m), "ratio_to_ceiling", percent),
                    extra(Some(m), "offered_mpps", num),
                    extra(Some(m), "delivered_fraction", |x| {
                        format!("{:.0}%", x * 100.0)
                    }),
                ]);
            }
            vec![t]
        }
        "scale" => {
            let mut t = Table::new(
                &sec.title,
                &[
                    "tool",
                    "prefixes",
                    "load ms",
                    "one more: ms",
                    "live Mpps",
                    "ns/pkt (1/rate)",
                ],
            );
            let mut tools: Vec<String> = Vec::new();
            for m in &sec.measurements {
                if let Some(k) = m.params.get("tool").and_then(|v| v.as_str())
                    && !tools.iter().any(|x| x == k)
                {
                    tools.push(k.to_string());
                }
            }
            for n in sizes_of(sec, "sizes") {
                for k in &tools {
                    let live = sec.get(&format!("{k}/live/{n}"));
                    t.rows.push(vec![
                        k.clone(),
                        group(n),
                        cell(sec.get(&format!("{k}/load/{n}"))),
                        cell(sec.get(&format!("{k}/incremental/{n}"))),
                        cell(live),
                        extra(live, "ns_per_packet", num),
                    ]);
                }
            }
            let mut tr = Table::new(
                "sluice per-packet cost by list size (BPF_PROG_TEST_RUN, deny hit)",
                &["prefixes", "ns/pkt"],
            );
            for n in sizes_of(sec, "sizes") {
                if let Some(m) = sec.get(&format!("sluice-native/test_run/{n}")) {
                    tr.rows.push(vec![group(n), cell(Some(m))]);
                }
            }
            vec![t, tr]
        }
        _ => {
            let mut t = Table::new(
                &sec.title,
                &["measurement", "value", "unit", "runs", "also"],
            );
            for m in &sec.measurements {
                // Companion figures (p99, targets, baselines) beside the median.
                let also: Vec<String> = m
                    .extra
                    .iter()
                    .map(|(k, v)| format!("{k} {}", num(*v)))
                    .collect();
                t.rows.push(vec![
                    m.label.clone(),
                    cell(Some(m)),
                    m.unit.clone(),
                    m.runs.to_string(),
                    also.join("; "),
                ]);
            }
            vec![t]
        }
    }
}

/// 1000000 -> "1,000,000".
pub fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub fn print_section(sec: &Section) {
    for t in tables(sec) {
        println!("\n{}", t.text());
    }
}

pub fn write_json(r: &Results, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "sluice's own numbers, measured by `make bench` (the `sluice-bench` crate, `bench/`). This page is written by that \
         command from the same data as `bench-results/results.json`; do not edit it by hand. Every number is a median over \
         runs, shown as `median [min–max]` over those runs. A later run on another machine gives other absolute numbers; \
         the ratios are what carries over.\n"
    );
    let _ = writeln!(s, "## Machine\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date (UTC) | {} |", m.date_utc);
    let _ = writeln!(s, "| CPU | {} |", m.cpu_model);
    let _ = writeln!(s, "| cores | {} |", m.cores);
    let _ = writeln!(
        s,
        "| memory | {:.1} GiB |",
        m.memory_bytes as f64 / (1u64 << 30) as f64
    );
    let _ = writeln!(s, "| kernel | {} |", m.kernel);
    let _ = writeln!(
        s,
        "| sluice commit | {}{} |",
        m.git_commit,
        if m.git_dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    );
    for (k, v) in &m.tools {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(
        s,
        "| load average (start → end) | {} → {} |",
        m.loadavg_start, m.loadavg_end
    );
    let _ = writeln!(s, "| runs per measurement | {} |", r.runs);
    let _ = writeln!(s, "| suite wall time | {:.0} s |\n", r.seconds);
    let _ = writeln!(
        s,
        "Reproduce with `make bench` (root; installs what it needs). `target/release/sluice-bench --help` lists the \
         options (`--runs`, `--only SECTION`, `--smoke`).\n"
    );
    for sec in &r.sections {
        let _ = writeln!(s, "## {}\n", sec.title);
        let _ = writeln!(s, "**How:** {}\n", sec.method);
        for t in tables(sec) {
            if t.title != sec.title {
                let _ = writeln!(s, "**{}**\n", t.title);
            }
            s.push_str(&t.markdown());
            s.push('\n');
        }
        let notes: Vec<&Measurement> = sec
            .measurements
            .iter()
            .filter(|m| !m.ok() || m.params.contains_key("note"))
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(s, "Notes:\n");
            for m in notes {
                let note = m
                    .params
                    .get("note")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| m.status.clone());
                let _ = writeln!(s, "- {}: {}", m.label, note);
            }
            s.push('\n');
        }
        // Rows measured differently from the section's description say how.
        let mut own: Vec<&str> = Vec::new();
        for m in &sec.measurements {
            if m.id.starts_with("agent") && m.method.len() > 40 && !own.contains(&m.method.as_str())
            {
                own.push(&m.method);
            }
        }
        for how in own {
            let _ = writeln!(s, "**Agent rows:** {how}\n");
        }
        if sec.key == "live" || sec.key == "scale" {
            let _ = writeln!(s, "Receivers:\n");
            let mut seen = Vec::new();
            for m in &sec.measurements {
                if let Some(k) = m.params.get("tool").and_then(|v| v.as_str())
                    && !seen.contains(&k)
                {
                    seen.push(k);
                    let _ = writeln!(s, "- `{k}`: {}", m.method);
                }
            }
            s.push('\n');
        }
    }
    if !r.errors.is_empty() {
        let _ = writeln!(s, "## Errors\n");
        for e in &r.errors {
            let _ = writeln!(s, "- {e}");
        }
        s.push('\n');
    }
    s
}

fn lb_tables(sec: &Section) -> Vec<Table> {
    let mut pp = Table {
        title: format!("{}: per packet (BPF_PROG_TEST_RUN)", sec.title),
        header: ["case", "how", "ns/pkt", "+ns over baseline"]
            .map(String::from)
            .to_vec(),
        rows: Vec::new(),
    };
    let mut live = Table {
        title: "Live forwarding through the LB (veth, 64-byte frames)".into(),
        header: [
            "configuration",
            "Mpps",
            "counted at",
            "vs baseline",
            "offered Mpps",
            "out/in",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut cp = Table {
        title: "LB control plane".into(),
        header: ["operation", "ms"].map(String::from).to_vec(),
        rows: Vec::new(),
    };
    for m in &sec.measurements {
        if m.id.starts_with("pp/") || m.id.starts_with("single/") {
            let how = match m.params.get("how").and_then(|v| v.as_str()) {
                Some("repeat") => format!(
                    "repeat {}",
                    m.params
                        .get("repeat")
                        .and_then(serde_json::Value::as_u64)
                        .map_or("?".into(), |n| group(n as usize))
                ),
                Some(h) => format!(
                    "{h} x{}",
                    m.params
                        .get("calls")
                        .and_then(serde_json::Value::as_u64)
                        .map_or("?".into(), |n| group(n as usize))
                ),
                None => "-".into(),
            };
            pp.rows.push(vec![
                m.label.clone(),
                how,
                cell(Some(m)),
                extra(Some(m), "over_baseline_ns", |x| format!("{x:+.0}")),
            ]);
        } else if m.id.starts_with("live/") {
            let vs = if m.extra.contains_key("ratio_to_reflect") {
                extra(Some(m), "ratio_to_reflect", |x| {
                    format!("{:.0}% of reflect", x * 100.0)
                })
            } else {
                extra(Some(m), "ratio_to_ceiling", |x| {
                    format!("{:.0}% of ceiling", x * 100.0)
                })
            };
            live.rows.push(vec![
                m.label.clone(),
                cell(Some(m)),
                m.params
                    .get("counted_at")
                    .and_then(|v| v.as_str())
                    .unwrap_or("-")
                    .to_string(),
                vs,
                extra(Some(m), "offered_mpps", num),
                extra(Some(m), "out_in_fraction", |x| format!("{:.0}%", x * 100.0)),
            ]);
        } else {
            cp.rows.push(vec![m.label.clone(), cell(Some(m))]);
        }
    }
    vec![pp, live, cp]
}
