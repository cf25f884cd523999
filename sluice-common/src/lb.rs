//! The L4 load balancer's shared layouts: services (VIPs), backends, the
//! Maglev lookup tables, the connection table and the LB counters.
//! Addresses are `addr_words` words (IPv4 in the first 4 bytes), as in rules.

/// Slots in every Maglev table. A prime, so every backend's permutation
/// visits every slot; about 16 slots per backend even for 4,096 backends.
pub const TABLE_SIZE: u32 = 65_537;

/// Services (VIP, protocol, port) the dataplane holds. Each has a Maglev
/// table (`TABLE_SIZE` x 4 bytes = 256 KiB) while it exists.
pub const MAX_SERVICES: u32 = 1024;

/// Backend slots: one per (service, backend) pair.
pub const MAX_BACKENDS: u32 = 16_384;

/// Connections the connection table pins (LRU: when full, the least
/// recently used connection is forgotten and its next packet is balanced
/// again by the Maglev table, which picks the same backend while the
/// service's backends are unchanged).
pub const CONN_CAPACITY: u32 = 1 << 20;

/// A Maglev table slot with no backend (the service has no usable backend).
pub const NO_BACKEND: u32 = u32::MAX;

/// `Service::mode`: rewrite the destination to the backend; replies are
/// translated back to the VIP on the way out (TC egress).
pub const MODE_NAT: u32 = 0;
/// `Service::mode`: direct server return on the same L2 segment: only the
/// destination MAC changes; the backend holds the VIP and answers the client.
pub const MODE_DSR: u32 = 1;
/// `Service::mode`: direct server return through a VXLAN tunnel: the frame
/// is encapsulated (outer IPv4/UDP 4789, the service's VNI) to the
/// backend, which decapsulates it, holds the VIP and answers the client.
pub const MODE_VXLAN: u32 = 2;
/// The VXLAN UDP port (IANA).
pub const VXLAN_PORT: u16 = 4789;

/// The inner destination MAC of VXLAN-encapsulated frames for `vni`:
/// 02:73:6c (locally administered, "sl") and the VNI. A backend's VXLAN
/// device gets this address (`ip link add vx0 type vxlan id VNI ... address
/// MAC`), so no per-backend MAC has to be configured.
#[must_use]
pub const fn vxlan_mac(vni: u32) -> [u8; 6] {
    let v = vni.to_be_bytes();
    [0x02, 0x73, 0x6c, v[1], v[2], v[3]]
}

/// `Backend::flags`: takes no new connections; existing ones go on.
pub const BACKEND_F_DRAINING: u32 = 1 << 0;
/// `Backend::flags`: failed its health checks. Out of the table; a pinned
/// connection to it is balanced again.
pub const BACKEND_F_DOWN: u32 = 1 << 1;

/// `Conn::flags`: a FIN or RST was seen; the entry is kept for the rest of
/// the connection's packets but no longer counts as active, and a new SYN
/// on the same 5-tuple is balanced afresh.
pub const CONN_F_CLOSED: u32 = 1 << 0;

/// `LbConfig::flags`: at least one service exists (packets to a VIP are
/// looked up only then).
pub const LB_F_ENABLED: u32 = 1 << 0;

/// Key of `LB_SERVICES`: what a packet is addressed to. `port` 0 = every
/// port of the VIP (looked up when the exact port has no service).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u64; 2],
    pub port: u16,
    /// IP protocol (6 TCP, 17 UDP).
    pub proto: u8,
    /// 4 or 6 (`Family::version`).
    pub family: u8,
    pub _pad: u32,
}

// SAFETY: repr(C), Copy, integers only; `_pad` fills the tail.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ServiceKey {}

/// Value of `LB_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Slot in `LB_MAGLEV` and `LB_SVC_STATS`; stable for the service's life.
    pub id: u32,
    /// `MODE_*`.
    pub mode: u32,
    /// Usable backends in the table (0: packets are dropped, reason `no-backend`).
    pub backends: u32,
    /// `MODE_VXLAN`: the VXLAN network identifier (24 bits).
    pub vni: u32,
}

// SAFETY: repr(C), Copy, u32s only.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Service {}

/// Value of `LB_BACKENDS` (indexed by backend slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u64; 2],
    /// Destination port after translation; 0 = keep the packet's port.
    pub port: u16,
    /// 4 or 6 (`Family::version`; 0 = free slot).
    pub family: u8,
    pub _pad: u8,
    /// `BACKEND_F_*`.
    pub flags: u32,
    /// Bumped each time the slot is given to another backend, so a pinned
    /// connection never follows a reused slot to a different backend.
    pub generation: u32,
    /// The service's id.
    pub service: u32,
    /// Maglev weight as configured (the kernel does not read it; the
    /// control plane rebuilds a table only when some member's changed).
    pub weight: u32,
    pub _pad2: u32,
}

// SAFETY: repr(C), Copy, integers only; `_pad`/`_pad2` are explicit.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Backend {}

/// A connection as the client sent it (key of `LB_CONNS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u64; 2],
    pub dst: [u64; 2],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 4 or 6 (`Family::version`).
    pub family: u8,
    pub _pad: u16,
}

// SAFETY: repr(C), Copy, integers only; `_pad` fills the tail.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowKey {}

/// Value of `LB_CONNS`: where the connection goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub backend: u32,
    /// `Backend::generation` when pinned.
    pub generation: u32,
    pub service: u32,
    /// `CONN_F_*`.
    pub flags: u32,
    /// `CLOCK_BOOTTIME` ns of the first and of the latest packet (the latest
    /// is refreshed at most once a second).
    pub created_ns: u64,
    pub last_ns: u64,
}

// SAFETY: repr(C), Copy, integers only, no gap.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Conn {}

/// Key of `LB_REVERSE`: a NAT backend as its replies show it. `port` 0 =
/// the backend of a whole-VIP service (replies keep their port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub addr: [u64; 2],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u32,
}

// SAFETY: repr(C), Copy, integers only; `_pad` fills the tail.
#[cfg(feature = "user")]
unsafe impl aya::Pod for BackendKey {}

/// Value of `LB_REVERSE`: the VIP (and port; 0 = keep) replies get as source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vip {
    pub addr: [u64; 2],
    pub port: u16,
    pub _pad: u16,
    pub service: u32,
}

// SAFETY: repr(C), Copy, integers only; `_pad` is explicit.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Vip {}

/// `LB_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// `LB_F_*`.
    pub flags: u32,
    pub _pad: u32,
    /// A pinned TCP / UDP connection idle for this long is balanced afresh.
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
    /// New connection-table entries per second as a GCRA interval (0 = no
    /// cap). Past it, new connections are balanced by the table alone and
    /// not recorded, so a SYN flood cannot evict established connections.
    pub new_conn_interval_ns: u64,
    pub new_conn_tolerance_ns: u64,
}

// SAFETY: repr(C), Copy, integers only; `_pad` is explicit.
#[cfg(feature = "user")]
unsafe impl aya::Pod for LbConfig {}

/// Per-CPU counters of a service or a backend (`LB_SVC_STATS`, `LB_BE_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbCounter {
    pub packets: u64,
    pub bytes: u64,
    /// Connections balanced to it (new connection-table entries or, past
    /// the cap, new unrecorded connections).
    pub conns: u64,
}

// SAFETY: repr(C), Copy, u64s only.
#[cfg(feature = "user")]
unsafe impl aya::Pod for LbCounter {}

/// Indexes of the per-CPU `LB_STATS` array.
pub mod lb_stat {
    /// Connections recorded in `LB_CONNS`.
    pub const CONN_CREATED: u32 = 0;
    /// New connections not recorded: over the new-connection rate.
    pub const CONN_CAPPED: u32 = 1;
    /// Inserts `LB_CONNS` refused.
    pub const CONN_INSERT_FAILED: u32 = 2;
    /// Pinned connections balanced again (backend removed, down, or idle).
    pub const CONN_REBALANCED: u32 = 3;
    /// Packets forwarded with XDP_TX (backend behind the receiving interface).
    pub const TX: u32 = 4;
    /// Packets redirected to another interface through `LB_TX_PORTS`.
    pub const REDIRECT: u32 = 5;
    /// NAT packets handed to the stack (no route, neighbour unknown, or the
    /// egress interface not in `LB_TX_PORTS`).
    pub const TO_STACK: u32 = 6;
    /// DSR and VXLAN packets dropped: the backend's neighbour (or the next
    /// hop's) is unknown.
    pub const NO_NEIGHBOUR: u32 = 7;
    /// Replies translated back to the VIP (TC egress).
    pub const REVERSE_NAT: u32 = 8;
    /// ICMP errors translated (either direction).
    pub const ICMP_TRANSLATED: u32 = 9;
    /// DSR and VXLAN packets dropped: the route to the backend leaves by
    /// an interface that is neither the receiving one nor one sluice is
    /// attached to (where a redirected frame could vanish uncounted).
    pub const EGRESS_NOT_ATTACHED: u32 = 10;
    /// Slots in `LB_STATS`.
    pub const SLOTS: u32 = 16;
    /// Names, by index (empty = unused slot).
    pub const NAMES: [&str; SLOTS as usize] = [
        "conns_created",
        "conns_capped",
        "conn_insert_failed",
        "conns_rebalanced",
        "tx",
        "redirect",
        "to_stack",
        "no_neighbour",
        "reverse_nat",
        "icmp_translated",
        "egress_not_attached",
        "",
        "",
        "",
        "",
        "",
    ];
}

/// The flow hash Maglev tables are indexed with (`hash % TABLE_SIZE`).
/// Fixed (no per-host key) so that every node with the same services picks
/// the same backend for the same flow. Same code in kernel and user space.
#[must_use]
#[inline(always)]
pub fn flow_hash(src: [u64; 2], dst: [u64; 2], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(proto);
    h = mix(h ^ src[0]);
    h = mix(h ^ src[1]);
    h = mix(h ^ dst[0]);
    h = mix(h ^ dst[1]);
    h = mix(h ^ ((u64::from(sport) << 16) | u64::from(dport)));
    (h >> 32) as u32 ^ h as u32
}

/// The hash the socket LB indexes a service's Maglev table with
/// (`socket_hash(cookie) % TABLE_SIZE`): the socket's cookie, so every
/// datagram of one UDP socket goes to the same backend, and user space can
/// predict a socket's backend from `SO_COOKIE`.
#[must_use]
#[inline(always)]
pub fn socket_hash(cookie: u64) -> u32 {
    let h = mix(cookie ^ 0x736c_7569_6365_736b);
    (h >> 32) as u32 ^ h as u32
}

/// SplitMix64's finaliser: every input bit affects every output bit (the
/// kernel's flow hash and user space's Maglev permutations both use it).
#[inline(always)]
pub const fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        assert_eq!(core::mem::size_of::<ServiceKey>(), 24);
        assert_eq!(core::mem::size_of::<Service>(), 16);
        assert_eq!(core::mem::size_of::<Backend>(), 40);
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<Conn>(), 32);
        assert_eq!(core::mem::size_of::<BackendKey>(), 24);
        assert_eq!(core::mem::size_of::<Vip>(), 24);
        assert_eq!(core::mem::size_of::<LbConfig>(), 40);
        assert_eq!(core::mem::size_of::<LbCounter>(), 24);
    }

    #[test]
    fn flow_hash_spreads_ports() {
        // Neighbouring source ports land in different slots.
        let a = flow_hash([1, 0], [2, 0], 1000, 80, 6) % TABLE_SIZE;
        let b = flow_hash([1, 0], [2, 0], 1001, 80, 6) % TABLE_SIZE;
        assert_ne!(a, b);
        assert_ne!(
            flow_hash([1, 0], [2, 0], 1000, 80, 6),
            flow_hash([1, 0], [2, 0], 1000, 80, 17)
        );
    }
}
