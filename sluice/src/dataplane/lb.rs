//! The load balancer's maps: services, backend slots, Maglev tables (built
//! here and swapped in with one update each), reverse NAT, counters.
//! Slot assignments live in the maps themselves, so any process can apply.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet},
    net::IpAddr,
    os::fd::AsFd as _,
};

use aya::maps::{Array, ArrayOfMaps, DevMapHash, HashMap, Map, MapData, PerCpuArray};
use sluice_common::{
    addr_words,
    lb::{
        BACKEND_F_DOWN, BACKEND_F_DRAINING, Backend, BackendKey, CONN_F_CLOSED, Conn, FlowKey,
        LB_F_ENABLED, LbConfig, LbCounter, MAX_BACKENDS, MAX_SERVICES, MODE_DSR, MODE_NAT,
        MODE_VXLAN, Service, ServiceKey, TABLE_SIZE, Vip, lb_stat,
    },
    map_names,
};

use super::{DataplaneError, PinRoot, policy::open_map, sys};
use crate::lb::{BackendAddr, Mode, Proto, ServiceId, ServiceSpec, maglev};

fn typed<T>(root: &PinRoot, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(open_map(root, name)?).map_err(|e| DataplaneError::PinnedMap {
        path: root.map(name),
        detail: e.to_string(),
    })
}

/// Connections the connection table is created with (the agent sets it
/// from `[lb] connections` before it first attaches).
static CONN_CAPACITY_WANTED: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(sluice_common::lb::CONN_CAPACITY);

/// Smallest and largest connection table sluice creates.
pub const MIN_CONNS: u32 = 1024;
pub const MAX_CONNS: u32 = 1 << 26;

pub fn set_conn_capacity(n: u32) {
    CONN_CAPACITY_WANTED.store(
        n.clamp(MIN_CONNS, MAX_CONNS),
        std::sync::atomic::Ordering::Relaxed,
    );
}

pub fn conn_capacity() -> u32 {
    CONN_CAPACITY_WANTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The pinned connection table's capacity.
pub fn pinned_conn_capacity(root: &PinRoot) -> Result<u32, DataplaneError> {
    let path = root.map(map_names::LB_CONNS);
    aya::maps::MapInfo::from_pin(&path)
        .map(|i| i.max_entries())
        .map_err(|e| DataplaneError::PinnedMap {
            path,
            detail: e.to_string(),
        })
}

/// Defaults of a fresh dataplane: a TCP connection idle for 15 minutes (UDP:
/// 5 minutes) is balanced afresh; at most 100,000 new connection-table
/// entries per second (burst 100,000).
pub const DEFAULT_TCP_IDLE_S: u64 = 900;
pub const DEFAULT_UDP_IDLE_S: u64 = 300;
pub const DEFAULT_NEW_CONNS_PER_S: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("too many services: sluice holds at most {max}")]
    TooManyServices { max: u32 },
    #[error("too many backends: sluice holds at most {max} (service members, all services)")]
    TooManyBackends { max: u32 },
    #[error(
        "service {service}: backend {backend} is IPv{backend_family}, the VIP is IPv{vip_family}"
    )]
    FamilyMismatch {
        service: ServiceId,
        backend: BackendAddr,
        vip_family: u8,
        backend_family: u8,
    },
    #[error("service {service}: VNI {vni} is out of range (0 to 16777215)")]
    Vni { service: ServiceId, vni: u32 },
    #[error("service {service}: VXLAN backends are reached over IPv4; {backend} is IPv6")]
    VxlanFamily {
        service: ServiceId,
        backend: BackendAddr,
    },
    #[error(
        "service {service}: a DSR backend keeps the client's destination port; \
         {backend} names another port"
    )]
    DsrPort {
        service: ServiceId,
        backend: BackendAddr,
    },
    #[error(
        "service {service}: backend {backend} needs a port only when the service has one \
         (whole-VIP NAT services keep the client's port)"
    )]
    WildcardPort {
        service: ServiceId,
        backend: BackendAddr,
    },
    #[error(
        "backend {backend} ({proto}) is behind two NAT services, {first} and {second}: its replies \
         could not be translated back to one VIP; give each service its own backend port"
    )]
    ReverseConflict {
        backend: BackendAddr,
        proto: &'static str,
        first: ServiceId,
        second: ServiceId,
    },
    #[error("service {service} lists backend {backend} twice")]
    DuplicateBackend {
        service: ServiceId,
        backend: BackendAddr,
    },
    #[error("service {service}: {source}")]
    Maglev {
        service: ServiceId,
        #[source]
        source: maglev::MaglevError,
    },
}

fn family(a: IpAddr) -> u8 {
    if a.is_ipv4() { 4 } else { 6 }
}

fn words(a: IpAddr) -> [u64; 2] {
    let mut b = [0u8; 16];
    match a {
        IpAddr::V4(v) => b[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => b.copy_from_slice(&v.octets()),
    }
    addr_words(&b)
}

fn addr_of(family: u8, w: [u64; 2]) -> IpAddr {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&w[0].to_ne_bytes());
    b[8..].copy_from_slice(&w[1].to_ne_bytes());
    if family == 4 {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(b)
    }
}

fn service_key(id: &ServiceId) -> ServiceKey {
    ServiceKey {
        addr: words(id.vip),
        port: id.port,
        proto: id.proto.number(),
        family: family(id.vip),
        _pad: 0,
    }
}

fn marker_key(vip: IpAddr) -> ServiceKey {
    ServiceKey {
        addr: words(vip),
        port: 0,
        proto: 0,
        family: family(vip),
        _pad: 0,
    }
}

fn service_id_of(k: &ServiceKey) -> Option<ServiceId> {
    let proto = match k.proto {
        6 => Proto::Tcp,
        17 => Proto::Udp,
        _ => return None,
    };
    Some(ServiceId {
        vip: addr_of(k.family, k.addr),
        port: k.port,
        proto,
    })
}

/// Gives a fresh LB its default settings; leaves configured ones alone.
pub fn initialise_if_needed(root: &PinRoot) -> Result<(), DataplaneError> {
    let cfg = config(root)?;
    if cfg.tcp_idle_ns == 0 && cfg.udp_idle_ns == 0 {
        let (interval, tolerance) =
            super::runtime::gcra(DEFAULT_NEW_CONNS_PER_S, DEFAULT_NEW_CONNS_PER_S);
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
    let (interval, tolerance) = super::runtime::gcra(new_per_s, burst);
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

/// A backend member as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberState {
    pub slot: u32,
    pub backend: BackendAddr,
    pub weight: u32,
    pub draining: bool,
    pub down: bool,
    /// Maglev table slots it holds (of `TABLE_SIZE`).
    pub table_slots: usize,
}

/// A service as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceState {
    pub id: ServiceId,
    pub slot: u32,
    pub mode: Mode,
    pub members: Vec<MemberState>,
}

/// What `apply` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    pub services_added: usize,
    pub services_removed: usize,
    pub tables_rebuilt: usize,
    pub backends_written: usize,
    pub backends_freed: usize,
}

struct Maps {
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    maglev: ArrayOfMaps<MapData>,
    reverse: HashMap<MapData, BackendKey, Vip>,
    /// `LB_MAGLEV` again, for deletes (aya has none for maps of maps).
    maglev_raw: std::os::fd::OwnedFd,
}

impl Maps {
    fn open(root: &PinRoot) -> Result<Self, DataplaneError> {
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

    fn read_services(&self) -> Result<BTreeMap<ServiceKey, Service>, DataplaneError> {
        let mut out = BTreeMap::new();
        for item in self.services.iter() {
            let (k, v) =
                item.map_err(|e| DataplaneError::map_err("read", map_names::LB_SERVICES, e))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    fn read_backends(&self) -> Result<Vec<Backend>, DataplaneError> {
        (0..MAX_BACKENDS)
            .map(|i| {
                self.backends
                    .get(&i, 0)
                    .map_err(|e| DataplaneError::map_err("read", map_names::LB_BACKENDS, e))
            })
            .collect()
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

/// The kernel Backend flags for a member.
fn member_flags(draining: bool, down: bool) -> u32 {
    let mut f = 0;
    if draining {
        f |= BACKEND_F_DRAINING;
    }
    if down {
        f |= BACKEND_F_DOWN;
    }
    f
}

/// Checks a desired set of services against what the kernel can hold and
/// what NAT can translate back. Nothing is written.
pub fn validate(services: &[ServiceSpec]) -> Result<(), LbError> {
    if services.len() > MAX_SERVICES as usize {
        return Err(LbError::TooManyServices { max: MAX_SERVICES });
    }
    let members: usize = services.iter().map(|s| s.backends.len()).sum();
    if members > MAX_BACKENDS as usize {
        return Err(LbError::TooManyBackends { max: MAX_BACKENDS });
    }
    let mut reverse: StdHashMap<(BackendAddr, Proto), ServiceId> = StdHashMap::new();
    for s in services {
        if let Mode::Vxlan { vni } = s.mode
            && vni > crate::lb::MAX_VNI
        {
            return Err(LbError::Vni { service: s.id, vni });
        }
        let mut seen = HashSet::new();
        for b in &s.backends {
            if !seen.insert(b.addr) {
                return Err(LbError::DuplicateBackend {
                    service: s.id,
                    backend: b.addr,
                });
            }
            if let Mode::Vxlan { .. } = s.mode {
                if !b.addr.addr.is_ipv4() {
                    return Err(LbError::VxlanFamily {
                        service: s.id,
                        backend: b.addr,
                    });
                }
            } else if family(b.addr.addr) != family(s.id.vip) {
                return Err(LbError::FamilyMismatch {
                    service: s.id,
                    backend: b.addr,
                    vip_family: family(s.id.vip),
                    backend_family: family(b.addr.addr),
                });
            }
            if s.id.port == 0 && b.addr.port != 0 {
                return Err(LbError::WildcardPort {
                    service: s.id,
                    backend: b.addr,
                });
            }
            if s.mode != Mode::Nat && b.addr.port != 0 && b.addr.port != s.id.port {
                return Err(LbError::DsrPort {
                    service: s.id,
                    backend: b.addr,
                });
            }
            if s.mode == Mode::Nat {
                let reply = BackendAddr {
                    addr: b.addr.addr,
                    port: if b.addr.port == 0 {
                        s.id.port
                    } else {
                        b.addr.port
                    },
                };
                if let Some(first) = reverse.insert((reply, s.id.proto), s.id)
                    && first != s.id
                {
                    return Err(LbError::ReverseConflict {
                        backend: reply,
                        proto: s.id.proto.name(),
                        first,
                        second: s.id,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Makes the kernel's services, backends, tables and reverse-NAT entries
/// match `services`. `down` names the members health checks failed.
/// Each service's table is swapped in with one update, after the backends
/// it names are written; removed backends are freed after the tables no
/// longer name them.
pub fn apply(
    root: &PinRoot,
    services: &[ServiceSpec],
    down: &HashSet<(ServiceId, BackendAddr)>,
) -> Result<ApplyReport, LbError> {
    validate(services)?;
    let mut maps = Maps::open(root)?;
    let mut report = ApplyReport::default();
    let current = maps.read_services()?;
    let mut backends = maps.read_backends()?;

    // Service ids: existing ones keep theirs.
    let mut used_ids: BTreeSet<u32> = current
        .iter()
        .filter(|(k, _)| k.proto != 0)
        .map(|(_, v)| v.id)
        .collect();
    let mut ids: Vec<u32> = Vec::with_capacity(services.len());
    for s in services {
        let key = service_key(&s.id);
        let id = match current.get(&key) {
            Some(v) => v.id,
            None => {
                let id = (0..MAX_SERVICES)
                    .find(|i| !used_ids.contains(i))
                    .ok_or(LbError::TooManyServices { max: MAX_SERVICES })?;
                used_ids.insert(id);
                report.services_added += 1;
                id
            }
        };
        ids.push(id);
    }
    let wanted_ids: HashSet<u32> = ids.iter().copied().collect();

    // Backend slots: (service id, addr, port) keeps its slot.
    let mut slot_of: StdHashMap<(u32, [u64; 2], u16), u32> = StdHashMap::new();
    for (i, b) in backends.iter().enumerate() {
        if b.family != 0 {
            slot_of.insert((b.service, b.addr, b.port), i as u32);
        }
    }
    let mut keep: HashSet<u32> = HashSet::new();
    let mut free = (0..MAX_BACKENDS).filter(|i| backends[*i as usize].family == 0);
    let mut free_list: Vec<u32> = Vec::new();
    // Slots of members of services that stay, keyed per service.
    let mut members: Vec<Vec<(u32, &crate::lb::BackendSpec, bool)>> = Vec::new();
    let mut old_inputs: Vec<Vec<(u32, u32)>> = Vec::new();
    for (s, &id) in services.iter().zip(&ids) {
        let mut m = Vec::new();
        // The table inputs as they are in the kernel now: (slot, effective weight).
        let mut old: Vec<(u32, u32)> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.family != 0 && b.service == id)
            .map(|(i, b)| {
                let usable = b.flags & (BACKEND_F_DOWN | BACKEND_F_DRAINING) == 0;
                (i as u32, if usable { b.weight } else { 0 })
            })
            .collect();
        old.sort_unstable();
        old_inputs.push(old);
        for b in &s.backends {
            let k = (id, words(b.addr.addr), b.addr.port);
            let slot = match slot_of.get(&k) {
                Some(&slot) => slot,
                None => {
                    let slot = match free_list.pop() {
                        Some(x) => x,
                        None => free
                            .next()
                            .ok_or(LbError::TooManyBackends { max: MAX_BACKENDS })?,
                    };
                    slot_of.insert(k, slot);
                    slot
                }
            };
            keep.insert(slot);
            m.push((slot, b, down.contains(&(s.id, b.addr))));
        }
        members.push(m);
    }
    drop(free);

    // 1. Backends the tables will name.
    for (m, &id) in members.iter().zip(&ids) {
        for &(slot, b, is_down) in m {
            let old = backends[slot as usize];
            let mut new = Backend {
                addr: words(b.addr.addr),
                port: b.addr.port,
                family: family(b.addr.addr),
                flags: member_flags(b.draining, is_down),
                generation: old.generation,
                service: id,
                weight: b.weight,
                ..Backend::default()
            };
            if old.family == 0 {
                new.generation = old.generation.wrapping_add(1);
            }
            if new != old {
                maps.backends
                    .set(slot, new, 0)
                    .map_err(|e| DataplaneError::map_err("write", map_names::LB_BACKENDS, e))?;
                backends[slot as usize] = new;
                report.backends_written += 1;
            }
        }
    }

    // 2. Tables, then service entries and VIP markers.
    for (((s, &id), m), old) in services.iter().zip(&ids).zip(&members).zip(&old_inputs) {
        let mut inputs: Vec<(u32, u32)> = m
            .iter()
            .map(|&(slot, b, is_down)| (slot, if b.draining || is_down { 0 } else { b.weight }))
            .collect();
        inputs.sort_unstable();
        let key = service_key(&s.id);
        let exists = current.contains_key(&key);
        let usable = inputs.iter().filter(|(_, w)| *w > 0).count() as u32;
        if !exists || inputs != *old {
            let names: Vec<String> = m.iter().map(|(_, b, _)| b.addr.to_string()).collect();
            let list: Vec<maglev::Member<'_>> = m
                .iter()
                .zip(&names)
                .map(|(&(slot, b, is_down), name)| maglev::Member {
                    name,
                    slot,
                    weight: if b.draining || is_down { 0 } else { b.weight },
                })
                .collect();
            let table = maglev::build(&list, TABLE_SIZE).map_err(|source| LbError::Maglev {
                service: s.id,
                source,
            })?;
            let inner = new_table(&table)?;
            maps.maglev
                .set(id, &inner, 0)
                .map_err(|e| DataplaneError::map_err("write", map_names::LB_MAGLEV, e))?;
            report.tables_rebuilt += 1;
        }
        let value = Service {
            id,
            mode: match s.mode {
                Mode::Nat => MODE_NAT,
                Mode::Dsr => MODE_DSR,
                Mode::Vxlan { .. } => MODE_VXLAN,
            },
            backends: usable,
            vni: match s.mode {
                Mode::Vxlan { vni } => vni,
                _ => 0,
            },
        };
        if current.get(&key) != Some(&value) {
            maps.services
                .insert(key, value, 0)
                .map_err(|e| DataplaneError::map_err("write", map_names::LB_SERVICES, e))?;
        }
        let marker = marker_key(s.id.vip);
        if !current.contains_key(&marker) {
            maps.services
                .insert(
                    marker,
                    Service {
                        id: u32::MAX,
                        ..Service::default()
                    },
                    0,
                )
                .map_err(|e| DataplaneError::map_err("write", map_names::LB_SERVICES, e))?;
        }
    }

    // 3. Reverse NAT entries.
    let mut want_rev: StdHashMap<BackendKey, Vip> = StdHashMap::new();
    for (s, &id) in services.iter().zip(&ids) {
        if s.mode != Mode::Nat {
            continue;
        }
        for b in &s.backends {
            let port = if b.addr.port == 0 {
                s.id.port
            } else {
                b.addr.port
            };
            want_rev.insert(
                BackendKey {
                    addr: words(b.addr.addr),
                    port,
                    proto: s.id.proto.number(),
                    family: family(b.addr.addr),
                    _pad: 0,
                },
                Vip {
                    addr: words(s.id.vip),
                    port: s.id.port,
                    _pad: 0,
                    service: id,
                },
            );
        }
    }
    let mut have_rev: Vec<(BackendKey, Vip)> = Vec::new();
    for item in maps.reverse.iter() {
        have_rev.push(item.map_err(|e| DataplaneError::map_err("read", map_names::LB_REVERSE, e))?);
    }
    for (k, v) in &want_rev {
        if !have_rev.iter().any(|(hk, hv)| hk == k && hv == v) {
            maps.reverse
                .insert(*k, *v, 0)
                .map_err(|e| DataplaneError::map_err("write", map_names::LB_REVERSE, e))?;
        }
    }
    for (k, _) in &have_rev {
        if !want_rev.contains_key(k) {
            let _ = maps.reverse.remove(k);
        }
    }

    // 4. Services no longer wanted, their tables and markers.
    let wanted_keys: HashSet<ServiceKey> = services.iter().map(|s| service_key(&s.id)).collect();
    let wanted_vips: HashSet<ServiceKey> = services.iter().map(|s| marker_key(s.id.vip)).collect();
    for (k, v) in &current {
        let gone = if k.proto == 0 {
            !wanted_vips.contains(k)
        } else {
            !wanted_keys.contains(k)
        };
        if !gone {
            continue;
        }
        maps.services
            .remove(k)
            .map_err(|e| DataplaneError::map_err("delete", map_names::LB_SERVICES, e))?;
        if k.proto != 0 && !wanted_ids.contains(&v.id) {
            let _ = sys::map_delete(maps.maglev_raw.as_fd(), &v.id.to_ne_bytes());
            report.services_removed += 1;
        }
    }

    // 5. Backend slots no longer named by any table.
    for (i, b) in backends.iter().enumerate() {
        let slot = i as u32;
        if b.family != 0 && !keep.contains(&slot) {
            let freed = Backend {
                generation: b.generation,
                ..Backend::default()
            };
            maps.backends
                .set(slot, freed, 0)
                .map_err(|e| DataplaneError::map_err("write", map_names::LB_BACKENDS, e))?;
            report.backends_freed += 1;
        }
    }

    let mut cfg = config(root)?;
    let enabled = if services.is_empty() { 0 } else { LB_F_ENABLED };
    if cfg.flags & LB_F_ENABLED != enabled {
        cfg.flags = (cfg.flags & !LB_F_ENABLED) | enabled;
        set_config(root, cfg)?;
    }
    Ok(report)
}

/// The services the kernel holds, with their members and table shares.
pub fn read(root: &PinRoot) -> Result<Vec<ServiceState>, DataplaneError> {
    let maps = Maps::open(root)?;
    let current = maps.read_services()?;
    let backends = maps.read_backends()?;
    let mut out = Vec::new();
    let keys: Vec<ServiceKey> = current.keys().filter(|k| k.proto != 0).copied().collect();
    for k in keys {
        let v = current[&k];
        let Some(id) = service_id_of(&k) else {
            continue;
        };
        let counts = table_counts(&maps, v.id).unwrap_or_default();
        let mut members: Vec<MemberState> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.family != 0 && b.service == v.id)
            .map(|(i, b)| MemberState {
                slot: i as u32,
                backend: BackendAddr {
                    addr: addr_of(b.family, b.addr),
                    port: b.port,
                },
                weight: b.weight,
                draining: b.flags & BACKEND_F_DRAINING != 0,
                down: b.flags & BACKEND_F_DOWN != 0,
                table_slots: counts.get(&(i as u32)).copied().unwrap_or(0),
            })
            .collect();
        members.sort_by_key(|m| m.backend);
        out.push(ServiceState {
            id,
            slot: v.id,
            mode: match v.mode {
                MODE_DSR => Mode::Dsr,
                MODE_VXLAN => Mode::Vxlan { vni: v.vni },
                _ => Mode::Nat,
            },
            members,
        });
    }
    Ok(out)
}

/// Table slots per backend slot of service `id`'s current table.
fn table_counts(maps: &Maps, id: u32) -> Result<BTreeMap<u32, usize>, DataplaneError> {
    let inner: MapData = maps
        .maglev
        .get(&id, 0)
        .map_err(|e| DataplaneError::map_err("read", map_names::LB_MAGLEV, e))?;
    let table = sys::array_lookup_all(inner.fd().as_fd(), TABLE_SIZE)
        .map_err(|e| DataplaneError::map_err("read", map_names::LB_MAGLEV, e))?;
    Ok(maglev::slot_counts(&table))
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
