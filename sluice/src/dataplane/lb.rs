//! The load balancer's maps: services, backend slots, Maglev tables (built
//! here and swapped in with one update each), reverse NAT, counters.
//! Slot assignments live in the maps themselves, so any process can apply.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    os::fd::AsFd as _,
};

use aya::maps::{Array, ArrayOfMaps, DevMapHash, HashMap, MapData, PerCpuArray};
use sluice_common::{
    lb::{
        Backend, BackendKey, CONN_F_CLOSED, Conn, FlowKey, LbConfig, LbCounter, MAX_BACKENDS,
        Service, ServiceKey, TABLE_SIZE, Vip, lb_stat,
    },
    map_names,
};

use super::{DataplaneError, PinRoot, policy::typed, sys};

/// The pinned connection table's capacity.
pub fn pinned_conn_capacity(root: &PinRoot) -> Result<u32, DataplaneError> {
    let path = root.map(map_names::LB_CONNS);
    aya::maps::MapInfo::from_pin(&path)
        .map(|i| i.max_entries())
        .map_err(|e| DataplaneError::PinnedMap {
            path,
            source: e.into(),
        })
}

use sluice_common::settings::{
    DEFAULT_NEW_CONNS_PER_S, DEFAULT_TCP_IDLE_S, DEFAULT_UDP_IDLE_S, gcra,
};

/// Gives a fresh LB its default settings; leaves configured ones alone.
pub fn initialise_if_needed(root: &PinRoot) -> Result<(), DataplaneError> {
    let cfg = config(root)?;
    if cfg.tcp_idle_ns == 0 && cfg.udp_idle_ns == 0 {
        let (interval, tolerance) = gcra(DEFAULT_NEW_CONNS_PER_S, DEFAULT_NEW_CONNS_PER_S);
        set_config(
            root,
            LbConfig {
                tcp_idle_ns: DEFAULT_TCP_IDLE_S * 1_000_000_000,
                udp_idle_ns: DEFAULT_UDP_IDLE_S * 1_000_000_000,
                new_conn_interval_ns: interval,
                new_conn_tolerance_ns: tolerance,
                ..cfg
            },
        )?;
    }
    Ok(())
}

pub fn config(root: &PinRoot) -> Result<LbConfig, DataplaneError> {
    let m: Array<MapData, LbConfig> = typed(root, map_names::LB_CONFIG)?;
    m.get(&0, 0)
        .map_err(|e| DataplaneError::map_err("read", map_names::LB_CONFIG, e))
}

pub fn set_config(root: &PinRoot, cfg: LbConfig) -> Result<(), DataplaneError> {
    let mut m: Array<MapData, LbConfig> = typed(root, map_names::LB_CONFIG)?;
    m.set(0, cfg, 0)
        .map_err(|e| DataplaneError::map_err("write", map_names::LB_CONFIG, e))
}

/// Changes the connection-table settings, keeping the enabled flag.
pub fn set_conn_settings(
    root: &PinRoot,
    tcp_idle_s: u64,
    udp_idle_s: u64,
    new_per_s: u64,
    burst: u64,
) -> Result<(), DataplaneError> {
    let cur = config(root)?;
    let (interval, tolerance) = gcra(new_per_s, burst);
    set_config(
        root,
        LbConfig {
            tcp_idle_ns: tcp_idle_s * 1_000_000_000,
            udp_idle_ns: udp_idle_s * 1_000_000_000,
            new_conn_interval_ns: interval,
            new_conn_tolerance_ns: tolerance,
            ..cur
        },
    )
}

/// Adds an interface the LB may redirect frames to.
pub fn add_tx_port(root: &PinRoot, ifindex: u32) -> Result<(), DataplaneError> {
    let mut m: DevMapHash<MapData> = typed(root, map_names::LB_TX_PORTS)?;
    m.insert(ifindex, ifindex, None, 0)
        .map_err(|e| DataplaneError::map_err("write", map_names::LB_TX_PORTS, e))
}

pub fn remove_tx_port(root: &PinRoot, ifindex: u32) -> Result<(), DataplaneError> {
    let mut m: DevMapHash<MapData> = typed(root, map_names::LB_TX_PORTS)?;
    match m.remove(ifindex) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(DataplaneError::map_err("delete", map_names::LB_TX_PORTS, e)),
    }
}

/// The LB's service, backend, Maglev and reverse-NAT maps, opened once for
/// a sequence of reads and writes (the engine's `lb::apply` drives them).
pub struct LbMaps {
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    maglev: ArrayOfMaps<MapData>,
    reverse: HashMap<MapData, BackendKey, Vip>,
    /// `LB_MAGLEV` again, for deletes (aya has none for maps of maps).
    maglev_raw: std::os::fd::OwnedFd,
}

impl LbMaps {
    pub fn open(root: &PinRoot) -> Result<Self, DataplaneError> {
        Ok(Self {
            services: typed(root, map_names::LB_SERVICES)?,
            backends: typed(root, map_names::LB_BACKENDS)?,
            maglev: typed(root, map_names::LB_MAGLEV)?,
            reverse: typed(root, map_names::LB_REVERSE)?,
            maglev_raw: sys::obj_get(&root.map(map_names::LB_MAGLEV)).map_err(|source| {
                DataplaneError::Io {
                    what: format!("opening {}", root.map(map_names::LB_MAGLEV).display()),
                    source,
                }
            })?,
        })
    }

    /// Every service entry (VIP markers have `proto == 0`).
    pub fn services(&self) -> Result<BTreeMap<ServiceKey, Service>, DataplaneError> {
        let mut out = BTreeMap::new();
        for item in self.services.iter() {
            let (k, v) =
                item.map_err(|e| DataplaneError::map_err("read", map_names::LB_SERVICES, e))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Every backend slot, free ones (`family == 0`) included.
    pub fn backends(&self) -> Result<Vec<Backend>, DataplaneError> {
        (0..MAX_BACKENDS)
            .map(|i| {
                self.backends
                    .get(&i, 0)
                    .map_err(|e| DataplaneError::map_err("read", map_names::LB_BACKENDS, e))
            })
            .collect()
    }

    pub fn set_backend(&mut self, slot: u32, b: Backend) -> Result<(), DataplaneError> {
        self.backends
            .set(slot, b, 0)
            .map_err(|e| DataplaneError::map_err("write", map_names::LB_BACKENDS, e))
    }

    /// Swaps service `id`'s Maglev table for `table` with one update: a new
    /// inner array, filled with one batched write, then put in place.
    pub fn swap_table(&mut self, id: u32, table: &[u32]) -> Result<(), DataplaneError> {
        let inner = new_table(table)?;
        self.maglev
            .set(id, &inner, 0)
            .map_err(|e| DataplaneError::map_err("write", map_names::LB_MAGLEV, e))
    }

    /// Service `id`'s current table.
    pub fn table(&self, id: u32) -> Result<Vec<u32>, DataplaneError> {
        let inner: MapData = self
            .maglev
            .get(&id, 0)
            .map_err(|e| DataplaneError::map_err("read", map_names::LB_MAGLEV, e))?;
        sys::array_lookup_all(inner.fd().as_fd(), TABLE_SIZE)
            .map_err(|e| DataplaneError::map_err("read", map_names::LB_MAGLEV, e))
    }

    /// Drops service `id`'s table; a table already gone is no error.
    pub fn remove_table(&mut self, id: u32) {
        let _ = sys::map_delete(self.maglev_raw.as_fd(), &id.to_ne_bytes());
    }

    pub fn set_service(&mut self, k: ServiceKey, v: Service) -> Result<(), DataplaneError> {
        self.services
            .insert(k, v, 0)
            .map_err(|e| DataplaneError::map_err("write", map_names::LB_SERVICES, e))
    }

    pub fn remove_service(&mut self, k: &ServiceKey) -> Result<(), DataplaneError> {
        self.services
            .remove(k)
            .map_err(|e| DataplaneError::map_err("delete", map_names::LB_SERVICES, e))
    }

    pub fn reverse_entries(&self) -> Result<Vec<(BackendKey, Vip)>, DataplaneError> {
        self.reverse
            .iter()
            .map(|item| item.map_err(|e| DataplaneError::map_err("read", map_names::LB_REVERSE, e)))
            .collect()
    }

    pub fn set_reverse(&mut self, k: BackendKey, v: Vip) -> Result<(), DataplaneError> {
        self.reverse
            .insert(k, v, 0)
            .map_err(|e| DataplaneError::map_err("write", map_names::LB_REVERSE, e))
    }

    /// Removes a reverse-NAT entry; one already gone is no error.
    pub fn remove_reverse(&mut self, k: &BackendKey) {
        let _ = self.reverse.remove(k);
    }
}

/// A Maglev table in a fresh array (filled with one batched update), ready
/// to be swapped in.
fn new_table(table: &[u32]) -> Result<MapData, DataplaneError> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let def = aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, 4, TABLE_SIZE, 0);
    let map = MapData::create(def, "sluice_maglev", None)
        .map_err(|e| DataplaneError::map_err("create", map_names::LB_MAGLEV, e))?;
    let keys: Vec<u8> = (0..TABLE_SIZE).flat_map(u32::to_ne_bytes).collect();
    let values: Vec<u8> = table.iter().flat_map(|v| v.to_ne_bytes()).collect();
    sys::map_update_batch(map.fd().as_fd(), &keys, &values, table.len())
        .map_err(|(_, e)| DataplaneError::map_err("write", map_names::LB_MAGLEV, e))?;
    Ok(map)
}

/// LB event counters summed over CPUs, by `lb_stat` index.
pub fn stats(root: &PinRoot) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
    let m: PerCpuArray<MapData, u64> = typed(root, map_names::LB_STATS)?;
    let mut out = Vec::new();
    for (i, name) in lb_stat::NAMES.iter().enumerate() {
        if name.is_empty() {
            continue;
        }
        let v = m
            .get(&(i as u32), 0)
            .map_err(|e| DataplaneError::map_err("read", map_names::LB_STATS, e))?;
        out.push((*name, v.iter().sum()));
    }
    Ok(out)
}

fn counters_of(
    root: &PinRoot,
    name: &'static str,
    slots: impl Iterator<Item = u32>,
) -> Result<StdHashMap<u32, LbCounter>, DataplaneError> {
    let m: PerCpuArray<MapData, LbCounter> = typed(root, name)?;
    let mut out = StdHashMap::new();
    for slot in slots {
        let v = m
            .get(&slot, 0)
            .map_err(|e| DataplaneError::map_err("read", name, e))?;
        let mut sum = LbCounter::default();
        for c in v.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
            sum.conns += c.conns;
        }
        out.insert(slot, sum);
    }
    Ok(out)
}

/// Zeroes the per-CPU counters of `slots` in `name` (a service id or
/// backend slot handed out anew must not start from its last owner's).
fn zero_counters(root: &PinRoot, name: &'static str, slots: &[u32]) -> Result<(), DataplaneError> {
    if slots.is_empty() {
        return Ok(());
    }
    let mut m: PerCpuArray<MapData, LbCounter> = typed(root, name)?;
    let cpus = aya::util::nr_cpus().map_err(|(what, source)| DataplaneError::Io {
        what: what.to_string(),
        source,
    })?;
    for slot in slots {
        let zeros = aya::maps::PerCpuValues::try_from(vec![LbCounter::default(); cpus])
            .map_err(|e| DataplaneError::map_err("write", name, e))?;
        m.set(*slot, zeros, 0)
            .map_err(|e| DataplaneError::map_err("write", name, e))?;
    }
    Ok(())
}

/// Zeroes the counters of service ids and backend slots handed out anew.
pub fn zero_new(root: &PinRoot, ids: &[u32], slots: &[u32]) -> Result<(), DataplaneError> {
    zero_counters(root, map_names::LB_SVC_STATS, ids)?;
    zero_counters(root, map_names::LB_BE_STATS, slots)
}

/// Counters of the given service ids.
pub fn service_counters(
    root: &PinRoot,
    ids: impl Iterator<Item = u32>,
) -> Result<StdHashMap<u32, LbCounter>, DataplaneError> {
    counters_of(root, map_names::LB_SVC_STATS, ids)
}

/// Counters of the given backend slots.
pub fn backend_counters(
    root: &PinRoot,
    slots: impl Iterator<Item = u32>,
) -> Result<StdHashMap<u32, LbCounter>, DataplaneError> {
    counters_of(root, map_names::LB_BE_STATS, slots)
}

/// Connections per backend slot that are open (no FIN/RST seen) and were
/// active within their idle timeout, from a walk of the connection table,
/// plus the number of entries walked.
pub fn active_connections(root: &PinRoot) -> Result<(StdHashMap<u32, u64>, u64), DataplaneError> {
    let m: HashMap<MapData, FlowKey, Conn> = typed(root, map_names::LB_CONNS)?;
    let cfg = config(root)?;
    let now = super::boottime_ns();
    let mut out: StdHashMap<u32, u64> = StdHashMap::new();
    let mut walked = 0u64;
    for item in m.iter() {
        let Ok((k, c)) = item else {
            // An entry evicted between the key walk and its read.
            continue;
        };
        walked += 1;
        let idle = if k.proto == 6 {
            cfg.tcp_idle_ns
        } else {
            cfg.udp_idle_ns
        };
        if c.flags & CONN_F_CLOSED == 0 && now.saturating_sub(c.last_ns) <= idle + 1_000_000_000 {
            *out.entry(c.backend).or_default() += 1;
        }
    }
    Ok((out, walked))
}
