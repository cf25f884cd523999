//! The policy maps, opened from their pins, and the generation protocol that
//! makes every change all-or-nothing for packets (see docs/dataplane.md §4).

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, OwnedFd},
};

use aya::{
    Pod,
    maps::{Array, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key},
    util::nr_cpus,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sluice_common::{
    Counter, EntryStats, GENERATIONS, KeyV4, KeyV6, LIST_CAPACITY, ListId, MAX_RULES,
    RULE_ACTION_SYN_GUARD, Rule, SETTINGS_F_AUDIT, SETTINGS_F_DIRTY, SETTINGS_F_INIT,
    SETTINGS_F_SYN_GUARD, Settings, Verdict, lpm_prefix_len, map_names,
};

use super::{
    DataplaneError,
    pins::{PinRoot, RootLock},
    sys,
};

use sluice_common::UNASSIGNED_SLOT as UNASSIGNED;

/// The defaults a fresh dataplane starts with: pass what nothing matched,
/// drop what cannot be parsed.
pub const INITIAL_SETTINGS: Settings = Settings {
    default_action: Verdict::Pass as u32,
    malformed_action: Verdict::Drop as u32,
    rule_count: 0,
    flags: SETTINGS_F_INIT,
    next_rule_id: 1,
    _pad: 0,
    list_len: [0; 4],
};

/// One change, applied as a whole or not at all.
#[derive(Debug, Default, Clone)]
pub struct Change {
    pub add: Vec<(ListId, IpNet)>,
    pub del: Vec<(ListId, IpNet)>,
    /// The complete new rule list, in evaluation order (new rules carry
    /// `stats_slot == UNASSIGNED`).
    pub rules: Option<Vec<Rule>>,
    pub default_action: Option<Verdict>,
    pub malformed_action: Option<Verdict>,
    /// Policy-wide audit mode on or off.
    pub audit: Option<bool>,
    /// A deletion of an entry that is not there is skipped (and counted)
    /// instead of refusing the change: the agent's changes say what the
    /// result must be, whatever drift the maps have.
    pub tolerate_missing: bool,
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChangeReport {
    pub added: usize,
    pub already_present: usize,
    pub deleted: usize,
    /// The generation now active.
    pub generation: u32,
    /// Ids given to rules this change added.
    pub new_rule_ids: Vec<u32>,
    /// Deletions of entries that were not there (`tolerate_missing`).
    #[serde(default)]
    pub missing: usize,
    /// A crash had left a change half-done; it was repaired first.
    pub repaired: bool,
    /// The change is in force, but copying it into the other generation
    /// failed (why); the next change or drift check finishes that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_pending: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ListEntry {
    pub prefix: IpNet,
    pub packets: u64,
    pub bytes: u64,
    /// `CLOCK_BOOTTIME` ns of the last hit, 0 = never.
    pub last_seen_ns: u64,
    /// Seconds since the last hit when listed; `None` = never hit.
    pub last_seen_secs_ago: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct RuleView {
    pub position: usize,
    pub rule: Rule,
    pub packets: u64,
    pub bytes: u64,
}

/// Address keys of the LPM tries: a generation byte, then the address.
trait AddrKey: Pod {
    fn encode(generation: u8, net: &IpNet) -> Option<Key<Self>>;
    fn decode(key: &Key<Self>) -> Option<(u8, IpNet)>;
}

impl AddrKey for KeyV4 {
    fn encode(generation: u8, net: &IpNet) -> Option<Key<Self>> {
        let IpNet::V4(n) = net else { return None };
        let o = n.network().octets();
        Some(Key::new(
            lpm_prefix_len(u32::from(n.prefix_len())),
            [generation, o[0], o[1], o[2], o[3], 0, 0, 0],
        ))
    }

    fn decode(key: &Key<Self>) -> Option<(u8, IpNet)> {
        let d = key.data();
        let plen = u8::try_from(key.prefix_len().checked_sub(8)?).ok()?;
        let net = Ipv4Net::new(Ipv4Addr::new(d[1], d[2], d[3], d[4]), plen).ok()?;
        Some((d[0], IpNet::V4(net)))
    }
}

impl AddrKey for KeyV6 {
    fn encode(generation: u8, net: &IpNet) -> Option<Key<Self>> {
        let IpNet::V6(n) = net else { return None };
        let mut d = [0u8; 24];
        d[0] = generation;
        d[1..17].copy_from_slice(&n.network().octets());
        Some(Key::new(lpm_prefix_len(u32::from(n.prefix_len())), d))
    }

    fn decode(key: &Key<Self>) -> Option<(u8, IpNet)> {
        let d = key.data();
        let plen = u8::try_from(key.prefix_len().checked_sub(8)?).ok()?;
        let mut a = [0u8; 16];
        a.copy_from_slice(&d[1..17]);
        let net = Ipv6Net::new(Ipv6Addr::from(a), plen).ok()?;
        Some((d[0], IpNet::V6(net)))
    }
}

/// One LPM list plus a raw descriptor for batched syscalls.
struct List<K: AddrKey> {
    id: ListId,
    trie: LpmTrie<MapData, K, EntryStats>,
    fd: OwnedFd,
}

impl<K: AddrKey> List<K> {
    fn name(&self) -> &'static str {
        self.id.map_name()
    }

    fn key(&self, generation: u32, net: &IpNet) -> Key<K> {
        // The caller routes each prefix to the list of its own family.
        K::encode(generation as u8, net).expect("prefix family matches the list")
    }

    /// Whether exactly `net` (not just a prefix covering it) is in the list.
    fn contains(&self, generation: u32, net: &IpNet) -> Result<bool, DataplaneError> {
        match self.trie.get(&self.key(generation, net), 0) {
            Ok(v) => Ok(v.prefix_len == u32::from(net.prefix_len())),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(DataplaneError::map_err("lookup", self.name(), e)),
        }
    }

    /// Inserts with zeroed stats. On failure returns how many went in.
    fn insert_many(
        &mut self,
        generation: u32,
        nets: &[IpNet],
    ) -> Result<(), (usize, DataplaneError)> {
        if nets.is_empty() {
            return Ok(());
        }
        let keys: Vec<Key<K>> = nets.iter().map(|n| self.key(generation, n)).collect();
        let values: Vec<EntryStats> = nets.iter().map(entry_value).collect();
        // SAFETY: Key<K> and EntryStats are Pod; the byte views cover exactly the vectors.
        let (kb, vb) = unsafe {
            (
                std::slice::from_raw_parts(
                    keys.as_ptr().cast::<u8>(),
                    size_of_val(keys.as_slice()),
                ),
                std::slice::from_raw_parts(
                    values.as_ptr().cast::<u8>(),
                    size_of_val(values.as_slice()),
                ),
            )
        };
        match sys::map_update_batch(self.fd.as_fd(), kb, vb, keys.len()) {
            Ok(()) => Ok(()),
            Err((0, e)) if batch_unsupported(&e) => {
                for (n, k) in keys.iter().enumerate() {
                    if let Err(e) = self.trie.insert(k, entry_value(&nets[n]), 0) {
                        return Err((n, self.full_or(e, "insert", nets.len() - n)));
                    }
                }
                Ok(())
            }
            Err((n, e)) => Err((n, self.full_or(e, "batch insert", nets.len() - n))),
        }
    }

    fn full_or(
        &self,
        e: impl std::error::Error + Send + Sync + 'static,
        op: &'static str,
        adding: usize,
    ) -> DataplaneError {
        if matches!(super::errno(&e), Some(libc::E2BIG | libc::ENOSPC)) {
            // The kernel found the trie full although the sizes said it fits
            // (entries of the other generation count against it too).
            DataplaneError::ListFull {
                list: list_label(self.id),
                capacity: LIST_CAPACITY,
                current: LIST_CAPACITY,
                adding,
            }
        } else {
            DataplaneError::map_err(op, self.name(), e)
        }
    }

    fn delete_many(&mut self, generation: u32, nets: &[IpNet]) -> Result<(), DataplaneError> {
        for n in nets {
            match self.trie.remove(&self.key(generation, n)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(DataplaneError::map_err("delete", self.name(), e)),
            }
        }
        Ok(())
    }

    /// Zeroes the hit counters of every entry of both generations (the
    /// entries stay). Returns how many prefixes were reset.
    fn reset_stats(&mut self) -> Result<usize, DataplaneError> {
        let all = self.all()?;
        let n = all
            .iter()
            .map(|(_, net, _)| *net)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        for g in 0..2u8 {
            let nets: Vec<IpNet> = all
                .iter()
                .filter(|(gen_, _, _)| *gen_ == g)
                .map(|(_, net, _)| *net)
                .collect();
            self.insert_many(u32::from(g), &nets).map_err(|(_, e)| e)?;
        }
        Ok(n)
    }

    /// Every entry of both generations.
    fn all(&self) -> Result<Vec<(u8, IpNet, EntryStats)>, DataplaneError> {
        let mut out = Vec::new();
        let (ks, vs) = (size_of::<Key<K>>(), size_of::<EntryStats>());
        // Batched: a million entries in a few hundred syscalls instead of
        // two per entry.
        if let Some((keys, values, n)) = sys::map_lookup_batch_all(self.fd.as_fd(), ks, vs, 4096)
            .map_err(|e| DataplaneError::map_err("batch lookup", self.name(), e))?
        {
            out.reserve(n);
            for i in 0..n {
                // SAFETY: the kernel wrote n whole keys and values of these
                // Pod types; read_unaligned copes with any alignment.
                let (k, v) = unsafe {
                    (
                        std::ptr::read_unaligned(keys[i * ks..].as_ptr().cast::<Key<K>>()),
                        std::ptr::read_unaligned(values[i * vs..].as_ptr().cast::<EntryStats>()),
                    )
                };
                if let Some((g, net)) = K::decode(&k) {
                    out.push((g, net, v));
                }
            }
            return Ok(out);
        }
        for item in self.trie.iter() {
            let (k, v) = item.map_err(|e| DataplaneError::map_err("iterate", self.name(), e))?;
            if let Some((g, net)) = K::decode(&k) {
                out.push((g, net, v));
            }
        }
        Ok(out)
    }
}

/// "deny (IPv4)" for messages.
fn list_label(id: ListId) -> &'static str {
    match id {
        ListId::DenyV4 => "deny (IPv4)",
        ListId::DenyV6 => "deny (IPv6)",
        ListId::AllowV4 => "allow (IPv4)",
        ListId::AllowV6 => "allow (IPv6)",
    }
}

/// A fresh list entry: no hits yet, its own prefix length recorded.
fn entry_value(net: &IpNet) -> EntryStats {
    EntryStats {
        prefix_len: u32::from(net.prefix_len()),
        ..EntryStats::default()
    }
}

fn batch_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524 /* ENOTSUPP */)
    )
}

/// Runs `$body` with `$l` bound to the list `$id` (the two key types differ).
macro_rules! with_list {
    ($self:ident, $id:expr, |$l:ident| $body:expr) => {
        match $id {
            ListId::DenyV4 => {
                let $l = &mut $self.deny_v4;
                $body
            }
            ListId::AllowV4 => {
                let $l = &mut $self.allow_v4;
                $body
            }
            ListId::DenyV6 => {
                let $l = &mut $self.deny_v6;
                $body
            }
            ListId::AllowV6 => {
                let $l = &mut $self.allow_v6;
                $body
            }
        }
    };
}

pub struct PolicyMaps {
    generation: Array<MapData, u32>,
    settings: Array<MapData, Settings>,
    rules: Array<MapData, Rule>,
    rule_stats: PerCpuArray<MapData, Counter>,
    pub(crate) counters: PerCpuArray<MapData, Counter>,
    deny_v4: List<KeyV4>,
    deny_v6: List<KeyV6>,
    allow_v4: List<KeyV4>,
    allow_v6: List<KeyV6>,
    /// Where the maps are pinned (for the DDoS stage's rule buckets).
    root: PinRoot,
    /// The id of every map opened above, checked against the live programs.
    ids: Vec<(&'static str, u32)>,
    _lock: Option<RootLock>,
}

/// Opens the map pinned as `name`, with its id (to compare with the maps
/// the attached program reads).
pub(crate) fn open_map_with_id(
    root: &PinRoot,
    name: &'static str,
) -> Result<(Map, u32), DataplaneError> {
    let path = root.map(name);
    let data = MapData::from_pin(&path).map_err(|e| super::pins::pinned_map_error(&path, e))?;
    let id = data
        .info()
        .map_err(|e| DataplaneError::PinnedMap {
            path: path.clone(),
            source: e.into(),
        })?
        .id();
    let map = Map::from_map_data(data).map_err(|e| DataplaneError::PinnedMap {
        path,
        source: e.into(),
    })?;
    Ok((map, id))
}

pub(crate) fn open_map(root: &PinRoot, name: &'static str) -> Result<Map, DataplaneError> {
    open_map_with_id(root, name).map(|(m, _)| m)
}

/// Opens a pinned map as the typed map `T` (the one typed opener).
pub(crate) fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
    root: &PinRoot,
    name: &'static str,
) -> Result<T, DataplaneError> {
    as_typed(root, name, open_map(root, name)?)
}

fn as_typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
    root: &PinRoot,
    name: &'static str,
    map: Map,
) -> Result<T, DataplaneError> {
    map.try_into()
        .map_err(|e: aya::maps::MapError| DataplaneError::PinnedMap {
            path: root.map(name),
            source: e.into(),
        })
}

/// Opens a pinned map as the typed map `T`, noting its id in `ids`.
fn open_typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
    root: &PinRoot,
    name: &'static str,
    ids: &mut Vec<(&'static str, u32)>,
) -> Result<T, DataplaneError> {
    let (map, id) = open_map_with_id(root, name)?;
    ids.push((name, id));
    as_typed(root, name, map)
}

fn open_list<K: AddrKey>(
    root: &PinRoot,
    id: ListId,
    ids: &mut Vec<(&'static str, u32)>,
) -> Result<List<K>, DataplaneError> {
    let name = id.map_name();
    let trie: LpmTrie<MapData, K, EntryStats> = open_typed(root, name, ids)?;
    // A second descriptor of the same map (not of the pin, which could be
    // replaced in between) for batched syscalls.
    let map_id = ids.last().map_or(0, |(_, i)| *i);
    let fd = sys::map_fd_by_id(map_id).map_err(|source| DataplaneError::Io {
        what: format!("opening {name} (map id {map_id})"),
        source,
    })?;
    Ok(List { id, trie, fd })
}

/// Refuses maps that are not the ones the live programs read: a write to
/// them would report success and change nothing packets see.
fn verify_bound(root: &PinRoot, ids: &[(&'static str, u32)]) -> Result<(), DataplaneError> {
    let names = ids.iter().map(|(n, _)| (*n).to_string()).collect();
    let (_, used) = super::integrity::used_maps(root, &names)?;
    let mut findings = Vec::new();
    for (name, id) in ids {
        let Some(readers) = used.get(*name) else {
            // No live program yet (a dataplane being set up).
            continue;
        };
        if readers.len() > 1 {
            findings.push(super::integrity::Finding::Split {
                map: (*name).to_string(),
                readers: readers
                    .iter()
                    .flat_map(|(i, p)| p.iter().map(|p| (p.clone(), *i)))
                    .collect(),
            });
        } else if let Some(&used_id) = readers.keys().next()
            && used_id != *id
        {
            findings.push(super::integrity::Finding::Replaced {
                map: (*name).to_string(),
                pinned_id: *id,
                used_id,
            });
        }
    }
    if findings.is_empty() {
        Ok(())
    } else {
        Err(DataplaneError::Unbound { findings })
    }
}

impl PolicyMaps {
    /// Opens the pinned policy maps under `root`, holding the root's lock
    /// until dropped so concurrent commands never interleave.
    pub fn open(root: &PinRoot) -> Result<Self, DataplaneError> {
        if !root.is_set_up() {
            return Err(DataplaneError::NotAttached {
                root: root.root.clone(),
            });
        }
        let lock = RootLock::acquire(&root.root)?;
        let mut maps = Self::open_unlocked(root)?;
        maps._lock = Some(lock);
        Ok(maps)
    }

    /// Opens the maps for a caller that already holds the root's lock.
    pub(crate) fn open_unlocked(root: &PinRoot) -> Result<Self, DataplaneError> {
        Self::open_pins(root).map_err(|e| match e {
            // A pin the live program's map should be under is gone: say that.
            DataplaneError::PinnedMap { ref path, .. } if !path.exists() => {
                match super::integrity::check(root) {
                    Ok(r) if !r.findings.is_empty() => DataplaneError::Unbound {
                        findings: r.findings,
                    },
                    _ => e,
                }
            }
            other => other,
        })
    }

    fn open_pins(root: &PinRoot) -> Result<Self, DataplaneError> {
        super::pins::check_pinned_maps(root, &super::pins::expected_maps(super::OBJECT)?)?;
        let mut ids = Vec::new();
        let maps = Self {
            generation: open_typed(root, map_names::GENERATION, &mut ids)?,
            settings: open_typed(root, map_names::SETTINGS, &mut ids)?,
            rules: open_typed(root, map_names::RULES, &mut ids)?,
            rule_stats: open_typed(root, map_names::RULE_STATS, &mut ids)?,
            counters: open_typed(root, map_names::COUNTERS, &mut ids)?,
            deny_v4: open_list(root, ListId::DenyV4, &mut ids)?,
            deny_v6: open_list(root, ListId::DenyV6, &mut ids)?,
            allow_v4: open_list(root, ListId::AllowV4, &mut ids)?,
            allow_v6: open_list(root, ListId::AllowV6, &mut ids)?,
            root: root.clone(),
            ids,
            _lock: None,
        };
        verify_bound(root, &maps.ids)?;
        Ok(maps)
    }

    /// Opens the policy maps the pinned XDP program itself reads (by the map
    /// ids in its own map list), not through the map pins: a read-back that
    /// a pin pointing elsewhere cannot fool. For reading.
    pub fn open_from_program(root: &PinRoot) -> Result<Self, DataplaneError> {
        let io = |what: String| move |source| DataplaneError::Io { what, source };
        let prog =
            sys::obj_get(&root.prog()).map_err(io(format!("opening {}", root.prog().display())))?;
        let (_, map_ids) = sys::prog_maps(&prog)
            .map_err(io(format!("reading the maps of {}", root.prog().display())))?;
        let mut by_name = std::collections::BTreeMap::new();
        for id in map_ids {
            if let Ok(fd) = sys::map_fd_by_id(id)
                && let Ok((_, name)) = sys::map_id_name(&fd)
            {
                by_name.insert(name, id);
            }
        }
        let mut ids = Vec::new();
        let mut open = |name: &'static str| -> Result<Map, DataplaneError> {
            let id = *by_name.get(name).ok_or_else(|| DataplaneError::PinnedMap {
                path: root.prog(),
                source: format!("the program reads no map named {name}").into(),
            })?;
            ids.push((name, id));
            let data =
                MapData::from_id(id).map_err(|e| DataplaneError::map_err("open", name, e))?;
            Map::from_map_data(data).map_err(|e| DataplaneError::map_err("open", name, e))
        };
        fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
            m: Map,
            name: &'static str,
        ) -> Result<T, DataplaneError> {
            m.try_into()
                .map_err(|e: aya::maps::MapError| DataplaneError::map_err("open", name, e))
        }
        let generation = typed(open(map_names::GENERATION)?, map_names::GENERATION)?;
        let settings = typed(open(map_names::SETTINGS)?, map_names::SETTINGS)?;
        let rules = typed(open(map_names::RULES)?, map_names::RULES)?;
        let rule_stats = typed(open(map_names::RULE_STATS)?, map_names::RULE_STATS)?;
        let counters = typed(open(map_names::COUNTERS)?, map_names::COUNTERS)?;
        let deny_v4 = typed(open(map_names::DENY_V4)?, map_names::DENY_V4)?;
        let deny_v6 = typed(open(map_names::DENY_V6)?, map_names::DENY_V6)?;
        let allow_v4 = typed(open(map_names::ALLOW_V4)?, map_names::ALLOW_V4)?;
        let allow_v6 = typed(open(map_names::ALLOW_V6)?, map_names::ALLOW_V6)?;
        let fd = |id: ListId| -> Result<OwnedFd, DataplaneError> {
            let map_id = ids
                .iter()
                .find(|(n, _)| *n == id.map_name())
                .map_or(0, |(_, i)| *i);
            sys::map_fd_by_id(map_id)
                .map_err(io(format!("opening {} (map id {map_id})", id.map_name())))
        };
        Ok(Self {
            generation,
            settings,
            rules,
            rule_stats,
            counters,
            deny_v4: List {
                id: ListId::DenyV4,
                trie: deny_v4,
                fd: fd(ListId::DenyV4)?,
            },
            deny_v6: List {
                id: ListId::DenyV6,
                trie: deny_v6,
                fd: fd(ListId::DenyV6)?,
            },
            allow_v4: List {
                id: ListId::AllowV4,
                trie: allow_v4,
                fd: fd(ListId::AllowV4)?,
            },
            allow_v6: List {
                id: ListId::AllowV6,
                trie: allow_v6,
                fd: fd(ListId::AllowV6)?,
            },
            root: root.clone(),
            ids,
            _lock: None,
        })
    }

    /// Checks again that the maps this handle writes are the ones the live
    /// programs read (after a change: nothing is reported as done that the
    /// program cannot see).
    pub fn verify_bound(&self) -> Result<(), DataplaneError> {
        verify_bound(&self.root, &self.ids)
    }

    pub fn active_generation(&self) -> Result<u32, DataplaneError> {
        self.generation
            .get(&0, 0)
            .map(|g| g & 1)
            .map_err(|e| DataplaneError::map_err("read", map_names::GENERATION, e))
    }

    pub fn settings(&self, generation: u32) -> Result<Settings, DataplaneError> {
        self.settings
            .get(&generation, 0)
            .map_err(|e| DataplaneError::map_err("read", map_names::SETTINGS, e))
    }

    /// The settings packets use now.
    pub fn active_settings(&self) -> Result<Settings, DataplaneError> {
        self.settings(self.active_generation()?)
    }

    fn set_settings(&mut self, generation: u32, s: &Settings) -> Result<(), DataplaneError> {
        self.settings
            .set(generation, s, 0)
            .map_err(|e| DataplaneError::map_err("write", map_names::SETTINGS, e))
    }

    /// Writes the initial settings into both generations of fresh maps.
    pub fn initialise_if_needed(&mut self) -> Result<(), DataplaneError> {
        for g in 0..GENERATIONS {
            if self.settings(g)?.flags & SETTINGS_F_INIT == 0 {
                self.set_settings(g, &INITIAL_SETTINGS)?;
            }
        }
        Ok(())
    }

    fn rules_of(&self, generation: u32, count: u32) -> Result<Vec<Rule>, DataplaneError> {
        (0..count.min(MAX_RULES))
            .map(|i| {
                self.rules
                    .get(&(generation * MAX_RULES + i), 0)
                    .map_err(|e| DataplaneError::map_err("read", map_names::RULES, e))
            })
            .collect()
    }

    fn write_rules(&mut self, generation: u32, rules: &[Rule]) -> Result<(), DataplaneError> {
        for (i, r) in rules.iter().enumerate() {
            self.rules
                .set(generation * MAX_RULES + i as u32, r, 0)
                .map_err(|e| DataplaneError::map_err("write", map_names::RULES, e))?;
        }
        Ok(())
    }

    /// The active rules, in evaluation order, with their hit counters.
    pub fn rules(&self) -> Result<Vec<RuleView>, DataplaneError> {
        let g = self.active_generation()?;
        let s = self.settings(g)?;
        self.rules_of(g, s.rule_count)?
            .into_iter()
            .enumerate()
            .map(|(position, rule)| {
                let c = self.rule_counter(rule.stats_slot)?;
                Ok(RuleView {
                    position,
                    rule,
                    packets: c.packets,
                    bytes: c.bytes,
                })
            })
            .collect()
    }

    fn rule_counter(&self, slot: u32) -> Result<Counter, DataplaneError> {
        let values = self
            .rule_stats
            .get(&slot, 0)
            .map_err(|e| DataplaneError::map_err("read", map_names::RULE_STATS, e))?;
        Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }

    fn reset_rule_buckets(&mut self, slot: u32) -> Result<(), DataplaneError> {
        for name in [map_names::RULE_BUCKETS, map_names::OVERFLOW_BKTS] {
            let mut m: aya::maps::Array<MapData, sluice_common::Bucket> = typed(&self.root, name)?;
            m.set(slot, sluice_common::Bucket::default(), 0)
                .map_err(|e| DataplaneError::map_err("write", name, e))?;
        }
        Ok(())
    }

    fn zero_rule_counter(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let cpus = nr_cpus().map_err(|(what, source)| DataplaneError::Io {
            what: what.to_string(),
            source,
        })?;
        let zeros = PerCpuValues::try_from(vec![Counter::default(); cpus])
            .map_err(|e| DataplaneError::map_err("write", map_names::RULE_STATS, e))?;
        self.rule_stats
            .set(slot, zeros, 0)
            .map_err(|e| DataplaneError::map_err("write", map_names::RULE_STATS, e))
    }

    /// Entries of a list as packets see them (active generation), with hits
    /// from both generations added up.
    pub fn list_entries(&self, list: ListId) -> Result<Vec<ListEntry>, DataplaneError> {
        let active = self.active_generation()? as u8;
        let all = match list {
            ListId::DenyV4 => self.deny_v4.all()?,
            ListId::AllowV4 => self.allow_v4.all()?,
            ListId::DenyV6 => self.deny_v6.all()?,
            ListId::AllowV6 => self.allow_v6.all()?,
        };
        let now = super::boottime_ns();
        let mut by_prefix: std::collections::BTreeMap<IpNet, (bool, EntryStats)> =
            std::collections::BTreeMap::new();
        for (g, net, v) in all {
            let e = by_prefix
                .entry(net)
                .or_insert((false, EntryStats::default()));
            e.0 |= g == active;
            e.1.packets += v.packets;
            e.1.bytes += v.bytes;
            e.1.last_seen_ns = e.1.last_seen_ns.max(v.last_seen_ns);
        }
        Ok(by_prefix
            .into_iter()
            .filter(|(_, (in_active, _))| *in_active)
            .map(|(prefix, (_, s))| ListEntry {
                prefix,
                packets: s.packets,
                bytes: s.bytes,
                last_seen_ns: s.last_seen_ns,
                last_seen_secs_ago: (s.last_seen_ns != 0)
                    .then(|| now.saturating_sub(s.last_seen_ns) as f64 / 1e9),
            })
            .collect())
    }

    fn contains(&self, list: ListId, generation: u32, net: &IpNet) -> Result<bool, DataplaneError> {
        match list {
            ListId::DenyV4 => self.deny_v4.contains(generation, net),
            ListId::AllowV4 => self.allow_v4.contains(generation, net),
            ListId::DenyV6 => self.deny_v6.contains(generation, net),
            ListId::AllowV6 => self.allow_v6.contains(generation, net),
        }
    }

    /// Brings the inactive generation back in line with the active one after
    /// an interrupted change. Returns whether anything needed repair.
    fn recover_if_dirty(&mut self) -> Result<bool, DataplaneError> {
        let a = self.active_generation()?;
        let i = a ^ 1;
        let sa = self.settings(a)?;
        let si = self.settings(i)?;
        if (sa.flags | si.flags) & SETTINGS_F_DIRTY == 0 {
            return Ok(false);
        }
        for list in ListId::ALL {
            with_list!(self, list, |l| {
                let all = l.all()?;
                let in_a: BTreeSet<IpNet> = all
                    .iter()
                    .filter(|e| u32::from(e.0) == a)
                    .map(|e| e.1)
                    .collect();
                let in_i: BTreeSet<IpNet> = all
                    .iter()
                    .filter(|e| u32::from(e.0) == i)
                    .map(|e| e.1)
                    .collect();
                let missing: Vec<IpNet> = in_a.difference(&in_i).copied().collect();
                let extra: Vec<IpNet> = in_i.difference(&in_a).copied().collect();
                // Deleting first keeps the repair within the trie's size.
                l.delete_many(i, &extra)?;
                l.insert_many(i, &missing).map_err(|(_, e)| e)?;
            });
        }
        let rules = self.rules_of(a, sa.rule_count)?;
        self.write_rules(i, &rules)?;
        let clean = Settings {
            flags: sa.flags & !SETTINGS_F_DIRTY,
            ..sa
        };
        self.set_settings(i, &clean)?;
        self.set_settings(a, &clean)?;
        Ok(true)
    }

    /// Applies `change` with the generation protocol. Nothing changes when it
    /// fails before the flip; see docs/dataplane.md §4.
    pub fn commit(&mut self, change: Change) -> Result<ChangeReport, DataplaneError> {
        if let Some(rules) = &change.rules
            && rules.iter().any(|r| {
                r.flags & (sluice_common::RULE_F_SPORT | sluice_common::RULE_F_TCP_FLAGS) != 0
            })
            && super::pins::program_features(&self.root) & super::pins::FEATURE_RULE_PORTS_FLAGS
                == 0
        {
            return Err(DataplaneError::ProgramTooOld {
                what: "rules with sport or flags",
            });
        }
        let repaired = self.recover_if_dirty()?;
        let a = self.active_generation()?;
        let i = a ^ 1;
        let sa = self.settings(a)?;
        let mut report = ChangeReport {
            repaired,
            ..ChangeReport::default()
        };

        // What actually changes, per list.
        let mut adds: [BTreeSet<IpNet>; 4] = Default::default();
        let mut dels: [BTreeSet<IpNet>; 4] = Default::default();
        for (list, net) in &change.add {
            if self.contains(*list, a, net)? {
                report.already_present += 1;
            } else {
                adds[*list as usize].insert(*net);
            }
        }
        for (list, net) in &change.del {
            if !self.contains(*list, a, net)? {
                let pending = adds[*list as usize].remove(net);
                if !pending {
                    if change.tolerate_missing {
                        report.missing += 1;
                        continue;
                    }
                    return Err(DataplaneError::NotInList {
                        list: list.kind(),
                        prefix: net.to_string(),
                    });
                }
                continue;
            }
            adds[*list as usize].remove(net);
            dels[*list as usize].insert(*net);
        }
        let mut new = sa;
        for list in ListId::ALL {
            let l = list as usize;
            let len = u64::from(sa.list_len[l]) + adds[l].len() as u64;
            let len = len - dels[l].len() as u64;
            if len > u64::from(LIST_CAPACITY) {
                return Err(DataplaneError::ListFull {
                    list: list_label(list),
                    capacity: LIST_CAPACITY,
                    current: sa.list_len[l],
                    adding: adds[l].len(),
                });
            }
            new.list_len[l] = len as u32;
            report.added += adds[l].len();
            report.deleted += dels[l].len();
        }
        if let Some(v) = change.default_action {
            new.default_action = v as u32;
        }
        if let Some(v) = change.malformed_action {
            new.malformed_action = v as u32;
        }
        match change.audit {
            Some(true) => new.flags |= SETTINGS_F_AUDIT,
            Some(false) => new.flags &= !SETTINGS_F_AUDIT,
            None => {}
        }
        let rules = match change.rules {
            Some(mut rules) => {
                if rules.len() > MAX_RULES as usize {
                    return Err(DataplaneError::TooManyRules { max: MAX_RULES });
                }
                let used: BTreeSet<u32> = rules
                    .iter()
                    .map(|r| r.stats_slot)
                    .filter(|s| *s != UNASSIGNED)
                    .collect();
                let mut free = (0..MAX_RULES).filter(|s| !used.contains(s));
                for r in &mut rules {
                    if r.stats_slot == UNASSIGNED {
                        r.stats_slot = free
                            .next()
                            .ok_or(DataplaneError::TooManyRules { max: MAX_RULES })?;
                        r.id = new.next_rule_id;
                        new.next_rule_id += 1;
                        report.new_rule_ids.push(r.id);
                    }
                }
                new.rule_count = rules.len() as u32;
                // The kernel checks answers to SYN challenges only while a
                // syn-guard rule exists.
                if rules.iter().any(|r| r.action == RULE_ACTION_SYN_GUARD) {
                    new.flags |= SETTINGS_F_SYN_GUARD;
                } else {
                    new.flags &= !SETTINGS_F_SYN_GUARD;
                }
                Some(rules)
            }
            None => None,
        };
        let current_rules = self.rules_of(a, sa.rule_count)?;
        let nothing_changes = report.added == 0
            && report.deleted == 0
            && rules.as_ref().is_none_or(|r| *r == current_rules)
            && new.default_action == sa.default_action
            && new.malformed_action == sa.malformed_action
            && new.flags == sa.flags;
        if nothing_changes {
            report.generation = a;
            return Ok(report);
        }
        let adds: [Vec<IpNet>; 4] = adds.map(|s| s.into_iter().collect());
        let dels: [Vec<IpNet>; 4] = dels.map(|s| s.into_iter().collect());

        // Phase 1: build the new policy in the inactive generation.
        self.set_settings(
            i,
            &Settings {
                flags: sa.flags | SETTINGS_F_DIRTY,
                ..sa
            },
        )?;
        if let Err(e) = self.apply_to(i, &adds, &dels, rules.as_deref()) {
            // Undo what went in so the generation mirrors the active one again;
            // if even that fails, the dirty mark makes the next change repair it.
            if self.undo(i, &adds, &dels).is_ok() {
                self.set_settings(i, &sa)?;
            }
            return Err(e);
        }
        for r in rules.iter().flatten() {
            if report.new_rule_ids.contains(&r.id) {
                self.zero_rule_counter(r.stats_slot)?;
                // A reused slot must not hand the new rule the old one's
                // buckets (per-source buckets are keyed by rule id instead).
                self.reset_rule_buckets(r.stats_slot)?;
            }
        }
        self.set_settings(
            i,
            &Settings {
                flags: new.flags | SETTINGS_F_DIRTY,
                ..new
            },
        )?;

        // The flip: one aligned word, read once per packet.
        self.generation
            .set(0, i, 0)
            .map_err(|e| DataplaneError::map_err("write", map_names::GENERATION, e))?;
        report.generation = i;

        // Phase 2: bring the old generation up to date. The change is in
        // force already: a failure here is no refusal. The dirty mark stays
        // and the next change (or the agent's drift check) repairs it.
        let phase2 = (|| {
            self.set_settings(
                a,
                &Settings {
                    flags: sa.flags | SETTINGS_F_DIRTY,
                    ..sa
                },
            )?;
            self.apply_to(a, &adds, &dels, rules.as_deref())?;
            let clean = Settings {
                flags: new.flags & !SETTINGS_F_DIRTY,
                ..new
            };
            self.set_settings(a, &clean)?;
            self.set_settings(i, &clean)
        })();
        if let Err(e) = phase2 {
            report.resync_pending = Some(e.to_string());
        }
        Ok(report)
    }

    /// Repairs a generation an interrupted change left behind (the agent's
    /// drift check; changes do it themselves first).
    pub fn repair(&mut self) -> Result<bool, DataplaneError> {
        self.recover_if_dirty()
    }

    fn undo(
        &mut self,
        generation: u32,
        adds: &[Vec<IpNet>; 4],
        dels: &[Vec<IpNet>; 4],
    ) -> Result<(), DataplaneError> {
        for list in ListId::ALL {
            let l = list as usize;
            with_list!(self, list, |t| t.delete_many(generation, &adds[l]))?;
            let mut missing = Vec::new();
            for net in &dels[l] {
                if !self.contains(list, generation, net)? {
                    missing.push(*net);
                }
            }
            with_list!(self, list, |t| t
                .insert_many(generation, &missing)
                .map_err(|(_, e)| e))?;
        }
        Ok(())
    }

    /// Deletes before it inserts: a generation never holds more than the
    /// larger of its old and new list, so both generations together fit the
    /// trie (sized for two full lists) even when a list goes from full to a
    /// different full list.
    fn apply_to(
        &mut self,
        generation: u32,
        adds: &[Vec<IpNet>; 4],
        dels: &[Vec<IpNet>; 4],
        rules: Option<&[Rule]>,
    ) -> Result<(), DataplaneError> {
        for list in ListId::ALL {
            with_list!(self, list, |l| l
                .delete_many(generation, &dels[list as usize]))?;
        }
        for list in ListId::ALL {
            with_list!(self, list, |l| l
                .insert_many(generation, &adds[list as usize])
                .map_err(|(_, e)| e))?;
        }
        if let Some(rules) = rules {
            self.write_rules(generation, rules)?;
        }
        Ok(())
    }

    /// Whether the generation packets use now holds what `change` asked for:
    /// every added prefix exactly there, every deleted one gone, the settings
    /// and (when given) the rules. Reads only what the change touched.
    pub fn verify_applied(&self, change: &Change) -> Result<(), DataplaneError> {
        let a = self.active_generation()?;
        let mismatch = |what: String| DataplaneError::Readback { what };
        for (list, net) in &change.add {
            if !self.contains(*list, a, net)? {
                return Err(mismatch(format!(
                    "{net} is missing from the {} list",
                    list.kind()
                )));
            }
        }
        for (list, net) in &change.del {
            if self.contains(*list, a, net)? {
                return Err(mismatch(format!(
                    "{net} is still in the {} list",
                    list.kind()
                )));
            }
        }
        let s = self.settings(a)?;
        if let Some(v) = change.default_action
            && s.default_action != v as u32
        {
            return Err(mismatch(format!("default action is not {}", v.name())));
        }
        if let Some(v) = change.malformed_action
            && s.malformed_action != v as u32
        {
            return Err(mismatch(format!("malformed action is not {}", v.name())));
        }
        if let Some(on) = change.audit
            && (s.flags & SETTINGS_F_AUDIT != 0) != on
        {
            return Err(mismatch(format!(
                "audit mode is not {}",
                if on { "on" } else { "off" }
            )));
        }
        if let Some(rules) = &change.rules {
            let now = self.rules_of(a, s.rule_count)?;
            let same = now.len() == rules.len()
                && now.iter().zip(rules).all(|(k, r)| {
                    let mut r = *r;
                    // Slots and ids of new rules are assigned by commit.
                    if r.stats_slot == UNASSIGNED {
                        r.stats_slot = k.stats_slot;
                        r.id = k.id;
                    }
                    *k == r
                });
            if !same {
                return Err(mismatch("the rules differ from the ones written".into()));
            }
        }
        Ok(())
    }

    /// Zeroes every packet counter: by class (family, protocol, verdict,
    /// reason), by rule slot, and every list entry's hits (both
    /// generations); the policy stays as it is. A packet counted while this
    /// runs may be lost from the counts (each per-CPU slot is written
    /// whole). Returns how many list entries were reset.
    pub fn reset_counters(&mut self) -> Result<usize, DataplaneError> {
        let cpus = nr_cpus().map_err(|(what, source)| DataplaneError::Io {
            what: what.to_string(),
            source,
        })?;
        for i in 0..sluice_common::COUNTER_SLOTS {
            let zeros = PerCpuValues::try_from(vec![Counter::default(); cpus])
                .map_err(|e| DataplaneError::map_err("write", map_names::COUNTERS, e))?;
            self.counters
                .set(i, zeros, 0)
                .map_err(|e| DataplaneError::map_err("write", map_names::COUNTERS, e))?;
        }
        for slot in 0..sluice_common::MAX_RULES {
            self.zero_rule_counter(slot)?;
        }
        Ok(self.deny_v4.reset_stats()?
            + self.deny_v6.reset_stats()?
            + self.allow_v4.reset_stats()?
            + self.allow_v6.reset_stats()?)
    }

    /// Where the maps are pinned.
    pub(crate) fn pin_root(&self) -> &PinRoot {
        &self.root
    }

    /// Sums the per-CPU counters of every slot.
    pub fn counters(&self) -> Result<Vec<Counter>, DataplaneError> {
        (0..sluice_common::COUNTER_SLOTS)
            .map(|i| {
                let v = self
                    .counters
                    .get(&i, 0)
                    .map_err(|e| DataplaneError::map_err("read", map_names::COUNTERS, e))?;
                Ok(v.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                }))
            })
            .collect()
    }
}

/// Which list a prefix belongs to.
pub fn list_for(allow: bool, net: &IpNet) -> ListId {
    match (allow, net.addr()) {
        (false, IpAddr::V4(_)) => ListId::DenyV4,
        (false, IpAddr::V6(_)) => ListId::DenyV6,
        (true, IpAddr::V4(_)) => ListId::AllowV4,
        (true, IpAddr::V6(_)) => ListId::AllowV6,
    }
}
