//! The DDoS stage's layouts: token buckets (shared, per source, overflow),
//! the SYN guard's verified sources, its settings and escalation reports.

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

// SAFETY: repr(C), Copy, four u64s: no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Bucket {}

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
    /// 4 or 6 (`Family::version`).
    pub family: u32,
    /// `addr_words` of the masked source.
    pub addr: [u64; 2],
}

// SAFETY: repr(C), Copy, integers only: two u32s then u64s, no gap.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SrcKey {}

/// Key of `SYN_VERIFIED`: a source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// 4 or 6 (`Family::version`).
    pub family: u32,
    pub _pad: u32,
    pub addr: [u64; 2],
}

// SAFETY: repr(C), Copy, integers only; `_pad` is explicit.
#[cfg(feature = "user")]
unsafe impl aya::Pod for AddrKey {}

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

// SAFETY: repr(C), Copy, u64s only.
#[cfg(feature = "user")]
unsafe impl aya::Pod for DdosConfig {}

/// `EVENTS` ring size.
pub const EVENTS_BYTES: u32 = 64 * 1024;

/// An escalation report (ring `EVENTS`): a source stayed over a per-source
/// limit for the rule's `escalate_after_ms`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Escalation {
    pub ts_ns: u64,
    pub rule_id: u32,
    /// 4 or 6 (`Family::version`).
    pub family: u32,
    /// Masked source address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    pub prefix_len: u32,
    pub ttl_s: u32,
    pub over_for_ms: u32,
    pub _pad: u32,
}

// SAFETY: repr(C), Copy, integers only; `_pad` fills the tail.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Escalation {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<Escalation>(), 48);
        assert_eq!(core::mem::size_of::<SrcKey>(), 24);
        assert_eq!(core::mem::size_of::<AddrKey>(), 24);
        assert_eq!(core::mem::size_of::<DdosConfig>(), 40);
        assert_eq!(core::mem::size_of::<Bucket>(), 32);
    }
}
