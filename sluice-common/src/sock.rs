//! The socket layer's layouts: workloads (cgroup v2 subtrees), their
//! connect/sendmsg and bind rules, and the counters the cgroup programs keep.
//! The socket programs are a separate object (`sluice-sock-ebpf`) with their
//! own maps, pinned under `<pin root>/sock/`.

/// Workloads the socket layer holds at once. The control plane refuses more
/// with an error naming the limit.
pub const MAX_WORKLOADS: u32 = 64;

/// Rules per workload, connect and bind rules together. Evaluated in order
/// (first match wins); the control plane refuses more.
pub const MAX_SOCK_RULES: u32 = 64;

/// Cgroup levels the programs walk to find the workload of the calling
/// process (the root is level 0). A workload deeper than this is refused.
pub const MAX_CGROUP_LEVEL: u32 = 32;

/// The socket layer's policy is double-buffered like the firewall's: two
/// generations, `SOCK_GENERATION` says which one sockets use.
pub const SOCK_GENERATIONS: u32 = 2;

/// The calls the socket programs judge.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SockHook {
    /// connect() on a TCP or UDP socket (connect4/connect6).
    Connect = 0,
    /// sendmsg()/sendto() with a destination on an unconnected UDP socket
    /// (sendmsg4/sendmsg6).
    Sendmsg = 1,
    /// bind() (bind4/bind6).
    Bind = 2,
}

/// Hook slots in a workload's counters.
pub const HOOK_SLOTS: u32 = 3;

impl SockHook {
    pub const ALL: [Self; 3] = [Self::Connect, Self::Sendmsg, Self::Bind];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Sendmsg => "sendmsg",
            Self::Bind => "bind",
        }
    }
}

/// What decided a socket call.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SockReason {
    /// A rule of the workload matched.
    Rule = 0,
    /// No rule matched: the workload's default for the hook applied.
    Default = 1,
}

/// Reason slots in a workload's counters.
pub const SOCK_REASON_SLOTS: u32 = 2;

impl SockReason {
    pub const ALL: [Self; 2] = [Self::Rule, Self::Default];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Rule => "rule",
            Self::Default => "default",
        }
    }
}

/// Counters per workload: hook x verdict (`Verdict`: allow = Pass, deny =
/// Drop, audit = Audit) x reason.
pub const SOCK_COUNTERS_PER_WORKLOAD: u32 = HOOK_SLOTS * crate::VERDICT_SLOTS * SOCK_REASON_SLOTS;

/// Index into `SOCK_STATS` of one (workload slot, hook, verdict, reason) counter.
#[must_use]
#[inline(always)]
pub const fn sock_counter_slot(workload: u32, hook: u32, verdict: u32, reason: u32) -> u32 {
    workload * SOCK_COUNTERS_PER_WORKLOAD
        + (hook * crate::VERDICT_SLOTS + verdict) * SOCK_REASON_SLOTS
        + reason
}

/// The workload is in use in this generation (a slot without it lets
/// every call through uncounted).
pub const WORKLOAD_F_ACTIVE: u32 = 1 << 0;
/// Audit mode: what the workload's policy would deny is allowed and
/// counted with verdict `Audit`.
pub const WORKLOAD_F_AUDIT: u32 = 1 << 1;

/// One workload's policy in one generation
/// (`SOCK_POLICY[gen * MAX_WORKLOADS + slot]`). Its rules are
/// `SOCK_RULES[(gen * MAX_WORKLOADS + slot) * MAX_SOCK_RULES ..]`: first
/// `connect_rules` connect/sendmsg rules, then `bind_rules` bind rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadPolicy {
    /// `WORKLOAD_F_*` bits.
    pub flags: u32,
    /// `Verdict` (Pass or Drop) for a connect/sendmsg no rule matched.
    pub connect_default: u32,
    /// `Verdict` (Pass or Drop) for a bind no rule matched.
    pub bind_default: u32,
    pub connect_rules: u32,
    pub bind_rules: u32,
    pub _pad: u32,
}

// SAFETY: repr(C), Copy, u32s only; `_pad` is explicit.
#[cfg(feature = "user")]
unsafe impl aya::Pod for WorkloadPolicy {}

/// Rule matches only addresses of `SockRule::family` (4 or 6; an IPv4-mapped
/// IPv6 address counts as IPv4).
pub const SOCK_RULE_F_FAMILY: u32 = 1 << 0;
/// Rule matches only addresses in `net/mask`.
pub const SOCK_RULE_F_ADDR: u32 = 1 << 1;
/// Rule matches only ports in `port_lo..=port_hi`.
pub const SOCK_RULE_F_PORT: u32 = 1 << 2;

/// A connect/sendmsg rule (the address and port are the destination) or a
/// bind rule (the address and port bound).
///
/// Addresses are the words of [`addr_words`](crate::addr_words), IPv4 in
/// the first 4 bytes, as in the firewall's rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRule {
    /// `Verdict`: Pass (allow) or Drop (deny).
    pub action: u32,
    /// IP protocol (6 TCP, 17 UDP); 0 = any.
    pub proto: u32,
    /// 4 or 6, used with `SOCK_RULE_F_FAMILY`.
    pub family: u32,
    /// `SOCK_RULE_F_*` bits.
    pub flags: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    /// The rule's position in its list, from 1 (connect and bind rules
    /// number separately); shown in counters' reasons and records.
    pub id: u32,
    pub net: [u64; 2],
    pub mask: [u64; 2],
}

// SAFETY: repr(C), Copy, integers only, laid out without gaps.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockRule {}

/// A socket call a workload's policy denied or audited, as the socket
/// programs report it in `SOCK_EVENTS` (allowed calls are only counted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockEvent {
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub ts_ns: u64,
    /// The workload's cgroup (the ancestor that matched).
    pub workload_cgroup: u64,
    /// The calling process's own cgroup (the workload's or a descendant).
    pub cgroup: u64,
    /// Thread-group id (the process id user space sees).
    pub pid: u32,
    /// `SockHook`.
    pub hook: u32,
    /// The task's command name, NUL-padded.
    pub comm: [u8; 16],
    /// Destination (connect, sendmsg) or address bound (bind): bytes,
    /// IPv4 in the first 4.
    pub addr: [u8; 16],
    pub port: u16,
    /// 4 or 6 (an IPv4-mapped address is 4).
    pub family: u8,
    pub proto: u8,
    /// `Verdict` (Drop or Audit).
    pub verdict: u8,
    /// `SockReason`.
    pub reason: u8,
    pub _pad: u16,
    /// The rule's id (reason rule); 0 for the default.
    pub rule: u32,
    pub _pad2: u32,
}

// SAFETY: repr(C), Copy, integers only; the pads are explicit.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockEvent {}

/// Bytes of the `SOCK_EVENTS` ring (a power of two; about 2,900 records of 80 bytes plus the ring's 8-byte header).
pub const SOCK_EVENTS_BYTES: u32 = 256 * 1024;

/// Name of the object holding the socket programs (a separate bin of
/// sluice-ebpf).
pub const SOCK_OBJECT_NAME: &str = "sluice-sock-ebpf";

/// The socket programs and the cgroup hook each attaches to.
pub const SOCK_PROGRAMS: [(&str, &str); 6] = [
    ("sluice_connect4", "connect4"),
    ("sluice_connect6", "connect6"),
    ("sluice_sendmsg4", "sendmsg4"),
    ("sluice_sendmsg6", "sendmsg6"),
    ("sluice_bind4", "bind4"),
    ("sluice_bind6", "bind6"),
];

/// The socket load balancer's programs and the hook each attaches to (on
/// the root of the cgroup v2 hierarchy: every local process). `sock_release`
/// is a `cgroup_sock` program; the others are `sock_addr` programs.
pub const SOCK_LB_PROGRAMS: [(&str, &str); 9] = [
    ("slb_connect4", "connect4"),
    ("slb_connect6", "connect6"),
    ("slb_sendmsg4", "sendmsg4"),
    ("slb_sendmsg6", "sendmsg6"),
    ("slb_recvmsg4", "recvmsg4"),
    ("slb_recvmsg6", "recvmsg6"),
    ("slb_peername4", "getpeername4"),
    ("slb_peername6", "getpeername6"),
    ("slb_release", "sock_release"),
];

/// Sockets whose destination the socket LB translated, remembered so that
/// getpeername() and recvmsg() report the VIP (`SOCK_LB_SOCKS`). An entry
/// is deleted when its socket closes. When the map is full, a new socket
/// is still balanced but reports its backend as the peer, and the miss is
/// counted (`sock_lb_stat::STATE_FULL`).
pub const SOCK_LB_CAPACITY: u32 = 262_144;

/// `SockLbConfig::flags`: translate connect()/sendmsg() to services.
pub const SOCK_LB_F_ENABLED: u32 = 1 << 0;

/// `SOCK_LB_CONFIG[0]`: whether the socket LB is on, and the network
/// namespace it serves (the dataplane's: sockets of other namespaces, which
/// reach the VIP through an interface and the packet LB, are left alone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbConfig {
    pub flags: u32,
    pub _pad: u32,
    /// The namespace's cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`).
    pub netns_cookie: u64,
}

// SAFETY: repr(C), Copy, integers only; `_pad` is explicit.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockLbConfig {}

/// Value of `SOCK_LB_SOCKS` (key: the socket's cookie): the service address
/// the application asked for and the backend it was given.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbSock {
    /// The VIP and backend as `addr_words` (IPv4 in the first 4 bytes).
    pub vip: [u64; 2],
    pub backend: [u64; 2],
    /// Ports in host order.
    pub vip_port: u16,
    pub backend_port: u16,
    /// 4 or 6.
    pub family: u8,
    pub proto: u8,
    pub _pad: u16,
    /// The backend's slot in `LB_BACKENDS`.
    pub slot: u32,
    pub _pad2: u32,
}

// SAFETY: repr(C), Copy, integers only; pads are explicit.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockLbSock {}

/// Indexes of the per-CPU `SOCK_LB_STATS` array.
pub mod sock_lb_stat {
    /// connect() calls to a service given a backend.
    pub const CONNECT: u32 = 0;
    /// sendmsg() calls to a service given a backend.
    pub const SENDMSG: u32 = 1;
    /// Calls to a service with no usable backend: failed with EHOSTUNREACH.
    pub const NO_BACKEND: u32 = 2;
    /// Balanced sockets not remembered: `SOCK_LB_SOCKS` was full (they
    /// report their backend as the peer).
    pub const STATE_FULL: u32 = 3;
    /// Calls to a service with the socket LB off (left to the packet LB).
    pub const SKIPPED: u32 = 4;
    /// getpeername()/recvmsg() answers changed back to the VIP.
    pub const REVERSED: u32 = 5;
    /// Calls to a service whose backend is of the other address family
    /// (left to the packet LB).
    pub const FAMILY: u32 = 6;
    /// Slots in `SOCK_LB_STATS`.
    pub const SLOTS: u32 = 8;
    /// Names, by index (empty = unused slot).
    pub const NAMES: [&str; SLOTS as usize] = [
        "connect",
        "sendmsg",
        "no_backend",
        "state_full",
        "skipped",
        "reversed",
        "family_mismatch",
        "",
    ];
}

/// Names of the socket object's maps (pinned under `<pin root>/sock/maps/`,
/// except the packet LB's, which it shares: see `SHARED_LB_MAPS`).
pub mod sock_map_names {
    pub const SOCK_GENERATION: &str = "SOCK_GENERATION";
    pub const WORKLOADS: &str = "WORKLOADS";
    pub const SOCK_POLICY: &str = "SOCK_POLICY";
    pub const SOCK_RULES: &str = "SOCK_RULES";
    pub const SOCK_STATS: &str = "SOCK_STATS";
    pub const SOCK_EVENTS: &str = "SOCK_EVENTS";
    pub const SOCK_LOST: &str = "SOCK_LOST";
    pub const SOCK_LB_CONFIG: &str = "SOCK_LB_CONFIG";
    pub const SOCK_LB_OFF: &str = "SOCK_LB_OFF";
    pub const SOCK_LB_SOCKS: &str = "SOCK_LB_SOCKS";
    pub const SOCK_LB_STATS: &str = "SOCK_LB_STATS";
    pub const SOCK_LB_BACKENDS: &str = "SOCK_LB_BACKENDS";
    /// The packet LB's maps the socket LB reads: bound to the pins of the
    /// XDP object's maps (the same kernel maps), so both balance by the
    /// same services, Maglev tables and backend health.
    pub const SHARED_LB_MAPS: [&str; 3] = [
        crate::map_names::LB_SERVICES,
        crate::map_names::LB_BACKENDS,
        crate::map_names::LB_MAGLEV,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<SockRule>(), 56);
        assert_eq!(core::mem::size_of::<WorkloadPolicy>(), 24);
        assert_eq!(core::mem::size_of::<SockEvent>(), 80);
        assert_eq!(core::mem::size_of::<SockLbConfig>(), 16);
        assert_eq!(core::mem::size_of::<SockLbSock>(), 48);
    }

    #[test]
    fn counter_slots_do_not_overlap() {
        let last = sock_counter_slot(
            MAX_WORKLOADS - 1,
            HOOK_SLOTS - 1,
            crate::VERDICT_SLOTS - 1,
            SOCK_REASON_SLOTS - 1,
        );
        assert_eq!(last + 1, MAX_WORKLOADS * SOCK_COUNTERS_PER_WORKLOAD);
        assert_eq!(sock_counter_slot(1, 0, 0, 0), SOCK_COUNTERS_PER_WORKLOAD);
    }
}
