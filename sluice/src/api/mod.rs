//! The agent's API as both ends speak it: request and answer bodies, the
//! result of a change, flow queries and records, time stamps, and the client
//! the CLI (and tests) call the agent with. The agent serves these types;
//! nothing here knows how.

pub mod client;
pub mod flows;
pub mod time;

use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::policy::{self, Action, PolicyDiff, RuleRow, RuleSpec};

/// What one reconcile did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReconcileReport {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    /// Interfaces that could not be attached (retried later).
    #[serde(default)]
    pub failed: Vec<String>,
    /// Entries, rules and settings that had to change in the maps.
    pub changes: usize,
    pub millis: f64,
    /// Map pins put back to the maps the attached programs read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired_pins: Vec<String>,
    /// What the load balancer's maps took, when the change touched them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<crate::engine::lb::ApplyReport>,
    /// What the socket layer took (workloads, cgroup links), when the
    /// change touched it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sock: Option<crate::engine::sock::ApplyReport>,
    /// What steering took (rule table, link), when the change touched it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steer: Option<crate::engine::steer::ApplyReport>,
}

/// The result of a change through the agent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    pub version: u64,
    pub diff: PolicyDiff,
    pub reconcile: ReconcileReport,
    /// Nothing would have changed (every prefix already there, a setting
    /// already in force): no version was made; `version` is the current one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<policy::config::Diagnostic>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Info {
    pub version: String,
    pub pin_root: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub policy_version: u64,
    pub base_source: String,
    pub runtime_changes: usize,
    /// A change an agent crash interrupted, finished or undone at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<String>,
}

/// `GET /v1/events`: the dataplane's event counters (`STATS`: SYN
/// challenges, verified sources, capped source buckets, escalation and flow
/// records written or lost, ...) and the agent's own DDoS figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventsBody {
    /// Summed over CPUs, by name (`sluice_common::stat::NAMES`).
    pub dataplane: std::collections::BTreeMap<String, u64>,
    /// Sources the agent denied for a while because they stayed over a
    /// per-source limit (since the agent started).
    pub escalated_sources: u64,
    /// Temporary deny entries removed when their time was up (since the
    /// agent started).
    pub deny_expirations: u64,
    /// Temporary deny entries in force now.
    pub temporary_denies: usize,
}

/// A list entry as listed: the kernel's figures and, for an entry the agent
/// will expire, why and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListedEntry {
    #[serde(flatten)]
    pub entry: crate::dataplane::ListEntry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporary: Option<policy::TempDeny>,
}

impl From<crate::dataplane::ListEntry> for ListedEntry {
    fn from(entry: crate::dataplane::ListEntry) -> Self {
        Self {
            entry,
            temporary: None,
        }
    }
}

impl std::ops::Deref for ListedEntry {
    type Target = crate::dataplane::ListEntry;

    fn deref(&self) -> &Self::Target {
        &self.entry
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListBody {
    pub list: String,
    pub entries: Vec<ListedEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixesBody {
    pub prefixes: Vec<IpNet>,
    /// Deny add only: remove the entries after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Why (shown by `deny list`); with `ttl_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RulesBody {
    pub rules: Vec<RuleRow>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleAddBody {
    pub rule: RuleSpec,
    pub at: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RuleAdded {
    #[serde(flatten)]
    pub applied: Applied,
    pub rule_id: u32,
    pub position: usize,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDelBody {
    pub ids: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsBody {
    pub default: Option<Action>,
    pub malformed: Option<Action>,
    #[serde(default)]
    pub audit: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBody {
    pub path: PathBuf,
    pub text: String,
}

/// Limits the API applies, fixed when the agent starts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `[agent] file_size_limit`: the largest list file a config may name.
    pub file_size_limit: u64,
}

/// `GET /v1/policy`: the desired state the agent enforces, with its version.
#[derive(Debug, Serialize, Deserialize)]
pub struct DesiredBody {
    pub version: u64,
    pub desired: crate::model::policy::Desired,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub time: u64,
    pub author: String,
    pub cause: String,
    pub deny: usize,
    pub allow: usize,
    pub rules: usize,
    pub default: Action,
    pub malformed: Action,
    pub current: bool,
    /// The request that made it (the CLI sends one per command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// List entries, rules and settings this version changed.
    #[serde(default)]
    pub changes: usize,
    /// Load-balanced services in this version.
    #[serde(default)]
    pub services: usize,
}

/// `GET /v1/history/{version}`: one version and what it changed.
#[derive(Debug, Serialize, Deserialize)]
pub struct VersionDetail {
    #[serde(flatten)]
    pub entry: HistoryEntry,
    /// Lists, rules and settings it changed.
    pub diff: policy::PolicyDiff,
    /// Temporary deny entries added, changed or removed.
    pub temporary_changes: usize,
    pub services_changed: bool,
    pub interfaces_changed: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    pub version: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachBody {
    pub name: String,
    pub netns: Option<String>,
}

/// A fresh request id: 16 hex digits from the kernel's random source.
pub fn new_request_id() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = (t as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
