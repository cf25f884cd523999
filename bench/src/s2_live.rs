//! Section 2: live drop rate. A generator floods 64-byte frames with varied
//! sources over a veth pair; each firewall in turn drops them on the
//! receiving end, all in the same run.

use anyhow::Result;
use ipnet::Ipv4Net;

use crate::{
    Plan,
    live::{self, GEN_SOURCE_NET, GEN_SOURCES},
    netns::Lab,
    prefixes,
    receivers::{Installed, Limits, Tool},
    stats::{Measurement, Section},
    util,
};

pub fn method(plan: &Plan) -> String {
    format!(
        "Two network namespaces joined by a veth pair ({q} queues per end, GRO on the receiver so its NAPI takes XDP_TX frames). \
         Generator: {g}, \
         {t} threads pinned round-robin to the {c} CPUs, each injecting on the sender veth; frames get a new IPv4 source \
         (cycling through {GEN_SOURCES} addresses of {GEN_SOURCE_NET}, checksum fixed) and leave the sender veth, so each 64-byte \
         UDP frame (Ethernet header included, no FCS) lands on the receiver. Generator and receiver share the machine's CPUs (the \
         receiver's softirq runs on the sending CPU): the rate is what this machine sustains end to end, and the ceiling row \
         (an XDP program that only drops) is that limit. Each run uses a fresh pair of namespaces: install the firewall, flood \
         {w:.2} s to warm up, then count the frames the receiver takes off its rings (veth per-queue xdp_packets, read by ioctl) \
         over a {m:.2} s window: Mpps = frames / window (a receiver so slow that fewer than {mw} frames arrive in the window \
         is rated over the whole flood instead, from the first frame until its rings are drained). After the flood the \
         firewall's own drop counter must equal the frames that arrived, and the receiver's stack must not have taken them \
         (Ip InDelivers + ForwDatagrams unchanged), each within 1% + 1024, else the run is an error. Configurations run in \
         turn inside each run (run-major), so slow drift in the machine's load hits them alike. Ratio = median Mpps / median Mpps of the ceiling. Offered = frames \
         the generator produced per second of its own running time.",
        q = plan.queues,
        g = crate::progs::gen_description(),
        t = plan.gen_threads,
        c = live::available_cpus().len(),
        w = plan.live_warmup.as_secs_f64(),
        m = plan.live_window.as_secs_f64(),
        mw = live::MIN_WINDOW_FRAMES,
    )
}

/// The configurations of this section: tool and number of rules.
pub fn configs(plan: &Plan) -> Vec<(Tool, usize)> {
    let all = vec![
        (Tool::DropAll, 0),
        (Tool::SluiceNative, 1),
        (Tool::SluiceGeneric, 1),
        (Tool::IptablesNft, 1),
        (Tool::IptablesNft, plan.ipt_many),
        (Tool::IptablesLegacy, 1),
        (Tool::IptablesLegacy, plan.ipt_many),
        (Tool::Ipset, 1),
        (Tool::Nft, 1),
    ];
    all.into_iter()
        .filter(|(t, _)| *t == Tool::DropAll || plan.wants(t.key()))
        .collect()
}

/// The deny list for `n` rules: n-1 filler /32s, then the prefix the
/// generator's sources fall in (last, so iptables walks every rule).
pub fn rules_for(n: usize) -> Vec<Ipv4Net> {
    if n == 0 {
        return Vec::new();
    }
    let hit: Ipv4Net = GEN_SOURCE_NET.parse().expect("valid");
    let mut v = prefixes::filler_v4(n - 1, 0x5eed_0002, &[hit]);
    v.push(hit);
    v
}

/// One flood against one installed firewall.
pub struct Sample {
    pub mpps: f64,
    pub offered: f64,
    /// Arrived / sent.
    pub arrived: f64,
    /// The rate is over the whole flood (a very slow receiver).
    pub whole_flood: bool,
    /// The firewall's own counter could not be listed in time, so only the
    /// stack counters vouch that it dropped the frames.
    pub stack_check_only: bool,
}

/// Floods `inst` and checks the frames arrived and were dropped by it:
/// its own drop counter must match the arrivals, and the receiver's stack
/// must not have taken them (Ip InDelivers + ForwDatagrams). `counters`
/// turns false once a counter listing did not finish in time, so later runs
/// of the same configuration skip it.
pub fn measure(
    plan: &Plan,
    lab: &Lab,
    inst: &mut Installed<'_>,
    what: &str,
    counters: &mut bool,
) -> Result<Sample> {
    let before = if *counters {
        inst.dropped(plan.counter_timeout)?
    } else {
        None
    };
    let stack0 = lab.rx.run(live::stack_delivered_here)?;
    let f = live::flood(lab, plan)?;
    let stack1 = lab.rx.run(live::stack_delivered_here)?;
    if f.drain_timed_out {
        eprintln!(
            "    note: {what}: receiver still draining after {:?}",
            plan.live_drain
        );
    }
    live::check_not_delivered(what, &f, stack1.saturating_sub(stack0))?;
    let after = if before.is_some() {
        inst.dropped(plan.counter_timeout)?
    } else {
        None
    };
    let stack_check_only = match (before, after) {
        (Some(b), Some(a)) => {
            live::check_drops(what, &f, a.saturating_sub(b))?;
            false
        }
        _ => {
            *counters = false;
            true
        }
    };
    Ok(Sample {
        mpps: f.mpps(),
        offered: f.offered_mpps(),
        arrived: if f.sent > 0 {
            f.arrived as f64 / f.sent as f64
        } else {
            0.0
        },
        whole_flood: f.whole_flood(),
        stack_check_only,
    })
}

/// Notes for a measurement from its samples.
pub fn sample_notes(samples: &[Sample], counter_timeout: std::time::Duration) -> Option<String> {
    let mut notes = Vec::new();
    if samples.iter().any(|s| s.whole_flood) {
        notes.push(format!(
            "receiver too slow for the window (< {} frames): rate over the whole flood, drain included",
            live::MIN_WINDOW_FRAMES
        ));
    }
    if samples.iter().any(|s| s.stack_check_only) {
        notes.push(format!(
            "listing the rule counters took over {} s, so the drops were checked with the stack's counters only",
            counter_timeout.as_secs()
        ));
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}

pub fn run(plan: &Plan) -> Result<Section> {
    let mut sec = Section::new(
        "live",
        "2. Live drop rate (veth, 64-byte frames)",
        &method(plan),
    );
    let configs = configs(plan);
    let limits = Limits {
        load_timeout: plan.restore_timeout,
        change_timeout: plan.change_timeout,
    };
    let mut samples: Vec<Vec<Sample>> = configs.iter().map(|_| Vec::new()).collect();
    let mut counters: Vec<bool> = configs.iter().map(|_| true).collect();
    let mut errors: Vec<Option<String>> = configs.iter().map(|_| None).collect();
    let missing: Vec<Option<String>> = configs
        .iter()
        .map(|(t, _)| {
            t.needs()
                .iter()
                .find(|p| !util::have(p))
                .map(|p| format!("{p} is not installed"))
        })
        .collect();
    for run in 0..plan.runs {
        for (i, (tool, n)) in configs.iter().enumerate() {
            util::check_stop()?;
            if missing[i].is_some() || errors[i].is_some() {
                continue;
            }
            let what = format!("{} ({n} rules), run {}", tool.key(), run + 1);
            eprintln!("  live: {what}");
            let r = (|| -> Result<Sample> {
                let lab = Lab::new(plan.queues)?;
                let mut inst = Installed::install(&lab, *tool, &rules_for(*n), &limits)?;
                let s = measure(plan, &lab, &mut inst, &what, &mut counters[i])?;
                inst.teardown(plan.restore_timeout)?;
                Ok(s)
            })();
            util::keep(r, &mut samples[i], &mut errors[i])?;
        }
    }
    let mut ceiling = None;
    for (i, (tool, n)) in configs.iter().enumerate() {
        let id = format!("{}/{n}", tool.key());
        let label = if *tool == Tool::DropAll {
            "ceiling: XDP_DROP only (bench_drop_all)".to_string()
        } else {
            format!(
                "{} ({n} rule{})",
                tool.key(),
                if *n == 1 { "" } else { "s" }
            )
        };
        let m = if let Some(why) = &missing[i] {
            Measurement::not_measured(&id, &label, "Mpps", why, tool.describe())
        } else if let Some(e) = &errors[i] {
            Measurement::error(&id, &label, "Mpps", e, tool.describe())
        } else {
            let s = &samples[i];
            let mut m = Measurement::from_samples(
                &id,
                &label,
                "Mpps",
                s.iter().map(|x| x.mpps).collect(),
                tool.describe(),
            );
            let med = |v: Vec<f64>| crate::stats::percentile(&v, 50.0);
            m = m
                .with_extra("offered_mpps", med(s.iter().map(|x| x.offered).collect()))
                .with_extra(
                    "delivered_fraction",
                    med(s.iter().map(|x| x.arrived).collect()),
                );
            if let Some(n) = sample_notes(s, plan.counter_timeout) {
                m = m.param("note", n);
            }
            if *tool == Tool::DropAll {
                ceiling = m.median;
            }
            m
        };
        let m = m.param("tool", tool.key()).param("rules", *n);
        sec.push(m);
    }
    if let Some(c) = ceiling.filter(|c| *c > 0.0) {
        for m in &mut sec.measurements {
            if let Some(x) = m.median {
                m.extra.insert("ratio_to_ceiling".into(), x / c);
            }
        }
    }
    sec.facts
        .insert("generator_threads".into(), plan.gen_threads.into());
    sec.facts
        .insert("iptables_many_rules".into(), plan.ipt_many.into());
    Ok(sec)
}
