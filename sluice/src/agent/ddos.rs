//! The agent's side of DDoS defence: turns the kernel's escalation reports
//! into temporary deny entries, and expires those entries when their time is up.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::IpNet;
use sluice_common::{Escalation, map_names};
use tracing::{info, warn};

use super::core::{Core, Ctx, Safety, Shared};
use crate::{api::time::unix_now, dataplane::runtime, model::policy::Op};

/// Who temporary entries are recorded as in history.
pub const AUTHOR: &str = "sluice-agent";

/// The prefix an escalation report names, or `None` for a malformed report.
pub fn prefix_of(e: &Escalation) -> Option<IpNet> {
    let addr: IpAddr = match e.family {
        4 => Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]).into(),
        6 => Ipv6Addr::from(e.addr).into(),
        _ => return None,
    };
    IpNet::new(addr, u8::try_from(e.prefix_len).ok()?)
        .ok()
        .map(|n| n.trunc())
}

/// What one batch of reports turns into: one `DenyFor` per (reason, expiry).
pub fn ops_for(reports: &[Escalation], now_unix: u64) -> Vec<Op> {
    let mut by: BTreeMap<(String, u64), Vec<IpNet>> = BTreeMap::new();
    for e in reports {
        let Some(net) = prefix_of(e) else {
            warn!(family = e.family, "malformed escalation report ignored");
            continue;
        };
        let reason = format!(
            "rate limit: over rule {} for {:.1}s",
            e.rule_id,
            f64::from(e.over_for_ms) / 1000.0
        );
        let list = by
            .entry((reason, now_unix + u64::from(e.ttl_s.max(1))))
            .or_default();
        if !list.contains(&net) {
            list.push(net);
        }
    }
    by.into_iter()
        .map(|((reason, expires_unix), prefixes)| Op::DenyFor {
            prefixes,
            reason,
            expires_unix,
        })
        .collect()
}

/// Applies reports (skipping sources already denied) and expires entries
/// whose time is up. Runs on a blocking thread with the core locked.
pub fn settle(core: &mut Core, reports: &[Escalation]) {
    let now = unix_now();
    let due = core
        .desired
        .temp_deny
        .values()
        .any(|t| t.expires_unix <= now);
    if reports.is_empty() && !due {
        return;
    }
    let desired = &core.desired;
    let fresh: Vec<Escalation> = reports
        .iter()
        .filter(|e| prefix_of(e).is_some_and(|n| !desired.policy.deny.contains(&n)))
        .copied()
        .collect();
    let ops = ops_for(&fresh, now);
    if !ops.is_empty() {
        let n: usize = ops
            .iter()
            .map(|o| match o {
                Op::DenyFor { prefixes, .. } => prefixes.len(),
                _ => 0,
            })
            .sum();
        // Denying a source cannot cut off the agent's own listeners
        // beyond what the guard already allows; escalation is automatic, so
        // it is not held back by a guard meant for human sessions.
        match core.change(ops, &Ctx::agent(AUTHOR)) {
            Ok(a) => {
                info!(sources = n, version = a.version, "escalated sources denied");
                core.metrics.escalations.inc_by(n as u64);
            }
            Err(e) => warn!(error = %e, sources = n, "escalation refused"),
        }
    }
    let expired: Vec<IpNet> = core
        .desired
        .temp_deny
        .iter()
        .filter(|(_, t)| t.expires_unix <= now)
        .map(|(n, _)| *n)
        .collect();
    if !expired.is_empty() {
        let n = expired.len();
        let op = Op::Expire { prefixes: expired };
        let ctx = Ctx {
            author: AUTHOR.into(),
            request: None,
            safety: Safety {
                session: None,
                force: true,
            },
            retry_interfaces: false,
        };
        match core.change(vec![op], &ctx) {
            Ok(a) => {
                info!(
                    entries = n,
                    version = a.version,
                    "temporary deny entries expired"
                );
                if !a.unchanged {
                    core.metrics.expirations.inc_by(n as u64);
                }
            }
            // Retried every tick (250 ms): warned about at most every 30 s.
            Err(e) => {
                static LAST_WARNED: std::sync::atomic::AtomicU64 =
                    std::sync::atomic::AtomicU64::new(0);
                let last = LAST_WARNED.load(std::sync::atomic::Ordering::Relaxed);
                if now >= last + EXPIRY_WARN_EVERY_SECS {
                    LAST_WARNED.store(now, std::sync::atomic::Ordering::Relaxed);
                    warn!(
                        error = %e,
                        entries = n,
                        "expiring deny entries failed; retried every 250 ms (this warning at most every 30 s)"
                    );
                } else {
                    tracing::debug!(error = %e, entries = n, "expiring deny entries failed again");
                }
            }
        }
    }
}

/// A failing expiry is warned about at most this often (it is retried on
/// every tick).
const EXPIRY_WARN_EVERY_SECS: u64 = 30;

/// Writes the `[ddos]` settings into `DDOS_CONFIG` when the kernel holds
/// others (first start, maps recreated by a new attach, a reload).
fn keep_settings(shared: &Shared, root: &crate::dataplane::PinRoot) {
    if !root.is_set_up() {
        return;
    }
    let want = match shared.lock() {
        Ok(c) => c.ddos.to_kernel(),
        Err(_) => return,
    };
    match runtime::ddos_config(root) {
        Ok(have)
            if have.new_source_interval_ns == want.new_source_interval_ns
                && have.new_source_tolerance_ns == want.new_source_tolerance_ns
                && have.verified_ttl_ns == want.verified_ttl_ns => {}
        Ok(_) => match runtime::set_ddos_config(root, &want) {
            Ok(()) => info!("[ddos] settings written to the dataplane"),
            Err(e) => warn!(error = %e, "cannot write the [ddos] settings"),
        },
        Err(e) => warn!(error = %e, "cannot read the DDoS settings"),
    }
}

/// Runs until aborted: every 250 ms, read escalation reports (reopening the
/// ring when the pins are recreated) and settle them with expiries.
pub async fn run(shared: Shared) {
    let mut ring: Option<(std::path::PathBuf, u64, runtime::Ring)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let root = match shared.lock() {
            Ok(c) => c.root.clone(),
            Err(_) => return,
        };
        let path = root.map(map_names::EVENTS);
        let ino = std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        match (&ring, ino) {
            (Some((_, old, _)), Ok(now)) if *old == now => {}
            (_, Ok(now)) => {
                ring = runtime::open_ring(&root, map_names::EVENTS)
                    .map_err(|e| warn!(error = %e, "cannot read escalation reports"))
                    .ok()
                    .map(|r| (path.clone(), now, r));
            }
            (_, Err(_)) => ring = None,
        }
        keep_settings(&shared, &root);
        let mut reports = Vec::new();
        if let Some((_, _, r)) = ring.as_mut() {
            runtime::drain_escalations(r, &mut reports);
        }
        let c = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut core) = c.lock() {
                settle(&mut core, &reports);
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(addr: [u8; 4], plen: u32, ttl: u32) -> Escalation {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&addr);
        Escalation {
            rule_id: 3,
            family: 4,
            addr: a,
            prefix_len: plen,
            ttl_s: ttl,
            over_for_ms: 1500,
            ..Escalation::default()
        }
    }

    #[test]
    fn reports_become_one_temporary_deny_per_reason_and_expiry() {
        let ops = ops_for(
            &[
                report([198, 18, 0, 7], 32, 60),
                report([198, 18, 0, 7], 32, 60),
                report([198, 18, 1, 0], 24, 60),
                report([198, 18, 2, 0], 24, 120),
            ],
            1000,
        );
        assert_eq!(ops.len(), 2, "{ops:?}");
        let Op::DenyFor {
            prefixes,
            reason,
            expires_unix,
        } = &ops[0]
        else {
            panic!("{ops:?}")
        };
        assert_eq!(*expires_unix, 1060);
        assert_eq!(reason, "rate limit: over rule 3 for 1.5s");
        let shown: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["198.18.0.7/32", "198.18.1.0/24"]);
        let mut v6 = report([0; 4], 64, 60);
        v6.family = 6;
        v6.addr = "2001:2:0:1::".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(prefix_of(&v6).unwrap().to_string(), "2001:2:0:1::/64");
        let mut bad = report([1, 2, 3, 4], 33, 1);
        assert!(prefix_of(&bad).is_none());
        bad.family = 9;
        assert!(prefix_of(&bad).is_none());
    }
}
