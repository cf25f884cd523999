//! Section 3: rule scale and update time. Loading N IPv4 prefixes into
//! sluice versus iptables-restore (both backends), ipset restore and nft -f;
//! one incremental change at each size; the per-packet cost at each size.

use std::time::{Duration, Instant};

use anyhow::Result;
use ipnet::Ipv4Net;

use crate::{
    Plan,
    netns::Lab,
    receivers::{Installed, Limits, TimedOut, Tool},
    s2_live,
    stats::{Measurement, Section},
    util,
};

pub fn method(plan: &Plan) -> String {
    format!(
        "For each size N, each tool loads N IPv4 prefixes (N-1 filler /32s spread over the unicast space, then 198.18.0.0/16, \
         which the generator's sources fall in; iptables keeps that order, so every packet walks all N rules) into a fresh \
         receiver namespace. Load = wall time of the one command that loads the list ({loaders}), run as `ip netns exec` \
         (for sluice: PolicyMaps::commit of one change adding N prefixes, in process, on a freshly attached program); a load \
         still running after {t} s is killed and reported as not finished. Incremental = wall time of adding one more prefix \
         the way an operator would (`iptables -A`, `ipset add`, `nft add element`, sluice commit of one prefix) with the list \
         loaded, up to {k} samples per size within ~{b} s; one still running after {ct} s is killed and reported as not \
         finished. Per-packet cost = the live drop rate of section 2's flood against \
         that list (Mpps, and 1000/Mpps = ns per packet for the whole machine); for sluice also BPF_PROG_TEST_RUN ns/packet of \
         the flood frame on the attached program. Loads and rates: median over runs ({runs} per size, {big} for N >= 1,000,000), \
         each run in a fresh namespace.",
        loaders = tools()
            .iter()
            .map(|t| format!("{}: {}", t.key(), t.loader()))
            .collect::<Vec<_>>()
            .join("; "),
        t = plan.restore_timeout.as_secs(),
        ct = plan.change_timeout.as_secs(),
        k = plan.incr_samples,
        b = plan.incr_budget.as_secs(),
        runs = plan.runs,
        big = plan.runs.min(plan.big_runs),
    )
}

pub fn tools() -> [Tool; 5] {
    [
        Tool::SluiceNative,
        Tool::IptablesNft,
        Tool::IptablesLegacy,
        Tool::Ipset,
        Tool::Nft,
    ]
}

/// Prefixes added one at a time by the incremental measurement: inside
/// [`prefixes::extra_space`], which no list or frame uses.
fn extra_prefix(i: usize) -> Ipv4Net {
    let i = i as u32;
    Ipv4Net::new(
        std::net::Ipv4Addr::new(198, 19, 128 + ((i >> 8) & 0x7f) as u8, (i & 0xff) as u8),
        32,
    )
    .expect("valid")
}

#[derive(Default)]
struct Acc {
    load: Vec<f64>,
    incr: Vec<f64>,
    mpps: Vec<f64>,
    samples: Vec<s2_live::Sample>,
    test_run_ns: Vec<f64>,
    load_not_finished: Option<String>,
    incr_not_finished: Option<String>,
    error: Option<String>,
}

pub fn run(plan: &Plan) -> Result<Section> {
    let mut sec = Section::new("scale", "3. Rule scale and update time", &method(plan));
    sec.facts
        .insert("sizes".into(), serde_json::json!(plan.scale_sizes));
    let limits = Limits {
        load_timeout: plan.restore_timeout,
        change_timeout: plan.change_timeout,
    };
    let flood_frame_for_test_run = |lab: &Lab| crate::live::flood_frame(lab);
    for &n in &plan.scale_sizes {
        let list = s2_live::rules_for(n);
        let runs = if n >= 1_000_000 {
            plan.runs.min(plan.big_runs)
        } else {
            plan.runs
        };
        for tool in tools() {
            if !plan.wants(tool.key()) {
                continue;
            }
            util::check_stop()?;
            let mut acc = Acc::default();
            let mut counters = true;
            if let Some(p) = tool.needs().iter().find(|p| !util::have(p)) {
                acc.error = Some(format!("not measured: {p} is not installed"));
            }
            for run in 0..runs {
                if acc.error.is_some() || acc.load_not_finished.is_some() {
                    break;
                }
                util::check_stop()?;
                eprintln!("  scale: {} with {n} prefixes, run {}", tool.key(), run + 1);
                let r = (|| -> Result<()> {
                    let step = Instant::now();
                    let lab = Lab::new(plan.queues)?;
                    let mut inst = match Installed::install(&lab, tool, &list, &limits) {
                        Ok(i) => i,
                        Err(e) if e.downcast_ref::<TimedOut>().is_some() => {
                            acc.load_not_finished = Some(e.to_string());
                            return Ok(());
                        }
                        Err(e) => return Err(e),
                    };
                    if let Some(t) = inst.load_time {
                        acc.load.push(t.as_secs_f64());
                    }
                    let lap = |what: &str| {
                        eprintln!("    {what}: {:.1} s", step.elapsed().as_secs_f64());
                    };
                    lap("lab + load");
                    if tool == Tool::SluiceNative {
                        let prog = inst.sluice_prog()?;
                        let frame = flood_frame_for_test_run(&lab);
                        let (_, ns) = crate::progs::test_run(&prog, &frame, plan.pp_repeat)?;
                        acc.test_run_ns.push(ns);
                    }
                    let s = s2_live::measure(
                        plan,
                        &lab,
                        &mut inst,
                        &format!("{} N={n}", tool.key()),
                        &mut counters,
                    )?;
                    acc.mpps.push(s.mpps);
                    acc.samples.push(s);
                    lap("+ flood");
                    if run == 0 {
                        let start = Instant::now();
                        for i in 0..plan.incr_samples {
                            util::check_stop()?;
                            match inst.add_one(extra_prefix(i), &limits) {
                                Ok(d) => acc.incr.push(d.as_secs_f64()),
                                Err(e) if e.downcast_ref::<TimedOut>().is_some() => {
                                    acc.incr_not_finished = Some(e.to_string());
                                    break;
                                }
                                Err(e) => return Err(e),
                            }
                            if start.elapsed() > plan.incr_budget {
                                break;
                            }
                        }
                    }
                    lap("+ incremental");
                    inst.teardown(plan.restore_timeout.max(Duration::from_secs(30)))?;
                    lap("+ teardown");
                    drop(lab);
                    lap("+ namespaces deleted");
                    Ok(())
                })();
                if let Err(e) = r {
                    if util::stopping() {
                        return Err(e);
                    }
                    eprintln!("    error: {e:#}");
                    acc.error = Some(format!("error: {e:#}"));
                }
            }
            push_rows(&mut sec, tool, n, acc, plan);
        }
    }
    Ok(sec)
}

fn push_rows(sec: &mut Section, tool: Tool, n: usize, acc: Acc, plan: &Plan) {
    let k = tool.key();
    let row =
        |what: &str, unit: &str, samples: Vec<f64>, method: &str, blocked: Option<&String>| {
            let id = format!("{k}/{what}/{n}");
            let label = format!("{k}, {what}, {n} prefixes");
            let m = if let Some(e) = &acc.error {
                if let Some(why) = e.strip_prefix("not measured: ") {
                    Measurement::not_measured(&id, &label, unit, why, method)
                } else {
                    Measurement::error(&id, &label, unit, e.trim_start_matches("error: "), method)
                }
            } else if let Some(b) = blocked {
                Measurement::not_measured(&id, &label, unit, b, method)
            } else {
                Measurement::from_samples(&id, &label, unit, samples, method)
            };
            m.param("tool", k).param("prefixes", n).param("what", what)
        };
    let load_block = acc.load_not_finished.clone();
    sec.push(row(
        "load",
        "ms",
        acc.load.iter().map(|s| s * 1e3).collect(),
        tool.loader(),
        load_block.as_ref(),
    ));
    let incr_block = load_block.clone().or_else(|| {
        acc.incr_not_finished
            .clone()
            .filter(|_| acc.incr.is_empty())
    });
    let mut incr = row(
        "incremental",
        "ms",
        acc.incr.iter().map(|s| s * 1e3).collect(),
        "add one prefix with the list loaded",
        incr_block.as_ref(),
    );
    if let (Some(why), true) = (&acc.incr_not_finished, !acc.incr.is_empty()) {
        incr.params
            .insert("note".into(), format!("a later sample: {why}").into());
    }
    sec.push(incr);
    let mut live = row(
        "live",
        "Mpps",
        acc.mpps.clone(),
        "live drop rate of the section-2 flood against this list",
        load_block.as_ref(),
    );
    if let Some(m) = live.median.filter(|m| *m > 0.0) {
        live = live.with_extra("ns_per_packet", 1e3 / m);
    }
    if let Some(note) = s2_live::sample_notes(&acc.samples, plan.counter_timeout) {
        live = live.param("note", note);
    }
    sec.push(live);
    if tool == Tool::SluiceNative {
        sec.push(row(
            "test_run",
            "ns/packet",
            acc.test_run_ns,
            "BPF_PROG_TEST_RUN of the flood frame (a deny hit) on the attached program",
            load_block.as_ref(),
        ));
    }
}
