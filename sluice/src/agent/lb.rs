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
    targets_of(&core.desired)
}

/// The namespace probes run in when a service names none: that of the
/// interfaces the agent balances on, when they all share one (the backends
/// are reached from there), else the agent's own.
pub fn default_probe_netns(interfaces: &[crate::policy::Interface]) -> Option<String> {
    let mut names = interfaces.iter().map(|i| i.netns.clone());
    let first = names.next()?;
    names.all(|n| n == first).then_some(first).flatten()
}

fn targets_of(
    desired: &crate::policy::Desired,
) -> Vec<(MemberKey, std::net::SocketAddr, CheckSpec)> {
    let default_netns = default_probe_netns(&desired.interfaces);
    let mut out = Vec::new();
    for s in &desired.services {
        let Some(h) = &s.health else {
            continue;
        };
        let mut spec = h.to_spec();
        if spec.netns.is_none() {
            spec.netns.clone_from(&default_netns);
        }
        for b in &s.spec.backends {
            out.push((
                (s.spec.id, b.addr),
                h.target(&s.spec.id, &b.addr),
                spec.clone(),
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

fn describe_check(h: &crate::lb::HealthConf, default_netns: Option<&str>) -> String {
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
    ) + &h
        .netns
        .as_deref()
        .or(default_netns)
        .map(|n| format!(" from netns {n}"))
        .unwrap_or_default()
}

/// The services as the kernel holds them, with counters, active
/// connections and (given the agent's services and checker) health;
/// `probe_netns`: where probes run when a service names no namespace.
pub fn view(
    root: &crate::dataplane::PinRoot,
    services: Option<&[crate::lb::LbService]>,
    checker: Option<&Checker<MemberKey>>,
    probe_netns: Option<&str>,
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
            health_check: check.map(|h| describe_check(h, probe_netns)),
            packets: c.packets,
            bytes: c.bytes,
            connections: c.conns,
            backends,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        lb::{CheckKind, HealthConf},
        policy::{Desired, Interface},
    };

    fn iface(name: &str, netns: Option<&str>) -> Interface {
        Interface {
            name: name.into(),
            netns: netns.map(str::to_owned),
            mode: crate::dataplane::AttachMode::Native,
        }
    }

    #[test]
    fn probes_run_where_the_balanced_interfaces_are_unless_a_service_says() {
        assert_eq!(default_probe_netns(&[]), None);
        assert_eq!(
            default_probe_netns(&[iface("a", Some("lb")), iface("b", Some("lb"))]),
            Some("lb".into())
        );
        // Interfaces in different namespaces (or one on the host): the
        // agent's own namespace, unless the service names one.
        assert_eq!(
            default_probe_netns(&[iface("a", Some("lb")), iface("b", None)]),
            None
        );
        assert_eq!(default_probe_netns(&[iface("a", None)]), None);

        let cfg = crate::policy::config::parse(
            std::path::Path::new("/etc/sluice/t.toml"),
            "[[interface]]\nname = \"veth0\"\nnetns = \"lb\"\n\n\
             [[service]]\nvip = \"198.18.0.10:80\"\nbackends = [\"198.18.1.2:8080\"]\n\
             health = { check = \"tcp\" }\n\n\
             [[service]]\nvip = \"198.18.0.11:80\"\nbackends = [\"198.18.1.3:8080\"]\n\
             health = { check = \"tcp\", netns = \"probes\" }\n",
        )
        .expect("valid config");
        let desired: &Desired = &cfg.desired;
        let t = targets_of(desired);
        let netns: Vec<(String, Option<String>)> = t
            .iter()
            .map(|((id, _), _, spec)| (id.to_string(), spec.netns.clone()))
            .collect();
        assert_eq!(
            netns,
            vec![
                ("198.18.0.10:80/tcp".into(), Some("lb".into())),
                ("198.18.0.11:80/tcp".into(), Some("probes".into())),
            ]
        );
        let h = HealthConf {
            netns: Some("probes".into()),
            ..HealthConf::new(CheckKind::Tcp)
        };
        assert!(describe_check(&h, Some("lb")).ends_with(" from netns probes"));
        let h = HealthConf::new(CheckKind::Tcp);
        assert!(describe_check(&h, Some("lb")).ends_with(" from netns lb"));
        assert!(!describe_check(&h, None).contains("netns"));
    }
}
