//! The socket layer's kernel side: finding cgroups, loading the socket
//! object (`sluice-sock-ebpf`), attaching its programs to workload cgroups
//! with pinned links, and writing its maps with a generation flip.
//!
//! Layout under the pin root: `sock/maps/<MAP>`, `sock/prog/<program>`,
//! `sock/links/<cgroup id>:<hook>`. The XDP side never removes `sock/`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::fd::AsFd as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use aya_obj::programs::CgroupSockAddrAttachType;
use sluice_common::sock::{
    MAX_SOCK_RULES, MAX_WORKLOADS, SOCK_COUNTERS_PER_WORKLOAD, SOCK_LB_PROGRAMS, SOCK_PROGRAMS,
    SockRule, WorkloadPolicy, sock_map_names as names,
};

use super::{DataplaneError, PinRoot, pins, policy::typed};

/// The socket programs, built by build.rs from sluice-ebpf (`sock_main.rs`).
pub static SOCK_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-sock-ebpf"));

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The socket layer's own pin root (`<root>/sock`): maps, programs, links.
#[must_use]
pub fn sock_root(root: &PinRoot) -> PinRoot {
    PinRoot::new(root.root.join("sock"))
}

/// Every program of the socket object: the workload programs, the socket
/// LB's, then the steering program.
pub fn object_programs() -> impl Iterator<Item = &'static str> {
    SOCK_PROGRAMS
        .iter()
        .chain(SOCK_LB_PROGRAMS.iter())
        .chain(sluice_common::steer::STEER_PROGRAMS.iter())
        .map(|(name, _)| *name)
}

/// The socket programs are loaded and pinned under `root`.
#[must_use]
pub fn is_loaded(root: &PinRoot) -> bool {
    let s = sock_root(root);
    object_programs().all(|name| s.prog_dir().join(name).exists())
}

/// Where the socket object's copy of the packet LB's maps is bound: the
/// XDP object's pins when the packet dataplane exists, else stand-ins
/// under `sock/maps/` (the socket LB is off then; when the packet maps
/// appear the programs are loaded again bound to them: `sock_lb::bound`).
#[must_use]
pub fn lb_maps_root(root: &PinRoot) -> PinRoot {
    if root.map(sluice_common::map_names::LB_SERVICES).exists() {
        root.clone()
    } else {
        sock_root(root)
    }
}

pub(super) fn io(what: String) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            DataplaneError::Permission { what }
        } else {
            DataplaneError::Io { what, source }
        }
    }
}

/// Where cgroup v2 is mounted: the first `cgroup2` mount in
/// /proc/self/mountinfo (the `unified` directory of the cgroup root on
/// hosts with the hybrid layout, the cgroup root itself on others).
pub fn cgroup2_mount() -> Result<PathBuf, DataplaneError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("reading /proc/self/mountinfo".into()))?;
    cgroup2_mount_in(&text).ok_or(DataplaneError::NoCgroup2)
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    // Only a mount of the hierarchy's root: paths below it are then the
    // kernel's own (a bind mount of a subtree, or a mount inside a cgroup
    // namespace, would make "the root" and levels relative).
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        if fields.nth(3)? != "/" {
            return None;
        }
        Some(PathBuf::from(unescape(fields.next()?)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(oct) = s.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(oct, 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A workload's cgroup as the kernel knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Absolute path of the cgroup directory.
    pub path: PathBuf,
    /// The cgroup id (the directory's inode number on cgroup v2), what
    /// `bpf_get_current_ancestor_cgroup_id` returns.
    pub id: u64,
}

/// Finds the cgroup at `rel` under the cgroup v2 mount: it must exist and
/// be a cgroup v2 directory.
pub fn resolve_cgroup(mount: &Path, rel: &str) -> Result<Cgroup, DataplaneError> {
    let path = mount.join(rel);
    let problem = |problem: String| DataplaneError::Cgroup {
        path: path.clone(),
        problem,
    };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(problem(format!(
                "does not exist (create the cgroup first; paths are relative to the cgroup v2 mount {})",
                mount.display()
            )));
        }
        Err(e) => return Err(problem(e.to_string())),
    };
    if !meta.is_dir() {
        return Err(problem("is not a directory".into()));
    }
    let fs = nix::sys::statfs::statfs(&path).map_err(|e| problem(e.to_string()))?;
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(problem("is not on a cgroup v2 filesystem".into()));
    }
    Ok(Cgroup {
        path: path.clone(),
        id: meta.ino(),
    })
}

/// The path of the cgroup with id `id`, searched under the cgroup v2
/// mount (at most `MAX_CGROUP_LEVEL` levels deep).
pub fn cgroup_path(id: u64) -> Option<PathBuf> {
    cgroup_path_under(&cgroup2_mount().ok()?, id)
}

/// [`cgroup_path`], searching only below `base` (`base` itself included).
pub fn cgroup_path_under(base: &Path, id: u64) -> Option<PathBuf> {
    if std::fs::metadata(base).is_ok_and(|m| m.ino() == id) {
        return Some(base.to_path_buf());
    }
    fn walk(dir: &Path, id: u64, depth: u32) -> Option<PathBuf> {
        if depth > sluice_common::sock::MAX_CGROUP_LEVEL {
            return None;
        }
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let p = e.path();
                if e.metadata().is_ok_and(|m| m.ino() == id) {
                    return Some(p);
                }
                if let Some(found) = walk(&p, id, depth + 1) {
                    return Some(found);
                }
            }
        }
        None
    }
    walk(base, id, 1)
}

/// The cgroup ids that have link pins, live or not (for cleanup).
pub fn pinned_link_ids(root: &PinRoot) -> BTreeSet<u64> {
    std::fs::read_dir(sock_root(root).links_dir())
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.split_once(':')?.0.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn attach_type(hook: &str) -> Option<CgroupSockAddrAttachType> {
    Some(match hook {
        "connect4" => CgroupSockAddrAttachType::Connect4,
        "connect6" => CgroupSockAddrAttachType::Connect6,
        "sendmsg4" => CgroupSockAddrAttachType::UDPSendMsg4,
        "sendmsg6" => CgroupSockAddrAttachType::UDPSendMsg6,
        "bind4" => CgroupSockAddrAttachType::Bind4,
        "bind6" => CgroupSockAddrAttachType::Bind6,
        _ => return None,
    })
}

/// The socket object with every map bound to its pin under `sock/` (created
/// when missing, re-used when present; one this build cannot use is
/// refused first), the packet LB's maps bound to `lb_maps_root`; programs
/// not yet loaded.
fn load_object(root: &PinRoot) -> Result<aya::Ebpf, DataplaneError> {
    let s = sock_root(root);
    let lb = lb_maps_root(root);
    let specs = pins::expected_maps(SOCK_OBJECT)?;
    let (shared, own): (Vec<_>, Vec<_>) = specs
        .into_iter()
        .partition(|m| names::SHARED_LB_MAPS.contains(&m.name.as_str()));
    pins::check_pinned_maps(&s, &own)?;
    pins::check_pinned_maps(&lb, &shared)?;
    std::fs::create_dir_all(lb.maps_dir())
        .map_err(io(format!("creating {}", lb.maps_dir().display())))?;
    super::attach::create_maglev_outer(&lb)?;
    let mut loader = EbpfLoader::new();
    let paths: Vec<(String, PathBuf)> = own
        .iter()
        .map(|m| (m.name.clone(), s.map(&m.name)))
        .chain(shared.iter().map(|m| (m.name.clone(), lb.map(&m.name))))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name.as_str(), path.as_path());
    }
    loader.load(SOCK_OBJECT).map_err(|e| {
        if super::is_permission(&e) {
            DataplaneError::Permission {
                what: "loading the socket programs".into(),
            }
        } else {
            DataplaneError::SockLoad { source: e.into() }
        }
    })
}

/// Loads (verifies) the program `name` of the socket object.
fn load_program(ebpf: &mut aya::Ebpf, name: &str) -> Result<(), DataplaneError> {
    let prog = ebpf.program_mut(name).ok_or_else(|| DataplaneError::Load {
        source: format!("program {name} missing from the socket object").into(),
    })?;
    let loaded = match prog {
        aya::programs::Program::CgroupSockAddr(p) => p.load(),
        aya::programs::Program::CgroupSock(p) => p.load(),
        aya::programs::Program::SkLookup(p) => p.load(),
        _ => {
            return Err(DataplaneError::SockLoad {
                source: format!("program {name} is not a socket program").into(),
            });
        }
    };
    loaded.map_err(|e| match super::attach::load_error(name, e) {
        DataplaneError::Load { source } => DataplaneError::SockLoad { source },
        other => other,
    })
}

/// Pins the loaded program `name` at `path` (replacing what was there).
fn pin_program(ebpf: &mut aya::Ebpf, name: &str, path: &Path) -> Result<(), DataplaneError> {
    let prog = ebpf.program_mut(name).ok_or_else(|| DataplaneError::Load {
        source: format!("program {name} missing from the socket object").into(),
    })?;
    let _ = std::fs::remove_file(path);
    prog.pin(path).map_err(|e| DataplaneError::Io {
        what: format!("pinning {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Loads the socket object (its maps created or re-used from their pins)
/// and pins its programs, unless they are pinned already.
pub fn ensure_loaded(root: &PinRoot) -> Result<(), DataplaneError> {
    if is_loaded(root) {
        return Ok(());
    }
    let s = sock_root(root);
    for dir in [s.maps_dir(), s.prog_dir(), s.links_dir()] {
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let mut ebpf = load_object(root)?;
    for name in object_programs() {
        load_program(&mut ebpf, name)?;
        pin_program(&mut ebpf, name, &s.prog_dir().join(name))?;
    }
    Ok(())
}

fn link_pin(root: &PinRoot, id: u64, hook: &str) -> PathBuf {
    sock_root(root).links_dir().join(format!("{id}:{hook}"))
}

/// Attaches every socket program to `cg` (links pinned, so they outlive
/// the process); hooks already linked are left as they are. All or
/// nothing: on a failure the links this call made are removed again.
/// Returns how many links were made.
pub fn attach(root: &PinRoot, cg: &Cgroup) -> Result<usize, DataplaneError> {
    let s = sock_root(root);
    let dir = File::open(&cg.path).map_err(io(format!("opening {}", cg.path.display())))?;
    // The directory opened must be the cgroup resolved: one removed and
    // made again in between is another cgroup (another id).
    let opened = dir
        .metadata()
        .map_err(io(format!("reading {}", cg.path.display())))?
        .ino();
    if opened != cg.id {
        return Err(DataplaneError::Cgroup {
            path: cg.path.clone(),
            problem: format!(
                "was removed and made again while being linked (id {} is now {opened}); retried at the next drift check",
                cg.id
            ),
        });
    }
    let mut made: Vec<PathBuf> = Vec::new();
    let result = (|| {
        for (name, hook) in SOCK_PROGRAMS {
            let pin = link_pin(root, cg.id, hook);
            if link_live(&pin, cg.id) {
                continue;
            }
            // A pin whose link was detached behind sluice's back runs
            // nothing: replaced.
            unlink(&pin);
            let kind = attach_type(hook).ok_or_else(|| DataplaneError::Load {
                source: format!("unknown hook {hook}").into(),
            })?;
            let prog_path = s.prog_dir().join(name);
            let mut prog = CgroupSockAddr::from_pin(&prog_path, kind).map_err(|e| {
                DataplaneError::PinnedMap {
                    path: prog_path.clone(),
                    source: e.into(),
                }
            })?;
            // A bpf_link on a cgroup always coexists with other programs
            // (links are multi-attach by nature); the kernel refuses any
            // attach flag with a link, and Single is the one that sends none.
            let id = prog.attach(&dir, CgroupAttachMode::Single).map_err(|e| {
                DataplaneError::CgroupAttach {
                    path: cg.path.clone(),
                    hook,
                    source: e.into(),
                }
            })?;
            let link = prog
                .take_link(id)
                .map_err(|e| DataplaneError::CgroupAttach {
                    path: cg.path.clone(),
                    hook,
                    source: e.into(),
                })?;
            let fd: FdLink = link
                .try_into()
                .map_err(
                    |e: aya::programs::links::LinkError| DataplaneError::CgroupAttach {
                        path: cg.path.clone(),
                        hook,
                        source: e.into(),
                    },
                )?;
            fd.pin(&pin).map_err(|e| DataplaneError::Io {
                what: format!("pinning {}", pin.display()),
                source: std::io::Error::other(e.to_string()),
            })?;
            made.push(pin);
        }
        Ok(made.len())
    })();
    if result.is_err() {
        for pin in &made {
            unlink(pin);
        }
    }
    result
}

/// The link pinned at `pin` still attaches its program to cgroup `id`.
pub(super) fn link_live(pin: &Path, id: u64) -> bool {
    super::sys::obj_get(pin)
        .and_then(super::sys::link_info)
        .is_ok_and(|i| i.cgroup_id == id && i.prog_id != 0)
}

/// Removes a pinned link; dropping its last reference detaches it.
pub(super) fn unlink(pin: &Path) {
    if let Ok(link) = PinnedLink::from_pin(pin) {
        drop(link.unpin());
    }
    let _ = std::fs::remove_file(pin);
}

/// Detaches every socket program from the cgroup with id `id`.
pub fn detach(root: &PinRoot, id: u64) -> usize {
    let mut n = 0;
    for (_, hook) in SOCK_PROGRAMS {
        let pin = link_pin(root, id, hook);
        if pin.exists() {
            unlink(&pin);
            n += 1;
        }
    }
    n
}

/// The hooks linked per cgroup id, from the link pins.
pub fn links(root: &PinRoot) -> Result<BTreeMap<u64, Vec<String>>, DataplaneError> {
    let dir = sock_root(root).links_dir();
    let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
    };
    for e in entries {
        let e = e.map_err(io(format!("reading {}", dir.display())))?;
        let name = e.file_name().to_string_lossy().into_owned();
        // Only links still attached to their cgroup count.
        if let Some((id, hook)) = name.split_once(':')
            && let Ok(id) = id.parse()
            && link_live(&e.path(), id)
        {
            out.entry(id).or_default().push(hook.to_string());
        }
    }
    for hooks in out.values_mut() {
        hooks.sort_by_key(|h| SOCK_PROGRAMS.iter().position(|(_, x)| x == h));
    }
    Ok(out)
}

/// Removes the socket layer's pins (call when no workload is left: every
/// link detached). The programs and maps go with their last reference.
pub fn remove_all(root: &PinRoot) -> Result<(), DataplaneError> {
    let s = sock_root(root);
    for id in links(root)?.keys() {
        detach(root, *id);
    }
    pins::remove_tree(&s.root).map_err(io(format!("removing {}", s.root.display())))
}

/// One workload's entry as written to a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPolicy {
    pub slot: u32,
    pub policy: WorkloadPolicy,
    /// Connect rules, then bind rules (`policy.connect_rules` + `policy.bind_rules`).
    pub rules: Vec<SockRule>,
}

/// The socket layer's maps, opened from their pins.
pub struct SockMaps {
    generation: Array<MapData, u32>,
    workloads: HashMap<MapData, u64, u32>,
    policy: Array<MapData, WorkloadPolicy>,
    rules: Array<MapData, SockRule>,
    stats: PerCpuArray<MapData, u64>,
}

impl SockMaps {
    pub fn open(root: &PinRoot) -> Result<Self, DataplaneError> {
        let s = sock_root(root);
        Ok(Self {
            generation: typed(&s, names::SOCK_GENERATION)?,
            workloads: typed(&s, names::WORKLOADS)?,
            policy: typed(&s, names::SOCK_POLICY)?,
            rules: typed(&s, names::SOCK_RULES)?,
            stats: typed(&s, names::SOCK_STATS)?,
        })
    }

    /// The generation sockets use now.
    pub fn generation(&self) -> Result<u32, DataplaneError> {
        Ok(self
            .generation
            .get(&0, 0)
            .map_err(|e| DataplaneError::map_err("read", names::SOCK_GENERATION, e))?
            & 1)
    }

    /// cgroup id -> workload slot.
    pub fn slots(&self) -> Result<BTreeMap<u64, u32>, DataplaneError> {
        let mut out = BTreeMap::new();
        for item in self.workloads.iter() {
            let (k, v) = item.map_err(|e| DataplaneError::map_err("read", names::WORKLOADS, e))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    pub fn set_slot(&mut self, id: u64, slot: u32) -> Result<(), DataplaneError> {
        self.workloads
            .insert(id, slot, 0)
            .map_err(|e| DataplaneError::map_err("write", names::WORKLOADS, e))
    }

    pub fn remove_slot(&mut self, id: u64) -> Result<(), DataplaneError> {
        match self.workloads.remove(&id) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(DataplaneError::map_err("delete", names::WORKLOADS, e)),
        }
    }

    /// Zeroes a slot's counters (a new workload takes it).
    pub fn zero_stats(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| DataplaneError::map_err("read", names::SOCK_STATS, e))?;
        for i in 0..SOCK_COUNTERS_PER_WORKLOAD {
            let zero = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                .map_err(|e| DataplaneError::map_err("write", names::SOCK_STATS, e))?;
            self.stats
                .set(slot * SOCK_COUNTERS_PER_WORKLOAD + i, zero, 0)
                .map_err(|e| DataplaneError::map_err("write", names::SOCK_STATS, e))?;
        }
        Ok(())
    }

    /// A slot's counters, summed over CPUs (`sock_counter_slot` order).
    pub fn stats(&self, slot: u32) -> Result<Vec<u64>, DataplaneError> {
        (0..SOCK_COUNTERS_PER_WORKLOAD)
            .map(|i| {
                self.stats
                    .get(&(slot * SOCK_COUNTERS_PER_WORKLOAD + i), 0)
                    .map(|v| v.iter().sum())
                    .map_err(|e| DataplaneError::map_err("read", names::SOCK_STATS, e))
            })
            .collect()
    }

    /// What generation `g` holds for `slot`.
    pub fn read_slot(&self, g: u32, slot: u32) -> Result<SlotPolicy, DataplaneError> {
        let index = g * MAX_WORKLOADS + slot;
        let policy = self
            .policy
            .get(&index, 0)
            .map_err(|e| DataplaneError::map_err("read", names::SOCK_POLICY, e))?;
        let n = (policy.connect_rules + policy.bind_rules).min(MAX_SOCK_RULES);
        let rules = (0..n)
            .map(|i| {
                self.rules
                    .get(&(index * MAX_SOCK_RULES + i), 0)
                    .map_err(|e| DataplaneError::map_err("read", names::SOCK_RULES, e))
            })
            .collect::<Result<_, _>>()?;
        Ok(SlotPolicy {
            slot,
            policy,
            rules,
        })
    }

    /// Writes `entries` (every other slot inactive) into the standby
    /// generation, reads it back, and flips sockets to it: each socket
    /// call sees the old policy or the new one, never a mix.
    pub fn commit(&mut self, entries: &[SlotPolicy]) -> Result<u32, DataplaneError> {
        let next = 1 - self.generation()?;
        for slot in 0..MAX_WORKLOADS {
            let e = entries.iter().find(|e| e.slot == slot);
            let index = next * MAX_WORKLOADS + slot;
            let policy = e.map(|e| e.policy).unwrap_or_default();
            self.policy
                .set(index, policy, 0)
                .map_err(|e| DataplaneError::map_err("write", names::SOCK_POLICY, e))?;
            for (i, r) in e
                .map(|e| e.rules.as_slice())
                .unwrap_or(&[])
                .iter()
                .enumerate()
            {
                self.rules
                    .set(index * MAX_SOCK_RULES + i as u32, *r, 0)
                    .map_err(|e| DataplaneError::map_err("write", names::SOCK_RULES, e))?;
            }
        }
        for e in entries {
            let back = self.read_slot(next, e.slot)?;
            if back != *e {
                return Err(DataplaneError::Readback {
                    what: format!("socket policy slot {} of generation {next}", e.slot),
                });
            }
        }
        self.generation
            .set(0, next, 0)
            .map_err(|e| DataplaneError::map_err("write", names::SOCK_GENERATION, e))?;
        if self.generation()? != next {
            return Err(DataplaneError::Readback {
                what: format!("{} is not {next}", names::SOCK_GENERATION),
            });
        }
        Ok(next)
    }
}

/// What an upgrade of the socket programs did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SockUpgrade {
    /// Programs replaced by this build's (same tag: left alone unless forced).
    pub programs: usize,
    /// Cgroup links switched to the new programs.
    pub links: usize,
}

/// Swaps this build's socket programs in on every cgroup link, atomically
/// per link (a call runs the old program or the new one), reusing the
/// pinned maps so workloads and counters carry over; all or nothing. The
/// caller holds the root lock and has checked the pins (`repair_sock`).
pub fn upgrade(root: &PinRoot, force: bool) -> Result<SockUpgrade, DataplaneError> {
    let mut report = SockUpgrade::default();
    let s = sock_root(root);
    // Any program pinned (an older build may not have had them all).
    if !object_programs().any(|name| s.prog_dir().join(name).exists()) {
        return Ok(report);
    }
    let mut ebpf = load_object(root)?;
    // Load every new program before any link changes.
    let mut swaps: Vec<&str> = Vec::new();
    for name in object_programs() {
        load_program(&mut ebpf, name)?;
        let new_tag = ebpf
            .program(name)
            .and_then(|p| p.info().ok())
            .map(|i| i.tag());
        let old_tag = aya::programs::ProgramInfo::from_pin(s.prog_dir().join(name))
            .map(|i| i.tag())
            .ok();
        if force || old_tag.is_none() || old_tag != new_tag {
            swaps.push(name);
        }
    }
    // Every link pin and the program it runs.
    let mut linked: Vec<(PathBuf, &str)> = Vec::new();
    for (id, hooks) in links(root)? {
        for hook in hooks {
            if let Some((name, _)) = SOCK_PROGRAMS.iter().find(|(_, h)| *h == hook) {
                linked.push((link_pin(root, id, &hook), name));
            }
        }
    }
    for (name, hook) in SOCK_LB_PROGRAMS {
        let pin = super::sock_lb::link_pin(root, hook);
        if pin.exists() {
            linked.push((pin, name));
        }
    }
    let steer = super::steer::link_pin(root);
    if steer.exists() {
        linked.push((steer, sluice_common::steer::STEER_PROGRAMS[0].0));
    }
    // Switch the links, remembering each one's old program to go back to.
    let mut done: Vec<(
        std::os::fd::OwnedFd,
        std::os::fd::OwnedFd,
        std::os::fd::OwnedFd,
    )> = Vec::new();
    let result = (|| {
        for (pin, name) in &linked {
            if !swaps.contains(name) {
                continue;
            }
            let new_fd = ebpf
                .program(name)
                .ok_or_else(|| DataplaneError::Load {
                    source: format!("program {name} missing from the socket object").into(),
                })?
                .fd()
                .map_err(|e| DataplaneError::Load { source: e.into() })?
                .as_fd()
                .try_clone_to_owned()
                .map_err(io("duplicating a program fd".into()))?;
            let link =
                super::sys::obj_get(pin).map_err(io(format!("opening {}", pin.display())))?;
            let info =
                super::sys::link_info(&link).map_err(io(format!("reading {}", pin.display())))?;
            let old = super::sys::prog_fd_by_id(info.prog_id)
                .map_err(io(format!("opening program {}", info.prog_id)))?;
            super::sys::link_update(link.as_fd(), new_fd.as_fd(), old.as_fd()).map_err(|e| {
                DataplaneError::CgroupAttach {
                    path: pin.clone(),
                    hook: "upgrade",
                    source: e.into(),
                }
            })?;
            done.push((link, old, new_fd));
        }
        Ok(())
    })();
    if let Err(e) = result {
        for (link, old, new) in &done {
            let _ = super::sys::link_update(link.as_fd(), old.as_fd(), new.as_fd());
        }
        return Err(e);
    }
    report.links = done.len();
    report.programs = swaps.len();
    // The pins follow the programs the links now run.
    for name in &swaps {
        pin_program(&mut ebpf, name, &s.prog_dir().join(name))?;
    }
    Ok(report)
}

/// Socket records lost to a full `SOCK_EVENTS` ring (0 when the socket
/// layer is not loaded).
#[must_use]
pub fn events_lost(root: &PinRoot) -> u64 {
    let s = sock_root(root);
    let Ok(lost) = typed::<PerCpuArray<MapData, u64>>(&s, names::SOCK_LOST) else {
        return 0;
    };
    lost.get(&0, 0).map_or(0, |v| v.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_either_layout() {
        let hybrid = "25 18 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
                      27 25 0:24 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let escaped = "30 23 0:26 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount_in(escaped), Some(PathBuf::from("/mnt/my cg")));
        let subtree = "31 23 0:26 /lab.slice /mnt/lab rw - cgroup2 none rw\n\
                       32 23 0:26 / /sys/fs/cgroup rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount_in(subtree),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_in("1 2 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
