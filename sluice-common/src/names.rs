//! The names user space finds kernel objects by: map names (as declared in
//! `sluice-ebpf/src/maps.rs`), program names and the `JUMP` slots.

/// Names of every map, as declared in `sluice-ebpf/src/maps.rs` and pinned under
/// `<pin root>/maps/`. Kernel map names are limited to 15 bytes.
pub mod map_names {
    pub const GENERATION: &str = "GENERATION";
    pub const SETTINGS: &str = "SETTINGS";
    pub const RULES: &str = "RULES";
    pub const RULE_STATS: &str = "RULE_STATS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const DENY_V4: &str = "DENY_V4";
    pub const DENY_V6: &str = "DENY_V6";
    pub const ALLOW_V4: &str = "ALLOW_V4";
    pub const ALLOW_V6: &str = "ALLOW_V6";
    pub const RULE_BUCKETS: &str = "RULE_BUCKETS";
    pub const SRC_BUCKETS: &str = "SRC_BUCKETS";
    pub const OVERFLOW_BKTS: &str = "OVERFLOW_BKTS";
    pub const NEW_SOURCES: &str = "NEW_SOURCES";
    pub const SYN_VERIFIED: &str = "SYN_VERIFIED";
    pub const DDOS_CONFIG: &str = "DDOS_CONFIG";
    pub const STATS: &str = "STATS";
    pub const EVENTS: &str = "EVENTS";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOW_CONFIG: &str = "FLOW_CONFIG";
    pub const FLOW_BUDGET: &str = "FLOW_BUDGET";
    pub const CAPTURE_CONFIG: &str = "CAPTURE_CONFIG";
    pub const CAPTURE: &str = "CAPTURE";
    pub const JUMP: &str = "JUMP";
    pub const LB_SERVICES: &str = "LB_SERVICES";
    pub const LB_BACKENDS: &str = "LB_BACKENDS";
    pub const LB_MAGLEV: &str = "LB_MAGLEV";
    pub const LB_CONNS: &str = "LB_CONNS";
    pub const LB_REVERSE: &str = "LB_REVERSE";
    pub const LB_CONFIG: &str = "LB_CONFIG";
    pub const LB_NEW_CONNS: &str = "LB_NEW_CONNS";
    pub const LB_STATS: &str = "LB_STATS";
    pub const LB_SVC_STATS: &str = "LB_SVC_STATS";
    pub const LB_BE_STATS: &str = "LB_BE_STATS";
    pub const LB_TX_PORTS: &str = "LB_TX_PORTS";
}

/// Name of the XDP entry point in the object file.
pub const XDP_PROGRAM: &str = "sluice_xdp";
/// The SYN guard's challenge writer, reached by a tail call through `JUMP`.
pub const SYN_CHALLENGE_PROGRAM: &str = "sluice_syn_challenge";
/// `JUMP` slot of `SYN_CHALLENGE_PROGRAM`.
pub const JUMP_SYN_CHALLENGE: u32 = 0;
/// The load balancer (XDP), reached by a tail call for packets to a VIP.
pub const LB_PROGRAM: &str = "sluice_lb";
/// `JUMP` slot of `LB_PROGRAM`.
pub const JUMP_LB: u32 = 1;
/// Slots in `JUMP`.
pub const JUMP_SLOTS: u32 = 2;
/// TC egress program: translates NAT backends' replies back to the VIP.
pub const TC_EGRESS_PROGRAM: &str = "sluice_tc_egress";
