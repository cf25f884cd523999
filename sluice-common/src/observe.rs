//! Observability layouts: flow records and packet capture (rings and their
//! settings), and the per-CPU event counters (`STATS`) every stage bumps.

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
    /// IP version (4, 6; 0 when not IP: `Family::version`).
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

// SAFETY: repr(C), Copy, integers only; `_pad` is explicit.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowRecord {}

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

// SAFETY: repr(C), Copy, integers only, no gap.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowConfig {}

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

// SAFETY: repr(C), Copy, u32s only.
#[cfg(feature = "user")]
unsafe impl aya::Pod for CaptureConfig {}

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

// SAFETY: repr(C), Copy, integers only; `_pad` fills the tail.
#[cfg(feature = "user")]
unsafe impl aya::Pod for CaptureHeader {}

/// A captured packet as it sits in the ring.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CaptureRecord {
    pub header: CaptureHeader,
    pub data: [u8; CAPTURE_SNAP],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<FlowRecord>(), 72);
        assert_eq!(core::mem::size_of::<CaptureHeader>(), 24);
        assert_eq!(core::mem::size_of::<CaptureRecord>(), 2048);
        assert_eq!(core::mem::size_of::<FlowConfig>(), 32);
    }
}

/// What `sluice explain` learns from the real program: it runs the pinned
/// XDP program on its frame with `BPF_PROG_TEST_RUN`, with this block in
/// the frame's XDP metadata (in front of the frame, where only BPF programs
/// and test runs can put data; a frame from the wire has none). The
/// pipeline, where it counts a packet's verdict, sees the magic and fills
/// in the rest, which the test run hands back with the frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExplainMeta {
    /// [`EXPLAIN_MAGIC`], set by user space.
    pub magic: u64,
    /// 1 once the pipeline wrote the fields below.
    pub answered: u32,
    /// `Verdict` value.
    pub verdict: u32,
    /// `Reason` value.
    pub reason: u32,
    /// As `FlowRecord::matched`: rule id or list entry prefix length.
    pub matched: u32,
    /// As `FlowRecord::backend`: backend slot + 1, or 0.
    pub backend: u32,
    pub _pad: u32,
}

// SAFETY: repr(C), Copy, integers only; `_pad` fills the tail.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ExplainMeta {}

/// `ExplainMeta::magic`: "sluice explain" in a word that no frame header
/// field produces by accident.
pub const EXPLAIN_MAGIC: u64 = 0x736c_7563_6578_706c;
