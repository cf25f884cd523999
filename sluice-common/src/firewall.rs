//! The firewall's layouts: double-buffered policy generations, the
//! allow/deny lists (LPM keys and per-entry stats), settings and L4 rules.

use crate::names::map_names;

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

// SAFETY: repr(C), Copy, integers only; `_pad` fills the tail.
#[cfg(feature = "user")]
unsafe impl aya::Pod for EntryStats {}

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

// SAFETY: repr(C), Copy, u32s only; `_pad` is explicit.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Settings {}

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
/// Rule matches only packets whose source port is in `sport_lo..=sport_hi`
/// (TCP/UDP packets that carry ports).
pub const RULE_F_SPORT: u32 = 1 << 9;
/// Rule matches only TCP packets whose flags byte, masked with
/// [`rule_tcp_mask`], equals [`rule_tcp_value`] (both kept in the high half
/// of `Rule::flags`, which the `RULE_F_*` bits leave free).
pub const RULE_F_TCP_FLAGS: u32 = 1 << 10;

/// `Rule::flags` with a TCP flags test: `mask` selects the flags looked at,
/// `value` says which of them must be set (the rest of `mask` clear).
#[must_use]
pub const fn rule_tcp_flags(mask: u8, value: u8) -> u32 {
    RULE_F_TCP_FLAGS | (mask as u32) << 16 | (value as u32) << 24
}

/// The TCP flags a `RULE_F_TCP_FLAGS` rule looks at.
#[must_use]
pub const fn rule_tcp_mask(flags: u32) -> u8 {
    (flags >> 16) as u8
}

/// The TCP flags (of [`rule_tcp_mask`]) a `RULE_F_TCP_FLAGS` rule wants set.
#[must_use]
pub const fn rule_tcp_value(flags: u32) -> u8 {
    (flags >> 24) as u8
}

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
/// bytes with [`addr_words`](crate::addr_words) (IPv4 uses the first 4
/// bytes), so kernel and user space compare the same bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// `Verdict` when the rule matches.
    pub action: u32,
    /// IP protocol number; 0 = any.
    pub proto: u32,
    /// 4 or 6 (`Family::version`), used when `RULE_F_FAMILY` is set.
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
    /// Source port range, used when `RULE_F_SPORT` is set (this word was
    /// padding before source ports existed: older rules hold zeros here
    /// and no `RULE_F_SPORT`, so maps carry over an upgrade unchanged).
    pub sport_lo: u16,
    pub sport_hi: u16,
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

// SAFETY: repr(C), Copy, integers only, laid out without gaps (the source
// ports align the address words).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Rule {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<Rule>(), 136);
        assert_eq!(core::mem::size_of::<Settings>(), 6 * 4 + 16);
        assert_eq!(core::mem::size_of::<EntryStats>(), 32);
    }
}
