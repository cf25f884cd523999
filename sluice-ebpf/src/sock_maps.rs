//! Every map of the socket object (`sluice-sock-ebpf`): key, value, capacity
//! and what happens when full. User space opens them by the names in
//! `sluice_common::sock::sock_map_names` and pins them under `<root>/sock/maps/`.
//! The socket LB also reads the packet LB's services, backends and Maglev
//! tables (`lb_maps.rs`), bound to the XDP object's pins.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, SockHash},
};
use sluice_common::{
    lb::{MAX_BACKENDS, MAX_SERVICES, ServiceKey},
    sock::{
        MAX_SOCK_RULES, MAX_WORKLOADS, SOCK_COUNTERS_PER_WORKLOAD, SOCK_EVENTS_BYTES,
        SOCK_GENERATIONS, SOCK_LB_CAPACITY, SockLbConfig, SockLbSock, SockRule, WorkloadPolicy,
        sock_lb_stat,
    },
    steer::{
        MAX_STEER_DESTS, STEER_FLOWS_BYTES, STEER_PREFIXES, SteerDest, SteerEntry, SteerKey,
        steer_stat,
    },
};

const STEER_GENERATIONS: u32 = 2;

/// Active socket-policy generation (0 or 1). Written only by the control
/// plane, after the generation it names is fully written. Never full.
#[map]
pub static SOCK_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Workloads: cgroup id -> workload slot. `MAX_WORKLOADS` entries; the
/// control plane refuses a workload beyond that, so an insert never fails
/// for want of room.
#[map]
pub static WORKLOADS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_WORKLOADS, 0);

/// Per generation and workload slot: defaults, flags and rule counts. Fixed size.
#[map]
pub static SOCK_POLICY: Array<WorkloadPolicy> =
    Array::with_max_entries(SOCK_GENERATIONS * MAX_WORKLOADS, 0);

/// Per generation and workload slot: `MAX_SOCK_RULES` rules. Fixed size;
/// the control plane refuses a workload with more rules.
#[map]
pub static SOCK_RULES: Array<SockRule> =
    Array::with_max_entries(SOCK_GENERATIONS * MAX_WORKLOADS * MAX_SOCK_RULES, 0);

/// Per-CPU decision counters by (workload slot, hook, verdict, reason)
/// (`sock_counter_slot`). Fixed size; a slot is zeroed when a new workload
/// takes it.
#[map]
pub static SOCK_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_WORKLOADS * SOCK_COUNTERS_PER_WORKLOAD, 0);

/// Denied and audited calls (`SockEvent`) for the agent's flow reader. When
/// full (reader too slow or away), records are lost and counted in
/// `SOCK_LOST`; verdicts are not affected.
#[map]
pub static SOCK_EVENTS: RingBuf = RingBuf::with_byte_size(SOCK_EVENTS_BYTES, 0);

/// Per-CPU count of `SockEvent`s lost to a full ring. One entry.
#[map]
pub static SOCK_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

// The socket load balancer.

/// Whether the socket LB is on and which network namespace it serves
/// (`SockLbConfig`). One entry, written by the control plane.
#[map]
pub static SOCK_LB_CONFIG: Array<SockLbConfig> = Array::with_max_entries(1, 0);

/// Services the socket LB leaves to the packet LB (`socket = false`), by
/// the key their `LB_SERVICES` entry has. At most one per service
/// (`MAX_SERVICES`); the control plane refuses more services.
#[map]
pub static SOCK_LB_OFF: HashMap<ServiceKey, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Translated sockets: socket cookie -> VIP and backend (`SockLbSock`), so
/// getpeername() and recvmsg() report the VIP. `SOCK_LB_CAPACITY` entries,
/// allocated as used (`BPF_F_NO_PREALLOC`); an entry is deleted when its
/// socket is released. When full, new sockets are still balanced, report
/// their backend as the peer, and are counted (`sock_lb_stat::STATE_FULL`).
#[map]
pub static SOCK_LB_SOCKS: HashMap<u64, SockLbSock> =
    HashMap::with_max_entries(SOCK_LB_CAPACITY, BPF_F_NO_PREALLOC);

/// Per-CPU socket LB event counters (`sock_lb_stat`). Fixed size.
#[map]
pub static SOCK_LB_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(sock_lb_stat::SLOTS, 0);

/// Per-CPU sockets balanced to each backend slot of `LB_BACKENDS`. Fixed
/// size; a slot is zeroed when a new backend takes it.
#[map]
pub static SOCK_LB_BACKENDS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// `BPF_F_NO_PREALLOC`: a hash map's entries are allocated when inserted.
const BPF_F_NO_PREALLOC: u32 = 1;

// sk_lookup steering (`sluice steer`).

/// Active steering generation (0 or 1): the first byte of every
/// `STEER_RULES` key. Written only by the control plane, after the
/// generation it names is fully written. Never full.
#[map]
pub static STEER_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Steering rules: (generation, protocol, family, address prefix) -> the
/// port ranges and destinations to try (`SteerEntry`). Longest prefix
/// match; both generations live here, `STEER_PREFIXES` entries each,
/// allocated as used. The control plane counts a generation's entries
/// before writing and refuses a table that does not fit, so an insert
/// never fails for want of room.
#[map]
pub static STEER_RULES: LpmTrie<SteerKey, SteerEntry> =
    LpmTrie::with_max_entries(STEER_GENERATIONS * STEER_PREFIXES, 0);

/// Destination slot -> the listening (TCP) or bound (UDP) socket it
/// delivers to. `MAX_STEER_DESTS` entries; the control plane refuses more
/// destinations. An entry disappears when its socket is closed (lookups
/// then count `no_socket`).
#[map]
pub static STEER_SOCKS: SockHash<u32> = SockHash::with_max_entries(MAX_STEER_DESTS, 0);

/// Destination slot -> the steer owning it and its socket's cookie
/// (`SteerDest`, written by the control plane: user space cannot read
/// `STEER_SOCKS`' values). Not read by the program. Fixed size.
#[map]
pub static STEER_DESTS: Array<SteerDest> = Array::with_max_entries(MAX_STEER_DESTS, 0);

/// Per-CPU counters per destination (`steer_stat`). Fixed size; a slot is
/// zeroed when a new destination takes it.
#[map]
pub static STEER_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_STEER_DESTS * steer_stat::PER_DEST, 0);

/// Flow records (`FlowRecord`, reason `steer`) of steered TCP connections
/// and of every refused lookup. When full (reader slow or away), records
/// are lost and counted in `STEER_LOST`; steering is not affected.
#[map]
pub static STEER_FLOWS: RingBuf = RingBuf::with_byte_size(STEER_FLOWS_BYTES, 0);

/// Per-CPU count of flow records lost to a full `STEER_FLOWS`. One entry.
#[map]
pub static STEER_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
