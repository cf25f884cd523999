//! Turns the per-CPU counter slots into the views `sluice stats` shows: by
//! protocol, by verdict and by reason, plus the busiest list entries and rules.

use std::collections::BTreeMap;

use sluice_common::{Counter, Family, L4, ListId, Reason, Verdict, counter_index};

use super::{DataplaneError, PolicyMaps, policy::ListEntry};

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
}

impl Totals {
    fn add(&mut self, c: &Counter) {
        self.packets += c.packets;
        self.bytes += c.bytes;
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TopEntry {
    pub list: String,
    #[serde(flatten)]
    pub entry: ListEntry,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TopRule {
    pub id: u32,
    pub position: usize,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub total: Totals,
    pub by_verdict: BTreeMap<String, Totals>,
    /// `verdict/reason`, e.g. `drop/deny-list`.
    pub by_reason: BTreeMap<String, Totals>,
    pub by_family: BTreeMap<String, Totals>,
    pub by_protocol: BTreeMap<String, Totals>,
    pub top_entries: Vec<TopEntry>,
    pub top_rules: Vec<TopRule>,
    /// When the counters were last reset (`stats --reset`), Unix
    /// nanoseconds; absent: never since the dataplane was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_unix_ns: Option<u64>,
}

/// Where the time of the last counter reset is kept: a one-entry array
/// pinned beside the maps (made by user space; no program reads it; it
/// goes with the other pins when the dataplane is removed).
const STATS_RESET: &str = "STATS_RESET";

/// What `reset` did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ResetReport {
    /// Unix nanoseconds.
    pub reset_unix_ns: u64,
    /// List entries whose hit counters were zeroed (both generations).
    pub entries: usize,
}

/// Zeroes every packet counter (classes, rules, list entries) and records
/// the time (`now_unix_ns`), which `stats` shows from then on.
pub fn reset(maps: &mut PolicyMaps, now_unix_ns: u64) -> Result<ResetReport, DataplaneError> {
    let entries = maps.reset_counters()?;
    super::pins::set_word(maps.pin_root(), STATS_RESET, now_unix_ns)?;
    Ok(ResetReport {
        reset_unix_ns: now_unix_ns,
        entries,
    })
}

/// When the counters were last reset (Unix nanoseconds), if ever.
#[must_use]
pub fn last_reset(maps: &PolicyMaps) -> Option<u64> {
    super::pins::word(maps.pin_root(), STATS_RESET).filter(|t| *t != 0)
}

/// The counter slots that saw packets, with the class each counts.
pub fn nonzero(slots: &[Counter]) -> impl Iterator<Item = (Family, L4, Verdict, Reason, &Counter)> {
    Family::ALL.into_iter().flat_map(move |f| {
        L4::ALL.into_iter().flat_map(move |l| {
            Verdict::ALL.into_iter().flat_map(move |v| {
                Reason::ALL.into_iter().filter_map(move |r| {
                    let c = &slots[counter_index(f, l, v, r) as usize];
                    (c.packets != 0).then_some((f, l, v, r, c))
                })
            })
        })
    })
}

pub fn collect(maps: &PolicyMaps, top: usize) -> Result<Stats, DataplaneError> {
    let slots = maps.counters()?;
    let mut st = Stats {
        reset_unix_ns: last_reset(maps),
        ..Stats::default()
    };
    for (f, l, v, r, c) in nonzero(&slots) {
        st.total.add(c);
        st.by_verdict
            .entry(v.name().to_string())
            .or_default()
            .add(c);
        st.by_reason
            .entry(format!("{}/{}", v.name(), r.name()))
            .or_default()
            .add(c);
        st.by_family.entry(f.name().to_string()).or_default().add(c);
        st.by_protocol
            .entry(l.name().to_string())
            .or_default()
            .add(c);
    }
    if top > 0 {
        let mut entries = Vec::new();
        for list in ListId::ALL {
            for e in maps.list_entries(list)? {
                if e.packets > 0 {
                    entries.push(TopEntry {
                        list: list.kind().to_string(),
                        entry: e,
                    });
                }
            }
        }
        entries.sort_by_key(|e| std::cmp::Reverse(e.entry.packets));
        entries.truncate(top);
        st.top_entries = entries;
        let mut rules: Vec<TopRule> = maps
            .rules()?
            .into_iter()
            .filter(|r| r.packets > 0)
            .map(|r| TopRule {
                id: r.rule.id,
                position: r.position,
                packets: r.packets,
                bytes: r.bytes,
            })
            .collect();
        rules.sort_by_key(|r| std::cmp::Reverse(r.packets));
        rules.truncate(top);
        st.top_rules = rules;
    }
    Ok(st)
}
