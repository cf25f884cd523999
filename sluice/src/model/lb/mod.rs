//! The L4 load balancer's user-space model: services (VIP, protocol, port,
//! mode) and their backends as the user writes them, and Maglev tables.

pub mod health;
pub mod maglev;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use sluice_common::lb::{MAX_BACKENDS, MAX_SERVICES};

use serde::{Deserialize, Serialize};

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// How packets reach a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Destination rewritten to the backend; replies translated back to the
    /// VIP on the way out. Backends route their replies through this host.
    #[default]
    Nat,
    /// Direct server return on one L2 segment: only the destination MAC
    /// changes; the backend holds the VIP (e.g. on `lo`) and answers the
    /// client itself.
    Dsr,
    /// Direct server return through a VXLAN tunnel (outer IPv4, UDP 4789):
    /// backends anywhere routable, each with a VXLAN device for `vni`, the
    /// VIP, and a route back to clients that does not need this host.
    Vxlan { vni: u32 },
}

/// Largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

impl Mode {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Dsr => "dsr",
            Self::Vxlan { .. } => "vxlan",
        }
    }
}

/// What identifies a service: `VIP:PORT/PROTO` (`PORT` `*` = every port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceId {
    pub vip: IpAddr,
    /// 0 = every port.
    pub port: u16,
    pub proto: Proto,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "{text:?} is not a service: expected VIP:PORT[/tcp|/udp], e.g. 198.18.0.10:80/tcp, \
         [2001:2::10]:443, or VIP:* for every port"
    )]
    Service { text: String },
    #[error(
        "{text:?} is not a backend: expected ADDR[:PORT], e.g. 198.18.1.2:8080 or [2001:2::5]:80"
    )]
    Backend { text: String },
    #[error("unknown protocol {text:?}: a service is tcp or udp")]
    Proto { text: String },
}

/// Splits `ADDR:PORT`, `[V6]:PORT`, `ADDR` or `[V6]`; `*` as port = 0.
fn split_addr_port(s: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, tail) = rest.split_once(']')?;
        let addr: IpAddr = addr.parse().ok()?;
        if !addr.is_ipv6() {
            return None;
        }
        return match tail {
            "" => Some((addr, None)),
            t => Some((addr, Some(parse_port(t.strip_prefix(':')?)?))),
        };
    }
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Some((addr, None));
    }
    let (addr, port) = s.rsplit_once(':')?;
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    Some((IpAddr::V4(addr), Some(parse_port(port)?)))
}

fn parse_port(s: &str) -> Option<u16> {
    if s == "*" {
        return Some(0);
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(p) => Some(p),
    }
}

impl FromStr for Proto {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(ParseError::Proto { text: s.into() }),
        }
    }
}

impl FromStr for ServiceId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = || ParseError::Service { text: s.into() };
        let (addr, proto) = match s.rsplit_once('/') {
            Some((a, p)) => (a, p.parse::<Proto>()?),
            None => (s, Proto::Tcp),
        };
        let (vip, port) = split_addr_port(addr).ok_or_else(bad)?;
        let port = port.ok_or_else(bad)?;
        Ok(Self { vip, port, proto })
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = if self.port == 0 {
            "*".to_string()
        } else {
            self.port.to_string()
        };
        match self.vip {
            IpAddr::V4(a) => write!(f, "{a}:{port}/{}", self.proto.name()),
            IpAddr::V6(a) => write!(f, "[{a}]:{port}/{}", self.proto.name()),
        }
    }
}

/// A backend's address: `ADDR[:PORT]` (no port = the port the client used).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendAddr {
    pub addr: IpAddr,
    /// 0 = the packet's own destination port.
    pub port: u16,
}

impl FromStr for BackendAddr {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (addr, port) =
            split_addr_port(s).ok_or_else(|| ParseError::Backend { text: s.into() })?;
        Ok(Self {
            addr,
            port: port.unwrap_or(0),
        })
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.addr, self.port) {
            (IpAddr::V4(a), 0) => write!(f, "{a}"),
            (IpAddr::V6(a), 0) => write!(f, "[{a}]"),
            (IpAddr::V4(a), p) => write!(f, "{a}:{p}"),
            (IpAddr::V6(a), p) => write!(f, "[{a}]:{p}"),
        }
    }
}

/// A backend as desired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub addr: BackendAddr,
    pub weight: u32,
    /// No new connections; existing ones finish.
    #[serde(default)]
    pub draining: bool,
}

/// A service as desired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub id: ServiceId,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
}

/// How the agent checks a service's backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConf {
    /// `tcp` (connect) or `http` (GET `path`, expect `expect`).
    pub check: CheckKind,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_expect")]
    pub expect: u16,
    /// Port to check; default: the backend's port, else the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Network namespace (a name under /run/netns) to probe from; default:
    /// the namespace of the interfaces the agent balances on, when they
    /// share one, else the agent's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Tcp,
    Http,
}

fn default_path() -> String {
    "/".into()
}

const fn default_expect() -> u16 {
    200
}

impl HealthConf {
    /// Defaults: every 2 s, 1 s timeout, up after 2 passes, down after 3 failures.
    pub fn new(check: CheckKind) -> Self {
        Self {
            check,
            path: default_path(),
            expect: default_expect(),
            port: None,
            netns: None,
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
        }
    }

    pub fn to_spec(&self) -> self::health::CheckSpec {
        self::health::CheckSpec {
            probe: match self.check {
                CheckKind::Tcp => self::health::Probe::Tcp,
                CheckKind::Http => self::health::Probe::Http {
                    path: self.path.clone(),
                    expect_status: self.expect,
                    host: None,
                },
            },
            interval: std::time::Duration::from_millis(self.interval_ms),
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            rise: self.rise,
            fall: self.fall,
            netns: self.netns.clone(),
        }
    }

    /// Checks the settings (and that a port to check is known), with the
    /// config file's limits, so that whatever is accepted exports to a
    /// file `check` takes.
    pub fn validate(&self, service: &ServiceSpec) -> Result<(), String> {
        self.to_spec()
            .validate()
            .map_err(|e| format!("service {}: health check: {e}", service.id))?;
        let bad = |what: String| Err(format!("service {}: health check: {what}", service.id));
        if self.port == Some(0) {
            return bad("port must be 1 to 65535, found 0".into());
        }
        for (name, v) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&v) {
                return bad(format!("{name} must be 1 to 100, found {v}"));
            }
        }
        for (name, v) in [("interval", self.interval_ms), ("timeout", self.timeout_ms)] {
            if !(1..=3_600_000).contains(&v) {
                return bad(format!("{name} must be a duration up to 1h, found {v} ms"));
            }
        }
        if let Some(n) = &self.netns
            && (n.is_empty() || n.contains('/') || n == "." || n == "..")
        {
            return bad(format!("netns {n:?} is not a network namespace name"));
        }
        if self.port.is_none()
            && service.id.port == 0
            && let Some(b) = service.backends.iter().find(|b| b.addr.port == 0)
        {
            return Err(format!(
                "service {}: health check: backend {} has no port to check \
                 (a whole-VIP service): give the check a port",
                service.id, b.addr
            ));
        }
        Ok(())
    }

    /// Where the check for `backend` of `service` connects.
    pub fn target(&self, service: &ServiceId, backend: &BackendAddr) -> std::net::SocketAddr {
        let port = self.port.unwrap_or(if backend.port != 0 {
            backend.port
        } else {
            service.port
        });
        std::net::SocketAddr::new(backend.addr, port)
    }
}

/// A service the agent owns: the dataplane's part and the agent's health check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbService {
    #[serde(flatten)]
    pub spec: ServiceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConf>,
    /// Local clients' connect()/sendmsg() to the service are given a
    /// backend at the socket (the socket LB, when it is on: `[lb] socket`);
    /// false leaves them to the packet LB.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub socket: bool,
}

fn yes() -> bool {
    true
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if signature"
)]
fn is_true(b: &bool) -> bool {
    *b
}

/// A change to the services (`sluice lb ...`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LbOp {
    ServiceAdd {
        service: LbService,
    },
    ServiceDel {
        id: ServiceId,
    },
    BackendAdd {
        service: ServiceId,
        backend: BackendSpec,
    },
    BackendDel {
        service: ServiceId,
        backend: BackendAddr,
    },
    /// Changes a service's settings (the socket LB for it on or off).
    ServiceSet {
        id: ServiceId,
        socket: bool,
    },
    /// Changes a backend's weight and/or drain state.
    BackendSet {
        service: ServiceId,
        backend: BackendAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        draining: Option<bool>,
    },
}

impl LbOp {
    /// Applies the change. `strict` (a new request) refuses changes that do
    /// not fit (a service that exists already, a backend that is absent);
    /// replaying onto a new base skips them.
    pub fn apply(&self, services: &mut Vec<LbService>, strict: bool) -> Result<(), String> {
        let find = |services: &mut Vec<LbService>, id: &ServiceId| {
            services.iter().position(|s| s.spec.id == *id)
        };
        // The backends of a service the change names; `None`: no such
        // service, which only a strict change refuses.
        fn backends_of<'a>(
            services: &'a mut [LbService],
            id: &ServiceId,
            strict: bool,
        ) -> Result<Option<&'a mut Vec<BackendSpec>>, String> {
            match services.iter().position(|s| s.spec.id == *id) {
                Some(i) => Ok(Some(&mut services[i].spec.backends)),
                None if strict => Err(format!("no service {id}")),
                None => Ok(None),
            }
        }
        // Where a backend the change names stands; `None`: absent, which
        // only a strict change refuses.
        fn backend_at(
            list: &[BackendSpec],
            service: &ServiceId,
            backend: &BackendAddr,
            strict: bool,
        ) -> Result<Option<usize>, String> {
            match list.iter().position(|b| b.addr == *backend) {
                Some(j) => Ok(Some(j)),
                None if strict => Err(format!("service {service} has no backend {backend}")),
                None => Ok(None),
            }
        }
        match self {
            Self::ServiceAdd { service } => match find(services, &service.spec.id) {
                Some(_) if strict => {
                    return Err(format!(
                        "service {} exists already (change its backends with `sluice lb backend ...`, \
                         or delete it first)",
                        service.spec.id
                    ));
                }
                Some(i) => services[i] = service.clone(),
                None => services.push(service.clone()),
            },
            Self::ServiceDel { id } => match find(services, id) {
                Some(i) => {
                    services.remove(i);
                }
                None if strict => return Err(format!("no service {id}")),
                None => {}
            },
            Self::ServiceSet { id, socket } => match find(services, id) {
                Some(i) => services[i].socket = *socket,
                None if strict => return Err(format!("no service {id}")),
                None => {}
            },
            Self::BackendAdd { service, backend } => {
                let Some(list) = backends_of(services, service, strict)? else {
                    return Ok(());
                };
                match list.iter().position(|b| b.addr == backend.addr) {
                    Some(_) if strict => {
                        return Err(format!(
                            "service {service} has backend {} already (change its weight with \
                             `sluice lb backend weight`)",
                            backend.addr
                        ));
                    }
                    Some(j) => list[j] = backend.clone(),
                    None => list.push(backend.clone()),
                }
            }
            Self::BackendDel { service, backend } => {
                let Some(list) = backends_of(services, service, strict)? else {
                    return Ok(());
                };
                if let Some(j) = backend_at(list, service, backend, strict)? {
                    list.remove(j);
                }
            }
            Self::BackendSet {
                service,
                backend,
                weight,
                draining,
            } => {
                let Some(list) = backends_of(services, service, strict)? else {
                    return Ok(());
                };
                if let Some(j) = backend_at(list, service, backend, strict)? {
                    let b = &mut list[j];
                    if let Some(w) = weight {
                        b.weight = *w;
                    }
                    if let Some(d) = draining {
                        b.draining = *d;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        match self {
            Self::ServiceAdd { service } => format!(
                "lb service add {} ({}, {} backends)",
                service.spec.id,
                service.spec.mode.name(),
                service.spec.backends.len()
            ),
            Self::ServiceDel { id } => format!("lb service del {id}"),
            Self::ServiceSet { id, socket } => format!(
                "lb service set {id} socket {}",
                if *socket { "on" } else { "off" }
            ),
            Self::BackendAdd { service, backend } => format!(
                "lb backend add {service} {} weight {}",
                backend.addr, backend.weight
            ),
            Self::BackendDel { service, backend } => format!("lb backend del {service} {backend}"),
            Self::BackendSet {
                service,
                backend,
                weight,
                draining,
            } => {
                let mut parts = Vec::new();
                if let Some(w) = weight {
                    parts.push(format!("weight {w}"));
                }
                match draining {
                    Some(true) => parts.push("drain".into()),
                    Some(false) => parts.push("undrain".into()),
                    None => {}
                }
                format!("lb backend {service} {backend} {}", parts.join(", "))
            }
        }
    }
}

/// Checks services as a whole: what the dataplane can hold and translate,
/// weights, health settings.
pub fn validate(services: &[LbService]) -> Result<(), String> {
    let specs: Vec<ServiceSpec> = services.iter().map(|s| s.spec.clone()).collect();
    let mut seen = std::collections::HashSet::new();
    for s in services {
        if !seen.insert(s.spec.id) {
            return Err(format!("service {} is defined twice", s.spec.id));
        }
        for b in &s.spec.backends {
            if !(1..=MAX_WEIGHT).contains(&b.weight) {
                return Err(format!(
                    "service {}: backend {} weight {} is out of range (1 to {MAX_WEIGHT}; \
                     drain a backend to take it out)",
                    s.spec.id, b.addr, b.weight
                ));
            }
        }
        if let Some(h) = &s.health {
            h.validate(&s.spec)?;
        }
    }
    validate_specs(&specs).map_err(|e| e.to_string())
}

/// A set of services the kernel cannot hold or NAT cannot translate back.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("too many services: sluice holds at most {max}")]
    TooManyServices { max: u32 },
    #[error("too many backends: sluice holds at most {max} (service members, all services)")]
    TooManyBackends { max: u32 },
    #[error(
        "service {service}: backend {backend} is IPv{backend_family}, the VIP is IPv{vip_family}"
    )]
    FamilyMismatch {
        service: ServiceId,
        backend: BackendAddr,
        vip_family: u8,
        backend_family: u8,
    },
    #[error("service {service}: VNI {vni} is out of range (0 to 16777215)")]
    Vni { service: ServiceId, vni: u32 },
    #[error("service {service}: VXLAN backends are reached over IPv4; {backend} is IPv6")]
    VxlanFamily {
        service: ServiceId,
        backend: BackendAddr,
    },
    #[error(
        "service {service}: a DSR backend keeps the client's destination port; \
         {backend} names another port"
    )]
    DsrPort {
        service: ServiceId,
        backend: BackendAddr,
    },
    #[error(
        "service {service}: backend {backend} needs a port only when the service has one \
         (whole-VIP NAT services keep the client's port)"
    )]
    WildcardPort {
        service: ServiceId,
        backend: BackendAddr,
    },
    #[error(
        "backend {backend} ({proto}) is behind two NAT services, {first} and {second}: its replies \
         could not be translated back to one VIP; give each service its own backend port"
    )]
    ReverseConflict {
        backend: BackendAddr,
        proto: &'static str,
        first: ServiceId,
        second: ServiceId,
    },
    #[error("service {service} lists backend {backend} twice")]
    DuplicateBackend {
        service: ServiceId,
        backend: BackendAddr,
    },
}

fn family(a: IpAddr) -> u8 {
    sluice_common::Family::of(&a).version()
}

/// Checks a desired set of services against what the kernel can hold and
/// what NAT can translate back. Nothing is written.
pub fn validate_specs(services: &[ServiceSpec]) -> Result<(), LbError> {
    if services.len() > MAX_SERVICES as usize {
        return Err(LbError::TooManyServices { max: MAX_SERVICES });
    }
    let members: usize = services.iter().map(|s| s.backends.len()).sum();
    if members > MAX_BACKENDS as usize {
        return Err(LbError::TooManyBackends { max: MAX_BACKENDS });
    }
    let mut reverse: HashMap<(BackendAddr, Proto), ServiceId> = HashMap::new();
    for s in services {
        if let Mode::Vxlan { vni } = s.mode
            && vni > MAX_VNI
        {
            return Err(LbError::Vni { service: s.id, vni });
        }
        let mut seen = HashSet::new();
        for b in &s.backends {
            if !seen.insert(b.addr) {
                return Err(LbError::DuplicateBackend {
                    service: s.id,
                    backend: b.addr,
                });
            }
            if let Mode::Vxlan { .. } = s.mode {
                if !b.addr.addr.is_ipv4() {
                    return Err(LbError::VxlanFamily {
                        service: s.id,
                        backend: b.addr,
                    });
                }
            } else if family(b.addr.addr) != family(s.id.vip) {
                return Err(LbError::FamilyMismatch {
                    service: s.id,
                    backend: b.addr,
                    vip_family: family(s.id.vip),
                    backend_family: family(b.addr.addr),
                });
            }
            if s.id.port == 0 && b.addr.port != 0 {
                return Err(LbError::WildcardPort {
                    service: s.id,
                    backend: b.addr,
                });
            }
            if s.mode != Mode::Nat && b.addr.port != 0 && b.addr.port != s.id.port {
                return Err(LbError::DsrPort {
                    service: s.id,
                    backend: b.addr,
                });
            }
            if s.mode == Mode::Nat {
                let reply = BackendAddr {
                    addr: b.addr.addr,
                    port: if b.addr.port == 0 {
                        s.id.port
                    } else {
                        b.addr.port
                    },
                };
                if let Some(first) = reverse.insert((reply, s.id.proto), s.id)
                    && first != s.id
                {
                    return Err(LbError::ReverseConflict {
                        backend: reply,
                        proto: s.id.proto.name(),
                        first,
                        second: s.id,
                    });
                }
            }
        }
    }
    Ok(())
}

/// One backend of one service: what health checks and drains are kept by.
pub type MemberKey = (ServiceId, BackendAddr);

/// Default backend weight.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest weight accepted (keeps Maglev's credit arithmetic small).
pub const MAX_WEIGHT: u32 = 10_000;

#[cfg(test)]
mod tests {

    #[test]
    fn health_settings_are_held_to_the_config_files_limits() {
        let spec = ServiceSpec {
            id: "198.19.0.10:80".parse().unwrap(),
            mode: Mode::Nat,
            backends: Vec::new(),
        };
        let ok = HealthConf::new(CheckKind::Tcp);
        assert!(ok.validate(&spec).is_ok());
        for (bad, want) in [
            (
                HealthConf {
                    port: Some(0),
                    ..ok.clone()
                },
                "port must be 1 to 65535",
            ),
            (
                HealthConf {
                    rise: 200,
                    ..ok.clone()
                },
                "rise must be 1 to 100",
            ),
            (
                HealthConf {
                    interval_ms: 7_200_000,
                    timeout_ms: 1000,
                    ..ok.clone()
                },
                "interval must be a duration up to 1h",
            ),
            (
                HealthConf {
                    netns: Some("a/b".into()),
                    ..ok.clone()
                },
                "is not a network namespace name",
            ),
            (
                HealthConf {
                    netns: Some("..".into()),
                    ..ok.clone()
                },
                "is not a network namespace name",
            ),
        ] {
            let e = bad.validate(&spec).expect_err(want);
            assert!(e.contains(want), "{e}");
        }
    }

    use super::*;

    #[test]
    fn service_ids_parse_and_print() {
        let s: ServiceId = "198.18.0.10:80/tcp".parse().unwrap();
        assert_eq!(s.to_string(), "198.18.0.10:80/tcp");
        let s: ServiceId = "198.18.0.10:53/udp".parse().unwrap();
        assert_eq!(s.proto, Proto::Udp);
        let s: ServiceId = "[2001:2::10]:443".parse().unwrap();
        assert_eq!(s.to_string(), "[2001:2::10]:443/tcp");
        let s: ServiceId = "198.18.0.10:*/udp".parse().unwrap();
        assert_eq!(s.port, 0);
        for bad in [
            "198.18.0.10",
            "198.18.0.10:0",
            "198.18.0.10:99999",
            "2001:2::10:80",
            "[198.18.0.1]:80",
            "198.18.0.10:80/sctp",
            "web:80",
        ] {
            assert!(bad.parse::<ServiceId>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn backend_addrs_parse_and_print() {
        let b: BackendAddr = "198.18.1.2:8080".parse().unwrap();
        assert_eq!((b.port, b.to_string().as_str()), (8080, "198.18.1.2:8080"));
        let b: BackendAddr = "2001:2::5".parse().unwrap();
        assert_eq!((b.port, b.to_string().as_str()), (0, "[2001:2::5]"));
        let b: BackendAddr = "[2001:2::5]:80".parse().unwrap();
        assert_eq!(b.port, 80);
        assert!("198.18.1.2:x".parse::<BackendAddr>().is_err());
        assert!("host:80".parse::<BackendAddr>().is_err());
    }

    fn service(id: &str, backends: &[&str]) -> LbService {
        LbService {
            socket: true,
            spec: ServiceSpec {
                id: id.parse().unwrap(),
                mode: Mode::Nat,
                backends: backends
                    .iter()
                    .map(|b| BackendSpec {
                        addr: b.parse().unwrap(),
                        weight: 1,
                        draining: false,
                    })
                    .collect(),
            },
            health: None,
        }
    }

    #[test]
    fn changes_apply_and_refuse_what_does_not_fit() {
        let id: ServiceId = "198.18.0.10:80/tcp".parse().unwrap();
        let b: BackendAddr = "198.18.1.2:8080".parse().unwrap();
        let mut all = vec![service("198.18.0.10:80/tcp", &["198.18.1.2:8080"])];
        let add_again = LbOp::ServiceAdd {
            service: service("198.18.0.10:80/tcp", &[]),
        };
        assert!(
            add_again
                .apply(&mut all, true)
                .unwrap_err()
                .contains("exists already")
        );
        // Replayed (not strict): replaces.
        add_again.apply(&mut all, false).unwrap();
        assert!(all[0].spec.backends.is_empty());
        let add = LbOp::BackendAdd {
            service: id,
            backend: BackendSpec {
                addr: b,
                weight: 2,
                draining: false,
            },
        };
        add.apply(&mut all, true).unwrap();
        assert!(add.apply(&mut all, true).unwrap_err().contains("already"));
        LbOp::BackendSet {
            service: id,
            backend: b,
            weight: Some(5),
            draining: Some(true),
        }
        .apply(&mut all, true)
        .unwrap();
        assert_eq!(
            (
                all[0].spec.backends[0].weight,
                all[0].spec.backends[0].draining
            ),
            (5, true)
        );
        let other: BackendAddr = "198.18.1.9".parse().unwrap();
        for op in [
            LbOp::BackendDel {
                service: id,
                backend: other,
            },
            LbOp::BackendSet {
                service: id,
                backend: other,
                weight: Some(1),
                draining: None,
            },
        ] {
            assert!(
                op.apply(&mut all, true)
                    .unwrap_err()
                    .contains("has no backend"),
                "{op:?}"
            );
            op.apply(&mut all, false).unwrap();
        }
        let gone: ServiceId = "198.18.0.11:80/tcp".parse().unwrap();
        assert!(
            LbOp::ServiceDel { id: gone }
                .apply(&mut all, true)
                .unwrap_err()
                .contains("no service")
        );
        LbOp::ServiceDel { id }.apply(&mut all, true).unwrap();
        assert!(all.is_empty());
    }

    #[test]
    fn validation_names_the_problem() {
        let mut s = service("198.18.0.10:80/tcp", &["198.18.1.2:8080"]);
        s.spec.backends[0].weight = MAX_WEIGHT + 1;
        assert!(validate(&[s]).unwrap_err().contains("weight"));
        let a = service("198.18.0.10:80/tcp", &["198.18.1.2:8080"]);
        assert!(
            validate(&[a.clone(), a])
                .unwrap_err()
                .contains("defined twice")
        );
    }
}
