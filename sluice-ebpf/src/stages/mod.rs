//! The stages of the dataplane, each one concern. A stage never imports
//! another (the firewall consults ddos for its rules); the pipeline orders them.

pub mod ddos;
pub mod firewall;
pub mod lb;
pub mod observe;
pub mod tc;
