//! Maps that are not policy: DDoS settings and event counters, flow-record
//! sampling, capture control, and the rings user space reads.

use aya::maps::{Array, MapData, PerCpuArray};
use sluice_common::{CaptureConfig, DdosConfig, FlowConfig, map_names, stat};

use super::{DataplaneError, PinRoot, policy::typed};

use sluice_common::settings::{DEFAULT_NEW_SOURCES_PER_S, DEFAULT_VERIFIED_TTL_S, gcra};

fn random_key() -> [u64; 2] {
    let mut buf = [0u8; 16];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most the remaining bytes of buf.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
    let (a, b) = buf.split_at(8);
    [
        u64::from_ne_bytes(a.try_into().expect("8 bytes")),
        u64::from_ne_bytes(b.try_into().expect("8 bytes")),
    ]
}

/// Gives fresh maps their defaults and a random cookie key; leaves
/// maps that already hold a key alone.
pub fn initialise_if_needed(root: &PinRoot) -> Result<(), DataplaneError> {
    let mut ddos: Array<MapData, DdosConfig> = typed(root, map_names::DDOS_CONFIG)?;
    let cur = ddos
        .get(&0, 0)
        .map_err(|e| DataplaneError::map_err("read", map_names::DDOS_CONFIG, e))?;
    if cur.secret == [0, 0] {
        let (interval, tolerance) = gcra(DEFAULT_NEW_SOURCES_PER_S, DEFAULT_NEW_SOURCES_PER_S);
        let cfg = DdosConfig {
            new_source_interval_ns: interval,
            new_source_tolerance_ns: tolerance,
            verified_ttl_ns: DEFAULT_VERIFIED_TTL_S * 1_000_000_000,
            secret: random_key(),
        };
        ddos.set(0, cfg, 0)
            .map_err(|e| DataplaneError::map_err("write", map_names::DDOS_CONFIG, e))?;
    }
    Ok(())
}

pub fn ddos_config(root: &PinRoot) -> Result<DdosConfig, DataplaneError> {
    let ddos: Array<MapData, DdosConfig> = typed(root, map_names::DDOS_CONFIG)?;
    ddos.get(&0, 0)
        .map_err(|e| DataplaneError::map_err("read", map_names::DDOS_CONFIG, e))
}

/// Changes the DDoS settings, keeping the cookie key.
pub fn set_ddos_config(root: &PinRoot, cfg: &DdosConfig) -> Result<(), DataplaneError> {
    let mut ddos: Array<MapData, DdosConfig> = typed(root, map_names::DDOS_CONFIG)?;
    let cur = ddos
        .get(&0, 0)
        .map_err(|e| DataplaneError::map_err("read", map_names::DDOS_CONFIG, e))?;
    let cfg = DdosConfig {
        secret: cur.secret,
        ..*cfg
    };
    ddos.set(0, cfg, 0)
        .map_err(|e| DataplaneError::map_err("write", map_names::DDOS_CONFIG, e))
}

pub fn flow_config(root: &PinRoot) -> Result<FlowConfig, DataplaneError> {
    let m: Array<MapData, FlowConfig> = typed(root, map_names::FLOW_CONFIG)?;
    m.get(&0, 0)
        .map_err(|e| DataplaneError::map_err("read", map_names::FLOW_CONFIG, e))
}

pub fn set_flow_config(root: &PinRoot, cfg: &FlowConfig) -> Result<(), DataplaneError> {
    let mut m: Array<MapData, FlowConfig> = typed(root, map_names::FLOW_CONFIG)?;
    m.set(0, *cfg, 0)
        .map_err(|e| DataplaneError::map_err("write", map_names::FLOW_CONFIG, e))
}

pub fn capture_config(root: &PinRoot) -> Result<CaptureConfig, DataplaneError> {
    let m: Array<MapData, CaptureConfig> = typed(root, map_names::CAPTURE_CONFIG)?;
    m.get(&0, 0)
        .map_err(|e| DataplaneError::map_err("read", map_names::CAPTURE_CONFIG, e))
}

pub fn set_capture_config(root: &PinRoot, cfg: &CaptureConfig) -> Result<(), DataplaneError> {
    let mut m: Array<MapData, CaptureConfig> = typed(root, map_names::CAPTURE_CONFIG)?;
    m.set(0, *cfg, 0)
        .map_err(|e| DataplaneError::map_err("write", map_names::CAPTURE_CONFIG, e))
}

/// The `STATS` event counters, summed over CPUs, by `sluice_common::stat` index.
pub fn stats(root: &PinRoot) -> Result<[u64; stat::SLOTS as usize], DataplaneError> {
    let m: PerCpuArray<MapData, u64> = typed(root, map_names::STATS)?;
    let mut out = [0u64; stat::SLOTS as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        let v = m
            .get(&(i as u32), 0)
            .map_err(|e| DataplaneError::map_err("read", map_names::STATS, e))?;
        *slot = v.iter().sum();
    }
    Ok(out)
}

/// The named, non-empty `STATS` counters.
pub fn named_stats(root: &PinRoot) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
    let s = stats(root)?;
    Ok(stat::NAMES
        .iter()
        .zip(s)
        .filter(|(n, _)| !n.is_empty())
        .map(|(n, v)| (*n, v))
        .collect())
}

/// A ring buffer map opened for reading.
pub type Ring = aya::maps::RingBuf<MapData>;

/// Opens one of the rings (`EVENTS`, `FLOWS`, `CAPTURE`) for reading. A
/// ring has one reader at a time: its read position is shared.
pub fn open_ring(root: &PinRoot, name: &'static str) -> Result<Ring, DataplaneError> {
    typed(root, name)
}

/// Reads the escalation reports already in the `EVENTS` ring (without
/// waiting) into `out`.
pub fn drain_escalations(ring: &mut Ring, out: &mut Vec<sluice_common::Escalation>) {
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<sluice_common::Escalation>() {
            // SAFETY: the kernel writes whole `Escalation` records; read unaligned.
            out.push(unsafe {
                std::ptr::read_unaligned(item.as_ptr().cast::<sluice_common::Escalation>())
            });
        }
    }
}
