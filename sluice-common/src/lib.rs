//! Types shared by sluice's kernel programs and user space: map names, key and
//! value layouts, capacities and the verdict/reason vocabulary. One definition each.
#![no_std]

pub mod lb;
pub mod settings;

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

/// Policy is double-buffered: every policy map holds two generations and the
/// `GENERATION` word says which one packets use. A change is written into the
/// inactive generation, the word is flipped, then the other generation is synced.
pub const GENERATIONS: u32 = 2;

/// L4 rules per generation. Rules are evaluated in order (first match wins), so
/// their cost grows with their number; large address sets belong in the lists.
pub const MAX_RULES: u32 = 256;

/// Prefixes each allow/deny list holds (per generation; the LPM trie is sized
/// for both generations).
pub const LIST_CAPACITY: u32 = 1 << 20;

/// Number of VLAN tags (802.1Q / 802.1ad) the parser walks through.
pub const MAX_VLAN_TAGS: usize = 2;

/// Number of IPv6 extension headers the parser walks through.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// What happens to a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Pass = 0,
    Drop = 1,
    /// Passed because the policy (or the rule) is in audit mode, but the
    /// policy would have dropped it.
    Audit = 2,
}

/// Verdict slots in the counter layout.
pub const VERDICT_SLOTS: u32 = 3;

impl Verdict {
    pub const ALL: [Self; 3] = [Self::Pass, Self::Drop, Self::Audit];

    #[must_use]
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Pass),
            1 => Some(Self::Drop),
            2 => Some(Self::Audit),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::Audit => "audit",
        }
    }
}

/// Why a packet got its verdict. Indexes the counters and tags flow records.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Nothing matched: the default action applied.
    Default = 0,
    /// The source matched the allow list.
    AllowList = 1,
    /// The source matched the deny list.
    DenyList = 2,
    /// An L4 rule matched.
    Rule = 3,
    /// The frame could not be parsed: the malformed-frame action applied.
    Malformed = 4,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): always passed.
    NotIp = 5,
    /// Over the rate of a `limit` rule.
    RateLimit = 6,
    /// SYN defence: a SYN from an unverified source while a `syn-guard`
    /// rule's rate was exceeded (answered with a challenge), or the answer to
    /// a challenge (consumed once it verified the source).
    SynDefence = 7,
    /// A per-source `limit` rule could not give the source its own bucket
    /// (new-source rate cap reached, or the table refused the insert) and the
    /// shared overflow bucket was empty.
    MapFull = 8,
    /// Addressed to a load-balanced service that has no usable backend (or,
    /// in DSR mode, whose backend's neighbour entry is unknown).
    NoBackend = 9,
    /// An IP fragment addressed to a load-balanced service: sluice does not
    /// balance fragments (later fragments carry no ports).
    VipFragment = 10,
}

/// Room in the counter layout for reasons added later without a map migration.
pub const REASON_SLOTS: u32 = 16;

impl Reason {
    pub const ALL: [Self; 11] = [
        Self::Default,
        Self::AllowList,
        Self::DenyList,
        Self::Rule,
        Self::Malformed,
        Self::NotIp,
        Self::RateLimit,
        Self::SynDefence,
        Self::MapFull,
        Self::NoBackend,
        Self::VipFragment,
    ];

    #[must_use]
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Default),
            1 => Some(Self::AllowList),
            2 => Some(Self::DenyList),
            3 => Some(Self::Rule),
            4 => Some(Self::Malformed),
            5 => Some(Self::NotIp),
            6 => Some(Self::RateLimit),
            7 => Some(Self::SynDefence),
            8 => Some(Self::MapFull),
            9 => Some(Self::NoBackend),
            10 => Some(Self::VipFragment),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::AllowList => "allow-list",
            Self::DenyList => "deny-list",
            Self::Rule => "rule",
            Self::Malformed => "malformed",
            Self::NotIp => "not-ip",
            Self::RateLimit => "rate-limit",
            Self::SynDefence => "syn-defence",
            Self::MapFull => "map-full",
            Self::NoBackend => "no-backend",
            Self::VipFragment => "vip-fragment",
        }
    }
}

/// Network-layer family of a packet, as the counters see it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// Not IP, or an Ethernet/VLAN header too short to tell.
    Other = 0,
    V4 = 1,
    V6 = 2,
}

pub const FAMILY_SLOTS: u32 = 3;

impl Family {
    pub const ALL: [Self; 3] = [Self::Other, Self::V4, Self::V6];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Other => "other",
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }
}

/// Transport class of a packet, as the counters see it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    /// No transport header known (not IP, or malformed before it).
    None = 0,
    Tcp = 1,
    Udp = 2,
    Icmp = 3,
    Icmpv6 = 4,
    /// Any other IP protocol (GRE, ESP, SCTP, no-next-header, ...).
    Other = 5,
    /// A non-first IP fragment: no transport header, matched on L3 only.
    Fragment = 6,
}

pub const L4_SLOTS: u32 = 7;

impl L4 {
    pub const ALL: [Self; 7] = [
        Self::None,
        Self::Tcp,
        Self::Udp,
        Self::Icmp,
        Self::Icmpv6,
        Self::Other,
        Self::Fragment,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Icmpv6 => "icmpv6",
            Self::Other => "other",
            Self::Fragment => "fragment",
        }
    }
}

/// Slots in `COUNTERS`: one per (family, l4, verdict, reason), so each packet
/// costs a single per-CPU increment and user space sums whichever view it shows.
pub const COUNTER_SLOTS: u32 = FAMILY_SLOTS * L4_SLOTS * VERDICT_SLOTS * REASON_SLOTS;

#[must_use]
pub const fn counter_index(family: Family, l4: L4, verdict: Verdict, reason: Reason) -> u32 {
    (((family as u32) * L4_SLOTS + l4 as u32) * VERDICT_SLOTS + verdict as u32) * REASON_SLOTS
        + reason as u32
}

/// Packets and bytes. Value of the per-CPU `COUNTERS` and `RULE_STATS` arrays.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Value of the allow/deny LPM tries: hits on this prefix. Shared by all CPUs
/// and updated with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryStats {
    pub packets: u64,
    pub bytes: u64,
    /// `CLOCK_BOOTTIME` nanoseconds of the last hit; 0 = never.
    pub last_seen_ns: u64,
    /// The entry's own address prefix length. An LPM lookup returns the
    /// longest match; comparing this tells user space whether the exact
    /// prefix it asked for is present. Not used by the kernel program.
    pub prefix_len: u32,
    pub _pad: u32,
}

/// LPM key data for IPv4 lists: generation byte, the address, then padding.
///
/// The kernel stores an entry's value right after its key data; key data a
/// multiple of 8 bytes long keeps `EntryStats` 8-byte aligned, so its atomic
/// counter adds never straddle a cache line (a split lock: ~0.5 ms each on
/// hosts that trap them). The padding is beyond the prefix length, so the
/// trie ignores it.
pub type KeyV4 = [u8; 8];
/// LPM key data for IPv6 lists: generation byte, the address, then padding
/// (see [`KeyV4`]).
pub type KeyV6 = [u8; 24];

/// LPM prefix length covering the generation byte plus `prefix_len` address bits.
#[must_use]
pub const fn lpm_prefix_len(prefix_len: u32) -> u32 {
    8 + prefix_len
}

/// Per-generation settings (`SETTINGS[generation]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `Verdict` for IP traffic nothing matched.
    pub default_action: u32,
    /// `Verdict` for frames that cannot be parsed.
    pub malformed_action: u32,
    /// Rules in use in this generation (`RULES[gen * MAX_RULES ..][..rule_count]`).
    pub rule_count: u32,
    /// `SETTINGS_F_*` bits. The kernel reads only `SETTINGS_F_AUDIT`; the
    /// others are the control plane's bookkeeping.
    pub flags: u32,
    /// Identifier the next added rule gets.
    pub next_rule_id: u32,
    pub _pad: u32,
    /// Prefixes in each list in this generation, indexed by `ListId`. Kept by
    /// the control plane so occupancy is known without walking the tries.
    pub list_len: [u32; 4],
}

/// The rules hold a `syn-guard` rule: answers to challenges are checked.
/// Kept by the control plane from the rules.
pub const SETTINGS_F_SYN_GUARD: u32 = 1 << 3;

/// The control plane initialised this generation.
pub const SETTINGS_F_INIT: u32 = 1 << 0;
/// Audit mode for the whole policy: what the lists, rules or default action
/// would drop is passed and counted with verdict `Audit`. The only flag the
/// kernel program reads; malformed frames are not affected.
pub const SETTINGS_F_AUDIT: u32 = 1 << 2;
/// A change touched this generation and had not finished: the inactive
/// generation must be resynchronised from the active one before the next change.
pub const SETTINGS_F_DIRTY: u32 = 1 << 1;

/// The four source-address lists.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListId {
    DenyV4 = 0,
    DenyV6 = 1,
    AllowV4 = 2,
    AllowV6 = 3,
}

impl ListId {
    pub const ALL: [Self; 4] = [Self::DenyV4, Self::DenyV6, Self::AllowV4, Self::AllowV6];

    /// "deny" or "allow".
    #[must_use]
    pub const fn kind(self) -> &'static str {
        match self {
            Self::DenyV4 | Self::DenyV6 => "deny",
            Self::AllowV4 | Self::AllowV6 => "allow",
        }
    }

    #[must_use]
    pub const fn map_name(self) -> &'static str {
        match self {
            Self::DenyV4 => map_names::DENY_V4,
            Self::DenyV6 => map_names::DENY_V6,
            Self::AllowV4 => map_names::ALLOW_V4,
            Self::AllowV6 => map_names::ALLOW_V6,
        }
    }
}

/// Rule matches only packets of `Rule::family`.
pub const RULE_F_FAMILY: u32 = 1 << 0;
/// Rule matches only packets whose destination port is in `port_lo..=port_hi`
/// (so only TCP/UDP packets that carry ports: not later fragments).
pub const RULE_F_DPORT: u32 = 1 << 1;
/// Rule matches only sources in `src_net/src_mask`.
pub const RULE_F_SRC: u32 = 1 << 2;
/// Rule matches only destinations in `dst_net/dst_mask`.
pub const RULE_F_DST: u32 = 1 << 3;
/// A drop rule in audit mode: matches are passed and counted as `Audit`.
pub const RULE_F_AUDIT: u32 = 1 << 4;
/// Rule matches only TCP SYNs without ACK (connection attempts).
pub const RULE_F_SYN: u32 = 1 << 5;
/// A `limit` rule with one bucket per source (prefix) instead of one shared bucket.
pub const RULE_F_PER_SOURCE: u32 = 1 << 6;
/// A `limit` rule that counts bytes (`interval` is picoseconds per byte).
pub const RULE_F_BYTES: u32 = 1 << 7;
/// A per-source `limit` rule that reports sources over the limit for
/// `escalate_after_ms` (the agent puts them on the deny list for `escalate_ttl_s`).
pub const RULE_F_ESCALATE: u32 = 1 << 8;

/// `Rule::action` values beyond the verdicts `Pass` (0) and `Drop` (1).
/// Packets over the limit are dropped (reason `RateLimit`); packets within it
/// go on to the next rule.
pub const RULE_ACTION_LIMIT: u32 = 3;
/// SYNs from unverified sources beyond the rate are answered with a
/// challenge and dropped (reason `SynDefence`); other packets go on to the
/// next rule.
pub const RULE_ACTION_SYN_GUARD: u32 = 4;

/// A `Rule::stats_slot` not yet assigned (a rule being added).
pub const UNASSIGNED_SLOT: u32 = u32::MAX;

/// An L4 rule (`RULES[gen * MAX_RULES + position]`).
///
/// Addresses are stored as two native-endian words built from the address
/// bytes with [`addr_words`] (IPv4 uses the first 4 bytes), so kernel and user
/// space compare the same bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// `Verdict` when the rule matches.
    pub action: u32,
    /// IP protocol number; 0 = any.
    pub proto: u32,
    /// 4 or 6, used when `RULE_F_FAMILY` is set.
    pub family: u32,
    /// `RULE_F_*` bits.
    pub flags: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    /// Index into `RULE_STATS`; stable for the life of the rule
    /// ([`UNASSIGNED_SLOT`] in a rule user space is adding).
    pub stats_slot: u32,
    /// User-visible identifier; stable for the life of the rule.
    pub id: u32,
    pub _pad: u32,
    pub src_net: [u64; 2],
    pub src_mask: [u64; 2],
    pub dst_net: [u64; 2],
    pub dst_mask: [u64; 2],
    /// `limit` / `syn-guard`: what one packet costs in nanoseconds (1e9 /
    /// rate), or with `RULE_F_BYTES` what one byte costs in picoseconds.
    pub interval: u64,
    /// Burst: nanoseconds of credit a bucket may hold ahead of time.
    pub tolerance_ns: u64,
    /// The rate as written (packets or, with `RULE_F_BYTES`, bytes per
    /// second) and the burst (packets or bytes); the kernel uses only
    /// `interval` and `tolerance_ns`.
    pub rate: u64,
    pub burst: u32,
    /// Per-source buckets key on the source masked to these prefix lengths.
    pub per_source_v4: u16,
    pub per_source_v6: u16,
    pub escalate_after_ms: u32,
    pub escalate_ttl_s: u32,
}

/// Sources (or source prefixes) the per-source `limit` buckets track, across
/// all per-source rules. An LRU map: when full, the least recently seen
/// source loses its bucket (and starts again with a full one).
pub const SOURCE_CAPACITY: u32 = 1 << 20;

/// Sources that answered a SYN challenge and skip `syn-guard` until their
/// verification expires. An LRU map; only sources that answered a challenge
/// (so can receive at their address) are inserted.
pub const VERIFIED_CAPACITY: u32 = 1 << 18;

/// Token-bucket state, kept as a GCRA "theoretical arrival time": a packet
/// conforms while `tat_ns - now <= tolerance`, and each conforming packet
/// moves `tat_ns` on by its cost. Shared buckets are updated with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tat_ns: u64,
    /// Start of the current run of over-limit packets (0 = not over).
    pub over_since_ns: u64,
    /// Last over-limit packet.
    pub last_over_ns: u64,
    /// Last time this bucket's source was reported for escalation.
    pub reported_ns: u64,
}

/// A run of over-limit packets ends when none came for this long.
pub const OVER_GAP_NS: u64 = 1_000_000_000;
/// A source still over its limit is reported again after this long (the
/// first report may have been lost, or the agent may have been away).
pub const REPORT_INTERVAL_NS: u64 = 1_000_000_000;

/// Key of `SRC_BUCKETS`: the rule's id and the masked source. Rule ids are
/// never reused while the dataplane exists, so a new rule never inherits the
/// buckets of a deleted one (those age out of the LRU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcKey {
    pub rule_id: u32,
    /// 4 or 6.
    pub family: u32,
    /// `addr_words` of the masked source.
    pub addr: [u64; 2],
}

/// Key of `SYN_VERIFIED`: a source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// 4 or 6.
    pub family: u32,
    pub _pad: u32,
    pub addr: [u64; 2],
}

/// `DDOS_CONFIG[0]`: settings of the DDoS stage that are not policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DdosConfig {
    /// New per-source buckets allowed per second, as a GCRA interval
    /// (0 = no cap). Past it, new sources share their rule's overflow bucket
    /// so a flood of new sources cannot evict the buckets of known ones.
    pub new_source_interval_ns: u64,
    pub new_source_tolerance_ns: u64,
    /// How long a source that answered a challenge stays verified.
    pub verified_ttl_ns: u64,
    /// Key of the challenge cookies (random, set when the maps are created).
    pub secret: [u64; 2],
}

/// Indexes of the per-CPU `STATS` array: events that are not packet verdicts.
pub mod stat {
    /// Per-source buckets created.
    pub const SRC_INSERTED: u32 = 0;
    /// New sources that got no bucket because the new-source rate was exceeded.
    pub const SRC_CAPPED: u32 = 1;
    /// Bucket inserts the map refused.
    pub const SRC_INSERT_FAILED: u32 = 2;
    /// SYN challenges sent.
    pub const SYN_CHALLENGES: u32 = 3;
    /// Sources verified by a correct answer.
    pub const SYN_VERIFIED: u32 = 4;
    /// Sources verified but not remembered (the insert failed).
    pub const SYN_VERIFY_FAILED: u32 = 5;
    /// Escalation reports written to `EVENTS`.
    pub const ESCALATIONS: u32 = 6;
    /// Escalation reports lost (ring full).
    pub const ESCALATIONS_LOST: u32 = 7;
    /// Flow records written to `FLOWS`.
    pub const FLOWS: u32 = 8;
    /// Flow records lost because the ring was full (reader too slow).
    pub const FLOWS_LOST_RING: u32 = 9;
    /// Flow records not written because this CPU was over the record rate cap.
    pub const FLOWS_LOST_CAP: u32 = 10;
    /// Packets written to `CAPTURE`.
    pub const CAPTURED: u32 = 11;
    /// Packets a capture missed because its ring was full.
    pub const CAPTURE_LOST: u32 = 12;
    /// Slots in `STATS`.
    pub const SLOTS: u32 = 16;
    /// Names, by index (empty = unused slot).
    pub const NAMES: [&str; SLOTS as usize] = [
        "source_buckets_created",
        "source_buckets_capped",
        "source_bucket_insert_failed",
        "syn_challenges",
        "syn_sources_verified",
        "syn_verify_insert_failed",
        "escalations",
        "escalations_lost",
        "flow_records",
        "flow_records_lost_ring_full",
        "flow_records_lost_rate_cap",
        "captured",
        "capture_lost",
        "",
        "",
        "",
    ];
}

/// An escalation report (ring `EVENTS`): a source stayed over a per-source
/// limit for the rule's `escalate_after_ms`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Escalation {
    pub ts_ns: u64,
    pub rule_id: u32,
    /// 4 or 6.
    pub family: u32,
    /// Masked source address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    pub prefix_len: u32,
    pub ttl_s: u32,
    pub over_for_ms: u32,
    pub _pad: u32,
}

/// `EVENTS` ring size.
pub const EVENTS_BYTES: u32 = 64 * 1024;
/// `FLOWS` ring size: about 50,000 records.
pub const FLOWS_BYTES: u32 = 4 * 1024 * 1024;
/// `CAPTURE` ring size.
pub const CAPTURE_BYTES: u32 = 16 * 1024 * 1024;

/// A flow record (ring `FLOWS`): one sampled packet and what sluice did with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRecord {
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub ts_ns: u64,
    pub ifindex: u32,
    /// Frame length in bytes.
    pub len: u32,
    /// Addresses as bytes (IPv4 in the first 4).
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// `Family` value.
    pub family: u8,
    /// IP protocol (last IPv6 next header); 0 when not IP.
    pub proto: u8,
    /// TCP flags byte (FIN=0x01 SYN=0x02 RST=0x04 PSH=0x08 ACK=0x10 ...).
    pub tcp_flags: u8,
    /// `L4` value.
    pub l4: u8,
    pub verdict: u8,
    pub reason: u8,
    pub _pad: u16,
    /// Rule id (reason rule / rate-limit / syn-defence) or matched list
    /// entry's prefix length (reason allow-list / deny-list); else 0.
    pub matched: u32,
    /// Sampling rate this record was taken at (1 = every packet).
    pub sample: u32,
    /// Load-balanced packets: the backend slot + 1; else 0.
    pub backend: u32,
}

/// `FLOW_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowConfig {
    /// 1-in-N sampling per `Verdict` (index = verdict); 0 = no records.
    pub sample: [u32; 4],
    /// Per-CPU record rate cap as a GCRA interval (0 = no cap).
    pub cap_interval_ns: u64,
    pub cap_tolerance_ns: u64,
}

/// `CAPTURE_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Non-zero while a capture runs.
    pub enabled: u32,
    /// Bit `1 << verdict` set = capture packets with that verdict.
    pub verdict_mask: u32,
    /// Only this interface (0 = any).
    pub ifindex: u32,
    /// Bytes of each packet to keep (at most `CAPTURE_SNAP`).
    pub snaplen: u32,
}

/// Most bytes of one packet a capture keeps.
pub const CAPTURE_SNAP: usize = 2048 - core::mem::size_of::<CaptureHeader>();

/// Header of a captured packet in the `CAPTURE` ring; `CAPTURE_SNAP` data
/// bytes follow (the first `cap_len` are the packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureHeader {
    pub ts_ns: u64,
    pub ifindex: u32,
    pub orig_len: u32,
    pub cap_len: u32,
    pub verdict: u8,
    pub reason: u8,
    pub _pad: u16,
}

/// A captured packet as it sits in the ring.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CaptureRecord {
    pub header: CaptureHeader,
    pub data: [u8; CAPTURE_SNAP],
}

/// The words a rule compares for an address: IPv4 is zero-padded to 16 bytes.
#[must_use]
pub fn addr_words(addr: &[u8; 16]) -> [u64; 2] {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&addr[..8]);
    lo.copy_from_slice(&addr[8..]);
    [u64::from_ne_bytes(hi), u64::from_ne_bytes(lo)]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, made only of integers and have no
    // implicit padding (explicit `_pad` fields fill the gaps).
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::EntryStats {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::Bucket {}
    unsafe impl aya::Pod for super::SrcKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::DdosConfig {}
    unsafe impl aya::Pod for super::Escalation {}
    unsafe impl aya::Pod for super::FlowRecord {}
    unsafe impl aya::Pod for super::FlowConfig {}
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::CaptureHeader {}
    unsafe impl aya::Pod for super::lb::ServiceKey {}
    unsafe impl aya::Pod for super::lb::Service {}
    unsafe impl aya::Pod for super::lb::Backend {}
    unsafe impl aya::Pod for super::lb::FlowKey {}
    unsafe impl aya::Pod for super::lb::Conn {}
    unsafe impl aya::Pod for super::lb::BackendKey {}
    unsafe impl aya::Pod for super::lb::Vip {}
    unsafe impl aya::Pod for super::lb::LbConfig {}
    unsafe impl aya::Pod for super::lb::LbCounter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_indices_are_unique_and_in_range() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for f in Family::ALL {
            for l in L4::ALL {
                for v in Verdict::ALL {
                    for r in Reason::ALL {
                        let i = counter_index(f, l, v, r) as usize;
                        assert!(i < seen.len());
                        assert!(!seen[i], "duplicate index {i}");
                        seen[i] = true;
                    }
                }
            }
        }
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<Rule>(), 136);
        assert_eq!(core::mem::size_of::<FlowRecord>(), 72);
        assert_eq!(core::mem::size_of::<Escalation>(), 48);
        assert_eq!(core::mem::size_of::<CaptureHeader>(), 24);
        assert_eq!(core::mem::size_of::<CaptureRecord>(), 2048);
        assert_eq!(core::mem::size_of::<SrcKey>(), 24);
        assert_eq!(core::mem::size_of::<DdosConfig>(), 40);
        assert_eq!(core::mem::size_of::<Settings>(), 6 * 4 + 16);
        assert_eq!(core::mem::size_of::<EntryStats>(), 32);
    }

    #[test]
    fn reason_and_verdict_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_u32(r as u32), Some(r));
        }
        for v in Verdict::ALL {
            assert_eq!(Verdict::from_u32(v as u32), Some(v));
        }
        assert_eq!(Reason::from_u32(REASON_SLOTS), None);
    }
}
