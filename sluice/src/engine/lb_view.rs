//! The load balancer as `sluice lb list` and `GET /v1/lb` show it: the
//! kernel's services with counters, active connections and health.

use crate::model::lb::MemberKey;

/// The namespace probes run in when a service names none: that of the
/// interfaces the agent balances on, when they all share one (the backends
/// are reached from there), else the agent's own.
pub fn default_probe_netns(interfaces: &[crate::model::policy::Interface]) -> Option<String> {
    let mut names = interfaces.iter().map(|i| i.netns.clone());
    let first = names.next()?;
    names.all(|n| n == first).then_some(first).flatten()
}

/// One backend of a service as `sluice lb list` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BackendRow {
    pub backend: String,
    pub weight: u32,
    /// `active`, `draining` (no new connections) or `down` (health checks).
    pub state: String,
    /// `up`, `down`, or `unchecked` (the service has no health check).
    pub health: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_error: Option<String>,
    /// Maglev table slots it holds (of 65,537).
    pub table_slots: usize,
    pub packets: u64,
    pub bytes: u64,
    /// Connections balanced to it.
    pub connections: u64,
    /// Open connections in the connection table (no FIN/RST, not idle).
    pub active: u64,
    /// Sockets the socket LB gave it (local clients).
    #[serde(default)]
    pub sockets: u64,
}

/// One service as `sluice lb list` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ServiceRow {
    pub service: String,
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    /// Local clients get a backend at the socket (when the socket LB is on).
    #[serde(default)]
    pub socket: bool,
    pub backends: Vec<BackendRow>,
}

/// What `GET /v1/lb` returns.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LbView {
    pub services: Vec<ServiceRow>,
    /// LB event counters (`conns_created`, `to_stack`, ...).
    pub events: Vec<(String, u64)>,
    /// Connection-table entries walked to count active connections.
    pub connection_entries: u64,
    /// The connection table's capacity.
    #[serde(default)]
    pub connection_capacity: u32,
    /// The socket LB (local clients balanced at connect()/sendmsg()).
    #[serde(default)]
    pub socket: super::sock_lb::SockLbState,
}

pub(crate) fn describe_check(
    h: &crate::model::lb::HealthConf,
    default_netns: Option<&str>,
) -> String {
    let what = match h.check {
        crate::model::lb::CheckKind::Tcp => "tcp".to_string(),
        crate::model::lb::CheckKind::Http => format!("http GET {} expect {}", h.path, h.expect),
    };
    format!(
        "{what} every {}ms timeout {}ms rise {} fall {}{}",
        h.interval_ms,
        h.timeout_ms,
        h.rise,
        h.fall,
        h.port.map(|p| format!(" port {p}")).unwrap_or_default()
    ) + &h
        .netns
        .as_deref()
        .or(default_netns)
        .map(|n| format!(" from netns {n}"))
        .unwrap_or_default()
}

/// The services as the kernel holds them, with counters, active
/// connections and (given the agent's services and its checker's last
/// errors) health;
/// `probe_netns`: where probes run when a service names no namespace.
pub fn view(
    root: &crate::dataplane::PinRoot,
    services: Option<&[crate::model::lb::LbService]>,
    last_error: &dyn Fn(&MemberKey) -> Option<String>,
    probe_netns: Option<&str>,
    walk_active: bool,
) -> Result<LbView, crate::dataplane::DataplaneError> {
    use crate::dataplane::lb as maps;
    let state = super::lb::read(root)?;
    let svc_counters = maps::service_counters(root, state.iter().map(|s| s.slot))?;
    let be_counters = maps::backend_counters(
        root,
        state.iter().flat_map(|s| s.members.iter().map(|m| m.slot)),
    )?;
    // Counting open connections walks the whole connection table (about a
    // second at 1M entries): skipped for views refreshed often (`top`).
    let (active, walked) = if walk_active {
        maps::active_connections(root)?
    } else {
        Default::default()
    };
    let sock_loaded = crate::dataplane::sock::is_loaded(root);
    let sockets = if sock_loaded {
        crate::dataplane::sock_lb::backend_sockets(
            root,
            state.iter().flat_map(|s| s.members.iter().map(|m| m.slot)),
        )?
    } else {
        Default::default()
    };
    let off = if sock_loaded {
        crate::dataplane::sock_lb::off(root)?
    } else {
        Default::default()
    };
    let mut out = LbView {
        events: maps::stats(root)?
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect(),
        connection_entries: walked,
        connection_capacity: maps::pinned_conn_capacity(root)?,
        socket: super::sock_lb::read(root),
        ..LbView::default()
    };
    for s in state {
        let conf = services.and_then(|all| all.iter().find(|x| x.spec.id == s.id));
        let check = conf.and_then(|c| c.health.as_ref());
        let c = svc_counters.get(&s.slot).copied().unwrap_or_default();
        let backends = s
            .members
            .iter()
            .map(|m| {
                let bc = be_counters.get(&m.slot).copied().unwrap_or_default();
                let health = match (check, m.down) {
                    (_, true) => "down",
                    (Some(_), false) => "up",
                    (None, false) => "unchecked",
                };
                BackendRow {
                    backend: m.backend.to_string(),
                    weight: m.weight,
                    state: m.state_name().into(),
                    health: health.into(),
                    health_error: if m.down {
                        last_error(&(s.id, m.backend))
                    } else {
                        None
                    },
                    table_slots: m.table_slots,
                    packets: bc.packets,
                    bytes: bc.bytes,
                    connections: bc.conns,
                    active: active.get(&m.slot).copied().unwrap_or(0),
                    sockets: sockets.get(&m.slot).copied().unwrap_or(0),
                }
            })
            .collect();
        out.services.push(ServiceRow {
            service: s.id.to_string(),
            mode: s.mode.name().into(),
            health_check: check.map(|h| describe_check(h, probe_netns)),
            packets: c.packets,
            bytes: c.bytes,
            connections: c.conns,
            socket: !off.contains(&super::lb::service_key(&s.id)),
            backends,
        });
    }
    Ok(out)
}
