//! Drives the real XDP program through BPF_PROG_TEST_RUN: a sandboxed
//! dataplane, model policies written into it through the CLI's own commit
//! path, and counter snapshots to compare against expectations.

use std::collections::BTreeSet;

use ipnet::IpNet;
use sluice::{
    dataplane::{Change, PolicyMaps, policy::list_for, sandbox::Sandbox},
    model::policy::{RuleSpec, TcpFlags},
};
use sluice_common::{Counter, Family, L4, ListId, Reason, Verdict, counter_index};

use super::model;

/// The XDP action the program must return for a verdict.
pub fn xdp_action(v: Verdict) -> u32 {
    match v {
        Verdict::Pass | Verdict::Audit => sluice::dataplane::sandbox::XDP_PASS,
        Verdict::Drop => sluice::dataplane::sandbox::XDP_DROP,
    }
}

pub fn new_sandbox() -> Sandbox {
    Sandbox::new().unwrap_or_else(|e| panic!("cannot load the XDP program (tests need root): {e}"))
}

/// Rules sluice would refuse (`rule add` validates them) are left out of
/// model policies so model and kernel hold the same rule set.
pub fn storable(rule: &model::Rule) -> bool {
    if rule.audit && !rule.drop {
        return false;
    }
    let fam = |n: &IpNet| n.addr().is_ipv4();
    match (&rule.src, &rule.dst) {
        (Some(s), Some(d)) => fam(s) == fam(d),
        _ => true,
    }
}

pub fn rule_spec(rule: &model::Rule) -> RuleSpec {
    RuleSpec {
        action: if rule.drop {
            Verdict::Drop
        } else {
            Verdict::Pass
        },
        audit: rule.audit,
        proto: rule.proto.filter(|p| *p != 0),
        dport: rule.dport,
        sport: rule.sport,
        src: rule.src,
        dst: rule.dst,
        syn: false,
        tcp_flags: rule.tcp_flags.map(|(set, mask)| TcpFlags { set, mask }),
        rate: None,
    }
}

/// Replaces whatever policy the sandbox holds with `policy`, in one commit.
pub fn set_policy(maps: &mut PolicyMaps, policy: &model::Policy) {
    let mut change = Change::default();
    let wanted = |allow: bool| -> BTreeSet<IpNet> {
        let list = if allow { &policy.allow } else { &policy.deny };
        list.iter().map(IpNet::trunc).collect()
    };
    for (allow, v4, v6) in [
        (true, ListId::AllowV4, ListId::AllowV6),
        (false, ListId::DenyV4, ListId::DenyV6),
    ] {
        let want = wanted(allow);
        let mut have = BTreeSet::new();
        for list in [v4, v6] {
            for e in maps.list_entries(list).expect("list entries") {
                have.insert(e.prefix);
            }
        }
        for n in have.difference(&want) {
            change.del.push((list_for(allow, n), *n));
        }
        for n in want.difference(&have) {
            change.add.push((list_for(allow, n), *n));
        }
    }
    change.rules = Some(
        policy
            .rules
            .iter()
            .map(|r| rule_spec(r).to_rule())
            .collect(),
    );
    change.default_action = Some(if policy.default_drop {
        Verdict::Drop
    } else {
        Verdict::Pass
    });
    change.malformed_action = Some(if policy.malformed_drop {
        Verdict::Drop
    } else {
        Verdict::Pass
    });
    change.audit = Some(policy.audit);
    maps.commit(change).expect("commit policy");
}

/// Everything the program counts, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub slots: Vec<Counter>,
    /// (list, prefix) → (packets, bytes)
    pub entries: Vec<(ListId, IpNet, u64, u64)>,
    /// rule position → (packets, bytes)
    pub rules: Vec<(u64, u64)>,
}

pub fn snapshot(maps: &PolicyMaps) -> Snapshot {
    let mut entries = Vec::new();
    for list in ListId::ALL {
        for e in maps.list_entries(list).expect("list entries") {
            entries.push((list, e.prefix, e.packets, e.bytes));
        }
    }
    Snapshot {
        slots: maps.counters().expect("counters"),
        entries,
        rules: maps
            .rules()
            .expect("rules")
            .iter()
            .map(|r| (r.packets, r.bytes))
            .collect(),
    }
}

/// What a set of frames should add to the counters.
#[derive(Debug, Default, Clone)]
pub struct Expected {
    pub slots: std::collections::BTreeMap<u32, (u64, u64)>,
    pub entries: std::collections::BTreeMap<(bool, IpNet), (u64, u64)>,
    pub rules: std::collections::BTreeMap<usize, (u64, u64)>,
}

impl Expected {
    pub fn add(&mut self, o: &model::Outcome, len: usize) {
        let len = len as u64;
        let slot = counter_index(o.family, o.l4, o.verdict, o.reason);
        let e = self.slots.entry(slot).or_default();
        e.0 += 1;
        e.1 += len;
        if let Some(net) = o.list_hit {
            let e = self
                .entries
                .entry((o.reason == Reason::AllowList, net.trunc()))
                .or_default();
            e.0 += 1;
            e.1 += len;
        }
        if let Some(i) = o.rule_hit {
            let e = self.rules.entry(i).or_default();
            e.0 += 1;
            e.1 += len;
        }
    }

    /// Checks `after - before` equals what was expected, naming every mismatch.
    pub fn check(&self, before: &Snapshot, after: &Snapshot) -> Result<(), String> {
        let mut problems = Vec::new();
        for (i, (b, a)) in before.slots.iter().zip(&after.slots).enumerate() {
            let got = (a.packets - b.packets, a.bytes - b.bytes);
            let want = self.slots.get(&(i as u32)).copied().unwrap_or_default();
            if got != want {
                problems.push(format!(
                    "counter slot {} {}: got {got:?}, want {want:?}",
                    i,
                    slot_name(i as u32)
                ));
            }
        }
        for (list, net, p, b) in &after.entries {
            let (bp, bb) = before
                .entries
                .iter()
                .find(|(l, n, _, _)| l == list && n == net)
                .map_or((0, 0), |e| (e.2, e.3));
            let allow = matches!(list, ListId::AllowV4 | ListId::AllowV6);
            let want = self
                .entries
                .get(&(allow, *net))
                .copied()
                .unwrap_or_default();
            if (p - bp, b - bb) != want {
                problems.push(format!(
                    "{list:?} {net}: got {:?}, want {want:?}",
                    (p - bp, b - bb)
                ));
            }
        }
        for (i, (a, b)) in after.rules.iter().zip(&before.rules).enumerate() {
            let got = (a.0 - b.0, a.1 - b.1);
            let want = self.rules.get(&i).copied().unwrap_or_default();
            if got != want {
                problems.push(format!("rule {i}: got {got:?}, want {want:?}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

/// "ipv4/tcp/drop/rule" for a counter slot.
pub fn slot_name(slot: u32) -> String {
    for f in Family::ALL {
        for l in L4::ALL {
            for v in Verdict::ALL {
                for r in Reason::ALL {
                    if counter_index(f, l, v, r) == slot {
                        return format!("{}/{}/{}/{}", f.name(), l.name(), v.name(), r.name());
                    }
                }
            }
        }
    }
    format!("unused slot {slot}")
}

pub fn hex(frame: &[u8]) -> String {
    frame
        .chunks(16)
        .enumerate()
        .map(|(i, c)| {
            let bytes: Vec<String> = c.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}  {}", i * 16, bytes.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}
