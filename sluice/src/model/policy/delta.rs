//! What one change does to the desired state, element by element: enough to
//! write it to the kernel, to report it, to keep it in history, and to undo
//! it. Computed while the change is applied, so its cost follows the size of
//! the change, not of the policy.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{Action, Desired, Interface, Policy, PolicyDiff, RuleSpec, TempDeny};
use crate::model::{lb::LbService, sock::Workload, steer::Steer};

/// The difference between two desired states.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_add: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_del: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_add: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_del: Vec<IpNet>,
    /// Rules before and after (order matters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<(Vec<RuleSpec>, Vec<RuleSpec>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<(Action, Action)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malformed: Option<(Action, Action)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<(bool, bool)>,
    /// Temporary deny entries: (prefix, before, after).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub temp: Vec<(IpNet, Option<TempDeny>, Option<TempDeny>)>,
    /// Services before and after (whole: there are at most a few thousand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<(Vec<LbService>, Vec<LbService>)>,
    /// Workloads before and after (whole: at most `MAX_WORKLOADS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<(Vec<Workload>, Vec<Workload>)>,
    /// Steers before and after (whole: at most `MAX_STEER_DESTS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steers: Option<(Vec<Steer>, Vec<Steer>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interfaces: Option<(Vec<Interface>, Vec<Interface>)>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Nothing packets are judged by changes (lists, rules, settings).
    pub fn policy_is_empty(&self) -> bool {
        self.deny_add.is_empty()
            && self.deny_del.is_empty()
            && self.allow_add.is_empty()
            && self.allow_del.is_empty()
            && self.rules.is_none()
            && self.default.is_none()
            && self.malformed.is_none()
            && self.audit.is_none()
    }

    /// The full difference between two states (cost: the size of both).
    pub fn between(from: &Desired, to: &Desired) -> Self {
        let mut d = Self::between_policies(&from.policy, &to.policy);
        for (n, t) in &from.temp_deny {
            if to.temp_deny.get(n) != Some(t) {
                d.temp
                    .push((*n, Some(t.clone()), to.temp_deny.get(n).cloned()));
            }
        }
        for (n, t) in &to.temp_deny {
            if !from.temp_deny.contains_key(n) {
                d.temp.push((*n, None, Some(t.clone())));
            }
        }
        d.temp.sort_by_key(|e| e.0);
        if from.services != to.services {
            d.services = Some((from.services.clone(), to.services.clone()));
        }
        if from.workloads != to.workloads {
            d.workloads = Some((from.workloads.clone(), to.workloads.clone()));
        }
        if from.steers != to.steers {
            d.steers = Some((from.steers.clone(), to.steers.clone()));
        }
        if from.interfaces != to.interfaces {
            d.interfaces = Some((from.interfaces.clone(), to.interfaces.clone()));
        }
        d
    }

    /// The difference of the policies alone.
    pub fn between_policies(from: &Policy, to: &Policy) -> Self {
        Self {
            deny_add: to.deny.difference(&from.deny).copied().collect(),
            deny_del: from.deny.difference(&to.deny).copied().collect(),
            allow_add: to.allow.difference(&from.allow).copied().collect(),
            allow_del: from.allow.difference(&to.allow).copied().collect(),
            rules: (from.rules != to.rules).then(|| (from.rules.clone(), to.rules.clone())),
            default: (from.default != to.default).then_some((from.default, to.default)),
            malformed: (from.malformed != to.malformed).then_some((from.malformed, to.malformed)),
            audit: (from.audit != to.audit).then_some((from.audit, to.audit)),
            ..Self::default()
        }
    }

    /// The change that undoes this one.
    #[must_use]
    pub fn inverse(&self) -> Self {
        let swap = |p: &Option<(Action, Action)>| p.map(|(a, b)| (b, a));
        Self {
            deny_add: self.deny_del.clone(),
            deny_del: self.deny_add.clone(),
            allow_add: self.allow_del.clone(),
            allow_del: self.allow_add.clone(),
            rules: self.rules.as_ref().map(|(a, b)| (b.clone(), a.clone())),
            default: swap(&self.default),
            malformed: swap(&self.malformed),
            audit: self.audit.map(|(a, b)| (b, a)),
            temp: self
                .temp
                .iter()
                .map(|(n, a, b)| (*n, b.clone(), a.clone()))
                .collect(),
            services: self.services.as_ref().map(|(a, b)| (b.clone(), a.clone())),
            workloads: self.workloads.as_ref().map(|(a, b)| (b.clone(), a.clone())),
            steers: self.steers.as_ref().map(|(a, b)| (b.clone(), a.clone())),
            interfaces: self
                .interfaces
                .as_ref()
                .map(|(a, b)| (b.clone(), a.clone())),
        }
    }

    /// Applies the policy part to `p` (which must be the state it was taken from).
    pub fn apply_to_policy(&self, p: &mut Policy) {
        for n in &self.deny_del {
            p.deny.remove(n);
        }
        p.deny.extend(self.deny_add.iter().copied());
        for n in &self.allow_del {
            p.allow.remove(n);
        }
        p.allow.extend(self.allow_add.iter().copied());
        if let Some((_, r)) = &self.rules {
            p.rules.clone_from(r);
        }
        if let Some((_, a)) = self.default {
            p.default = a;
        }
        if let Some((_, a)) = self.malformed {
            p.malformed = a;
        }
        if let Some((_, a)) = self.audit {
            p.audit = a;
        }
    }

    /// Applies the whole change to `d`.
    pub fn apply_to(&self, d: &mut Desired) {
        self.apply_to_policy(&mut d.policy);
        for (n, _, after) in &self.temp {
            match after {
                Some(t) => {
                    d.temp_deny.insert(*n, t.clone());
                }
                None => {
                    d.temp_deny.remove(n);
                }
            }
        }
        if let Some((_, s)) = &self.services {
            d.services.clone_from(s);
        }
        if let Some((_, w)) = &self.workloads {
            d.workloads.clone_from(w);
        }
        if let Some((_, w)) = &self.steers {
            d.steers.clone_from(w);
        }
        if let Some((_, i)) = &self.interfaces {
            d.interfaces.clone_from(i);
        }
    }

    /// The policy part, as the API and the CLI report it.
    pub fn policy_diff(&self) -> PolicyDiff {
        let text = |r: &[RuleSpec]| r.iter().map(ToString::to_string).collect::<Vec<_>>();
        PolicyDiff {
            deny_add: self.deny_add.clone(),
            deny_del: self.deny_del.clone(),
            allow_add: self.allow_add.clone(),
            allow_del: self.allow_del.clone(),
            rules: self.rules.as_ref().map(|(a, b)| (text(a), text(b))),
            default: self.default,
            malformed: self.malformed,
            audit: self.audit,
        }
    }

    /// List entries, rules and settings that change in the maps.
    pub fn size(&self) -> usize {
        self.policy_diff().size()
    }

    /// How [`fingerprint`] moves with this change, given the policy after it.
    #[must_use]
    pub fn fingerprint_after(&self, before: u64, after: &Policy) -> u64 {
        let mut f = before;
        for (kind, adds, dels) in [
            (b'd', &self.deny_add, &self.deny_del),
            (b'a', &self.allow_add, &self.allow_del),
        ] {
            for n in adds {
                f = f.wrapping_add(entry_hash(kind, n));
            }
            for n in dels {
                f = f.wrapping_sub(entry_hash(kind, n));
            }
        }
        let old = settings_hash(
            self.default.map_or(after.default, |x| x.0),
            self.malformed.map_or(after.malformed, |x| x.0),
            self.audit.map_or(after.audit, |x| x.0),
            self.rules.as_ref().map_or(&after.rules, |x| &x.0),
        );
        let new = settings_hash(after.default, after.malformed, after.audit, &after.rules);
        f.wrapping_sub(old).wrapping_add(new)
    }
}

/// FNV-1a, 64 bit: stable across builds (it is stored in history).
fn fnv(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn entry_hash(kind: u8, n: &IpNet) -> u64 {
    let addr: Vec<u8> = match n {
        IpNet::V4(v) => v.network().octets().to_vec(),
        IpNet::V6(v) => v.network().octets().to_vec(),
    };
    // One more round so that nearby prefixes spread over all 64 bits (the
    // sum of many of them must not cancel out easily).
    let h = fnv([kind, n.prefix_len()].into_iter().chain(addr), FNV_START);
    h ^ (h >> 29).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

fn settings_hash(default: Action, malformed: Action, audit: bool, rules: &[RuleSpec]) -> u64 {
    let text = format!(
        "{default}|{malformed}|{audit}|{}",
        rules
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(";")
    );
    fnv(text.into_bytes(), FNV_START)
}

/// A short checksum of a policy's content, kept with every version so a
/// policy rebuilt from history can be checked before it is applied. It is a
/// sum over entries, so a change updates it in time proportional to the
/// change ([`Delta::fingerprint_after`]).
pub fn fingerprint(p: &Policy) -> u64 {
    let mut f = settings_hash(p.default, p.malformed, p.audit, &p.rules);
    for n in &p.deny {
        f = f.wrapping_add(entry_hash(b'd', n));
    }
    for n in &p.allow {
        f = f.wrapping_add(entry_hash(b'a', n));
    }
    f
}

/// Records, while ops are applied, what each element was before it was
/// first touched: the net change afterwards, and the undo on failure.
#[derive(Debug, Default)]
pub struct Tracker {
    deny: BTreeMap<IpNet, bool>,
    allow: BTreeMap<IpNet, bool>,
    temp: BTreeMap<IpNet, Option<TempDeny>>,
    rules: Option<Vec<RuleSpec>>,
    default: Option<Action>,
    malformed: Option<Action>,
    audit: Option<bool>,
    services: Option<Vec<LbService>>,
    workloads: Option<Vec<Workload>>,
    steers: Option<Vec<Steer>>,
    interfaces: Option<Vec<Interface>>,
}

/// A desired state being changed, optionally tracked.
pub struct Edit<'a> {
    pub d: &'a mut Desired,
    pub t: Option<&'a mut Tracker>,
}

impl Edit<'_> {
    fn list_set(&mut self, allow: bool, n: IpNet, present: bool) {
        let list = if allow {
            &mut self.d.policy.allow
        } else {
            &mut self.d.policy.deny
        };
        let was = list.contains(&n);
        if was == present {
            return;
        }
        if let Some(t) = self.t.as_deref_mut() {
            let seen = if allow { &mut t.allow } else { &mut t.deny };
            seen.entry(n).or_insert(was);
        }
        if present {
            list.insert(n);
        } else {
            list.remove(&n);
        }
    }

    pub fn insert(&mut self, allow: bool, n: IpNet) {
        self.list_set(allow, n, true);
    }

    pub fn remove(&mut self, allow: bool, n: IpNet) {
        self.list_set(allow, n, false);
    }

    pub fn set_temp(&mut self, n: IpNet, t: Option<TempDeny>) {
        let before = self.d.temp_deny.get(&n).cloned();
        if before == t {
            return;
        }
        if let Some(tr) = self.t.as_deref_mut() {
            tr.temp.entry(n).or_insert(before);
        }
        match t {
            Some(t) => {
                self.d.temp_deny.insert(n, t);
            }
            None => {
                self.d.temp_deny.remove(&n);
            }
        }
    }

    pub fn rules(&mut self) -> &mut Vec<RuleSpec> {
        if let Some(t) = self.t.as_deref_mut() {
            t.rules.get_or_insert_with(|| self.d.policy.rules.clone());
        }
        &mut self.d.policy.rules
    }

    pub fn set_default(&mut self, a: Action) {
        if let Some(t) = self.t.as_deref_mut() {
            t.default.get_or_insert(self.d.policy.default);
        }
        self.d.policy.default = a;
    }

    pub fn set_malformed(&mut self, a: Action) {
        if let Some(t) = self.t.as_deref_mut() {
            t.malformed.get_or_insert(self.d.policy.malformed);
        }
        self.d.policy.malformed = a;
    }

    pub fn set_audit(&mut self, on: bool) {
        if let Some(t) = self.t.as_deref_mut() {
            t.audit.get_or_insert(self.d.policy.audit);
        }
        self.d.policy.audit = on;
    }

    pub fn services(&mut self) -> &mut Vec<LbService> {
        if let Some(t) = self.t.as_deref_mut() {
            t.services.get_or_insert_with(|| self.d.services.clone());
        }
        &mut self.d.services
    }

    pub fn workloads(&mut self) -> &mut Vec<Workload> {
        if let Some(t) = self.t.as_deref_mut() {
            t.workloads.get_or_insert_with(|| self.d.workloads.clone());
        }
        &mut self.d.workloads
    }

    pub fn steers(&mut self) -> &mut Vec<Steer> {
        if let Some(t) = self.t.as_deref_mut() {
            t.steers.get_or_insert_with(|| self.d.steers.clone());
        }
        &mut self.d.steers
    }

    pub fn interfaces(&mut self) -> &mut Vec<Interface> {
        if let Some(t) = self.t.as_deref_mut() {
            t.interfaces
                .get_or_insert_with(|| self.d.interfaces.clone());
        }
        &mut self.d.interfaces
    }
}

impl Tracker {
    /// The net change from what was recorded to `d` now.
    pub fn delta(&self, d: &Desired) -> Delta {
        let mut out = Delta::default();
        for (allow, seen) in [(false, &self.deny), (true, &self.allow)] {
            let list = if allow {
                &d.policy.allow
            } else {
                &d.policy.deny
            };
            for (n, was) in seen {
                match (*was, list.contains(n)) {
                    (false, true) => {
                        if allow {
                            out.allow_add.push(*n);
                        } else {
                            out.deny_add.push(*n);
                        }
                    }
                    (true, false) => {
                        if allow {
                            out.allow_del.push(*n);
                        } else {
                            out.deny_del.push(*n);
                        }
                    }
                    _ => {}
                }
            }
        }
        for (n, before) in &self.temp {
            let after = d.temp_deny.get(n).cloned();
            if *before != after {
                out.temp.push((*n, before.clone(), after));
            }
        }
        if let Some(r) = &self.rules
            && *r != d.policy.rules
        {
            out.rules = Some((r.clone(), d.policy.rules.clone()));
        }
        out.default = self
            .default
            .filter(|a| *a != d.policy.default)
            .map(|a| (a, d.policy.default));
        out.malformed = self
            .malformed
            .filter(|a| *a != d.policy.malformed)
            .map(|a| (a, d.policy.malformed));
        out.audit = self
            .audit
            .filter(|a| *a != d.policy.audit)
            .map(|a| (a, d.policy.audit));
        if let Some(s) = &self.services
            && *s != d.services
        {
            out.services = Some((s.clone(), d.services.clone()));
        }
        if let Some(w) = &self.workloads
            && *w != d.workloads
        {
            out.workloads = Some((w.clone(), d.workloads.clone()));
        }
        if let Some(w) = &self.steers
            && *w != d.steers
        {
            out.steers = Some((w.clone(), d.steers.clone()));
        }
        if let Some(i) = &self.interfaces
            && *i != d.interfaces
        {
            out.interfaces = Some((i.clone(), d.interfaces.clone()));
        }
        out
    }
}

/// Applies `ops` to `d` in place, all or none: on the first op that does not
/// fit (`strict`), everything is put back and the error returned. Returns
/// the net change.
pub fn apply_ops(d: &mut Desired, ops: &[super::Op], strict: bool) -> Result<Delta, String> {
    let mut t = Tracker::default();
    for op in ops {
        let r = op.apply_in(&mut Edit { d, t: Some(&mut t) }, strict);
        if let Err(e) = r {
            let undo = t.delta(d).inverse();
            undo.apply_to(d);
            return Err(e);
        }
    }
    Ok(t.delta(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::Op;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn tracked_ops_give_the_net_change_and_undo_on_failure() {
        let mut d = Desired::default();
        d.policy.deny.insert(net("198.18.1.0/24"));
        let before = d.clone();
        let ops = vec![
            Op::ListAdd {
                allow: false,
                prefixes: vec![net("198.18.2.0/24"), net("198.18.3.0/24")],
            },
            Op::ListDel {
                allow: false,
                prefixes: vec![net("198.18.2.0/24"), net("198.18.1.0/24")],
            },
            Op::Default {
                action: Action::Drop,
            },
        ];
        let delta = apply_ops(&mut d, &ops, true).unwrap();
        assert_eq!(delta.deny_add, vec![net("198.18.3.0/24")]);
        assert_eq!(delta.deny_del, vec![net("198.18.1.0/24")]);
        assert_eq!(delta.default, Some((Action::Pass, Action::Drop)));
        assert_eq!(Delta::between(&before, &d), delta);
        let mut back = d.clone();
        delta.inverse().apply_to(&mut back);
        assert_eq!(back, before);
        // A failing op leaves nothing behind.
        let mut e = before.clone();
        let bad = vec![
            Op::ListAdd {
                allow: true,
                prefixes: vec![net("198.18.9.0/24")],
            },
            Op::ListDel {
                allow: false,
                prefixes: vec![net("198.18.77.0/24")],
            },
        ];
        assert!(apply_ops(&mut e, &bad, true).is_err());
        assert_eq!(e, before);
    }

    #[test]
    fn fingerprint_follows_changes() {
        let mut p = Policy::default();
        p.deny.insert(net("198.18.0.0/16"));
        let f0 = fingerprint(&p);
        let mut d = Desired {
            policy: p.clone(),
            ..Desired::default()
        };
        let delta = apply_ops(
            &mut d,
            &[
                Op::ListAdd {
                    allow: true,
                    prefixes: vec![net("2001:2::/48")],
                },
                Op::Audit { on: true },
            ],
            true,
        )
        .unwrap();
        let f1 = delta.fingerprint_after(f0, &d.policy);
        assert_eq!(f1, fingerprint(&d.policy));
        assert_ne!(f0, f1);
        // The same entry in the other list is another policy.
        let mut q = Policy::default();
        q.allow.insert(net("198.18.0.0/16"));
        assert_ne!(fingerprint(&q), f0);
    }
}
