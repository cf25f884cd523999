//! Flow records as the API carries them: the query language of
//! `GET /v1/flows` and `/v1/flows/top` (parsed alike by the agent and the
//! CLI), the records and tables it answers with, and their names.

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sluice_common::{Family, FlowRecord, L4, Reason, Verdict, ip_from_bytes};

use super::time::rfc3339;
use crate::model::policy::config::FlowSettings;

/// Newest records kept for `GET /v1/flows`.
pub const RECENT_CAPACITY: usize = 10_000;
/// Records shown when no limit is given.
pub const DEFAULT_LIMIT: usize = 100;
/// Rows of each top table when no limit is given, and the most allowed.
pub const DEFAULT_TOP: usize = 10;
pub const MAX_TOP: usize = 1000;

const TCP_FLAG_NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];

pub(crate) fn verdict_names() -> String {
    Verdict::ALL.map(Verdict::name).join(", ")
}

pub(crate) fn reason_names() -> String {
    Reason::ALL.map(Reason::name).join(", ")
}

/// A bad query or filter (API and CLI say the same).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("unknown verdict '{value}' (valid: {})", verdict_names())]
    Verdict { value: String },
    #[error("unknown reason '{value}' (valid: {})", reason_names())]
    Reason { value: String },
    #[error("'{value}' is not a CIDR or an address (e.g. 198.18.0.0/24, 2001:2::/48, 198.18.0.7)")]
    Prefix { value: String },
    #[error("'{value}' is not a port (0-65535)")]
    Port { value: String },
    #[error("'{value}' is not a limit (1-{max})")]
    Limit { value: String, max: usize },
    #[error("unknown ranking '{value}' (valid: packets, bytes)")]
    By { value: String },
    #[error("'{value}' is not true or false")]
    Bool { value: String },
    #[error("{what} does not apply to the top flows (their totals cover every reason)")]
    NotForTop { what: &'static str },
}

pub fn parse_verdict(s: &str) -> Result<Verdict, FilterError> {
    Verdict::ALL
        .into_iter()
        .find(|v| v.name() == s)
        .ok_or_else(|| FilterError::Verdict { value: s.into() })
}

pub fn parse_reason(s: &str) -> Result<Reason, FilterError> {
    Reason::ALL
        .into_iter()
        .find(|r| r.name() == s)
        .ok_or_else(|| FilterError::Reason { value: s.into() })
}

pub fn parse_cidr(s: &str) -> Result<IpNet, FilterError> {
    crate::model::policy::parse_prefix_lenient(s)
        .map_err(|_| FilterError::Prefix { value: s.into() })
}

pub fn parse_port(s: &str) -> Result<u16, FilterError> {
    s.trim()
        .parse()
        .map_err(|_| FilterError::Port { value: s.into() })
}

pub fn parse_limit(s: Option<&str>, default: usize, max: usize) -> Result<usize, FilterError> {
    let Some(s) = s else { return Ok(default) };
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(FilterError::Limit {
            value: s.into(),
            max,
        }),
    }
}

pub fn parse_bool(s: Option<&str>) -> Result<bool, FilterError> {
    match s {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some(other) => Err(FilterError::Bool {
            value: other.into(),
        }),
    }
}

/// What to rank top flows, sources and destinations by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Packets,
    Bytes,
}

impl By {
    pub fn parse(s: Option<&str>) -> Result<Self, FilterError> {
        match s {
            None | Some("packets") => Ok(Self::Packets),
            Some("bytes") => Ok(Self::Bytes),
            Some(other) => Err(FilterError::By {
                value: other.into(),
            }),
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Packets => "packets",
            Self::Bytes => "bytes",
        }
    }
}

/// Query parameters of `GET /v1/flows` and `GET /v1/flows/top`, as given
/// (validated by [`Filter::parse`] and friends so both ends word errors alike).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FlowsQuery {
    pub verdict: Option<String>,
    pub reason: Option<String>,
    pub src: Option<String>,
    pub dst: Option<String>,
    pub port: Option<String>,
    pub limit: Option<String>,
    pub follow: Option<String>,
    pub by: Option<String>,
}

impl FlowsQuery {
    /// `?k=v&...` for the set parameters (values are expected to be valid
    /// already: verdict and reason names, CIDRs, numbers).
    #[must_use]
    pub fn to_query(&self) -> String {
        let pairs = [
            ("verdict", &self.verdict),
            ("reason", &self.reason),
            ("src", &self.src),
            ("dst", &self.dst),
            ("port", &self.port),
            ("limit", &self.limit),
            ("follow", &self.follow),
            ("by", &self.by),
        ];
        let s: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
            .collect();
        if s.is_empty() {
            String::new()
        } else {
            format!("?{}", s.join("&"))
        }
    }
}

/// Percent-encodes what may not stand in a query value.
fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Which records (or flows) a query wants. Every condition given must hold.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    pub verdict: Option<Verdict>,
    pub reason: Option<Reason>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    /// Source or destination port.
    pub port: Option<u16>,
}

impl Filter {
    pub fn parse(q: &FlowsQuery) -> Result<Self, FilterError> {
        Ok(Self {
            verdict: q.verdict.as_deref().map(parse_verdict).transpose()?,
            reason: q.reason.as_deref().map(parse_reason).transpose()?,
            src: q.src.as_deref().map(parse_cidr).transpose()?,
            dst: q.dst.as_deref().map(parse_cidr).transpose()?,
            port: q.port.as_deref().map(parse_port).transpose()?,
        })
    }

    pub(crate) fn matches(&self, r: &FlowRecord) -> bool {
        if self.verdict.is_some_and(|v| v as u8 != r.verdict)
            || self.reason.is_some_and(|x| x as u8 != r.reason)
        {
            return false;
        }
        self.matches_tuple(addrs(r), ports(r))
    }

    pub(crate) fn matches_tuple(
        &self,
        addrs: Option<(IpAddr, IpAddr)>,
        ports: Option<(u16, u16)>,
    ) -> bool {
        if self.src.is_some() || self.dst.is_some() {
            let Some((s, d)) = addrs else { return false };
            if self.src.is_some_and(|n| !n.contains(&s))
                || self.dst.is_some_and(|n| !n.contains(&d))
            {
                return false;
            }
        }
        match (self.port, ports) {
            (None, _) => true,
            (Some(p), Some((s, d))) => p == s || p == d,
            (Some(_), None) => false,
        }
    }
}

pub(crate) fn has_addrs(r: &FlowRecord) -> bool {
    r.reason != Reason::Malformed as u8 && Family::from_version(r.family) != Family::Other
}

/// Source and destination, for IP packets that parsed.
pub(crate) fn addrs(r: &FlowRecord) -> Option<(IpAddr, IpAddr)> {
    if !has_addrs(r) {
        return None;
    }
    Some((
        ip_from_bytes(r.family, &r.src)?,
        ip_from_bytes(r.family, &r.dst)?,
    ))
}

/// Source and destination port, for TCP and UDP (not later fragments).
pub(crate) fn ports(r: &FlowRecord) -> Option<(u16, u16)> {
    (has_addrs(r) && (r.l4 == L4::Tcp as u8 || r.l4 == L4::Udp as u8)).then_some((r.sport, r.dport))
}

pub(crate) fn name_of<T: Copy>(all: &[T], v: u8, name: fn(T) -> &'static str) -> String {
    all.get(usize::from(v))
        .map_or_else(|| format!("unknown-{v}"), |x| name(*x).to_string())
}

pub(crate) fn verdict_name(v: u8) -> String {
    name_of(&Verdict::ALL, v, Verdict::name)
}

pub(crate) fn reason_name(v: u8) -> String {
    name_of(&Reason::ALL, v, Reason::name)
}

/// The name of an IP version as records hold it (4, 6, 0 = not IP).
pub(crate) fn family_name(v: u8) -> String {
    match v {
        0 | 4 | 6 => Family::from_version(v).name().to_string(),
        _ => format!("unknown-{v}"),
    }
}

pub(crate) fn l4_name(v: u8) -> String {
    name_of(&L4::ALL, v, L4::name)
}

#[must_use]
pub fn tcp_flag_names(flags: u8) -> Vec<String> {
    TCP_FLAG_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| flags & (1 << i) != 0)
        .map(|(_, n)| (*n).to_string())
        .collect()
}

/// One record as the reader took it from the ring.
#[derive(Debug, Clone)]
pub struct FlowEvent {
    /// The agent's record number, from 1.
    pub seq: u64,
    /// Wall-clock time, Unix nanoseconds.
    pub time_ns: u64,
    pub interface: Option<Arc<str>>,
    /// Load-balanced: the backend and its state when the record was read.
    pub backend: Option<BackendTag>,
    pub rec: FlowRecord,
    /// A socket call a workload's policy denied or audited (no packet):
    /// who made it. `rec` then holds the destination (or address bound),
    /// verdict and reason.
    pub sock: Option<SockTag>,
    /// A steering record (reason `steer`): the steer it was for.
    pub steer: Option<Arc<str>>,
}

/// The process behind a socket record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockTag {
    /// The workload's name (when the agent still has it).
    pub workload: Option<Arc<str>>,
    /// connect, sendmsg or bind.
    pub hook: &'static str,
    pub pid: u32,
    pub comm: Arc<str>,
    /// The process's own cgroup (the workload's or one below it).
    pub cgroup: Option<Arc<str>>,
}

/// A backend as flow records name it: address and state (`active`,
/// `draining`, or `down` when health checks failed it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTag {
    pub backend: Arc<str>,
    pub state: &'static str,
}

/// A flow record as the API and `sluice flows --json` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    pub time_ns: u64,
    /// Interface name, when the index belongs to exactly one attachment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    pub ifindex: u32,
    /// `ipv4`, `ipv6` or `other`.
    pub family: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    /// IP protocol number (0 when not IP).
    pub proto: u8,
    /// Transport class: tcp, udp, icmp, icmpv6, other, fragment, none.
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_flags: Vec<String>,
    pub verdict: String,
    pub reason: String,
    /// The rule that decided (reasons rule, rate-limit, syn-defence, map-full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
    /// Prefix length of the list entry that matched (allow-list, deny-list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_len: Option<u32>,
    /// Frame length in bytes.
    pub len: u32,
    /// The record stands for 1 in `sample` packets.
    pub sample: u32,
    /// Load-balanced packets: the backend chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Its state then: active, draining, or down (health checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_state: Option<String>,
    /// Socket records (a workload's denied or audited connect, sendmsg or
    /// bind; no packet was sent): the workload, the call, the process and
    /// its cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Steering records (reason `steer`): the steer the lookup was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steer: Option<String>,
}

impl FlowEvent {
    #[must_use]
    pub fn view(&self) -> FlowView {
        let r = &self.rec;
        let (src, dst) = addrs(r).unzip();
        // A socket record knows no source (the call made no packet).
        let src = src.filter(|_| self.sock.is_none());
        let (sport, dport) = ports(r).unzip();
        let sport = sport.filter(|_| self.sock.is_none());
        let rule = [
            Reason::Rule,
            Reason::RateLimit,
            Reason::SynDefence,
            Reason::MapFull,
        ]
        .iter()
        .any(|x| *x as u8 == r.reason)
        .then_some(r.matched);
        let prefix_len = [Reason::AllowList, Reason::DenyList]
            .iter()
            .any(|x| *x as u8 == r.reason)
            .then_some(r.matched);
        FlowView {
            seq: self.seq,
            time: rfc3339(self.time_ns),
            time_ns: self.time_ns,
            interface: self.interface.as_deref().map(str::to_string),
            ifindex: r.ifindex,
            family: family_name(r.family),
            src,
            dst,
            sport,
            dport,
            proto: r.proto,
            protocol: l4_name(r.l4),
            tcp_flags: if r.l4 == L4::Tcp as u8 {
                tcp_flag_names(r.tcp_flags)
            } else {
                Vec::new()
            },
            verdict: verdict_name(r.verdict),
            reason: reason_name(r.reason),
            rule,
            prefix_len,
            len: r.len,
            sample: r.sample,
            backend: self.backend.as_ref().map(|b| b.backend.to_string()),
            backend_state: self.backend.as_ref().map(|b| b.state.to_string()),
            workload: self
                .sock
                .as_ref()
                .and_then(|t| t.workload.as_deref().map(str::to_string)),
            hook: self.sock.as_ref().map(|t| t.hook.to_string()),
            pid: self.sock.as_ref().map(|t| t.pid),
            comm: self.sock.as_ref().map(|t| t.comm.to_string()),
            cgroup: self
                .sock
                .as_ref()
                .and_then(|t| t.cgroup.as_deref().map(str::to_string)),
            steer: self.steer.as_deref().map(str::to_string),
        }
    }
}

/// `GET /v1/flows`: the newest matching records, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowsBody {
    pub records: Vec<FlowView>,
}

/// `GET /v1/flows/top`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopReport {
    pub by: String,
    /// Flows the agent holds totals for (at most `flow_capacity`).
    pub flows_tracked: usize,
    pub flow_capacity: usize,
    pub flows: Vec<TopFlow>,
    pub sources: Vec<TopAddr>,
    pub destinations: Vec<TopAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictPackets {
    pub pass: u64,
    pub drop: u64,
    pub audit: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopFlow {
    pub family: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    pub proto: u8,
    pub protocol: String,
    /// Packets and bytes (the records times their sampling rate).
    pub packets: u64,
    pub bytes: u64,
    pub verdicts: VerdictPackets,
    /// TCP flags seen in any of its records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_flags: Vec<String>,
    pub records: u64,
    /// Some records stood for more than one packet: the totals are estimates.
    pub sampled: bool,
    pub first_seen: String,
    pub last_seen: String,
    pub last_reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopAddr {
    pub addr: IpAddr,
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}

/// `GET /v1/flows/stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowStats {
    /// The reader holds the ring (false while no dataplane is pinned).
    pub reading: bool,
    /// Records the agent read from the ring.
    pub records_read: u64,
    /// From the kernel's event counters: records written, and records lost
    /// because the ring was full (reader too slow or away) or this CPU was
    /// over `rate_cap`.
    pub records_written: u64,
    pub lost_ring_full: u64,
    pub lost_rate_cap: u64,
    /// Socket records (workloads' denied and audited calls) lost because
    /// their ring was full.
    #[serde(default)]
    pub sock_lost_ring_full: u64,
    pub flows_tracked: usize,
    pub flow_capacity: usize,
    /// Flows dropped from the table (least recently seen) to make room.
    pub evictions: u64,
    pub recent: usize,
    pub recent_capacity: usize,
    /// Clients following the stream, and records they lost by falling behind.
    pub followers: usize,
    pub follower_lost: u64,
    /// The `[flows]` settings in force.
    pub settings: FlowSettings,
    /// The kernel's sampling settings match them (false until the
    /// dataplane exists).
    pub applied: bool,
}

/// Cheap counters for the metrics endpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlowCounters {
    pub records_read: u64,
    pub flows_tracked: usize,
    pub evictions: u64,
    pub follower_lost: u64,
}
