//! Differential test of the lock-out guard's evaluator
//! (`model::policy::eval::judge_packet`, the verdict logic's third copy
//! after the kernel and the reference model) against the reference model,
//! on random policies and random packets of connections (its `judge`
//! combines the verdicts of a connection's packets; unit tests cover that). Reproduce a
//! failure with `SLUICE_SEED=<seed>`. Needs no privileges.

use std::collections::BTreeSet;

use ipnet::IpNet;
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};
use sluice::model::policy::{Action, Policy, eval};
use sluice_common::L4;

use crate::support::{
    frames::{random_frame, random_policy},
    kernel, model,
};

const POLICIES: usize = 300;
const FRAMES_PER_POLICY: usize = 400;

/// The reference model's policy as the desired state holds it.
fn desired(p: &model::Policy) -> Policy {
    let set = |l: &[IpNet]| -> BTreeSet<IpNet> { l.iter().map(IpNet::trunc).collect() };
    Policy {
        default: if p.default_drop {
            Action::Drop
        } else {
            Action::Pass
        },
        malformed: if p.malformed_drop {
            Action::Drop
        } else {
            Action::Pass
        },
        audit: p.audit,
        allow: set(&p.allow),
        deny: set(&p.deny),
        rules: p.rules.iter().map(kernel::rule_spec).collect(),
    }
}

#[test]
fn the_guards_evaluator_agrees_with_the_reference_model() {
    let seed: u64 = std::env::var("SLUICE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut compared = 0usize;
    let mut by_reason = std::collections::BTreeMap::new();
    for round in 0..POLICIES {
        let mut policy = random_policy(&mut rng);
        policy.rules.retain(kernel::storable);
        let guard_policy = desired(&policy);
        for _ in 0..FRAMES_PER_POLICY {
            let frame = random_frame(&mut rng);
            // The guard judges the first packet of a connection: parsed IP,
            // not a later fragment.
            let model::Parsed::Ip(pkt) = model::parse(&frame) else {
                continue;
            };
            if pkt.l4 == L4::Fragment {
                continue;
            }
            let want = model::judge(&policy, &frame);
            let probe = eval::Probe {
                what: "a random connection".into(),
                src: pkt.src,
                dst: pkt.dst,
                proto: pkt.proto,
                dport: pkt.dport,
                sport: pkt.sport,
            };
            let (verdict, reason, why) =
                eval::judge_packet(&guard_policy, &probe, pkt.tcp_flags.unwrap_or(0));
            assert_eq!(
                (verdict, reason),
                (want.verdict, want.reason),
                "seed {seed} (rerun with SLUICE_SEED={seed}), round {round}: the guard says \
                 {verdict:?}/{reason:?} ({why}), the model {want:?}\nprobe: {probe}\n\
                 policy: {policy:?}"
            );
            *by_reason.entry(format!("{reason:?}")).or_insert(0usize) += 1;
            compared += 1;
        }
    }
    assert!(
        compared >= 50_000,
        "only {compared} probes compared (seed {seed})"
    );
    // Every way to a verdict was exercised, not only the default.
    for r in ["AllowList", "DenyList", "Rule", "Default"] {
        assert!(
            by_reason.get(r).copied().unwrap_or(0) >= 100,
            "reason {r} decided too few probes: {by_reason:?} (seed {seed})"
        );
    }
}
