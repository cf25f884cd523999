//! Packet capture from the `CAPTURE` ring: one capture at a time per pin root
//! tells the XDP program what to copy, reads the copies, and switches it off.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    path::{Path, PathBuf},
};

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use sluice_common::{
    CAPTURE_BYTES, CAPTURE_SNAP, CaptureConfig, CaptureHeader, Reason, Verdict, map_names, stat,
};

use super::{
    DataplaneError, PinRoot,
    lockfile::{self, LockError, LockFile},
    policy::typed,
};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "another capture is running on pin root {root}{}; sluice runs one capture at a time \
         per pin root (lock {lock})",
        holder(*.pid)
    )]
    Busy {
        root: PathBuf,
        pid: Option<u32>,
        lock: PathBuf,
    },
    #[error("capture lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

fn holder(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// The capture lock file of `root`.
#[must_use]
pub fn lock_path(root: &Path) -> PathBuf {
    lockfile::path_for("capture", root)
}

/// An exclusive, non-blocking lock on capturing from one pin root. The lock
/// file holds the owner's pid and is removed on release.
#[derive(Debug)]
pub struct CaptureLock(LockFile);

impl CaptureLock {
    pub fn acquire(root: &PinRoot) -> Result<Self, CaptureError> {
        let path = lock_path(&root.root);
        match LockFile::acquire(&path, &std::process::id().to_string()) {
            Ok(l) => Ok(Self(l)),
            Err(LockError::Busy { path, holder }) => Err(CaptureError::Busy {
                root: root.root.clone(),
                pid: holder.parse().ok(),
                lock: path,
            }),
            Err(LockError::Io { path, source }) => Err(CaptureError::Lock { path, source }),
        }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// What to capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    /// Interface index in the namespace of the interface (0 = any).
    pub ifindex: u32,
    /// Bit `1 << verdict` per verdict wanted.
    pub verdict_mask: u32,
    /// Bytes of each packet to keep, 1..=`CAPTURE_SNAP`.
    pub snaplen: u32,
}

impl Filter {
    #[must_use]
    pub fn mask_of(verdicts: &[Verdict]) -> u32 {
        verdicts.iter().fold(0, |m, v| m | (1 << (*v as u32)))
    }
}

/// One captured packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// `CLOCK_BOOTTIME` when the XDP program saw it, in ns.
    pub ts_ns: u64,
    pub ifindex: u32,
    /// Length of the frame on the wire.
    pub orig_len: u32,
    /// `Verdict` and `Reason` as the kernel wrote them.
    pub verdict: u8,
    pub reason: u8,
    /// The first bytes of the frame, Ethernet header first.
    pub data: Vec<u8>,
}

impl Packet {
    #[must_use]
    pub fn verdict(&self) -> Option<Verdict> {
        Verdict::from_u32(u32::from(self.verdict))
    }

    #[must_use]
    pub fn reason(&self) -> Option<Reason> {
        Reason::from_u32(u32::from(self.reason))
    }

    /// `verdict=drop reason=deny-list`: the words a capture file carries.
    #[must_use]
    pub fn comment(&self) -> String {
        let verdict = self.verdict().map_or_else(
            || format!("unknown-{}", self.verdict),
            |v| v.name().to_string(),
        );
        let reason = self.reason().map_or_else(
            || format!("unknown-{}", self.reason),
            |r| r.name().to_string(),
        );
        format!("verdict={verdict} reason={reason}")
    }
}

/// Nanoseconds since the Unix epoch of a `CLOCK_BOOTTIME` instant, converted
/// with the two clocks read now (`wall_now - (boot_now - ts)`).
#[must_use]
pub fn wall_clock_ns(boottime_ts_ns: u64) -> u64 {
    let boot_now = super::boottime_ns();
    let wall_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    wall_now.saturating_sub(boot_now.saturating_sub(boottime_ts_ns))
}

/// What the kernel counted during a capture.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// Packets copied into the ring.
    pub captured: u64,
    /// Packets a full ring made the kernel miss.
    pub lost: u64,
}

/// A running capture. Dropping it (also on error or panic) switches capture
/// off again; [`Capture::finish`] does the same and reports the counts.
pub struct Capture {
    ring: RingBuf<MapData>,
    config: Array<MapData, CaptureConfig>,
    stats: PerCpuArray<MapData, u64>,
    filter: Filter,
    started_ns: u64,
    at_start: KernelCounts,
    enabled: bool,
    /// Records skipped: left from before the start, another interface or verdict.
    pub skipped: u64,
    _lock: CaptureLock,
}

fn counts(stats: &PerCpuArray<MapData, u64>) -> Result<KernelCounts, DataplaneError> {
    let read = |i: u32| -> Result<u64, DataplaneError> {
        let v = stats
            .get(&i, 0)
            .map_err(|e| DataplaneError::map_err("read", map_names::STATS, e))?;
        Ok(v.iter().sum())
    };
    Ok(KernelCounts {
        captured: read(stat::CAPTURED)?,
        lost: read(stat::CAPTURE_LOST)?,
    })
}

impl Capture {
    /// Starts capturing under `lock`: switches off whatever a capture that
    /// died left running, empties the ring of its records, then tells the
    /// XDP program to copy packets matching `filter`.
    pub fn start(root: &PinRoot, lock: CaptureLock, filter: Filter) -> Result<Self, CaptureError> {
        if !root.is_set_up() {
            return Err(DataplaneError::NotAttached {
                root: root.root.clone(),
            }
            .into());
        }
        super::pins::check_pinned_maps(root, &super::pins::expected_maps(super::OBJECT)?)?;
        let mut config: Array<MapData, CaptureConfig> = typed(root, map_names::CAPTURE_CONFIG)?;
        let stats: PerCpuArray<MapData, u64> = typed(root, map_names::STATS)?;
        let mut ring = super::runtime::open_ring(root, map_names::CAPTURE)?;
        let write = |config: &mut Array<MapData, CaptureConfig>, cfg: CaptureConfig| {
            config
                .set(0, cfg, 0)
                .map_err(|e| DataplaneError::map_err("write", map_names::CAPTURE_CONFIG, e))
        };
        let old = config
            .get(&0, 0)
            .map_err(|e| DataplaneError::map_err("read", map_names::CAPTURE_CONFIG, e))?;
        if old.enabled != 0 {
            write(&mut config, CaptureConfig { enabled: 0, ..old })?;
        }
        // Bounded: nothing refills the ring once capture is off (a full
        // ring holds fewer records than this).
        let most = CAPTURE_BYTES as usize / size_of::<CaptureHeader>();
        for _ in 0..most {
            if ring.next().is_none() {
                break;
            }
        }
        let at_start = counts(&stats)?;
        let started_ns = super::boottime_ns();
        let cfg = CaptureConfig {
            enabled: 1,
            verdict_mask: filter.verdict_mask,
            ifindex: filter.ifindex,
            snaplen: filter.snaplen.min(CAPTURE_SNAP as u32),
        };
        // From here on, Drop switches capture off again.
        let mut capture = Self {
            ring,
            config,
            stats,
            filter,
            started_ns,
            at_start,
            enabled: true,
            skipped: 0,
            _lock: lock,
        };
        write(&mut capture.config, cfg)?;
        Ok(capture)
    }

    /// The next captured packet, if the ring holds one; never waits.
    pub fn next_packet(&mut self) -> Option<Packet> {
        loop {
            let item = self.ring.next()?;
            if item.len() < size_of::<CaptureHeader>() {
                self.skipped += 1;
                continue;
            }
            // SAFETY: the entry holds at least a CaptureHeader, a repr(C)
            // plain-integer type valid for every bit pattern; read unaligned
            // since the ring promises only 8-byte alignment.
            let h = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<CaptureHeader>()) };
            let wanted = h.ts_ns >= self.started_ns
                && (self.filter.ifindex == 0 || h.ifindex == self.filter.ifindex)
                && self.filter.verdict_mask & (1u32 << (h.verdict & 31)) != 0;
            if !wanted {
                self.skipped += 1;
                continue;
            }
            let start = size_of::<CaptureHeader>();
            let len = (h.cap_len as usize)
                .min(CAPTURE_SNAP)
                .min(item.len() - start);
            return Some(Packet {
                ts_ns: h.ts_ns,
                ifindex: h.ifindex,
                orig_len: h.orig_len,
                verdict: h.verdict,
                reason: h.reason,
                data: item[start..start + len].to_vec(),
            });
        }
    }

    /// The kernel's counts since the start.
    pub fn counts(&self) -> Result<KernelCounts, DataplaneError> {
        let now = counts(&self.stats)?;
        Ok(KernelCounts {
            captured: now.captured.saturating_sub(self.at_start.captured),
            lost: now.lost.saturating_sub(self.at_start.lost),
        })
    }

    fn disable(&mut self) -> Result<(), DataplaneError> {
        if !self.enabled {
            return Ok(());
        }
        let cur = self
            .config
            .get(&0, 0)
            .map_err(|e| DataplaneError::map_err("read", map_names::CAPTURE_CONFIG, e))?;
        self.config
            .set(0, CaptureConfig { enabled: 0, ..cur }, 0)
            .map_err(|e| DataplaneError::map_err("write", map_names::CAPTURE_CONFIG, e))?;
        self.enabled = false;
        Ok(())
    }

    /// Switches capture off and returns the kernel's counts since the start.
    pub fn finish(mut self) -> Result<KernelCounts, DataplaneError> {
        self.disable()?;
        self.counts()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(e) = self.disable() {
            eprintln!("sluice: warning: could not switch capture off: {e}");
        }
    }
}

impl AsFd for Capture {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for Capture {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_paths_are_distinct_per_root() {
        let a = lock_path(Path::new("/nonexistent/a/b"));
        let b = lock_path(Path::new("/nonexistent/a%2Fb"));
        assert_ne!(a, b);
        assert_eq!(a, Path::new("/run/sluice/capture-nonexistent%2Fa%2Fb.lock"));
    }

    #[test]
    fn verdict_masks() {
        assert_eq!(Filter::mask_of(&Verdict::ALL), 0b111);
        assert_eq!(Filter::mask_of(&[Verdict::Drop]), 0b010);
    }

    #[test]
    fn comments_name_verdict_and_reason() {
        let p = Packet {
            ts_ns: 0,
            ifindex: 1,
            orig_len: 60,
            verdict: Verdict::Drop as u8,
            reason: Reason::DenyList as u8,
            data: vec![],
        };
        assert_eq!(p.comment(), "verdict=drop reason=deny-list");
        let unknown = Packet {
            verdict: 9,
            reason: 40,
            ..p
        };
        assert_eq!(unknown.comment(), "verdict=unknown-9 reason=unknown-40");
    }
}
