//! Section 6, live part: Mpps forwarded through the load balancer (NAT,
//! XDP_TX back out of the veth it came in on), next to the firewall's drop
//! and pass rates and an XDP_TX reflector, all with section 2's harness.

use std::net::Ipv4Addr;

use anyhow::{Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode, links::FdLink},
};
use sluice::{
    dataplane::{BENCH_OBJECT, PolicyMaps},
    model::lb::Mode,
};
use sluice_common::{Family, Reason, Verdict, counter_index};

use crate::{
    Plan, ethtool,
    live::{self, GEN_SOURCES},
    netns::{self, Lab},
    progs,
    receivers::{Installed, Limits, Tool},
    s2_live,
    s6_lb::{self, SluiceOn},
    stats::{Measurement, Section, percentile},
    util,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cfg {
    /// bench_drop_all on the receiver: section 2's ceiling.
    Ceiling,
    /// sluice, deny list matching every source: XDP_DROP.
    FwDrop,
    /// sluice, no rules: XDP_PASS into the receiver's stack.
    FwPass,
    /// bench_trafficgen attached to the receiver: rewrite the source, XDP_TX.
    Reflect,
    /// sluice LB, NAT service on the receiver's address: XDP_TX to a backend.
    LbDsr,
}

const CONFIGS: [Cfg; 5] = [
    Cfg::Ceiling,
    Cfg::FwDrop,
    Cfg::FwPass,
    Cfg::Reflect,
    Cfg::LbDsr,
];

impl Cfg {
    fn key(self) -> &'static str {
        match self {
            Self::Ceiling => "xdp-drop-all",
            Self::FwDrop => "sluice-firewall-drop",
            Self::FwPass => "sluice-firewall-pass",
            Self::Reflect => "xdp-tx-reflect",
            Self::LbDsr => "sluice-lb-dsr",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Ceiling => "ceiling: XDP_DROP only (bench_drop_all)",
            Self::FwDrop => "sluice firewall, deny-list drop (1 rule)",
            Self::FwPass => "sluice firewall, pass to the stack (no rules)",
            Self::Reflect => "baseline: XDP_TX reflector (bench_trafficgen)",
            Self::LbDsr => "sluice LB, DSR to 4 backends, XDP_TX",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Ceiling => {
                "bench_drop_all attached natively to the receiver: frames taken off its rings per second"
            }
            Self::FwDrop => {
                "sluice attached natively to the receiver, deny list holding the generator's sources: frames taken off its rings (and dropped by sluice) per second"
            }
            Self::FwPass => {
                "sluice attached natively to the receiver, no rules: frames taken off its rings per second, each passed to the receiver's stack (checked with sluice's pass counter)"
            }
            Self::Reflect => {
                "bench_trafficgen attached natively to the receiver (rewrites the source, XDP_TX): frames arriving back at the generator's veth per second"
            }
            Self::LbDsr => {
                "sluice attached natively to the receiver, a DSR service on the receiver's address (every UDP port) with 4 backends behind the same veth: frames balanced (connection table, Maglev), given the backend's MAC, sent with XDP_TX and arriving back at the generator's veth per second. DSR, not NAT: the generator (live frames, where the kernel allows them) recycles its pages, and a NAT rewrite of the destination would leave recycled frames no longer addressed to the VIP"
            }
        }
    }

    /// Counted where frames arrive back (the generator's veth), not where
    /// they arrive first.
    fn counted_back(self) -> bool {
        matches!(self, Self::Reflect | Self::LbDsr)
    }
}

struct Sample {
    mpps: f64,
    offered: f64,
    /// Out / in: frames sent back per frame the receiver took (forwarding
    /// rows), or frames arrived per frame sent (the others).
    fraction: f64,
    whole_flood: bool,
}

/// bench_trafficgen attached natively (its own object; detached on drop).
struct Reflector {
    _link: FdLink,
    _ebpf: Ebpf,
}

/// Loads bench_trafficgen and attaches it to `ifindex` (the calling thread
/// must be in the interface's namespace).
fn attach_reflector(ifindex: u32) -> Result<Reflector> {
    let mut ebpf = EbpfLoader::new()
        .load(BENCH_OBJECT)
        .map_err(|e| anyhow!("loading the benchmark object: {e:#}"))?;
    let prog: &mut Xdp = ebpf
        .program_mut(progs::TRAFFICGEN)
        .ok_or_else(|| anyhow!("{} missing", progs::TRAFFICGEN))?
        .try_into()?;
    prog.load()
        .map_err(|e| anyhow!("loading {}: {e}", progs::TRAFFICGEN))?;
    let id = prog
        .attach_to_if_index(ifindex, XdpMode::Driver)
        .map_err(|e| anyhow!("attaching {}: {e}", progs::TRAFFICGEN))?;
    let link = prog.take_link(id)?;
    let link = FdLink::try_from(link).map_err(|e| anyhow!("not a bpf_link: {e}"))?;
    Ok(Reflector {
        _link: link,
        _ebpf: ebpf,
    })
}

/// The LB's backends: behind the receiver's veth, on the generator's side.
fn live_backends() -> Vec<Ipv4Addr> {
    (3..7).map(|i| Ipv4Addr::new(198, 19, 255, i)).collect()
}

fn slack(n: u64) -> u64 {
    1024 + n / 100
}

fn measure_one(plan: &Plan, cfg: Cfg, what: &str) -> Result<Sample> {
    let mut lab = Lab::new(plan.queues)?;
    // Frames sent back to the generator's veth are taken off its rings
    // (its NAPI runs only with an XDP program) and counted there.
    let tx_idx = lab.tx_ifindex;
    let _peer = lab.tx.run(move || progs::attach_drop_all(tx_idx))?;
    let limits = Limits {
        load_timeout: plan.restore_timeout,
        change_timeout: plan.change_timeout,
    };
    match cfg {
        Cfg::Ceiling | Cfg::FwDrop => {
            let (tool, rules) = if cfg == Cfg::Ceiling {
                (Tool::DropAll, s2_live::rules_for(0))
            } else {
                (Tool::SluiceNative, s2_live::rules_for(1))
            };
            let mut inst = Installed::install(&lab, tool, &rules, &limits)?;
            let mut counters = true;
            let s = s2_live::measure(plan, &lab, &mut inst, what, &mut counters)?;
            inst.teardown(plan.restore_timeout)?;
            Ok(Sample {
                mpps: s.mpps,
                offered: s.offered,
                fraction: s.arrived,
                whole_flood: s.whole_flood,
            })
        }
        Cfg::FwPass => {
            let sluice = SluiceOn::attach(&lab)?;
            let maps = PolicyMaps::open(sluice.root()).map_err(|e| anyhow!("sluice maps: {e}"))?;
            let i = counter_index(
                Family::V4,
                sluice_common::L4::Udp,
                Verdict::Pass,
                Reason::Default,
            ) as usize;
            let passed = || -> Result<u64> {
                let c = maps
                    .counters()
                    .map_err(|e| anyhow!("sluice counters: {e}"))?;
                Ok(c.get(i).map_or(0, |c| c.packets))
            };
            let p0 = passed()?;
            let f = live::flood(&lab, plan)?;
            let p = passed()? - p0;
            if f.arrived == 0 {
                bail!("{what}: no frames arrived (sent {})", f.sent);
            }
            if p.abs_diff(f.arrived) > slack(f.arrived) {
                bail!("{what}: sluice passed {p} frames but {} arrived", f.arrived);
            }
            // PolicyMaps holds the pin root's lock: release it before the
            // detach (which takes it) or the two deadlock.
            drop(maps);
            drop(sluice);
            Ok(Sample {
                mpps: f.mpps(),
                offered: f.offered_mpps(),
                fraction: f.arrived as f64 / f.sent.max(1) as f64,
                whole_flood: f.whole_flood(),
            })
        }
        Cfg::Reflect | Cfg::LbDsr => {
            // live::flood counts arrivals with the lab's `rx_stats`: point
            // it at the generator's veth, where forwarded frames arrive,
            // and keep the receiver's for what went in.
            let tx_if = lab.tx_if.clone();
            let back = lab.tx.run(move || ethtool::Stats::open_here(&tx_if))?;
            let into = std::mem::replace(&mut lab.rx_stats, back);
            let lab = &lab;
            let rx_idx = lab.rx.ifindex(&lab.rx_if)?;
            let mut _reflector = None;
            let mut sluice = None;
            if cfg == Cfg::Reflect {
                _reflector = Some(lab.rx.run(move || attach_reflector(rx_idx))?);
            } else {
                let s = SluiceOn::attach(lab)?;
                s6_lb::backends_behind_veth(lab, &live_backends(), &[])?;
                let vip = Ipv4Addr::from(netns::RX_V4);
                s6_lb::apply(
                    s.root(),
                    // Every port: the generator varies its ports.
                    &[s6_lb::service(
                        &format!("{vip}:*/udp"),
                        Mode::Dsr,
                        &live_backends()
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>(),
                    )?],
                )?;
                sluice = Some(s);
            }
            let lb_tx = |s: &Option<SluiceOn<'_>>| -> Result<u64> {
                match s {
                    Some(s) => s6_lb::lb_stat(s.root(), "tx"),
                    None => Ok(0),
                }
            };
            let in0 = into.sum("_xdp_packets")?;
            let tx0 = lb_tx(&sluice)?;
            let stack0 = lab.rx.run(live::stack_delivered_here)?;
            let f = live::flood(lab, plan)?;
            let took = into.sum("_xdp_packets")? - in0;
            let sent_back = lb_tx(&sluice)? - tx0;
            let stack = lab.rx.run(live::stack_delivered_here)? - stack0;
            if took == 0 || f.arrived == 0 {
                bail!(
                    "{what}: nothing forwarded (sent {}, receiver took {took}, {} came back)",
                    f.sent,
                    f.arrived
                );
            }
            if stack > slack(took) {
                bail!("{what}: {stack} of {took} frames went into the receiver's stack");
            }
            if f.arrived > took + slack(took) {
                bail!(
                    "{what}: {} frames came back but the receiver took only {took}",
                    f.arrived
                );
            }
            if cfg == Cfg::LbDsr && sent_back.abs_diff(took) > slack(took) {
                let mut stats: Vec<String> = match &sluice {
                    Some(s) => [
                        "to_stack",
                        "no_neighbour",
                        "conns_created",
                        "conns_capped",
                        "redirect",
                    ]
                    .iter()
                    .map(|n| format!("{n} {}", s6_lb::lb_stat(s.root(), n).unwrap_or(0)))
                    .collect(),
                    None => Vec::new(),
                };
                if let Some(s) = &sluice
                    && let Ok(maps) = PolicyMaps::open(s.root())
                    && let Ok(c) = maps.counters()
                {
                    for v in Verdict::ALL {
                        for r in Reason::ALL {
                            let mut n = 0;
                            for f in sluice_common::Family::ALL {
                                for l in sluice_common::L4::ALL {
                                    n += c[counter_index(f, l, v, r) as usize].packets;
                                }
                            }
                            if n > 0 {
                                stats.push(format!("{}/{} {n}", v.name(), r.name()));
                            }
                        }
                    }
                }
                bail!(
                    "{what}: the LB sent {sent_back} frames with XDP_TX but the receiver took {took} ({})",
                    stats.join(", ")
                );
            }
            drop(sluice);
            Ok(Sample {
                mpps: f.mpps(),
                offered: f.offered_mpps(),
                fraction: f.arrived as f64 / took as f64,
                whole_flood: f.whole_flood(),
            })
        }
    }
}

pub fn run(plan: &Plan) -> Result<Vec<Measurement>> {
    let mut samples: Vec<Vec<Sample>> = CONFIGS.iter().map(|_| Vec::new()).collect();
    let mut errors: Vec<Option<String>> = CONFIGS.iter().map(|_| None).collect();
    for run in 0..plan.runs {
        for (i, cfg) in CONFIGS.iter().enumerate() {
            util::check_stop()?;
            if errors[i].is_some() {
                continue;
            }
            let what = format!("{}, run {}", cfg.key(), run + 1);
            eprintln!("  lb live: {what}");
            util::keep(
                measure_one(plan, *cfg, &what),
                &mut samples[i],
                &mut errors[i],
            )?;
        }
    }
    let mut out = Vec::new();
    for (i, cfg) in CONFIGS.iter().enumerate() {
        let id = format!("live/{}", cfg.key());
        let mut m = if let Some(e) = &errors[i] {
            Measurement::error(&id, cfg.label(), "Mpps", e, cfg.describe())
        } else {
            let s = &samples[i];
            let med = |v: Vec<f64>| percentile(&v, 50.0);
            let mut m = Measurement::from_samples(
                &id,
                cfg.label(),
                "Mpps",
                s.iter().map(|x| x.mpps).collect(),
                cfg.describe(),
            )
            .with_extra("offered_mpps", med(s.iter().map(|x| x.offered).collect()))
            .with_extra(
                "out_in_fraction",
                med(s.iter().map(|x| x.fraction).collect()),
            );
            if s.iter().any(|x| x.whole_flood) {
                m = m.param(
                    "note",
                    format!(
                        "fewer than {} frames in the window: rate over the whole flood, drain included",
                        live::MIN_WINDOW_FRAMES
                    ),
                );
            }
            m
        };
        m = m
            .param("config", cfg.key())
            .param(
                "counted_at",
                if cfg.counted_back() {
                    "generator veth (back)"
                } else {
                    "receiver veth (in)"
                },
            )
            .param("sources", GEN_SOURCES);
        out.push(m);
    }
    let median_of = |key: Cfg| {
        out.iter()
            .find(|m| m.id == format!("live/{}", key.key()))
            .and_then(|m| m.median)
            .filter(|x| *x > 0.0)
    };
    let (ceiling, reflect, fw_drop) = (
        median_of(Cfg::Ceiling),
        median_of(Cfg::Reflect),
        median_of(Cfg::FwDrop),
    );
    for (m, cfg) in out.iter_mut().zip(CONFIGS) {
        let Some(x) = m.median else { continue };
        match (cfg.counted_back(), reflect, ceiling) {
            (true, Some(r), _) => {
                m.extra.insert("ratio_to_reflect".into(), x / r);
            }
            (false, _, Some(c)) => {
                m.extra.insert("ratio_to_ceiling".into(), x / c);
            }
            _ => {}
        }
        if cfg == Cfg::LbDsr
            && let Some(d) = fw_drop
        {
            m.extra.insert("ratio_to_firewall_drop".into(), x / d);
        }
    }
    Ok(out)
}

/// Section 6: the LB's per-packet cost, live rate and control plane.
pub fn lb_section(plan: &Plan) -> Result<Section> {
    let mut sec = Section::new("lb", "6. Load balancer", &s6_lb::method(plan));
    sec.facts.insert("repeat".into(), plan.pp_repeat.into());
    sec.facts
        .insert("singles".into(), s6_lb::singles(plan).into());
    eprintln!("  lb: per-packet cost");
    for m in s6_lb::per_packet(plan)? {
        sec.push(m);
    }
    util::check_stop()?;
    for m in run(plan)? {
        sec.push(m);
    }
    util::check_stop()?;
    eprintln!("  lb: control plane");
    for m in s6_lb::control(plan)? {
        sec.push(m);
    }
    Ok(sec)
}
