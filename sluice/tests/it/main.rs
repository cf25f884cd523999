//! sluice's integration tests as one crate (as aya's test/integration-test):
//! a module per capability, and the support modules they share (frame
//! builders, the reference model, the kernel harness, namespace guards, the
//! CLI and agent drivers, the Linux 6.1 guest) compiled once. Most tests
//! need root.
//!
//! Every test runs in parallel with every other one in this one process:
//! names of namespaces, interfaces, pin roots and files are unique per
//! process and test (see `support::netns`), no test changes the process's
//! environment, working directory or signal handlers, and tests that keep
//! a CPU busy for long take [`support::heavy`]. A module is a suite of its
//! own by its path: `cargo test -p sluice --test it -- lb_packets::`.

mod support;

mod agent;
mod agent_guard;
mod atomicity;
mod capture;
mod compat;
mod ddos;
mod ddos_e2e;
mod differential;
mod docs;
mod e2e_attach;
mod e2e_netns;
mod escalation;
mod eval_model;
mod explain;
mod flows;
mod lb_e2e;
mod lb_icmp;
mod lb_packets;
mod lb_scale;
mod lb_vxlan;
mod lts;
mod model;
mod packets;
mod sock;
mod sock_lb;
mod steer;
mod syn_flood;
mod top;
mod trust;
mod upgrade;
