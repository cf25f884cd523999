//! The only module that touches aya (the layering test holds it to that):
//! loading, attaching and pinning the programs, and reading and writing
//! their maps with generation flips. It speaks sluice-common types only.

pub mod attach;
pub mod capture;
#[cfg(test)]
mod contract;
pub mod explain;
pub mod flows;
pub mod integrity;
pub mod lb;
pub mod lockfile;
pub mod pins;
pub mod policy;
pub mod runtime;
pub mod sandbox;
pub mod sock;
pub mod sock_lb;
pub mod stats;
pub mod steer;
pub mod sys;
pub mod tc;

use std::{io, path::PathBuf};

pub use attach::{AttachMode, AttachReport, Attachment, DetachReport, ProgramStatus, Status};
pub use pins::{DEFAULT_PIN_ROOT, PinRoot};
pub use policy::{Change, ListEntry, PolicyMaps, RuleView};

/// The kernel programs, built by build.rs from sluice-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"));

/// Benchmark-only programs (ceiling, reference lookup, traffic generator);
/// never loaded by the product. See sluice-ebpf/src/bench.rs.
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-bench-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "permission denied {what}: sluice needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"
    )]
    Permission { what: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("mounting bpffs at /sys/fs/bpf failed: {source}")]
    MountBpffs {
        #[source]
        source: io::Error,
    },
    #[error(
        "no bpffs at /sys/fs/bpf in this mount namespace (under `ip netns exec`?): pins made here \
         would vanish with the command; use `sluice -n NETNS ...` instead"
    )]
    PrivateMountNamespace,
    #[error("pin root {path} is not on a bpf filesystem")]
    NotBpffs { path: PathBuf },
    #[error("the embedded kernel program cannot be parsed: {source}")]
    Object { source: Cause },
    #[error("pinned map {path} cannot be opened: {source}")]
    PinnedMap { path: PathBuf, source: Cause },
    #[error(
        "pinned map {path} does not match this build (expected {expected}, found {found}); \
         it was made by another sluice version: `sluice detach` each interface (any version can; \
         this removes the old policy too), then attach and apply the policy again"
    )]
    IncompatibleMap {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("no sluice dataplane at {root} (run `sluice attach IFACE` first)")]
    NotAttached { root: PathBuf },
    #[error(
        "the attached program predates {what}: it would read them as broader rules; run \
         `sluice upgrade` first (the agent upgrades it when it starts)"
    )]
    ProgramTooOld { what: &'static str },
    #[error("sluice is not attached to {iface} in netns {netns}")]
    NotAttachedTo { iface: String, netns: String },
    #[error("interface {name} does not exist in netns {netns}")]
    UnknownInterface { name: String, netns: String },
    #[error("the kernel refused the XDP program: {}", chain(source.as_ref()))]
    Load { source: Cause },
    #[error(
        "the kernel refused the socket programs (cgroup v2 connect, sendmsg and bind hooks \
         with bpf_link: Linux 5.7 or later): {}",
        chain(source.as_ref())
    )]
    SockLoad { source: Cause },
    /// The verifier refused one of sluice's programs.
    #[error(
        "the kernel's verifier refused program {program}: {source}{}\nverifier log (last lines):\n{log_tail}",
        hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    Verifier {
        program: String,
        #[source]
        source: io::Error,
        /// The last lines of the verifier's log.
        log_tail: String,
        /// What this kernel lacks that sluice needs, when it is too old for
        /// a feature sluice's programs use.
        hint: Option<String>,
    },
    #[error("attaching XDP to {iface} in {mode} mode failed: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        source: Cause,
    },
    #[error(
        "the clsact egress filter slot sluice uses on {iface} (priority {priority}, handle \
         {handle:#x}) holds another owner's {kind} filter{}; sluice does not replace it \
         (this kernel has no TCX, so sluice falls back to clsact)",
        if name.is_empty() { String::new() } else { format!(" ({name})") }
    )]
    TcSlotTaken {
        iface: String,
        priority: u16,
        handle: u32,
        kind: String,
        name: String,
    },
    #[error(
        "upgrading the program on {iface} failed: {source}; every interface keeps the old program"
    )]
    Upgrade { iface: String, source: Cause },
    #[error(
        "{list} list is full: it holds at most {capacity} prefixes ({current} now, {adding} more requested)"
    )]
    ListFull {
        list: &'static str,
        capacity: u32,
        current: u32,
        adding: usize,
    },
    #[error("{prefix} is not in the {list} list")]
    NotInList { list: &'static str, prefix: String },
    #[error("too many rules: sluice holds at most {max}")]
    TooManyRules { max: u32 },
    #[error("no rule with id {id}")]
    NoSuchRule { id: u32 },
    #[error("rule position {at} is out of range (there are {len} rules)")]
    BadPosition { at: usize, len: usize },
    #[error(
        "the attached program does not read the maps sluice would write ({}); nothing was \
         changed. `sluice upgrade` pins the program's own maps again (the agent does this \
         itself)",
        findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Unbound { findings: Vec<integrity::Finding> },
    #[error(
        "no cgroup v2 filesystem is mounted (workloads are cgroup v2 paths; mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`)"
    )]
    NoCgroup2,
    #[error("cgroup {path} {problem}")]
    Cgroup { path: PathBuf, problem: String },
    #[error("attaching the {hook} program to cgroup {path} failed: {}", chain(source.as_ref()))]
    CgroupAttach {
        path: PathBuf,
        hook: &'static str,
        source: Cause,
    },
    #[error("{problem}")]
    Steer { problem: String },
    #[error("the maps do not hold what was just written: {what}")]
    Readback { what: String },
    #[error("{op} on map {map} failed: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        source: Cause,
    },
}

/// What a dataplane error came from: the library's or kernel's own error,
/// kept whole so its chain (and errno) stays readable, or sluice's words
/// where there is no underlying error.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error and its causes, joined by ": ".
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl DataplaneError {
    /// Wraps an aya/io failure, turning EPERM/EACCES into the clear
    /// "needs privileges" error.
    pub(crate) fn map_err(
        op: &'static str,
        map: &'static str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        if is_permission(&e) {
            return Self::Permission {
                what: format!("({op} {map})"),
            };
        }
        Self::Map {
            op,
            map,
            source: e.into(),
        }
    }
}

/// The errno of the first OS error in `e`'s chain of causes (aya wraps the
/// syscall's or netlink's `io::Error` as a source).
pub(crate) fn errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(n) = err
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(n);
        }
        cur = err.source();
    }
    None
}

/// The kernel refused for want of privileges (EPERM, EACCES).
pub(crate) fn is_permission(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(errno(e), Some(libc::EPERM | libc::EACCES))
}

/// `CLOCK_BOOTTIME` now, in nanoseconds: the clock `last_seen_ns` uses.
pub fn boottime_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME is always available on Linux");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}
