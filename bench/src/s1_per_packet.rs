//! Section 1: per-packet cost of sluice's XDP program and of the minimal
//! reference lookup, with BPF_PROG_TEST_RUN, on representative frames and
//! deny lists of several sizes.

use std::{net::IpAddr, time::Instant};

use anyhow::{Result, anyhow, bail};
use sluice::dataplane::{
    Change, attach,
    sandbox::{Sandbox, XDP_DROP, XDP_PASS},
};

use crate::{
    Plan,
    frames::{self, L4, Spec},
    prefixes::{self, DenyList},
    progs::{self, Reference},
    stats::{Measurement, Section},
    util,
};

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    expect: u32,
    /// The reference program parses untagged frames only.
    reference: bool,
}

fn cases() -> Vec<Case> {
    let dst4: IpAddr = "198.19.255.2".parse().expect("valid");
    let dst6: IpAddr = "2001:2:0:ff::2".parse().expect("valid");
    let p4: IpAddr = prefixes::PASS_V4.into();
    let d4: IpAddr = prefixes::DROP_V4.into();
    let p6: IpAddr = prefixes::PASS_V6.into();
    let d6: IpAddr = prefixes::DROP_V6.into();
    let mk = |name, src, dst, l4, vlan: Option<u16>, expect, reference| {
        let mut s = Spec::new(src, dst, l4);
        s.vlan = vlan;
        Case {
            name,
            frame: frames::build(&s),
            expect,
            reference,
        }
    };
    vec![
        mk("ipv4-tcp-pass", p4, dst4, L4::Tcp, None, XDP_PASS, true),
        mk("ipv4-udp-pass", p4, dst4, L4::Udp, None, XDP_PASS, true),
        mk("ipv4-tcp-drop", d4, dst4, L4::Tcp, None, XDP_DROP, true),
        mk("ipv4-udp-drop", d4, dst4, L4::Udp, None, XDP_DROP, true),
        mk("ipv6-tcp-pass", p6, dst6, L4::Tcp, None, XDP_PASS, true),
        mk("ipv6-udp-pass", p6, dst6, L4::Udp, None, XDP_PASS, true),
        mk("ipv6-tcp-drop", d6, dst6, L4::Tcp, None, XDP_DROP, true),
        mk("ipv6-udp-drop", d6, dst6, L4::Udp, None, XDP_DROP, true),
        mk(
            "vlan-ipv4-tcp-pass",
            p4,
            dst4,
            L4::Tcp,
            Some(100),
            XDP_PASS,
            false,
        ),
        mk(
            "vlan-ipv4-udp-drop",
            d4,
            dst4,
            L4::Udp,
            Some(100),
            XDP_DROP,
            false,
        ),
    ]
}

/// Longest one BPF_PROG_TEST_RUN call of section 1 may take.
const RUN_BUDGET: std::time::Duration = std::time::Duration::from_millis(250);

pub const METHOD: &str = "BPF_PROG_TEST_RUN with `repeat` set high (1,000,000, or fewer when one call would exceed 0.25 s) runs the program back to back on one frame; the kernel reports the mean time per run (integer ns, measured with preemption off around the loop). Each cell is the median over runs of that mean, with min/max over runs. sluice is the real program (Sandbox: same object, maps and PolicyMaps::commit path as the CLI), default policy (pass), no L4 rules, its deny list holding N IPv4 and N IPv6 prefixes: the prefix the `drop` frames come from plus N-1 filler (IPv4 /32s spread over the whole unicast space, IPv6 /64s over 2000::/3, never covering the `pass` sources). The reference is bench_reference: untagged Ethernet, one LPM lookup of the source address, no counters, same prefixes. Ratio = sluice median / reference median. Frames are 64 bytes or the minimum that holds the headers (IPv6/TCP: 74, VLAN adds 4).";

pub fn run(plan: &Plan) -> Result<Section> {
    let mut sec = Section::new(
        "per_packet",
        "1. Per-packet cost (BPF_PROG_TEST_RUN)",
        METHOD,
    );
    sec.facts.insert("repeat".into(), plan.pp_repeat.into());
    sec.facts
        .insert("list_sizes".into(), serde_json::json!(plan.pp_sizes));
    let cases = cases();
    for &n in &plan.pp_sizes {
        util::check_stop()?;
        eprintln!("  per-packet: deny lists of {n} prefixes per family");
        let list = DenyList::new(n);
        let sandbox = Sandbox::new().map_err(|e| anyhow!("sluice sandbox: {e}"))?;
        let mut maps = sandbox
            .policy()
            .map_err(|e| anyhow!("sluice policy maps: {e}"))?;
        let change = Change {
            add: list.entries(),
            ..Change::default()
        };
        let t0 = Instant::now();
        maps.commit(change)
            .map_err(|e| anyhow!("sluice commit: {e}"))?;
        let commit_s = t0.elapsed().as_secs_f64();
        drop(maps);
        let mut reference = Reference::new()?;
        let t0 = Instant::now();
        reference.fill(&list.v4, &list.v6)?;
        let ref_fill_s = t0.elapsed().as_secs_f64();
        sec.facts.insert(
            format!("load_seconds_{n}"),
            serde_json::json!({"sluice_commit": commit_s, "reference_batch_update": ref_fill_s}),
        );
        if n == plan.pp_sizes[0] {
            if let Ok(st) = attach::status(sandbox.root())
                && let Some(p) = st.program
            {
                sec.facts
                    .insert("sluice_jited_bytes".into(), p.jited_bytes.into());
                if let Some(v) = p.verified_insns {
                    sec.facts.insert("sluice_verified_insns".into(), v.into());
                }
            }
            if let Ok(info) = reference.prog().info() {
                sec.facts
                    .insert("reference_jited_bytes".into(), info.size_jitted().into());
            }
        }

        // Check the verdicts first: a benchmark of the wrong path is no benchmark.
        for c in &cases {
            let got = sandbox
                .run(&c.frame)
                .map_err(|e| anyhow!("sluice test_run: {e}"))?
                .action;
            if got != c.expect {
                bail!(
                    "sluice returned {got} for {} (expected {})",
                    c.name,
                    c.expect
                );
            }
            if c.reference {
                let (got, _) = progs::test_run(reference.prog(), &c.frame, 1)?;
                if got != c.expect {
                    bail!(
                        "reference returned {got} for {} (expected {})",
                        c.name,
                        c.expect
                    );
                }
            }
        }
        // Warm caches and the JIT'd code, and size each frame's repeat count:
        // `pp_repeat`, or fewer when one run would take longer than
        // RUN_BUDGET (a pathological path must not stall the suite).
        let mut repeats = Vec::with_capacity(cases.len());
        for c in &cases {
            let probe = 200;
            let r = sandbox
                .run_repeat(&c.frame, probe)
                .map_err(|e| anyhow!("sluice test_run: {e}"))?;
            let est = (r.duration.as_nanos() as f64).max(1.0);
            let fit = (RUN_BUDGET.as_nanos() as f64 / est) as u32;
            repeats.push(fit.clamp(100, plan.pp_repeat.max(100)));
        }

        let mut s_samples = vec![Vec::new(); cases.len()];
        let mut r_samples = vec![Vec::new(); cases.len()];
        for _ in 0..plan.runs {
            util::check_stop()?;
            for (i, c) in cases.iter().enumerate() {
                let r = sandbox
                    .run_repeat(&c.frame, repeats[i])
                    .map_err(|e| anyhow!("sluice test_run: {e}"))?;
                s_samples[i].push(r.duration.as_nanos() as f64);
                if c.reference {
                    let (_, ns) = progs::test_run(reference.prog(), &c.frame, plan.pp_repeat)?;
                    r_samples[i].push(ns);
                }
            }
        }
        for (i, c) in cases.iter().enumerate() {
            let s = Measurement::from_samples(
                &format!("sluice/{}/{n}", c.name),
                &format!("sluice, {}, deny list {n}", c.name),
                "ns/packet",
                std::mem::take(&mut s_samples[i]),
                "BPF_PROG_TEST_RUN mean ns per run, median over runs",
            )
            .param("program", "sluice_xdp")
            .param("frame", c.name)
            .param("frame_bytes", c.frame.len())
            .param("list_size", n)
            .param("repeat", repeats[i]);
            if c.reference {
                let r = Measurement::from_samples(
                    &format!("reference/{}/{n}", c.name),
                    &format!("reference, {}, list {n}", c.name),
                    "ns/packet",
                    std::mem::take(&mut r_samples[i]),
                    "BPF_PROG_TEST_RUN mean ns per run, median over runs",
                )
                .param("program", "bench_reference")
                .param("frame", c.name)
                .param("frame_bytes", c.frame.len())
                .param("list_size", n)
                .param("repeat", plan.pp_repeat);
                let ratio = match (s.median, r.median) {
                    (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                    _ => None,
                };
                let mut s = match ratio {
                    Some(x) => s.with_extra("ratio_to_reference", x),
                    None => s,
                };
                if let Some(x) = ratio.filter(|x| *x > 50.0) {
                    s = s.param(
                        "note",
                        format!(
                            "{x:.0}x the reference on the same frame and list: the time is not \
                             in the lookup both programs do"
                        ),
                    );
                }
                sec.push(s);
                sec.push(r);
            } else {
                sec.push(s);
            }
        }
        drop(reference);
        drop(sandbox);
    }
    Ok(sec)
}
