//! The engine: turns the model into map writes. The one write path for the
//! agent and the direct CLI alike; it reads the maps back to prove a change.

pub mod explain;
pub mod lb;
pub mod lb_view;
pub mod policy;
pub mod sock;
pub mod sock_lb;
pub mod steer;

use crate::dataplane::{DataplaneError, PinRoot, Status, attach, attach::ServiceStatus};

/// What is attached and in force: the dataplane's status with the load
/// balancer's services as the model names them.
pub fn status(root: &PinRoot) -> Result<Status, DataplaneError> {
    let mut st = attach::status(root)?;
    // Policy fields are set only when the maps are the ones packets use.
    if st.rules.is_none() {
        return Ok(st);
    }
    for svc in lb::read(root)? {
        let down = svc.members.iter().filter(|m| m.down).count();
        let draining = svc.members.iter().filter(|m| !m.down && m.draining).count();
        st.services.push(ServiceStatus {
            service: svc.id.to_string(),
            mode: svc.mode.name().to_string(),
            backends: svc.members.len(),
            active: svc.members.len() - down - draining,
            draining,
            down,
        });
    }
    Ok(st)
}
