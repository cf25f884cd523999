//! The agent's configuration file (TOML): parsing with positions, validation
//! that reports every problem with file, line and column, and resolution into
//! the desired state. See examples/sluice.toml for a commented example.

use std::{
    collections::BTreeSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use super::{Desired, Interface, Policy, RuleSpec, parse_prefix};
use sluice_common::settings::AttachMode;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/sluice";
pub const DEFAULT_SOCKET: &str = "/run/sluice/sluice.sock";
pub const DEFAULT_HISTORY: usize = 20;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every problem found in a file (never just the first).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} problem(s) in {}:\n{}", .0.len(), .0.first().map(|d| d.file.display().to_string()).unwrap_or_default(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<Diagnostic>);

/// Agent settings from the `[agent]` table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentSettings {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub pin_root: PathBuf,
    /// Applied versions kept for rollback.
    pub history: usize,
    /// Prometheus endpoint; off when absent.
    pub metrics: Option<SocketAddr>,
    /// Largest file (prefix list, config) the agent reads, in bytes.
    #[serde(default = "default_file_size_limit")]
    pub file_size_limit: u64,
}

fn default_file_size_limit() -> u64 {
    crate::files::DEFAULT_FILE_SIZE_LIMIT
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            state_dir: DEFAULT_STATE_DIR.into(),
            socket: DEFAULT_SOCKET.into(),
            pin_root: sluice_common::settings::DEFAULT_PIN_ROOT.into(),
            history: DEFAULT_HISTORY,
            metrics: None,
            file_size_limit: crate::files::DEFAULT_FILE_SIZE_LIMIT,
        }
    }
}

/// Flow-record settings from the `[flows]` table: 1-in-N sampling per
/// verdict (0 = no records) and the per-CPU record rate cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowSettings {
    pub sample_pass: u32,
    pub sample_drop: u32,
    pub sample_audit: u32,
    /// Records per second per CPU (0 = no cap).
    pub rate_cap: u64,
    /// Records a CPU may write at once above the rate.
    pub burst: u64,
}

pub const DEFAULT_FLOW_RATE_CAP: u64 = 10_000;
/// Highest `rate_cap` and `burst` (the cap's interval must stay >= 1 ns).
pub const MAX_FLOW_RATE: u64 = 1_000_000_000;

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            sample_pass: 100,
            sample_drop: 1,
            sample_audit: 1,
            rate_cap: DEFAULT_FLOW_RATE_CAP,
            burst: DEFAULT_FLOW_RATE_CAP / 10,
        }
    }
}

impl FlowSettings {
    /// The `FLOW_CONFIG` entry these settings stand for.
    #[must_use]
    pub fn to_kernel(&self) -> sluice_common::FlowConfig {
        let (interval, tolerance) = sluice_common::settings::gcra(self.rate_cap, self.burst);
        sluice_common::FlowConfig {
            sample: [self.sample_pass, self.sample_drop, self.sample_audit, 0],
            cap_interval_ns: interval,
            cap_tolerance_ns: tolerance,
        }
    }
}

/// DDoS settings from the `[ddos]` table that are not rules: the cap on new
/// per-source buckets and how long a source that answered a SYN challenge
/// stays verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DdosSettings {
    /// New per-source buckets per second (0 = no cap).
    pub new_sources_per_second: u64,
    pub new_sources_burst: u64,
    pub verified_ttl_secs: u64,
}

impl Default for DdosSettings {
    fn default() -> Self {
        Self {
            new_sources_per_second: sluice_common::settings::DEFAULT_NEW_SOURCES_PER_S,
            new_sources_burst: sluice_common::settings::DEFAULT_NEW_SOURCES_PER_S,
            verified_ttl_secs: sluice_common::settings::DEFAULT_VERIFIED_TTL_S,
        }
    }
}

impl DdosSettings {
    /// The `DDOS_CONFIG` entry these settings stand for (the cookie key is
    /// kept from the map when written).
    #[must_use]
    pub fn to_kernel(&self) -> sluice_common::DdosConfig {
        let (interval, tolerance) =
            sluice_common::settings::gcra(self.new_sources_per_second, self.new_sources_burst);
        sluice_common::DdosConfig {
            new_source_interval_ns: interval,
            new_source_tolerance_ns: tolerance,
            verified_ttl_ns: self.verified_ttl_secs * 1_000_000_000,
            secret: [0, 0],
        }
    }
}

/// A parsed and validated configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub agent: AgentSettings,
    pub desired: Desired,
    pub flows: FlowSettings,
    pub ddos: DdosSettings,
    pub lb: LbSettings,
}

/// The `[lb]` table: the connection table's timeouts and new-entry cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbSettings {
    pub tcp_idle_secs: u64,
    pub udp_idle_secs: u64,
    pub new_connections_per_second: u64,
    pub new_connections_burst: u64,
    /// Connection-table capacity, used when the table is created.
    pub connections: u32,
    /// The socket LB: local clients' connect()/sendmsg() to a service are
    /// given a backend at the socket (docs/sock.md).
    pub socket: bool,
}

impl Default for LbSettings {
    fn default() -> Self {
        use sluice_common::settings::{
            DEFAULT_NEW_CONNS_PER_S, DEFAULT_TCP_IDLE_S, DEFAULT_UDP_IDLE_S,
        };
        Self {
            tcp_idle_secs: DEFAULT_TCP_IDLE_S,
            udp_idle_secs: DEFAULT_UDP_IDLE_S,
            new_connections_per_second: DEFAULT_NEW_CONNS_PER_S,
            new_connections_burst: DEFAULT_NEW_CONNS_PER_S,
            connections: sluice_common::lb::CONN_CAPACITY,
            socket: true,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLb {
    conn_tcp_idle: Option<Spanned<String>>,
    conn_udp_idle: Option<Spanned<String>>,
    new_connections_per_second: Option<Spanned<i64>>,
    new_connections_burst: Option<Spanned<i64>>,
    connections: Option<Spanned<i64>>,
    socket: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    vip: Spanned<String>,
    mode: Option<Spanned<String>>,
    vni: Option<Spanned<i64>>,
    socket: Option<bool>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    health: Option<Spanned<RawHealth>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawBackend {
    Addr(String),
    Full {
        addr: String,
        weight: Option<i64>,
        #[serde(default)]
        drain: bool,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: String,
    path: Option<String>,
    expect: Option<i64>,
    port: Option<i64>,
    netns: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default, rename = "interface")]
    interfaces: Vec<Spanned<RawInterface>>,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    deny: RawList,
    #[serde(default)]
    allow: RawList,
    #[serde(default)]
    flows: RawFlows,
    #[serde(default)]
    ddos: RawDdos,
    #[serde(default)]
    lb: RawLb,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
    #[serde(default, rename = "workload")]
    workloads: Vec<Spanned<RawWorkload>>,
    #[serde(default, rename = "steer")]
    steers: Vec<Spanned<RawSteer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSteer {
    name: Spanned<String>,
    proto: Spanned<String>,
    prefixes: Spanned<Vec<Spanned<String>>>,
    ports: Option<Spanned<RawPorts>>,
    on_missing: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPorts {
    Int(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: Spanned<String>,
    cgroup: Spanned<String>,
    #[serde(default)]
    audit: bool,
    connect_default: Option<Spanned<String>>,
    bind_default: Option<Spanned<String>>,
    #[serde(default)]
    connect: Vec<Spanned<String>>,
    #[serde(default)]
    bind: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDdos {
    new_sources_per_second: Option<Spanned<i64>>,
    new_sources_burst: Option<Spanned<i64>>,
    verified_ttl: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    state_dir: Option<Spanned<String>>,
    socket: Option<Spanned<String>>,
    pin_root: Option<Spanned<String>>,
    history: Option<Spanned<i64>>,
    metrics: Option<Spanned<String>>,
    file_size_limit: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlows {
    sample_pass: Option<Spanned<i64>>,
    sample_drop: Option<Spanned<i64>>,
    sample_audit: Option<Spanned<i64>>,
    rate_cap: Option<Spanned<i64>>,
    burst: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: Spanned<String>,
    netns: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    audit: bool,
    default: Option<Spanned<String>>,
    malformed: Option<Spanned<String>>,
    #[serde(default)]
    rules: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawList {
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    files: Vec<Spanned<String>>,
}

/// Turns byte offsets into 1-based line and column.
struct Positions<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Positions<'_> {
    fn at(&self, offset: usize, message: impl Into<String>) -> Diagnostic {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Diagnostic {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    fn span<T>(&self, s: &Spanned<T>, message: impl Into<String>) -> Diagnostic {
        self.at(s.span().start, message)
    }
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace)
        && name != "."
        && name != ".."
}

fn action(
    pos: &Positions<'_>,
    v: &Option<Spanned<String>>,
    default: sluice_common::Verdict,
    diags: &mut Vec<Diagnostic>,
) -> sluice_common::Verdict {
    match v {
        None => default,
        Some(s) => match s.get_ref().as_str() {
            "pass" => sluice_common::Verdict::Pass,
            "drop" => sluice_common::Verdict::Drop,
            other => {
                diags.push(pos.span(s, format!("expected \"pass\" or \"drop\", found {other:?}")));
                default
            }
        },
    }
}

/// The `[flows]` table, defaults filled in.
fn flow_settings(pos: &Positions<'_>, raw: &RawFlows, diags: &mut Vec<Diagnostic>) -> FlowSettings {
    let mut flows = FlowSettings::default();
    for (name, value, into) in [
        ("sample_pass", &raw.sample_pass, &mut flows.sample_pass),
        ("sample_drop", &raw.sample_drop, &mut flows.sample_drop),
        ("sample_audit", &raw.sample_audit, &mut flows.sample_audit),
    ] {
        if let Some(v) = value {
            match u32::try_from(*v.get_ref()) {
                Ok(n) => *into = n,
                Err(_) => diags.push(pos.span(
                    v,
                    format!(
                        "{name} must be 0 (no records), 1 (every packet) or N (1 in N packets, \
                         N <= {}), found {}",
                        u32::MAX,
                        v.get_ref()
                    ),
                )),
            }
        }
    }
    if let Some(v) = &raw.rate_cap {
        match u64::try_from(*v.get_ref()) {
            Ok(n) if n <= MAX_FLOW_RATE => {
                flows.rate_cap = n;
                flows.burst = (n / 10).max(1);
            }
            _ => diags.push(pos.span(
                v,
                format!(
                    "rate_cap must be between 0 (no cap) and {MAX_FLOW_RATE} records per second \
                     per CPU, found {}",
                    v.get_ref()
                ),
            )),
        }
    }
    if let Some(v) = &raw.burst {
        match u64::try_from(*v.get_ref()) {
            Ok(n) if (1..=MAX_FLOW_RATE).contains(&n) => flows.burst = n,
            _ => diags.push(pos.span(
                v,
                format!(
                    "burst must be between 1 and {MAX_FLOW_RATE} records, found {}",
                    v.get_ref()
                ),
            )),
        }
    }
    flows
}

/// The `[ddos]` table, defaults filled in.
fn ddos_settings(pos: &Positions<'_>, raw: &RawDdos, diags: &mut Vec<Diagnostic>) -> DdosSettings {
    const MAX: u64 = 1_000_000_000;
    let mut d = DdosSettings::default();
    if let Some(v) = &raw.new_sources_per_second {
        match u64::try_from(*v.get_ref()) {
            Ok(n) if n <= MAX => {
                d.new_sources_per_second = n;
                d.new_sources_burst = n.max(1);
            }
            _ => diags.push(pos.span(
                v,
                format!(
                    "new_sources_per_second must be between 0 (no cap) and {MAX}, found {}",
                    v.get_ref()
                ),
            )),
        }
    }
    if let Some(v) = &raw.new_sources_burst {
        match u64::try_from(*v.get_ref()) {
            Ok(n) if (1..=MAX).contains(&n) => d.new_sources_burst = n,
            _ => diags.push(pos.span(
                v,
                format!(
                    "new_sources_burst must be between 1 and {MAX}, found {}",
                    v.get_ref()
                ),
            )),
        }
    }
    if let Some(v) = &raw.verified_ttl {
        match super::parse_duration_ms(v.get_ref())
            .filter(|ms| ms % 1000 == 0 && (1_000..=30 * 86_400_000).contains(ms))
        {
            Some(ms) => d.verified_ttl_secs = ms / 1000,
            None => diags.push(pos.span(
                v,
                format!(
                    "verified_ttl must be whole seconds from 1s to 30d (e.g. \"1h\"), found {:?}",
                    v.get_ref()
                ),
            )),
        }
    }
    d
}

/// The `[lb]` table, defaults filled in.
fn lb_settings(pos: &Positions<'_>, raw: &RawLb, diags: &mut Vec<Diagnostic>) -> LbSettings {
    const MAX: u64 = 1_000_000_000;
    let mut l = LbSettings::default();
    for (name, v, into) in [
        ("conn_tcp_idle", &raw.conn_tcp_idle, &mut l.tcp_idle_secs),
        ("conn_udp_idle", &raw.conn_udp_idle, &mut l.udp_idle_secs),
    ] {
        if let Some(v) = v {
            match super::parse_duration_ms(v.get_ref())
                .filter(|ms| ms % 1000 == 0 && (1_000..=7 * 86_400_000).contains(ms))
            {
                Some(ms) => *into = ms / 1000,
                None => diags.push(pos.span(
                    v,
                    format!(
                        "{name} must be whole seconds from 1s to 7d (e.g. \"15m\"), found {:?}",
                        v.get_ref()
                    ),
                )),
            }
        }
    }
    if let Some(v) = &raw.new_connections_per_second {
        match u64::try_from(*v.get_ref()) {
            Ok(n) if n <= MAX => {
                l.new_connections_per_second = n;
                l.new_connections_burst = n.max(1);
            }
            _ => diags.push(pos.span(
                v,
                format!(
                    "new_connections_per_second must be between 0 (no cap) and {MAX}, found {}",
                    v.get_ref()
                ),
            )),
        }
    }
    if let Some(v) = raw.socket {
        l.socket = v;
    }
    if let Some(v) = &raw.connections {
        use sluice_common::settings::{MAX_CONNS, MIN_CONNS};
        match u32::try_from(*v.get_ref()) {
            Ok(n) if (MIN_CONNS..=MAX_CONNS).contains(&n) => l.connections = n,
            _ => diags.push(pos.span(
                v,
                format!(
                    "connections must be between {MIN_CONNS} and {MAX_CONNS}, found {}",
                    v.get_ref()
                ),
            )),
        }
    }
    if let Some(v) = &raw.new_connections_burst {
        match u64::try_from(*v.get_ref()) {
            Ok(n) if (1..=MAX).contains(&n) => l.new_connections_burst = n,
            _ => diags.push(pos.span(
                v,
                format!(
                    "new_connections_burst must be between 1 and {MAX}, found {}",
                    v.get_ref()
                ),
            )),
        }
    }
    l
}

/// One `[[service]]` table.
fn service(
    pos: &Positions<'_>,
    raw: &Spanned<RawService>,
    diags: &mut Vec<Diagnostic>,
) -> Option<crate::model::lb::LbService> {
    use crate::model::lb::{
        BackendSpec, CheckKind, DEFAULT_WEIGHT, HealthConf, LbService, Mode, ServiceSpec,
    };
    let r = raw.get_ref();
    let before = diags.len();
    let id = match r.vip.get_ref().parse::<crate::model::lb::ServiceId>() {
        Ok(id) => Some(id),
        Err(e) => {
            diags.push(pos.span(&r.vip, e.to_string()));
            None
        }
    };
    let mode = match r.mode.as_ref().map(|m| (m, m.get_ref().as_str())) {
        None | Some((_, "nat")) => Mode::Nat,
        Some((_, "dsr")) => Mode::Dsr,
        Some((m, "vxlan")) => match &r.vni {
            Some(v) => match u32::try_from(*v.get_ref()) {
                Ok(n) if n <= crate::model::lb::MAX_VNI => Mode::Vxlan { vni: n },
                _ => {
                    diags.push(pos.span(
                        v,
                        format!(
                            "vni must be 0 to {}, found {}",
                            crate::model::lb::MAX_VNI,
                            v.get_ref()
                        ),
                    ));
                    Mode::Nat
                }
            },
            None => {
                diags.push(pos.span(m, "mode vxlan needs a vni (the backends' VXLAN network id)"));
                Mode::Nat
            }
        },
        Some((m, other)) => {
            diags.push(pos.span(
                m,
                format!("mode must be nat, dsr or vxlan, found {other:?}"),
            ));
            Mode::Nat
        }
    };
    if let Some(v) = &r.vni
        && !matches!(mode, Mode::Vxlan { .. })
        && diags.len() == before
    {
        diags.push(pos.span(v, "vni goes with mode = \"vxlan\""));
    }
    let mut backends = Vec::new();
    for b in &r.backends {
        let (addr, weight, drain) = match b.get_ref() {
            RawBackend::Addr(a) => (a.as_str(), None, false),
            RawBackend::Full {
                addr,
                weight,
                drain,
            } => (addr.as_str(), *weight, *drain),
        };
        let addr = match addr.parse() {
            Ok(a) => a,
            Err(e) => {
                diags.push(pos.span(b, format!("{e}")));
                continue;
            }
        };
        let weight = match weight {
            None => DEFAULT_WEIGHT,
            Some(w) => match u32::try_from(w) {
                Ok(w) if (1..=crate::model::lb::MAX_WEIGHT).contains(&w) => w,
                _ => {
                    diags.push(pos.span(
                        b,
                        format!(
                            "weight must be 1 to {}, found {w}",
                            crate::model::lb::MAX_WEIGHT
                        ),
                    ));
                    continue;
                }
            },
        };
        backends.push(BackendSpec {
            addr,
            weight,
            draining: drain,
        });
    }
    let health = r.health.as_ref().and_then(|h| {
        let raw = h.get_ref();
        let check = match raw.check.as_str() {
            "tcp" => CheckKind::Tcp,
            "http" => CheckKind::Http,
            other => {
                diags.push(pos.span(
                    h,
                    format!("health check must be tcp or http, found {other:?}"),
                ));
                return None;
            }
        };
        let mut c = HealthConf::new(check);
        let mut bad = |msg: String| diags.push(pos.span(h, msg));
        if let Some(p) = &raw.path {
            c.path.clone_from(p);
        }
        if let Some(e) = raw.expect {
            match u16::try_from(e) {
                Ok(e) => c.expect = e,
                Err(_) => bad(format!("expect must be an HTTP status, found {e}")),
            }
        }
        if let Some(p) = raw.port {
            match u16::try_from(p) {
                Ok(p) if p != 0 => c.port = Some(p),
                _ => bad(format!("port must be 1 to 65535, found {p}")),
            }
        }
        if let Some(n) = &raw.netns {
            if n.is_empty() || n.contains('/') || n == "." || n == ".." {
                bad(format!("netns {n:?} is not a network namespace name"));
            } else {
                c.netns = Some(n.clone());
            }
        }
        for (name, v, into) in [
            ("interval", &raw.interval, &mut c.interval_ms),
            ("timeout", &raw.timeout, &mut c.timeout_ms),
        ] {
            if let Some(v) = v {
                match super::parse_duration_ms(v).filter(|ms| (1..=3_600_000).contains(ms)) {
                    Some(ms) => *into = ms,
                    None => bad(format!(
                        "{name} must be a duration up to 1h (e.g. \"2s\"), found {v:?}"
                    )),
                }
            }
        }
        for (name, v, into) in [
            ("rise", raw.rise, &mut c.rise),
            ("fall", raw.fall, &mut c.fall),
        ] {
            if let Some(v) = v {
                match u32::try_from(v) {
                    Ok(n) if (1..=100).contains(&n) => *into = n,
                    _ => bad(format!("{name} must be 1 to 100, found {v}")),
                }
            }
        }
        Some(c)
    });
    if diags.len() > before {
        return None;
    }
    Some(LbService {
        spec: ServiceSpec {
            id: id?,
            mode,
            backends,
        },
        health,
        socket: r.socket.unwrap_or(true),
    })
}

/// Parses and validates configuration text. `path` is used for messages and
/// to resolve relative prefix files.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    parse_with(path, text, None)
}

/// [`parse`], reading the files the config names with at most
/// `file_size_limit` bytes each (default: the file's own `[agent]
/// file_size_limit`). The agent passes its own limit for files it is sent.
pub fn parse_with(
    path: &Path,
    text: &str,
    file_size_limit: Option<u64>,
) -> Result<Config, ConfigErrors> {
    let pos = Positions { file: path, text };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            return Err(ConfigErrors(vec![pos.at(offset, e.message().to_string())]));
        }
    };
    let mut diags = Vec::new();
    let base_dir = path.parent().unwrap_or(Path::new("."));

    let mut agent = AgentSettings::default();
    let path_setting = |s: &Spanned<String>, diags: &mut Vec<Diagnostic>| -> Option<PathBuf> {
        let p = PathBuf::from(s.get_ref());
        if p.is_absolute() {
            Some(p)
        } else {
            diags.push(pos.span(s, format!("{:?} must be an absolute path", s.get_ref())));
            None
        }
    };
    if let Some(s) = &raw.agent.state_dir {
        agent.state_dir = path_setting(s, &mut diags).unwrap_or(agent.state_dir);
    }
    if let Some(s) = &raw.agent.socket {
        agent.socket = path_setting(s, &mut diags).unwrap_or(agent.socket);
    }
    if let Some(s) = &raw.agent.pin_root {
        agent.pin_root = path_setting(s, &mut diags).unwrap_or(agent.pin_root);
    }
    if let Some(v) = &raw.agent.file_size_limit {
        let n = match v.get_ref() {
            toml::Value::Integer(n) => u64::try_from(*n).ok(),
            toml::Value::String(s) => crate::files::parse_size(s),
            _ => None,
        };
        match n {
            Some(n) if n >= 1024 => agent.file_size_limit = n,
            _ => diags.push(pos.span(
                v,
                "file_size_limit must be a size of at least 1024 bytes, e.g. 268435456 or \"256MiB\"",
            )),
        }
    }
    let file_limit = file_size_limit.unwrap_or(agent.file_size_limit);
    if let Some(h) = &raw.agent.history {
        match usize::try_from(*h.get_ref()) {
            Ok(n) if (1..=1000).contains(&n) => agent.history = n,
            _ => diags.push(pos.span(h, "history must be between 1 and 1000")),
        }
    }
    if let Some(m) = &raw.agent.metrics {
        match m.get_ref().parse::<SocketAddr>() {
            Ok(a) => agent.metrics = Some(a),
            Err(_) => diags.push(pos.span(
                m,
                format!(
                    "{:?} is not a listen address like 127.0.0.1:9464 or [::1]:9464",
                    m.get_ref()
                ),
            )),
        }
    }

    let mut interfaces = Vec::new();
    let mut seen = BTreeSet::new();
    for i in &raw.interfaces {
        let r = i.get_ref();
        let name = r.name.get_ref();
        if !valid_ifname(name) {
            diags.push(pos.span(&r.name, format!("{name:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)")));
            continue;
        }
        let mode = match &r.mode {
            None => AttachMode::Auto,
            Some(m) => match m.get_ref().as_str() {
                "native" => AttachMode::Native,
                "generic" => AttachMode::Generic,
                "auto" => AttachMode::Auto,
                other => {
                    diags.push(pos.span(
                        m,
                        format!("mode must be native, generic or auto, found {other:?}"),
                    ));
                    continue;
                }
            },
        };
        let netns = r.netns.as_ref().map(|n| n.get_ref().clone());
        if let Some(n) = &r.netns
            && (n.get_ref().is_empty() || n.get_ref().contains('/'))
        {
            diags.push(pos.span(
                n,
                format!("{:?} is not a network namespace name", n.get_ref()),
            ));
            continue;
        }
        if !seen.insert((netns.clone(), name.clone())) {
            diags.push(pos.span(&r.name, format!("interface {name} is listed twice")));
            continue;
        }
        interfaces.push(Interface {
            name: name.clone(),
            netns,
            mode,
        });
    }

    let mut policy = Policy {
        default: action(
            &pos,
            &raw.policy.default,
            sluice_common::Verdict::Pass,
            &mut diags,
        )
        .into(),
        malformed: action(
            &pos,
            &raw.policy.malformed,
            sluice_common::Verdict::Drop,
            &mut diags,
        )
        .into(),
        audit: raw.policy.audit,
        ..Policy::default()
    };
    for (list, into) in [
        (&raw.deny, &mut policy.deny),
        (&raw.allow, &mut policy.allow),
    ] {
        for p in &list.prefixes {
            match parse_prefix(p.get_ref()) {
                Ok(net) => {
                    into.insert(net);
                }
                Err(e) => diags.push(pos.span(p, e.to_string())),
            }
        }
        for f in &list.files {
            let file = base_dir.join(f.get_ref());
            match super::read_prefix_file(&file, file_limit) {
                Ok(nets) => into.extend(nets),
                Err(e) => diags.push(pos.span(f, e.to_string())),
            }
        }
    }
    for r in &raw.policy.rules {
        let words: Vec<String> = r.get_ref().split_whitespace().map(String::from).collect();
        match RuleSpec::parse(&words) {
            Ok(spec) => policy.rules.push(spec),
            Err(e) => diags.push(pos.span(r, e.to_string())),
        }
    }
    if policy.rules.len() > sluice_common::MAX_RULES as usize {
        diags.push(pos.at(
            0,
            format!(
                "{} rules; sluice holds at most {}",
                policy.rules.len(),
                sluice_common::MAX_RULES
            ),
        ));
    }
    for (list, name) in [(&policy.deny, "deny"), (&policy.allow, "allow")] {
        let v4 = list.iter().filter(|n| n.addr().is_ipv4()).count();
        let v6 = list.len() - v4;
        if v4.max(v6) > sluice_common::LIST_CAPACITY as usize {
            diags.push(pos.at(
                0,
                format!(
                    "the {name} list has {} prefixes of one family; at most {} fit",
                    v4.max(v6),
                    sluice_common::LIST_CAPACITY
                ),
            ));
        }
    }
    let flows = flow_settings(&pos, &raw.flows, &mut diags);
    let ddos = ddos_settings(&pos, &raw.ddos, &mut diags);
    let lb = lb_settings(&pos, &raw.lb, &mut diags);
    let mut services = Vec::new();
    for s in &raw.services {
        if let Some(svc) = service(&pos, s, &mut diags) {
            services.push(svc);
        }
    }
    if diags.is_empty()
        && let Err(e) = crate::model::lb::validate(&services)
    {
        let at = raw.services.first().map_or(0, |s| s.span().start);
        diags.push(pos.at(at, e));
    }
    let mut workloads = Vec::new();
    for w in &raw.workloads {
        if let Some(w) = workload(&pos, w.get_ref(), &mut diags) {
            workloads.push(w);
        }
    }
    if diags.is_empty()
        && let Err(e) = crate::model::sock::validate(&workloads)
    {
        let at = raw.workloads.first().map_or(0, |s| s.span().start);
        diags.push(pos.at(at, e));
    }
    let mut steers = Vec::new();
    for s in &raw.steers {
        if let Some(s) = steer(&pos, s.get_ref(), &mut diags) {
            steers.push(s);
        }
    }
    if diags.is_empty()
        && let Err(e) = crate::model::steer::validate(&steers)
    {
        let at = raw.steers.first().map_or(0, |s| s.span().start);
        diags.push(pos.at(at, e));
    }
    diags.sort_by_key(|d| (d.line, d.column));
    if diags.is_empty() {
        Ok(Config {
            path: path.to_path_buf(),
            agent,
            desired: Desired {
                interfaces,
                policy,
                temp_deny: std::collections::BTreeMap::new(),
                services,
                workloads,
                steers,
            },
            flows,
            ddos,
            lb,
        })
    } else {
        Err(ConfigErrors(diags))
    }
}

/// One `[[workload]]` section, every problem reported at its position.
fn workload(
    pos: &Positions<'_>,
    r: &RawWorkload,
    diags: &mut Vec<Diagnostic>,
) -> Option<crate::model::sock::Workload> {
    use crate::model::sock::{self, RuleKind, SockAction, SockRuleSpec};
    let before = diags.len();
    let name = r.name.get_ref().clone();
    if let Err(e) = sock::check_name(&name) {
        diags.push(pos.span(&r.name, e));
    }
    let cgroup = match sock::normalise_cgroup(r.cgroup.get_ref()) {
        Ok(c) => c,
        Err(e) => {
            diags.push(pos.span(&r.cgroup, e));
            String::new()
        }
    };
    let mut default = |d: &Option<Spanned<String>>| match d {
        None => SockAction::Allow,
        Some(s) => s.get_ref().parse().unwrap_or_else(|e: String| {
            diags.push(pos.span(s, e));
            SockAction::Allow
        }),
    };
    let connect_default = default(&r.connect_default);
    let bind_default = default(&r.bind_default);
    let mut rules = |list: &[Spanned<String>], kind| {
        let mut out = Vec::new();
        for t in list {
            match SockRuleSpec::parse(t.get_ref(), kind) {
                Ok(rule) => out.push(rule),
                Err(e) => diags.push(pos.span(t, e)),
            }
        }
        out
    };
    let connect = rules(&r.connect, RuleKind::Connect);
    let bind = rules(&r.bind, RuleKind::Bind);
    if diags.len() > before {
        return None;
    }
    let w = sock::Workload {
        name,
        cgroup,
        audit: r.audit,
        connect_default,
        bind_default,
        connect,
        bind,
    };
    if let Err(e) = w.validate() {
        diags.push(pos.span(&r.name, e));
        return None;
    }
    Some(w)
}

/// One `[[steer]]` section, every problem reported at its position.
fn steer(
    pos: &Positions<'_>,
    r: &RawSteer,
    diags: &mut Vec<Diagnostic>,
) -> Option<crate::model::steer::Steer> {
    use crate::model::{
        lb::Proto,
        steer::{self, OnMissing, PortRange},
    };
    let before = diags.len();
    let name = r.name.get_ref().clone();
    if let Err(e) = steer::check_name(&name) {
        diags.push(pos.span(&r.name, e));
    }
    let proto = match r.proto.get_ref().as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        other => {
            diags.push(pos.span(
                &r.proto,
                format!("`{other}` is not a protocol (tcp or udp)"),
            ));
            Proto::Tcp
        }
    };
    let mut prefixes = Vec::new();
    for p in r.prefixes.get_ref() {
        match p.get_ref().parse::<ipnet::IpNet>() {
            Ok(n) => prefixes.push(n),
            Err(_) => {
                diags.push(pos.span(p, format!("`{}` is not a prefix (ADDR/LEN)", p.get_ref())))
            }
        }
    }
    if r.prefixes.get_ref().is_empty() {
        diags.push(pos.span(&r.prefixes, "a steer needs at least one prefix"));
    }
    let ports = match &r.ports {
        None => PortRange::ALL,
        Some(p) => {
            let text = match p.get_ref() {
                RawPorts::Int(n) => n.to_string(),
                RawPorts::Text(t) => t.clone(),
            };
            text.parse().unwrap_or_else(|e: String| {
                diags.push(pos.span(p, e));
                PortRange::ALL
            })
        }
    };
    let on_missing = match r.on_missing.as_ref().map(|s| (s, s.get_ref().as_str())) {
        None | Some((_, "drop")) => OnMissing::Drop,
        Some((_, "pass")) => OnMissing::Pass,
        Some((s, other)) => {
            diags.push(pos.span(s, format!("`{other}` is not drop or pass")));
            OnMissing::Drop
        }
    };
    if diags.len() > before {
        return None;
    }
    let s = steer::Steer {
        name,
        proto,
        prefixes,
        ports,
        on_missing,
    };
    if let Err(e) = s.validate() {
        diags.push(pos.span(&r.name, e));
        return None;
    }
    Some(s)
}

/// Reads and parses a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    parse(path, &read(path, crate::files::DEFAULT_FILE_SIZE_LIMIT)?)
}

/// Reads a configuration file's text (a regular file of at most `limit` bytes).
pub fn read(path: &Path, limit: u64) -> Result<String, ConfigErrors> {
    crate::files::read_text(path, limit).map_err(|e| {
        ConfigErrors(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            message: e.without_path(),
        }])
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_config_that_cannot_be_read_is_named_once() {
        let e = super::read(
            std::path::Path::new("/nonexistent/sluice.toml"),
            crate::files::DEFAULT_FILE_SIZE_LIMIT,
        )
        .expect_err("missing");
        assert_eq!(
            e.to_string().lines().last().unwrap_or_default(),
            "/nonexistent/sluice.toml: cannot read: No such file or directory (os error 2)"
        );
        let e = super::read(std::path::Path::new("/"), 1 << 20).expect_err("a directory");
        assert!(
            e.to_string().ends_with(
                "/: is a directory, not a regular file; sluice reads only regular files"
            ),
            "{e}"
        );
    }

    use super::*;

    fn errors(text: &str) -> Vec<(usize, usize, String)> {
        match parse(Path::new("/etc/sluice/test.toml"), text) {
            Ok(_) => Vec::new(),
            Err(ConfigErrors(d)) => d
                .into_iter()
                .map(|d| (d.line, d.column, d.message))
                .collect(),
        }
    }

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sluice.toml");
        let cfg = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.desired.interfaces.len(), 1);
        assert_eq!(cfg.desired.policy.rules.len(), 5);
        assert!(cfg.desired.policy.rules[0].rate.is_some());
        assert_eq!(cfg.desired.policy.deny.len(), 2);
        assert_eq!(cfg.agent, AgentSettings::default());
    }

    #[test]
    fn empty_file_is_the_default_policy() {
        let cfg = parse(Path::new("/x.toml"), "").unwrap();
        assert_eq!(cfg.desired, Desired::default());
    }

    /// Each bad file and where its (every) problem is reported.
    #[test]
    fn bad_files_report_every_problem_with_its_position() {
        // (file text, [(line, column, message fragment)])
        type Expected<'a> = &'a [(usize, usize, &'a str)];
        let table: &[(&str, Expected<'_>)] = &[
            (
                "[deny]\nprefixes = [\"198.18.0.300/24\"]\n",
                &[(2, 13, "invalid prefix '198.18.0.300/24'")],
            ),
            (
                "[deny]\nprefixes = [\"198.18.0.0/24\",\n  \"nonsense\", \"2001:2::/129\"]\n",
                &[
                    (3, 3, "invalid prefix 'nonsense'"),
                    (3, 15, "invalid prefix '2001:2::/129'"),
                ],
            ),
            (
                "[policy]\nrules = [\"drop tcp dport 80\", \"reject udp\"]\n",
                &[(
                    2,
                    31,
                    "expected 'drop', 'pass', 'limit' or 'syn-guard' first",
                )],
            ),
            (
                "[policy]\nrules = [\"drop icmp dport 7\"]\n",
                &[(2, 10, "dport only applies to tcp and udp")],
            ),
            (
                "[policy]\ndefault = \"deny\"\n",
                &[(2, 11, "expected \"pass\" or \"drop\"")],
            ),
            (
                "[policy]\nmalformed = \"maybe\"\ndefault = \"drop\"\n",
                &[(2, 13, "expected \"pass\" or \"drop\"")],
            ),
            (
                "[[interface]]\nname = \"this-name-is-too-long\"\n",
                &[(2, 8, "not a valid interface name")],
            ),
            (
                "[[interface]]\nname = \"eth0\"\nmode = \"turbo\"\n",
                &[(3, 8, "mode must be native, generic or auto")],
            ),
            (
                "[[interface]]\nname = \"eth0\"\n[[interface]]\nname = \"eth0\"\n",
                &[(4, 8, "interface eth0 is listed twice")],
            ),
            (
                "[agent]\nmetrics = \"localhost\"\n",
                &[(2, 11, "not a listen address")],
            ),
            (
                "[agent]\nhistory = 0\n",
                &[(2, 11, "history must be between 1 and 1000")],
            ),
            (
                "[agent]\nstate_dir = \"relative/dir\"\n",
                &[(2, 13, "must be an absolute path")],
            ),
            (
                "[deny]\nfiles = [\"/nonexistent/sluice-deny.txt\"]\n",
                &[(2, 10, "cannot read /nonexistent/sluice-deny.txt")],
            ),
            (
                "[policy]\ndefault = \"pass\"\nbogus = 1\n",
                &[(3, 1, "unknown field `bogus`")],
            ),
            ("[deny\nprefixes = []\n", &[(1, 6, "")]),
            (
                "[[steer]]\nname = \"web\"\nproto = \"sctp\"\nprefixes = [\"198.19.1.0/24\"]\n",
                &[(3, 9, "`sctp` is not a protocol")],
            ),
            (
                "[[steer]]\nname = \"web\"\nproto = \"tcp\"\nprefixes = [\"198.19.1.0/33\"]\nports = \"0\"\non_missing = \"keep\"\n",
                &[
                    (4, 13, "is not a prefix"),
                    (5, 9, "is not a port range"),
                    (6, 14, "not drop or pass"),
                ],
            ),
            (
                "[[steer]]\nname = \"a\"\nproto = \"udp\"\nprefixes = [\"198.19.1.0/24\"]\nports = 53\n\n\
                 [[steer]]\nname = \"b\"\nproto = \"udp\"\nprefixes = [\"198.19.1.0/24\"]\nports = \"50-60\"\n",
                &[(1, 1, "steers a and b both claim udp 198.19.1.0/24")],
            ),
            ("[policy]\nrules = \"drop udp\"\n", &[(2, 9, "")]),
        ];
        for (text, want) in table {
            let got = errors(text);
            assert_eq!(got.len(), want.len(), "file:\n{text}\ngot: {got:?}");
            for ((gl, gc, gm), (wl, wc, wm)) in got.iter().zip(want.iter()) {
                assert_eq!((gl, gc), (wl, wc), "file:\n{text}\nmessage: {gm}");
                assert!(
                    gm.contains(wm),
                    "file:\n{text}\n{gm:?} should contain {wm:?}"
                );
            }
        }
    }

    #[test]
    fn prefix_files_are_read_relative_to_the_config_with_line_numbers() {
        let dir = std::env::temp_dir().join(format!("sluice-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("deny.txt"),
            "# blocklist\n198.18.5.0/24\n\n2001:2:0:5::/64 # comment\n",
        )
        .unwrap();
        std::fs::write(dir.join("bad.txt"), "198.18.5.0/24\nnot-a-prefix\n").unwrap();
        let cfg = parse(&dir.join("sluice.toml"), "[deny]\nfiles = [\"deny.txt\"]\n").unwrap();
        assert_eq!(cfg.desired.policy.deny.len(), 2);
        let err = parse(&dir.join("sluice.toml"), "[deny]\nfiles = [\"bad.txt\"]\n").unwrap_err();
        assert!(err.0[0].message.contains("bad.txt:2"), "{}", err.0[0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ddos_table_has_defaults_and_reports_bad_values() {
        let cfg = parse(Path::new("/x.toml"), "").unwrap();
        assert_eq!(cfg.ddos, DdosSettings::default());
        let cfg = parse(
            Path::new("/x.toml"),
            "[ddos]\nnew_sources_per_second = 50\nverified_ttl = \"10m\"\n",
        )
        .unwrap();
        assert_eq!(cfg.ddos.new_sources_per_second, 50);
        assert_eq!(cfg.ddos.new_sources_burst, 50);
        assert_eq!(cfg.ddos.verified_ttl_secs, 600);
        let k = cfg.ddos.to_kernel();
        assert_eq!(k.new_source_interval_ns, 20_000_000);
        assert_eq!(k.new_source_tolerance_ns, 49 * 20_000_000);
        let got = errors(
            "[ddos]\nnew_sources_per_second = -1\nnew_sources_burst = 0\nverified_ttl = \"5ms\"\n",
        );
        let lines: Vec<usize> = got.iter().map(|(l, _, _)| *l).collect();
        assert_eq!(lines, [2, 3, 4], "{got:?}");
        assert!(got[2].2.contains("verified_ttl"), "{got:?}");
        assert!(!errors("[ddos]\nbogus = 1\n").is_empty());
    }

    #[test]
    fn flows_table_has_defaults_and_reports_bad_values() {
        let cfg = parse(Path::new("/x.toml"), "").unwrap();
        assert_eq!(cfg.flows, FlowSettings::default());
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sluice.toml");
        let example = load(&example).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            example.flows,
            FlowSettings::default(),
            "the example shows the defaults"
        );
        assert_eq!(cfg.flows.to_kernel().sample, [100, 1, 1, 0]);
        let cfg = parse(
            Path::new("/x.toml"),
            "[flows]\nsample_pass = 1\nsample_drop = 0\nrate_cap = 500\n",
        )
        .unwrap();
        assert_eq!(
            cfg.flows,
            FlowSettings {
                sample_pass: 1,
                sample_drop: 0,
                sample_audit: 1,
                rate_cap: 500,
                burst: 50,
            }
        );
        let k = cfg.flows.to_kernel();
        assert_eq!(
            (k.cap_interval_ns, k.cap_tolerance_ns),
            (2_000_000, 98_000_000)
        );
        let off = parse(Path::new("/x.toml"), "[flows]\nrate_cap = 0\nburst = 7\n").unwrap();
        assert_eq!(
            (off.flows.to_kernel().cap_interval_ns, off.flows.burst),
            (0, 7)
        );
        assert_eq!(
            errors(
                "[flows]\nsample_pass = -1\nsample_drop = 5000000000\nrate_cap = -5\nburst = 0\nnope = 1\n"
            )
            .len(),
            1,
            "an unknown key is a parse error of its own"
        );
        let got = errors(
            "[flows]\nsample_pass = -1\nsample_drop = 5000000000\nrate_cap = -5\nburst = 0\n",
        );
        let want = [
            (2, 15, "sample_pass must be 0 (no records)"),
            (3, 15, "sample_drop must be 0 (no records)"),
            (4, 12, "rate_cap must be between 0 (no cap)"),
            (5, 9, "burst must be between 1"),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for ((gl, gc, gm), (wl, wc, wm)) in got.iter().zip(want) {
            assert_eq!((*gl, *gc), (wl, wc), "{gm}");
            assert!(gm.contains(wm), "{gm:?} should contain {wm:?}");
        }
    }

    #[test]
    fn services_parse_with_backends_weights_and_health() {
        let text = r#"
[lb]
conn_tcp_idle = "10m"
new_connections_per_second = 5000
connections = 4096

[[service]]
vip = "198.18.0.10:80/tcp"
backends = ["198.18.1.2:8080", { addr = "198.18.1.3:8080", weight = 3, drain = true }]
health = { check = "http", path = "/healthz", expect = 204, interval = "500ms", timeout = "200ms", rise = 1, fall = 4 }

[[service]]
vip = "[2001:2::10]:*/udp"
mode = "dsr"
backends = ["2001:2::5"]
"#;
        let cfg = parse(Path::new("/etc/sluice/t.toml"), text).expect("valid");
        assert_eq!(cfg.lb.tcp_idle_secs, 600);
        assert_eq!(cfg.lb.new_connections_per_second, 5000);
        assert_eq!(cfg.lb.connections, 4096);
        let s = &cfg.desired.services;
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].spec.id.to_string(), "198.18.0.10:80/tcp");
        assert_eq!(s[0].spec.backends[1].weight, 3);
        assert!(s[0].spec.backends[1].draining);
        let h = s[0].health.as_ref().expect("health");
        assert_eq!(
            (
                h.path.as_str(),
                h.expect,
                h.interval_ms,
                h.timeout_ms,
                h.rise,
                h.fall
            ),
            ("/healthz", 204, 500, 200, 1, 4)
        );
        assert_eq!(s[1].spec.mode, crate::model::lb::Mode::Dsr);
        assert_eq!(s[1].spec.id.port, 0);
    }

    #[test]
    fn bad_services_are_reported_with_their_positions() {
        let cases = [
            ("[[service]]\nvip = \"198.18.0.10\"\n", "is not a service"),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nmode = \"tunnel\"\n",
                "mode must be nat, dsr or vxlan",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nmode = \"vxlan\"\n",
                "needs a vni",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nvni = 5\n",
                "vni goes with",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nmode = \"vxlan\"\nvni = 16777216\n",
                "vni must be",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nmode = \"vxlan\"\nvni = 7\nbackends = [\"2001:2::5\"]\n",
                "reached over IPv4",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nbackends = [\"host:80\"]\n",
                "is not a backend",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nbackends = [{ addr = \"198.18.1.2\", weight = 0 }]\n",
                "weight must be 1 to",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nhealth = { check = \"icmp\" }\n",
                "health check must be tcp or http",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nhealth = { check = \"tcp\", netns = \"a/b\" }\n",
                "netns \"a/b\" is not a network namespace name",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nbackends = [\"2001:2::5\"]\n",
                "is IPv6, the VIP is IPv4",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nbackends = [\"198.18.1.2:81\"]\n[[service]]\nvip = \"198.18.0.11:80\"\nbackends = [\"198.18.1.2:81\"]\n",
                "is behind two NAT services",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nmode = \"dsr\"\nbackends = [\"198.18.1.2:81\"]\n",
                "DSR backend keeps the client's destination port",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\n[[service]]\nvip = \"198.18.0.10:80\"\n",
                "defined twice",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:*\"\nbackends = [\"198.18.1.2\"]\nhealth = { check = \"tcp\" }\n",
                "give the check a port",
            ),
            (
                "[[service]]\nvip = \"198.18.0.10:80\"\nhealth = { check = \"tcp\", interval = \"1s\", timeout = \"2s\" }\n",
                "health check",
            ),
            (
                "[lb]\nconn_tcp_idle = \"0s\"\n",
                "conn_tcp_idle must be whole seconds",
            ),
            ("[lb]\nconnections = 10\n", "connections must be between"),
        ];
        for (text, want) in cases {
            let got = errors(text);
            assert_eq!(got.len(), 1, "{text}: {got:?}");
            assert!(
                got[0].2.contains(want),
                "{text}: {:?} should contain {want:?}",
                got[0].2
            );
            assert!(got[0].0 >= 1, "{text}: no position");
        }
    }
}
