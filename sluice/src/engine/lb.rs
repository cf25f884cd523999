//! The load balancer's way into the kernel: desired services (model) become
//! backend slots, Maglev tables, service entries and reverse-NAT entries,
//! written in an order that never lets a packet see a half-made service; and
//! the kernel's LB read back as services.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap, HashSet},
    net::IpAddr,
};

use sluice_common::{
    Family, ip_from_words, ip_words,
    lb::{
        BACKEND_F_DOWN, BACKEND_F_DRAINING, Backend, BackendKey, LB_F_ENABLED, MAX_BACKENDS,
        MAX_SERVICES, MODE_DSR, MODE_NAT, MODE_VXLAN, Service, ServiceKey, TABLE_SIZE, Vip,
    },
};

use crate::{
    dataplane::{self, DataplaneError, PinRoot, lb::LbMaps},
    model::lb::{BackendAddr, BackendSpec, LbError, Mode, Proto, ServiceId, ServiceSpec, maglev},
};

/// Why an LB change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Spec(#[from] LbError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("service {service}: {source}")]
    Maglev {
        service: ServiceId,
        #[source]
        source: maglev::MaglevError,
    },
}

/// An address read back from an LB key or backend entry; an entry that is
/// not IP (never written so) reads as the unspecified IPv6 address.
fn addr_of(family: u8, w: [u64; 2]) -> IpAddr {
    ip_from_words(family, w).unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
}

pub(crate) fn service_key(id: &ServiceId) -> ServiceKey {
    ServiceKey {
        addr: ip_words(&id.vip),
        port: id.port,
        proto: id.proto.number(),
        family: Family::of(&id.vip).version(),
        _pad: 0,
    }
}

fn marker_key(vip: IpAddr) -> ServiceKey {
    ServiceKey {
        addr: ip_words(&vip),
        port: 0,
        proto: 0,
        family: Family::of(&vip).version(),
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

impl MemberState {
    /// `down` (health checks), `draining` (no new connections) or `active`.
    #[must_use]
    pub const fn state_name(&self) -> &'static str {
        if self.down {
            "down"
        } else if self.draining {
            "draining"
        } else {
            "active"
        }
    }
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

/// Makes the kernel's services, backends, tables and reverse-NAT entries
/// match `services`. `down` names the members health checks failed.
/// Each service's table is swapped in with one update, after the backends
/// it names are written; removed backends are freed after the tables no
/// longer name them.
pub fn apply(
    root: &PinRoot,
    services: &[ServiceSpec],
    down: &HashSet<(ServiceId, BackendAddr)>,
) -> Result<ApplyReport, ApplyError> {
    crate::model::lb::validate_specs(services)?;
    let mut maps = LbMaps::open(root)?;
    let mut report = ApplyReport::default();
    let current = maps.services()?;
    let mut backends = maps.backends()?;

    // Service ids: existing ones keep theirs.
    let mut used_ids: BTreeSet<u32> = current
        .iter()
        .filter(|(k, _)| k.proto != 0)
        .map(|(_, v)| v.id)
        .collect();
    let mut ids: Vec<u32> = Vec::with_capacity(services.len());
    // Ids and slots handed out anew: their counters start from zero, not
    // from their last owner's.
    let mut new_ids: Vec<u32> = Vec::new();
    let mut new_slots: Vec<u32> = Vec::new();
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
                new_ids.push(id);
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
    let mut members: Vec<Vec<(u32, &BackendSpec, bool)>> = Vec::new();
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
            let k = (id, ip_words(&b.addr.addr), b.addr.port);
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
                    new_slots.push(slot);
                    slot
                }
            };
            keep.insert(slot);
            m.push((slot, b, down.contains(&(s.id, b.addr))));
        }
        members.push(m);
    }
    drop(free);
    // No table names the new ids and slots yet: no packet is counted
    // against them before this.
    dataplane::lb::zero_new(root, &new_ids, &new_slots)?;

    // 1. Backends the tables will name.
    for (m, &id) in members.iter().zip(&ids) {
        for &(slot, b, is_down) in m {
            let old = backends[slot as usize];
            let mut new = Backend {
                addr: ip_words(&b.addr.addr),
                port: b.addr.port,
                family: Family::of(&b.addr.addr).version(),
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
                maps.set_backend(slot, new)?;
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
            let table = maglev::build(&list, TABLE_SIZE).map_err(|source| ApplyError::Maglev {
                service: s.id,
                source,
            })?;
            maps.swap_table(id, &table)?;
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
            maps.set_service(key, value)?;
        }
        let marker = marker_key(s.id.vip);
        if !current.contains_key(&marker) {
            maps.set_service(
                marker,
                Service {
                    id: u32::MAX,
                    ..Service::default()
                },
            )?;
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
                    addr: ip_words(&b.addr.addr),
                    port,
                    proto: s.id.proto.number(),
                    family: Family::of(&b.addr.addr).version(),
                    _pad: 0,
                },
                Vip {
                    addr: ip_words(&s.id.vip),
                    port: s.id.port,
                    _pad: 0,
                    service: id,
                },
            );
        }
    }
    let have_rev = maps.reverse_entries()?;
    for (k, v) in &want_rev {
        if !have_rev.iter().any(|(hk, hv)| hk == k && hv == v) {
            maps.set_reverse(*k, *v)?;
        }
    }
    for (k, _) in &have_rev {
        if !want_rev.contains_key(k) {
            maps.remove_reverse(k);
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
        maps.remove_service(k)?;
        if k.proto != 0 && !wanted_ids.contains(&v.id) {
            maps.remove_table(v.id);
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
            maps.set_backend(slot, freed)?;
            report.backends_freed += 1;
        }
    }

    let mut cfg = dataplane::lb::config(root)?;
    let enabled = if services.is_empty() { 0 } else { LB_F_ENABLED };
    if cfg.flags & LB_F_ENABLED != enabled {
        cfg.flags = (cfg.flags & !LB_F_ENABLED) | enabled;
        dataplane::lb::set_config(root, cfg)?;
    }
    Ok(report)
}

/// The services the kernel holds, with their members and table shares.
pub fn read(root: &PinRoot) -> Result<Vec<ServiceState>, DataplaneError> {
    let maps = LbMaps::open(root)?;
    let current = maps.services()?;
    let backends = maps.backends()?;
    let mut out = Vec::new();
    let keys: Vec<ServiceKey> = current.keys().filter(|k| k.proto != 0).copied().collect();
    for k in keys {
        let v = current[&k];
        let Some(id) = service_id_of(&k) else {
            continue;
        };
        let counts = maps
            .table(v.id)
            .map(|t| maglev::slot_counts(&t))
            .unwrap_or_default();
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
