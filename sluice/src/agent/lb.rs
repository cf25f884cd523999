//! The agent's load-balancer task: runs the health checks the desired
//! services ask for and moves backends out of (and back into) their tables.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::model::lb::health::CheckSpec;

use super::{
    core::MemberKey,
    core::Shared,
    health::{Checker, Health},
};

/// The health-check targets the desired services name.
fn targets(core: &super::core::Core) -> Vec<(MemberKey, std::net::SocketAddr, CheckSpec)> {
    targets_of(&core.desired)
}

fn targets_of(
    desired: &crate::model::policy::Desired,
) -> Vec<(MemberKey, std::net::SocketAddr, CheckSpec)> {
    let default_netns = crate::engine::lb_view::default_probe_netns(&desired.interfaces);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::lb_view::{default_probe_netns, describe_check};
    use crate::{
        model::lb::{CheckKind, HealthConf},
        model::policy::{Desired, Interface},
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

        let cfg = crate::model::policy::config::parse(
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
