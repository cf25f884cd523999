//! Defaults and bounds of the dataplane's run-time settings, and how user
//! space names its attachments: what both the model (config defaults and
//! validation) and the dataplane (a fresh map's contents) need.

/// Where sluice pins its programs, links and maps unless told otherwise.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/sluice";

/// How the XDP program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum AttachMode {
    /// In the driver (fastest); refused by drivers without XDP support.
    Native,
    /// In the kernel's generic path; works on every interface.
    Generic,
    /// Native, falling back to generic when the driver refuses it.
    Auto,
}

impl AttachMode {
    pub const ALL: [Self; 3] = [Self::Native, Self::Generic, Self::Auto];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Auto => "auto",
        }
    }

    /// The mode an attachment actually has (never `auto`).
    pub fn attached_from_name(s: &str) -> Option<Self> {
        match s {
            "native" => Some(Self::Native),
            "generic" => Some(Self::Generic),
            _ => None,
        }
    }
}

impl core::str::FromStr for AttachMode {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or("attach mode must be native, generic or auto")
    }
}

/// Defaults of a fresh dataplane: a source that answered a SYN challenge
/// stays verified for an hour; at most 100,000 new per-source buckets per
/// second (burst 100,000) so a flood of new sources cannot flush known ones.
pub const DEFAULT_VERIFIED_TTL_S: u64 = 3600;
pub const DEFAULT_NEW_SOURCES_PER_S: u64 = 100_000;

/// A GCRA (interval, tolerance) pair in nanoseconds for `rate` events per
/// second with a burst of `burst` events. `rate == 0` = no limit.
pub const fn gcra(rate: u64, burst: u64) -> (u64, u64) {
    if rate == 0 {
        return (0, 0);
    }
    let mut interval = 1_000_000_000 / rate;
    if interval == 0 {
        interval = 1;
    }
    let burst = if burst == 0 { 1 } else { burst };
    (interval, interval * (burst - 1))
}

/// Smallest and largest connection table sluice creates.
pub const MIN_CONNS: u32 = 1024;
pub const MAX_CONNS: u32 = 1 << 26;

/// Defaults of a fresh dataplane: a TCP connection idle for 15 minutes (UDP:
/// 5 minutes) is balanced afresh; at most 100,000 new connection-table
/// entries per second (burst 100,000).
pub const DEFAULT_TCP_IDLE_S: u64 = 900;
pub const DEFAULT_UDP_IDLE_S: u64 = 300;
pub const DEFAULT_NEW_CONNS_PER_S: u64 = 100_000;
