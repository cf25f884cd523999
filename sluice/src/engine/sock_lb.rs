//! The socket LB as the engine drives it: on (loaded, bound to the packet
//! LB's maps, linked to the root cgroup, serving this network namespace)
//! or off (no links), and the services it leaves to the packet LB.

use std::collections::BTreeSet;

use sluice_common::lb::ServiceKey;

use crate::{
    dataplane::{DataplaneError, PinRoot, pins, sock, sock_lb},
    model::lb::LbService,
};

/// What `apply` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    /// The socket LB serves local clients now.
    pub on: bool,
    /// Links made / removed on the root cgroup.
    pub linked: usize,
    pub unlinked: usize,
    /// The programs were loaded again to read the packet LB's current maps.
    pub rebound: bool,
}

pub use crate::dataplane::sock_lb::SockLbState;

/// The services the socket LB must leave alone.
#[must_use]
pub fn off_keys(services: &[LbService]) -> BTreeSet<ServiceKey> {
    services
        .iter()
        .filter(|s| !s.socket)
        .map(|s| super::lb::service_key(&s.spec.id))
        .collect()
}

/// Before the packet LB's services change: services that leave the socket
/// LB are marked first, so none is balanced at the socket against its
/// setting while the services change (no-op when the socket LB is not loaded).
pub fn prepare(root: &PinRoot, services: &[LbService]) -> Result<(), DataplaneError> {
    if !sock::is_loaded(root) {
        return Ok(());
    }
    sock_lb::set_off(root, &off_keys(services), false)
}

/// Makes the socket LB on (`on` and services exist) or off, for `services`.
/// On: the socket programs loaded (bound to the packet LB's maps, loaded
/// again if they read others), the service settings written, the network
/// namespace `netns` (a name under /run/netns; `None`: the caller's) set as
/// the one served, then the root cgroup linked. Off: links removed first.
/// The packet dataplane must exist (its maps are the ones balanced by).
pub fn apply(
    root: &PinRoot,
    on: bool,
    services: &[LbService],
    netns: Option<&str>,
) -> Result<ApplyReport, DataplaneError> {
    let mut report = ApplyReport::default();
    let want = on && !services.is_empty();
    if !want {
        if sock::is_loaded(root) {
            let _lock = pins::RootLock::acquire(&root.root)?;
            report.unlinked = sock_lb::detach(root);
            sock_lb::set_config(root, false, 0)?;
            sock_lb::set_off(root, &off_keys(services), true)?;
        }
        return Ok(report);
    }
    sock::ensure_loaded(root)?;
    let _lock = pins::RootLock::acquire(&root.root)?;
    if !sock_lb::bound(root)? {
        sock::upgrade(root, true)?;
        report.rebound = true;
        if !sock_lb::bound(root)? {
            return Err(DataplaneError::Readback {
                what: "the socket LB programs do not read the packet LB's pinned maps".into(),
            });
        }
    }
    sock_lb::set_off(root, &off_keys(services), true)?;
    let cookie = crate::netns::run_in(netns, sock_lb::netns_cookie).map_err(|e| {
        DataplaneError::SockLoad {
            source: format!("entering network namespace {}: {e}", netns.unwrap_or("?")).into(),
        }
    })??;
    sock_lb::set_config(root, true, cookie)?;
    report.linked = sock_lb::attach(root)?;
    report.on = true;
    Ok(report)
}

/// The socket LB as the kernel holds it now.
#[must_use]
pub fn read(root: &PinRoot) -> SockLbState {
    sock_lb::state(root)
}
