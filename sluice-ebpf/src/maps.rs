//! Every map of the XDP pipeline: key, value, capacity and what happens when full.
//! User space opens them by the names in `sluice_common::map_names` and pins them.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use sluice_common::{
    AddrKey, Bucket, CAPTURE_BYTES, COUNTER_SLOTS, CaptureConfig, Counter, DdosConfig,
    EVENTS_BYTES, EntryStats, FLOWS_BYTES, FlowConfig, GENERATIONS, JUMP_SLOTS, KeyV4, KeyV6,
    LIST_CAPACITY, MAX_RULES, Rule, SOURCE_CAPACITY, Settings, SrcKey, VERIFIED_CAPACITY,
    handoff::{Handoff, IcmpService},
    lb::{self, BackendKey, Conn, FlowKey, LbConfig, LbCounter, Vip},
    stat,
};

use crate::net::parse::PacketSlot;

/// Active policy generation (0 or 1). One u32; written only by the control
/// plane to flip between fully built generations. Never full.
#[map]
pub static GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// `Settings` per generation. Fixed size (2); never full.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(GENERATIONS, 0);

/// L4 rules, `MAX_RULES` per generation. The control plane refuses a rule
/// beyond `MAX_RULES` with an error naming the limit.
#[map]
pub static RULES: Array<Rule> = Array::with_max_entries(GENERATIONS * MAX_RULES, 0);

/// Per-rule hit counters, indexed by `Rule::stats_slot`; one slot per possible
/// rule, so it cannot fill before `RULES` does.
#[map]
pub static RULE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// Per-CPU packet/byte counters by (family, l4, verdict, reason); fixed size.
#[map]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

// Source-address lists: LPM tries keyed by (generation byte, address), sized
// for `LIST_CAPACITY` prefixes in each generation. Only user space inserts;
// an insert into a full trie fails with E2BIG and the whole change is rolled
// back and reported (nothing is half-applied).

#[map]
pub static DENY_V4: LpmTrie<KeyV4, EntryStats> =
    LpmTrie::with_max_entries(GENERATIONS * LIST_CAPACITY, 0);

#[map]
pub static DENY_V6: LpmTrie<KeyV6, EntryStats> =
    LpmTrie::with_max_entries(GENERATIONS * LIST_CAPACITY, 0);

#[map]
pub static ALLOW_V4: LpmTrie<KeyV4, EntryStats> =
    LpmTrie::with_max_entries(GENERATIONS * LIST_CAPACITY, 0);

#[map]
pub static ALLOW_V6: LpmTrie<KeyV6, EntryStats> =
    LpmTrie::with_max_entries(GENERATIONS * LIST_CAPACITY, 0);

// DDoS stage.

/// Bucket of each `limit` / `syn-guard` rule, indexed by `Rule::stats_slot`
/// (shared by all CPUs, atomic adds). One per possible rule; never full.
#[map]
pub static RULE_BUCKETS: Array<Bucket> = Array::with_max_entries(MAX_RULES, 0);

/// Per-source buckets of per-source `limit` rules, keyed by (rule id,
/// masked source); `SOURCE_CAPACITY` entries. LRU: when full the least
/// recently seen source is forgotten. Inserts past the new-source rate cap
/// (`DDOS_CONFIG`) are skipped and counted (`STATS[SRC_CAPPED]`), so a flood
/// of new sources cannot evict the buckets of sources already known.
#[map]
pub static SRC_BUCKETS: LruHashMap<SrcKey, Bucket> =
    LruHashMap::with_max_entries(SOURCE_CAPACITY, 0);

/// Per rule slot: the bucket shared by the sources that got no bucket of their own.
#[map]
pub static OVERFLOW_BKTS: Array<Bucket> = Array::with_max_entries(MAX_RULES, 0);

/// The new-source rate cap's own bucket. One entry.
#[map]
pub static NEW_SOURCES: Array<Bucket> = Array::with_max_entries(1, 0);

/// Sources that answered a SYN challenge -> verification expiry
/// (`CLOCK_BOOTTIME` ns); `VERIFIED_CAPACITY` entries, LRU. A failed insert
/// is counted (`STATS[SYN_VERIFY_FAILED]`); the source is challenged again.
#[map]
pub static SYN_VERIFIED: LruHashMap<AddrKey, u64> =
    LruHashMap::with_max_entries(VERIFIED_CAPACITY, 0);

/// DDoS settings that are not policy (new-source cap, verification TTL,
/// cookie key). One entry, written by the control plane.
#[map]
pub static DDOS_CONFIG: Array<DdosConfig> = Array::with_max_entries(1, 0);

/// Per-CPU event counters (`sluice_common::stat`). Fixed size.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::SLOTS, 0);

/// Escalation reports for the agent. When full, reports are lost and
/// counted (`STATS[ESCALATIONS_LOST]`); the kernel reports again a second later.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

// Observability.

/// Flow records. When full (reader too slow or away), records are lost and
/// counted (`STATS[FLOWS_LOST_RING]`); verdicts are not affected.
#[map]
pub static FLOWS: RingBuf = RingBuf::with_byte_size(FLOWS_BYTES, 0);

/// Flow sampling and the per-CPU record rate cap. One entry.
#[map]
pub static FLOW_CONFIG: Array<FlowConfig> = Array::with_max_entries(1, 0);

/// Per-CPU GCRA time of the record rate cap. One entry.
#[map]
pub static FLOW_BUDGET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// What `sluice capture` wants. One entry.
#[map]
pub static CAPTURE_CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// Captured packets. When full, packets are missed and counted
/// (`STATS[CAPTURE_LOST]`); verdicts are not affected.
#[map]
pub static CAPTURE: RingBuf = RingBuf::with_byte_size(CAPTURE_BYTES, 0);

/// Programs `sluice_xdp` jumps to (`sluice_common::JUMP_*`), set when the
/// program is loaded. Fixed size.
#[map]
pub static JUMP: ProgramArray = ProgramArray::with_max_entries(JUMP_SLOTS, 0);

// Load balancer. Services, backends and tables are written only by the
// control plane; the kernel writes the connection table and counters.

// Services, backends and Maglev tables: `lb_maps.rs` (the socket object
// reads the same maps).
pub use crate::lb_maps::{LB_BACKENDS, LB_MAGLEV, LB_SERVICES};

/// Connection table: client 5-tuple -> backend. LRU of `CONN_CAPACITY`:
/// when full the least recently used connection is forgotten (its next
/// packet is balanced again). New entries are rate-capped (`LB_CONFIG`),
/// and what the cap or a failed insert leaves out is counted in `LB_STATS`.
#[map]
pub static LB_CONNS: LruHashMap<FlowKey, Conn> = LruHashMap::with_max_entries(lb::CONN_CAPACITY, 0);

/// NAT backends -> the VIP their replies are translated back to (TC
/// egress). One entry per NAT member (+ whole-VIP members); sized like
/// `LB_BACKENDS`.
#[map]
pub static LB_REVERSE: HashMap<BackendKey, Vip> = HashMap::with_max_entries(lb::MAX_BACKENDS, 0);

/// LB settings (`LbConfig`). One entry.
#[map]
pub static LB_CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

/// The new-connection cap's bucket. One entry.
#[map]
pub static LB_NEW_CONNS: Array<Bucket> = Array::with_max_entries(1, 0);

/// Per-CPU LB event counters (`sluice_common::lb::lb_stat`). Fixed size.
#[map]
pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(lb::lb_stat::SLOTS, 0);

/// Per-CPU counters per service id / backend slot. Fixed size.
#[map]
pub static LB_SVC_STATS: PerCpuArray<LbCounter> =
    PerCpuArray::with_max_entries(lb::MAX_SERVICES, 0);

#[map]
pub static LB_BE_STATS: PerCpuArray<LbCounter> = PerCpuArray::with_max_entries(lb::MAX_BACKENDS, 0);

/// What the firewall decided for the packet in hand (`Handoff`). Written
/// for every packet by the main program (whose second half reads it back)
/// and read by the LB program after the tail call. Per-CPU scratch; one entry.
#[map]
pub static LB_VERDICT: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for the LB's FIB lookup (a 64-byte `bpf_fib_lookup`; as
/// plain words, since that type's unions would break loading the object's
/// BTF). Per-CPU; one entry.
#[map]
pub static LB_FIB: PerCpuArray<[u64; 8]> = PerCpuArray::with_max_entries(1, 0);

/// The packet as the main program parsed it (`PacketSlot`), written for
/// every packet like `LB_VERDICT`. Per-CPU scratch; one entry.
#[map]
pub static LB_PACKET: PerCpuArray<PacketSlot> = PerCpuArray::with_max_entries(1, 0);

/// The service an ICMP error was matched to, for the forwarding that
/// follows: its mode and VNI (`IcmpService`). Per-CPU scratch; one entry.
#[map]
pub static LB_ICMP_SVC: PerCpuArray<IcmpService> = PerCpuArray::with_max_entries(1, 0);

/// Interfaces the LB may redirect to (ifindex -> ifindex), filled by attach.
/// A backend behind an interface not in it is reached with a plain redirect.
#[map]
pub static LB_TX_PORTS: DevMapHash = DevMapHash::with_max_entries(256, 0);
