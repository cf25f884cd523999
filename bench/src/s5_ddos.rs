//! Section 5: what the DDoS stage costs per packet (BPF_PROG_TEST_RUN):
//! limit rules within and over their rate, per-source buckets, and the SYN
//! guard's challenge, against the same program with no rules, same run.

use std::net::IpAddr;

use anyhow::{Result, anyhow, bail};
use sluice::{
    dataplane::{
        Change,
        sandbox::{Sandbox, XDP_DROP, XDP_PASS},
    },
    model::policy::RuleSpec,
};

use crate::{
    Plan,
    frames::{self, L4, Spec},
    stats::{Measurement, Section},
    util,
};

struct Case {
    name: &'static str,
    /// Rules in force (empty = the baseline).
    rules: &'static [&'static str],
    l4: L4,
    v6: bool,
    expect: u32,
}

const CASES: &[Case] = &[
    Case {
        name: "no rules (baseline)",
        rules: &[],
        l4: L4::Udp,
        v6: false,
        expect: XDP_PASS,
    },
    Case {
        name: "shared limit, within rate",
        rules: &["limit 1000000000/s udp"],
        l4: L4::Udp,
        v6: false,
        expect: XDP_PASS,
    },
    Case {
        name: "per-source limit, within rate",
        rules: &["limit 1000000000/s per-source udp"],
        l4: L4::Udp,
        v6: false,
        expect: XDP_PASS,
    },
    Case {
        name: "per-source limit, within rate (IPv6 /64)",
        rules: &["limit 1000000000/s per-source /24 /64 udp"],
        l4: L4::Udp,
        v6: true,
        expect: XDP_PASS,
    },
    Case {
        name: "per-source limit, over rate (drop)",
        rules: &["limit 1/s burst 1 per-source udp"],
        l4: L4::Udp,
        v6: false,
        expect: XDP_DROP,
    },
    Case {
        name: "syn-guard, SYN within rate",
        rules: &["syn-guard 1000000000/s tcp"],
        l4: L4::Tcp,
        v6: false,
        expect: XDP_PASS,
    },
];

pub const METHOD: &str = "The real sluice program in a Sandbox (as section 1), default policy pass, empty lists, with the rules of each row committed through PolicyMaps::commit. BPF_PROG_TEST_RUN with `repeat` runs the program back to back on one 64-byte frame (one source, so one bucket); the kernel reports the mean ns per run; cells are medians over runs. Over-rate rows are measured after a first packet has used the burst, so every measured run takes the over-rate path; The SYN guard's challenge (XDP_TX) is not measured here: BPF_PROG_TEST_RUN repeats on the frame the previous run left, so after one run the program would see its own SYN-ACK. The baseline row is the same program with no rules, measured in the same run; `+ns` is a row's median minus the baseline's.";

pub fn run(plan: &Plan) -> Result<Section> {
    let mut sec = Section::new("ddos", "5. DDoS stage cost (BPF_PROG_TEST_RUN)", METHOD);
    sec.facts.insert("repeat".into(), plan.pp_repeat.into());
    let src4: IpAddr = "198.18.7.1".parse().expect("valid");
    let dst4: IpAddr = "198.19.255.2".parse().expect("valid");
    let src6: IpAddr = "2001:2:0:7::1".parse().expect("valid");
    let dst6: IpAddr = "2001:2:0:ff::2".parse().expect("valid");
    let mut baseline = None;
    for c in CASES {
        util::check_stop()?;
        let sandbox = Sandbox::new().map_err(|e| anyhow!("sluice sandbox: {e}"))?;
        let mut maps = sandbox
            .policy()
            .map_err(|e| anyhow!("sluice policy maps: {e}"))?;
        let rules = c
            .rules
            .iter()
            .map(|r| {
                let words: Vec<String> = r.split_whitespace().map(String::from).collect();
                RuleSpec::parse(&words)
                    .map(|s| s.to_rule())
                    .map_err(|e| anyhow!("{r}: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        maps.commit(Change {
            rules: Some(rules),
            ..Change::default()
        })
        .map_err(|e| anyhow!("sluice commit: {e}"))?;
        let (src, dst) = if c.v6 { (src6, dst6) } else { (src4, dst4) };
        let frame = frames::build(&Spec::new(src, dst, c.l4));
        // The first packet may use the burst; the path measured is what the
        // second one takes. A benchmark of the wrong path is no benchmark.
        sandbox
            .run(&frame)
            .map_err(|e| anyhow!("sluice test_run: {e}"))?;
        let got = sandbox
            .run(&frame)
            .map_err(|e| anyhow!("sluice test_run: {e}"))?
            .action;
        if got != c.expect {
            bail!(
                "sluice returned {got} for '{}' (expected {})",
                c.name,
                c.expect
            );
        }
        let mut samples = Vec::with_capacity(plan.runs);
        for _ in 0..plan.runs {
            util::check_stop()?;
            let r = sandbox
                .run_repeat(&frame, plan.pp_repeat)
                .map_err(|e| anyhow!("sluice test_run: {e}"))?;
            samples.push(r.duration.as_nanos() as f64);
        }
        let mut m = Measurement::from_samples(
            &format!("ddos/{}", c.name),
            c.name,
            "ns/packet",
            samples,
            "BPF_PROG_TEST_RUN mean ns per run, median over runs",
        )
        .param("rules", c.rules.join("; "))
        .param("frame_bytes", frame.len())
        .param("repeat", plan.pp_repeat);
        match (baseline, m.median) {
            (None, Some(b)) if c.rules.is_empty() => baseline = Some(b),
            (Some(b), Some(x)) => m = m.with_extra("over_baseline_ns", x - b),
            _ => {}
        }
        sec.push(m);
    }
    Ok(sec)
}
