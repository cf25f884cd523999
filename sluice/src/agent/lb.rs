//! The agent's load-balancer task: runs the health checks the desired
//! services ask for and moves backends out of (and back into) their tables.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use super::{
    api::Shared,
    core::MemberKey,
    health::{CheckSpec, Checker, Health},
};

/// The health-check targets the desired services name.
fn targets(core: &super::core::Core) -> Vec<(MemberKey, std::net::SocketAddr, CheckSpec)> {
    let mut out = Vec::new();
    for s in &core.desired.services {
        let Some(h) = &s.health else {
            continue;
        };
        for b in &s.spec.backends {
            out.push((
                (s.spec.id, b.addr),
                h.target(&s.spec.id, &b.addr),
                h.to_spec(),
            ));
        }
    }
    out
}

/// Every second: hand the checker the current targets (it keeps unchanged
/// ones running); on each health transition: re-apply the tables.
pub async fn run(core: Shared) {
    let (checker, mut transitions) = Checker::<MemberKey>::new();
    let checker = Arc::new(checker);
    if let Ok(mut c) = core.lock() {
        c.checker = Some(checker.clone());
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last: Option<Vec<(MemberKey, std::net::SocketAddr, CheckSpec)>> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let c = core.clone();
                let now = tokio::task::spawn_blocking(move || c.lock().map(|c| targets(&c)).ok())
                    .await
                    .ok()
                    .flatten();
                if let Some(now) = now
                    && last.as_ref() != Some(&now)
                {
                    checker.set_targets(now.clone());
                    last = Some(now);
                }
            }
            Some(t) = transitions.recv() => {
                let up = t.health == Health::Up;
                let key = t.key;
                match &t.status.last_error {
                    Some(e) if !up => info!(service = %key.0, backend = %key.1, error = %e, "backend down: out of the table"),
                    _ => info!(service = %key.0, backend = %key.1, up, "backend health changed"),
                }
                let c = core.clone();
                let r = tokio::task::spawn_blocking(move || {
                    c.lock().map_err(|_| ()).map(|mut c| c.set_health(key, up))
                })
                .await;
                if let Ok(Ok(Err(e))) = r {
                    warn!(error = %e, "applying a health change failed; the next change or drift check retries");
                }
            }
        }
    }
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
}

fn describe_check(h: &crate::lb::HealthConf) -> String {
    let what = match h.check {
        crate::lb::CheckKind::Tcp => "tcp".to_string(),
        crate::lb::CheckKind::Http => format!("http GET {} expect {}", h.path, h.expect),
    };
    format!(
        "{what} every {}ms timeout {}ms rise {} fall {}{}",
        h.interval_ms,
        h.timeout_ms,
        h.rise,
        h.fall,
        h.port.map(|p| format!(" port {p}")).unwrap_or_default()
    )
}

/// The services as the kernel holds them, with counters, active
/// connections and (given the agent's services and checker) health.
pub fn view(
    root: &crate::dataplane::PinRoot,
    services: Option<&[crate::lb::LbService]>,
    checker: Option<&Checker<MemberKey>>,
) -> Result<LbView, crate::dataplane::DataplaneError> {
    use crate::dataplane::lb as maps;
    let state = maps::read(root)?;
    let svc_counters = maps::service_counters(root, state.iter().map(|s| s.slot))?;
    let be_counters = maps::backend_counters(
        root,
        state.iter().flat_map(|s| s.members.iter().map(|m| m.slot)),
    )?;
    let (active, walked) = maps::active_connections(root)?;
    let mut out = LbView {
        events: maps::stats(root)?
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect(),
        connection_entries: walked,
        connection_capacity: maps::pinned_conn_capacity(root)?,
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
                let status = checker.and_then(|ch| ch.status_of(&(s.id, m.backend)));
                let health = match (check, m.down) {
                    (_, true) => "down",
                    (Some(_), false) => "up",
                    (None, false) => "unchecked",
                };
                BackendRow {
                    backend: m.backend.to_string(),
                    weight: m.weight,
                    state: if m.down {
                        "down"
                    } else if m.draining {
                        "draining"
                    } else {
                        "active"
                    }
                    .into(),
                    health: health.into(),
                    health_error: status.and_then(|st| st.last_error.filter(|_| m.down)),
                    table_slots: m.table_slots,
                    packets: bc.packets,
                    bytes: bc.bytes,
                    connections: bc.conns,
                    active: active.get(&m.slot).copied().unwrap_or(0),
                }
            })
            .collect();
        out.services.push(ServiceRow {
            service: s.id.to_string(),
            mode: s.mode.name().into(),
            health_check: check.map(describe_check),
            packets: c.packets,
            bytes: c.bytes,
            connections: c.conns,
            backends,
        });
    }
    Ok(out)
}
