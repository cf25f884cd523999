//! Desired state: what sluice should be doing, independent of the kernel.
//! Compared with what is pinned to produce the one change that gets there.

use std::{collections::BTreeSet, fmt};

use ipnet::IpNet;
use sluice_common::{ListId, Rule, Verdict};

use super::RuleSpec;
use crate::dataplane::{
    AttachMode, Change, DataplaneError, PolicyMaps,
    policy::{UNASSIGNED, list_for},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pass,
    Drop,
}

impl From<Verdict> for Action {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Pass => Self::Pass,
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
            deny: BTreeSet::new(),
            allow: BTreeSet::new(),
            rules: Vec::new(),
        }
    }
}

/// An interface the agent keeps sluice attached to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
}

/// How one policy differs from another.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyDiff {
    pub deny_add: Vec<IpNet>,
    pub deny_del: Vec<IpNet>,
    pub allow_add: Vec<IpNet>,
    pub allow_del: Vec<IpNet>,
    /// Rules before and after, when they differ (order matters).
    pub rules: Option<(Vec<String>, Vec<String>)>,
    pub default: Option<(Action, Action)>,
    pub malformed: Option<(Action, Action)>,
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

/// What the pinned maps hold now, as a policy.
pub fn pinned_policy(maps: &PolicyMaps) -> Result<Policy, DataplaneError> {
    let s = maps.active_settings()?;
    let mut deny = BTreeSet::new();
    let mut allow = BTreeSet::new();
    for list in ListId::ALL {
        let into = if list.kind() == "allow" {
            &mut allow
        } else {
            &mut deny
        };
        into.extend(maps.list_entries(list)?.into_iter().map(|e| e.prefix));
    }
    Ok(Policy {
        default: Verdict::from_u32(s.default_action)
            .unwrap_or(Verdict::Pass)
            .into(),
        malformed: Verdict::from_u32(s.malformed_action)
            .unwrap_or(Verdict::Drop)
            .into(),
        deny,
        allow,
        rules: maps
            .rules()?
            .iter()
            .map(|r| RuleSpec::from_rule(&r.rule))
            .collect(),
    })
}

/// The one change that turns `current` (what is pinned) into `target`.
/// Rules that stay keep their id and counters.
pub fn change_to(
    maps: &PolicyMaps,
    current: &Policy,
    target: &Policy,
) -> Result<Change, DataplaneError> {
    let diff = PolicyDiff::between(current, target);
    let mut change = Change::default();
    for (allow, add, del) in [
        (false, &diff.deny_add, &diff.deny_del),
        (true, &diff.allow_add, &diff.allow_del),
    ] {
        change
            .add
            .extend(add.iter().map(|n| (list_for(allow, n), *n)));
        change
            .del
            .extend(del.iter().map(|n| (list_for(allow, n), *n)));
    }
    if diff.rules.is_some() {
        let mut existing: Vec<Option<Rule>> =
            maps.rules()?.into_iter().map(|r| Some(r.rule)).collect();
        let rules = target
            .rules
            .iter()
            .map(|spec| {
                let reuse = existing
                    .iter_mut()
                    .find(|r| r.as_ref().is_some_and(|r| RuleSpec::from_rule(r) == *spec))
                    .and_then(Option::take);
                reuse.unwrap_or_else(|| {
                    let mut r = spec.to_rule();
                    r.stats_slot = UNASSIGNED;
                    r
                })
            })
            .collect();
        change.rules = Some(rules);
    }
    change.default_action = diff.default.map(|(_, b)| b.into());
    change.malformed_action = diff.malformed.map(|(_, b)| b.into());
    Ok(change)
}
