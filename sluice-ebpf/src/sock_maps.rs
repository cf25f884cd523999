//! Every map of the socket object (`sluice-sock-ebpf`): key, value, capacity
//! and what happens when full. User space opens them by the names in
//! `sluice_common::sock::sock_map_names` and pins them under `<root>/sock/maps/`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use sluice_common::sock::{
    MAX_SOCK_RULES, MAX_WORKLOADS, SOCK_COUNTERS_PER_WORKLOAD, SOCK_EVENTS_BYTES, SOCK_GENERATIONS,
    SockRule, WorkloadPolicy,
};

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
