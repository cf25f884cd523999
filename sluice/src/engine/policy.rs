//! The policy's way into the kernel: what the pinned maps hold, read back as
//! a policy, and the one change that turns it into the desired one.

use std::collections::BTreeSet;

use sluice_common::{ListId, Rule, UNASSIGNED_SLOT, Verdict};

use crate::{
    dataplane::{
        Change, DataplaneError, PinRoot, PolicyMaps, RuleView,
        policy::{ChangeReport, list_for},
    },
    model::policy::{Delta, Desired, Op, Policy, RuleRow, RuleSpec},
};

/// Why a change to the pinned policy was not made.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The change does not fit the policy the maps hold (deleting what is
    /// absent, a rule position out of range): nothing was written.
    #[error("{0}")]
    Refused(String),
}

/// The one write of a policy change, for the agent and the direct CLI
/// alike: the kernel change for `delta` (whose result is `target`),
/// committed as one generation flip and read back from the maps the
/// program uses.
pub fn write(
    maps: &mut PolicyMaps,
    delta: &Delta,
    target: &Policy,
) -> Result<ChangeReport, DataplaneError> {
    let change = change_for(maps, delta, target)?;
    let report = maps.commit(change.clone())?;
    maps.verify_bound()?;
    maps.verify_applied(&change)?;
    Ok(report)
}

/// The policy the pins hold, open for a change made without the agent.
pub struct Pinned {
    maps: PolicyMaps,
    /// What the maps hold now.
    pub policy: Policy,
    /// The rules as the maps hold them (ids, positions, counters).
    pub rules: Vec<RuleView>,
}

/// What [`Pinned::apply`] did: the kernel's report and the policy delta.
pub struct Written {
    pub report: ChangeReport,
    pub delta: Delta,
}

impl Pinned {
    pub fn open(root: &PinRoot) -> Result<Self, DataplaneError> {
        let maps = PolicyMaps::open(root)?;
        let policy = pinned_policy(&maps)?;
        let rules = maps.rules()?;
        Ok(Self {
            maps,
            policy,
            rules,
        })
    }

    /// Carries out `ops` as a new request would be at the agent (strict:
    /// deleting what is absent is refused) on the policy the maps hold,
    /// then writes the result. A refused op writes nothing.
    pub fn apply(mut self, ops: &[Op]) -> Result<Written, EngineError> {
        let mut d = Desired {
            policy: std::mem::take(&mut self.policy),
            ..Desired::default()
        };
        let delta = crate::model::policy::delta::apply_ops(&mut d, ops, true)
            .map_err(EngineError::Refused)?;
        let report = write(&mut self.maps, &delta, &d.policy)?;
        Ok(Written { report, delta })
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
        audit: s.flags & sluice_common::SETTINGS_F_AUDIT != 0,
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
    change_for(maps, &Delta::between_policies(current, target), target)
}

/// The kernel change for `delta`, whose result is `target`. Rules that stay
/// keep their id and counters; deleting what the maps do not hold is not an
/// error (the result is what counts).
pub fn change_for(
    maps: &PolicyMaps,
    delta: &Delta,
    target: &Policy,
) -> Result<Change, DataplaneError> {
    let mut change = Change {
        tolerate_missing: true,
        ..Change::default()
    };
    for (allow, add, del) in [
        (false, &delta.deny_add, &delta.deny_del),
        (true, &delta.allow_add, &delta.allow_del),
    ] {
        change
            .add
            .extend(add.iter().map(|n| (list_for(allow, n), *n)));
        change
            .del
            .extend(del.iter().map(|n| (list_for(allow, n), *n)));
    }
    if delta.rules.is_some() {
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
                    r.stats_slot = UNASSIGNED_SLOT;
                    r
                })
            })
            .collect();
        change.rules = Some(rules);
    }
    change.default_action = delta.default.map(|(_, b)| b.into());
    change.malformed_action = delta.malformed.map(|(_, b)| b.into());
    change.audit = delta.audit.map(|(_, b)| b);
    Ok(change)
}

/// A rule the maps hold, as listed to users.
pub fn rule_row(v: &RuleView) -> RuleRow {
    RuleRow {
        id: v.rule.id,
        position: v.position,
        rule: RuleSpec::from_rule(&v.rule),
        packets: v.packets,
        bytes: v.bytes,
    }
}
