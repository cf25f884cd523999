//! Desired state: what sluice should be doing, independent of the kernel.
//! Compared with what is pinned to produce the one change that gets there.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use ipnet::IpNet;
use sluice_common::Verdict;

use super::RuleSpec;
use sluice_common::settings::AttachMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pass,
    Drop,
}

impl From<Verdict> for Action {
    fn from(v: Verdict) -> Self {
        match v {
            // Audit is a counted outcome, never a configured action.
            Verdict::Pass | Verdict::Audit => Self::Pass,
            Verdict::Drop => Self::Drop,
        }
    }
}

impl From<Action> for Verdict {
    fn from(a: Action) -> Self {
        match a {
            Action::Pass => Self::Pass,
            Action::Drop => Self::Drop,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Verdict::from(*self).name())
    }
}

/// The policy packets are judged by.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    pub default: Action,
    pub malformed: Action,
    /// Audit mode: what would be dropped (lists, rules, default) is passed
    /// and counted as `audit`. Malformed frames are not affected.
    #[serde(default)]
    pub audit: bool,
    pub deny: BTreeSet<IpNet>,
    pub allow: BTreeSet<IpNet>,
    pub rules: Vec<RuleSpec>,
}

impl Default for Policy {
    /// What a fresh dataplane does: pass what nothing matched, drop what
    /// cannot be parsed, no lists, no rules.
    fn default() -> Self {
        Self {
            default: Action::Pass,
            malformed: Action::Drop,
            audit: false,
            deny: BTreeSet::new(),
            allow: BTreeSet::new(),
            rules: Vec::new(),
        }
    }
}

/// An interface the agent keeps sluice attached to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub mode: AttachMode,
}

/// Everything the agent owns.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Desired {
    pub interfaces: Vec<Interface>,
    pub policy: Policy,
    /// Deny entries that expire (escalated sources, `deny add --ttl`): each
    /// is also in `policy.deny` until the agent expires it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub temp_deny: BTreeMap<IpNet, TempDeny>,
    /// Load-balanced services (`[[service]]`, `sluice lb ...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<crate::model::lb::LbService>,
    /// Socket-layer workloads (`[[workload]]`, `sluice workload ...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<crate::model::sock::Workload>,
    /// sk_lookup steers (`[[steer]]`, `sluice steer ...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steers: Vec<crate::model::steer::Steer>,
}

/// Why a temporary deny entry exists and when it goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TempDeny {
    pub reason: String,
    /// Unix seconds.
    pub expires_unix: u64,
}

/// How one policy differs from another.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyDiff {
    pub deny_add: Vec<IpNet>,
    pub deny_del: Vec<IpNet>,
    pub allow_add: Vec<IpNet>,
    pub allow_del: Vec<IpNet>,
    /// Rules before and after, when they differ (order matters).
    pub rules: Option<(Vec<String>, Vec<String>)>,
    pub default: Option<(Action, Action)>,
    pub malformed: Option<(Action, Action)>,
    #[serde(default)]
    pub audit: Option<(bool, bool)>,
}

impl PolicyDiff {
    pub fn between(from: &Policy, to: &Policy) -> Self {
        let rules_text = |p: &Policy| p.rules.iter().map(ToString::to_string).collect::<Vec<_>>();
        Self {
            deny_add: to.deny.difference(&from.deny).copied().collect(),
            deny_del: from.deny.difference(&to.deny).copied().collect(),
            allow_add: to.allow.difference(&from.allow).copied().collect(),
            allow_del: from.allow.difference(&to.allow).copied().collect(),
            rules: (from.rules != to.rules).then(|| (rules_text(from), rules_text(to))),
            default: (from.default != to.default).then_some((from.default, to.default)),
            malformed: (from.malformed != to.malformed).then_some((from.malformed, to.malformed)),
            audit: (from.audit != to.audit).then_some((from.audit, to.audit)),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Number of list entries, rules and settings that change.
    pub fn size(&self) -> usize {
        self.deny_add.len()
            + self.deny_del.len()
            + self.allow_add.len()
            + self.allow_del.len()
            + self.rules.as_ref().map_or(0, |(a, b)| a.len().max(b.len()))
            + usize::from(self.default.is_some())
            + usize::from(self.malformed.is_some())
            + usize::from(self.audit.is_some())
    }
}

impl fmt::Display for PolicyDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        if let Some((a, b)) = self.default {
            writeln!(f, "~ default {a} -> {b}")?;
        }
        if let Some((a, b)) = self.malformed {
            writeln!(f, "~ malformed {a} -> {b}")?;
        }
        if let Some((a, b)) = self.audit {
            let on = |x: bool| if x { "on" } else { "off" };
            writeln!(f, "~ audit {} -> {}", on(a), on(b))?;
        }
        for (sign, list, nets) in [
            ('+', "deny", &self.deny_add),
            ('-', "deny", &self.deny_del),
            ('+', "allow", &self.allow_add),
            ('-', "allow", &self.allow_del),
        ] {
            for n in nets {
                writeln!(f, "{sign} {list} {n}")?;
            }
        }
        if let Some((before, after)) = &self.rules {
            writeln!(f, "~ rules (in order):")?;
            for r in before {
                writeln!(f, "  - {r}")?;
            }
            for r in after {
                writeln!(f, "  + {r}")?;
            }
        }
        Ok(())
    }
}

/// A runtime change made through the API, kept as an overlay on the last
/// applied file so it survives reloads of that file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    ListAdd {
        allow: bool,
        prefixes: Vec<IpNet>,
    },
    ListDel {
        allow: bool,
        prefixes: Vec<IpNet>,
    },
    RuleAdd {
        at: Option<usize>,
        rule: RuleSpec,
    },
    RuleDel {
        rule: RuleSpec,
    },
    Default {
        action: Action,
    },
    Malformed {
        action: Action,
    },
    Audit {
        on: bool,
    },
    Attach {
        interface: Interface,
    },
    Detach {
        name: String,
        netns: Option<String>,
    },
    /// Deny until `expires_unix` (seconds), with a reason. A prefix already
    /// denied for good is left as it is; a temporary one gets the new expiry.
    DenyFor {
        prefixes: Vec<IpNet>,
        reason: String,
        expires_unix: u64,
    },
    /// Temporary deny entries whose time is up.
    Expire {
        prefixes: Vec<IpNet>,
    },
    /// A change to the load balancer's services.
    Lb {
        change: crate::model::lb::LbOp,
    },
    /// A change to the socket layer's workloads.
    Workload {
        change: crate::model::sock::WorkloadOp,
    },
    /// A change to the sk_lookup steers.
    Steer {
        change: crate::model::steer::SteerOp,
    },
}

/// Refuses a prefix with bits set beyond its length (`198.18.1.0/8`): what
/// was meant is ambiguous, so sluice does not guess.
pub fn exact_prefix(n: &IpNet) -> Result<(), String> {
    if *n == n.trunc() {
        Ok(())
    } else {
        Err(format!(
            "{n} has bits set beyond its /{} prefix (the network is {}); write the network \
             address, or a /{} for one host",
            n.prefix_len(),
            n.trunc(),
            n.max_prefix_len()
        ))
    }
}

impl Op {
    /// The ops that take `dels` out of a list and put `adds` in (none for
    /// an empty side), deletes first.
    #[must_use]
    pub fn list_edit(allow: bool, dels: Vec<IpNet>, adds: Vec<IpNet>) -> Vec<Self> {
        let mut ops = Vec::new();
        if !dels.is_empty() {
            ops.push(Self::ListDel {
                allow,
                prefixes: dels,
            });
        }
        if !adds.is_empty() {
            ops.push(Self::ListAdd {
                allow,
                prefixes: adds,
            });
        }
        ops
    }

    /// Applies the op. `strict` (a new request) refuses ops that do not fit
    /// (deleting what is absent, a prefix with host bits); replaying onto a
    /// new file skips them.
    pub fn apply(&self, d: &mut Desired, strict: bool) -> Result<(), String> {
        self.apply_in(&mut super::delta::Edit { d, t: None }, strict)
    }

    /// [`Op::apply`] through an [`Edit`](super::delta::Edit), which may
    /// record what changed.
    pub(crate) fn apply_in(
        &self,
        e: &mut super::delta::Edit<'_>,
        strict: bool,
    ) -> Result<(), String> {
        if strict {
            match self {
                Self::ListAdd { prefixes, .. }
                | Self::ListDel { prefixes, .. }
                | Self::DenyFor { prefixes, .. }
                | Self::Expire { prefixes } => {
                    for n in prefixes {
                        exact_prefix(n)?;
                    }
                }
                _ => {}
            }
        }
        match self {
            Self::ListAdd { allow, prefixes } => {
                for n in prefixes.iter().map(IpNet::trunc) {
                    e.insert(*allow, n);
                    if !*allow {
                        // Denied for good now: no longer expires.
                        e.set_temp(n, None);
                    }
                }
            }
            Self::ListDel { allow, prefixes } => {
                let (list, name) = if *allow {
                    (&e.d.policy.allow, "allow")
                } else {
                    (&e.d.policy.deny, "deny")
                };
                if strict
                    && let Some(missing) = prefixes.iter().find(|n| !list.contains(&n.trunc()))
                {
                    return Err(format!("{missing} is not in the {name} list"));
                }
                for n in prefixes.iter().map(IpNet::trunc) {
                    e.remove(*allow, n);
                    if !*allow {
                        e.set_temp(n, None);
                    }
                }
            }
            Self::DenyFor {
                prefixes,
                reason,
                expires_unix,
            } => {
                for n in prefixes.iter().map(IpNet::trunc) {
                    if e.d.policy.deny.contains(&n) && !e.d.temp_deny.contains_key(&n) {
                        continue;
                    }
                    e.insert(false, n);
                    e.set_temp(
                        n,
                        Some(TempDeny {
                            reason: reason.clone(),
                            expires_unix: *expires_unix,
                        }),
                    );
                }
            }
            Self::Expire { prefixes } => {
                for n in prefixes.iter().map(IpNet::trunc) {
                    if e.d.temp_deny.contains_key(&n) {
                        e.set_temp(n, None);
                        e.remove(false, n);
                    }
                }
            }
            Self::RuleAdd { at, rule } => {
                let rules = e.rules();
                let pos = at.unwrap_or(rules.len());
                if pos > rules.len() {
                    if strict {
                        return Err(format!(
                            "rule position {pos} is out of range (there are {} rules)",
                            rules.len()
                        ));
                    }
                    rules.push(rule.clone());
                } else {
                    rules.insert(pos, rule.clone());
                }
            }
            Self::RuleDel { rule } => match e.d.policy.rules.iter().position(|r| r == rule) {
                Some(i) => {
                    e.rules().remove(i);
                }
                None if strict => return Err(format!("no rule '{rule}'")),
                None => {}
            },
            Self::Default { action } => e.set_default(*action),
            Self::Malformed { action } => e.set_malformed(*action),
            Self::Audit { on } => e.set_audit(*on),
            Self::Attach { interface } => {
                let ifs = e.interfaces();
                ifs.retain(|i| !(i.name == interface.name && i.netns == interface.netns));
                ifs.push(interface.clone());
            }
            Self::Lb { change } => {
                // Validated on a copy: a refused change leaves the services as they were.
                let mut services = e.d.services.clone();
                change.apply(&mut services, strict)?;
                if strict {
                    crate::model::lb::validate(&services)?;
                }
                if services != e.d.services {
                    *e.services() = services;
                }
            }
            Self::Workload { change } => {
                // Validated on a copy, like services.
                let mut workloads = e.d.workloads.clone();
                change.apply(&mut workloads, strict)?;
                if workloads != e.d.workloads {
                    *e.workloads() = workloads;
                }
            }
            Self::Steer { change } => {
                let mut steers = e.d.steers.clone();
                change.apply(&mut steers, strict)?;
                if steers != e.d.steers {
                    *e.steers() = steers;
                }
            }
            Self::Detach { name, netns } => {
                let found =
                    e.d.interfaces
                        .iter()
                        .any(|i| &i.name == name && &i.netns == netns);
                if strict && !found {
                    return Err(format!(
                        "{name} (netns {}) is not among the agent's interfaces",
                        netns.as_deref().unwrap_or("host")
                    ));
                }
                if found {
                    e.interfaces()
                        .retain(|i| !(&i.name == name && &i.netns == netns));
                }
            }
        }
        Ok(())
    }

    /// One line for history and logs.
    pub fn describe(&self) -> String {
        let nets = |v: &[IpNet]| {
            let shown: Vec<String> = v.iter().take(3).map(ToString::to_string).collect();
            if v.len() > 3 {
                format!("{} (+{} more)", shown.join(" "), v.len() - 3)
            } else {
                shown.join(" ")
            }
        };
        let list = |allow: &bool| if *allow { "allow" } else { "deny" };
        match self {
            Self::ListAdd { allow, prefixes } => format!("{} add {}", list(allow), nets(prefixes)),
            Self::ListDel { allow, prefixes } => format!("{} del {}", list(allow), nets(prefixes)),
            Self::RuleAdd { at: Some(at), rule } => format!("rule add --at {at} {rule}"),
            Self::RuleAdd { at: None, rule } => format!("rule add {rule}"),
            Self::RuleDel { rule } => format!("rule del {rule}"),
            Self::Default { action } => format!("default {action}"),
            Self::Malformed { action } => format!("malformed {action}"),
            Self::Audit { on } => format!("audit {}", if *on { "on" } else { "off" }),
            Self::Attach { interface } => format!(
                "attach {} (netns {}) --mode {}",
                interface.name,
                interface.netns.as_deref().unwrap_or("host"),
                interface.mode.name()
            ),
            Self::Detach { name, netns } => format!(
                "detach {name} (netns {})",
                netns.as_deref().unwrap_or("host")
            ),
            Self::DenyFor {
                prefixes, reason, ..
            } => format!("deny add {} (temporary: {reason})", nets(prefixes)),
            Self::Expire { prefixes } => format!("expired deny {}", nets(prefixes)),
            Self::Lb { change } => change.describe(),
            Self::Workload { change } => change.describe(),
            Self::Steer { change } => change.describe(),
        }
    }
}

/// The shortest overlay with the same effect on `base` as `overlay`: list
/// changes become one add and one delete per list, the last setting of each
/// kind wins, interfaces become the difference; rule changes are kept in
/// order (positions depend on each other). Keeps the store from growing
/// with every runtime change.
/// The runtime changes that stay on top of a new base (`apply`, a reload):
/// all of them, except rule adds whose rule the new base already has (each
/// base rule absorbs one), which would otherwise put the rule in twice
/// (applying an export of the desired state, or a file that took the rule
/// in). A rule the runtime changes also delete somewhere (moved, or added
/// and taken out again) keeps all its ops: absorbing its add but not its
/// delete would lose it.
#[must_use]
pub fn overlay_for_base(base: &Desired, overlay: &[Op]) -> Vec<Op> {
    let deleted: Vec<&RuleSpec> = overlay
        .iter()
        .filter_map(|op| match op {
            Op::RuleDel { rule } => Some(rule),
            _ => None,
        })
        .collect();
    let mut have: Vec<&RuleSpec> = base
        .policy
        .rules
        .iter()
        .filter(|r| !deleted.contains(r))
        .collect();
    overlay
        .iter()
        .filter(|op| match op {
            Op::RuleAdd { rule, .. } => match have.iter().position(|r| *r == rule) {
                Some(i) => {
                    have.remove(i);
                    false
                }
                None => true,
            },
            _ => true,
        })
        .cloned()
        .collect()
}

pub fn compact_overlay(base: &Desired, overlay: &[Op]) -> Vec<Op> {
    let mut fin = base.clone();
    for op in overlay {
        let _ = op.apply(&mut fin, false);
    }
    let mut out = Vec::new();
    let iface_key = |i: &Interface| (i.name.clone(), i.netns.clone());
    for b in &base.interfaces {
        if !fin.interfaces.iter().any(|f| iface_key(f) == iface_key(b)) {
            out.push(Op::Detach {
                name: b.name.clone(),
                netns: b.netns.clone(),
            });
        }
    }
    for f in &fin.interfaces {
        if !base.interfaces.contains(f) {
            out.push(Op::Attach {
                interface: f.clone(),
            });
        }
    }
    // Temporary entries keep their reason and expiry.
    let mut temp: BTreeMap<(String, u64), Vec<IpNet>> = BTreeMap::new();
    for (n, t) in &fin.temp_deny {
        if base.temp_deny.get(n) != Some(t) {
            temp.entry((t.reason.clone(), t.expires_unix))
                .or_default()
                .push(*n);
        }
    }
    for n in base.temp_deny.keys() {
        if !fin.temp_deny.contains_key(n) {
            out.push(Op::Expire { prefixes: vec![*n] });
        }
    }
    for ((reason, expires_unix), prefixes) in temp {
        out.push(Op::DenyFor {
            prefixes,
            reason,
            expires_unix,
        });
    }
    for (allow, b, f) in [
        (false, &base.policy.deny, &fin.policy.deny),
        (true, &base.policy.allow, &fin.policy.allow),
    ] {
        let adds: Vec<IpNet> = f
            .difference(b)
            .filter(|n| allow || !fin.temp_deny.contains_key(n))
            .copied()
            .collect();
        let dels: Vec<IpNet> = b.difference(f).copied().collect();
        out.extend(Op::list_edit(allow, dels, adds));
    }
    out.extend(
        overlay
            .iter()
            .filter(|o| matches!(o, Op::RuleAdd { .. } | Op::RuleDel { .. }))
            .cloned(),
    );
    if fin.policy.default != base.policy.default {
        out.push(Op::Default {
            action: fin.policy.default,
        });
    }
    if fin.policy.malformed != base.policy.malformed {
        out.push(Op::Malformed {
            action: fin.policy.malformed,
        });
    }
    if fin.policy.audit != base.policy.audit {
        out.push(Op::Audit {
            on: fin.policy.audit,
        });
    }
    // Services: gone ones deleted, new or changed ones given whole (a
    // replayed add replaces).
    for b in &base.services {
        if !fin.services.iter().any(|f| f.spec.id == b.spec.id) {
            out.push(Op::Lb {
                change: crate::model::lb::LbOp::ServiceDel { id: b.spec.id },
            });
        }
    }
    for f in &fin.services {
        if !base.services.contains(f) {
            out.push(Op::Lb {
                change: crate::model::lb::LbOp::ServiceAdd { service: f.clone() },
            });
        }
    }
    // Workloads likewise (a replayed add replaces).
    for b in &base.workloads {
        if !fin.workloads.iter().any(|f| f.name == b.name) {
            out.push(Op::Workload {
                change: crate::model::sock::WorkloadOp::Del {
                    name: b.name.clone(),
                },
            });
        }
    }
    for f in &fin.workloads {
        if !base.workloads.contains(f) {
            out.push(Op::Workload {
                change: crate::model::sock::WorkloadOp::Add {
                    workload: f.clone(),
                },
            });
        }
    }
    // Steers likewise.
    for b in &base.steers {
        if !fin.steers.iter().any(|f| f.name == b.name) {
            out.push(Op::Steer {
                change: crate::model::steer::SteerOp::Del {
                    name: b.name.clone(),
                },
            });
        }
    }
    for f in &fin.steers {
        if !base.steers.contains(f) {
            out.push(Op::Steer {
                change: crate::model::steer::SteerOp::Add { steer: f.clone() },
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_that_has_a_runtime_rule_absorbs_its_add() {
        let r = |t: &str| {
            RuleSpec::parse(&t.split(' ').map(str::to_owned).collect::<Vec<_>>()).unwrap()
        };
        let overlay = vec![
            Op::RuleAdd {
                at: Some(0),
                rule: r("pass icmpv6"),
            },
            Op::RuleAdd {
                at: None,
                rule: r("drop udp dport 9"),
            },
            Op::RuleAdd {
                at: None,
                rule: r("drop udp dport 9"),
            },
        ];
        let mut base = Desired::default();
        base.policy.rules = vec![
            r("pass icmpv6"),
            r("drop udp dport 9"),
            r("drop tcp dport 7"),
        ];
        // One base copy of each absorbs one add; the second dport 9 add stays.
        let kept = overlay_for_base(&base, &overlay);
        assert_eq!(kept, vec![overlay[2].clone()]);
        let mut d = base.clone();
        for op in &kept {
            op.apply(&mut d, false).unwrap();
        }
        assert_eq!(d.policy.rules.len(), 4);
        // A base without them keeps every add.
        assert_eq!(overlay_for_base(&Desired::default(), &overlay), overlay);
        // A rule moved at run time (deleted, added at the front), or added
        // and deleted again, keeps every op: it stays in, once.
        for ops in [
            vec![
                Op::RuleDel {
                    rule: r("drop tcp dport 7"),
                },
                Op::RuleAdd {
                    at: Some(0),
                    rule: r("drop tcp dport 7"),
                },
            ],
            vec![
                Op::RuleAdd {
                    at: None,
                    rule: r("drop tcp dport 7"),
                },
                Op::RuleDel {
                    rule: r("drop tcp dport 7"),
                },
            ],
        ] {
            let kept = overlay_for_base(&base, &ops);
            assert_eq!(kept, ops);
            let mut d = base.clone();
            for op in &kept {
                op.apply(&mut d, false).unwrap();
            }
            let n = d
                .policy
                .rules
                .iter()
                .filter(|x| **x == r("drop tcp dport 7"))
                .count();
            assert_eq!(n, 1, "{ops:?} -> {:?}", d.policy.rules);
        }
    }

    #[test]
    fn compacting_keeps_the_effect_and_drops_what_cancels() {
        let mut base = Desired::default();
        base.policy.deny.insert("198.18.1.0/24".parse().unwrap());
        let x: IpNet = "198.18.2.0/24".parse().unwrap();
        let overlay = vec![
            Op::ListAdd {
                allow: false,
                prefixes: vec![x],
            },
            Op::ListDel {
                allow: false,
                prefixes: vec![x],
            },
            Op::Default {
                action: Action::Drop,
            },
            Op::Default {
                action: Action::Pass,
            },
            Op::Audit { on: true },
            Op::ListDel {
                allow: false,
                prefixes: vec!["198.18.1.0/24".parse().unwrap()],
            },
        ];
        let compact = compact_overlay(&base, &overlay);
        let replay = |ops: &[Op]| {
            let mut d = base.clone();
            for op in ops {
                let _ = op.apply(&mut d, false);
            }
            d
        };
        assert_eq!(replay(&compact), replay(&overlay));
        assert_eq!(compact.len(), 2, "{compact:?}");
    }

    #[test]
    fn temporary_denies_keep_reason_and_expiry_through_compaction() {
        let mut base = Desired::default();
        let permanent: IpNet = "198.18.1.0/24".parse().unwrap();
        base.policy.deny.insert(permanent);
        let a: IpNet = "198.18.2.1/32".parse().unwrap();
        let b: IpNet = "2001:2::1/128".parse().unwrap();
        let overlay = vec![
            Op::DenyFor {
                prefixes: vec![a, b, permanent],
                reason: "rate limit".into(),
                expires_unix: 100,
            },
            Op::DenyFor {
                prefixes: vec![a],
                reason: "again".into(),
                expires_unix: 200,
            },
            Op::Expire { prefixes: vec![b] },
        ];
        let replay = |ops: &[Op]| {
            let mut d = base.clone();
            for op in ops {
                let _ = op.apply(&mut d, false);
            }
            d
        };
        let d = replay(&overlay);
        assert!(d.policy.deny.contains(&a) && !d.policy.deny.contains(&b));
        assert!(
            d.policy.deny.contains(&permanent),
            "a permanent entry stays"
        );
        assert!(!d.temp_deny.contains_key(&permanent));
        assert_eq!(d.temp_deny[&a].expires_unix, 200);
        assert_eq!(d.temp_deny[&a].reason, "again");
        let compact = compact_overlay(&base, &overlay);
        assert_eq!(replay(&compact), d, "{compact:?}");
        // A plain add makes a temporary entry permanent.
        let mut d3 = d.clone();
        Op::ListAdd {
            allow: false,
            prefixes: vec![a],
        }
        .apply(&mut d3, true)
        .unwrap();
        Op::Expire { prefixes: vec![a] }
            .apply(&mut d3, true)
            .unwrap();
        assert!(d3.policy.deny.contains(&a), "a permanent add expired");
        let mut ops = overlay.clone();
        ops.push(Op::ListAdd {
            allow: false,
            prefixes: vec![a],
        });
        let compact = compact_overlay(&base, &ops);
        let mut d4 = replay(&compact);
        assert!(!d4.temp_deny.contains_key(&a), "{compact:?}");
        Op::Expire { prefixes: vec![a] }
            .apply(&mut d4, true)
            .unwrap();
        assert!(d4.policy.deny.contains(&a));
        // Deleting a temporary entry by hand forgets its expiry too.
        let mut d2 = d.clone();
        Op::ListDel {
            allow: false,
            prefixes: vec![a],
        }
        .apply(&mut d2, true)
        .unwrap();
        assert!(d2.temp_deny.is_empty());
    }
}
