//! The socket load balancer's kernel side: its links on the root of the
//! cgroup v2 hierarchy (pinned at `sock/lb/<hook>`), its settings (on or
//! off, the network namespace it serves), the services it leaves to the
//! packet LB, its counters, and whether its programs read the packet LB's
//! maps. The programs are the socket object's (`dataplane::sock` loads them).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya_obj::generated::bpf_attach_type;
use sluice_common::{
    lb::ServiceKey,
    map_names,
    sock::{
        SOCK_LB_F_ENABLED, SOCK_LB_PROGRAMS, SockLbConfig, SockLbSock, sock_lb_stat,
        sock_map_names as names,
    },
};

use super::{
    DataplaneError, PinRoot,
    policy::typed,
    sock::{io, link_live, sock_root, unlink},
    sys,
};

/// Where the link of `hook` is pinned.
#[must_use]
pub fn link_pin(root: &PinRoot, hook: &str) -> PathBuf {
    sock_root(root).root.join("lb").join(hook)
}

fn attach_type(hook: &str) -> Option<u32> {
    Some(match hook {
        "connect4" => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
        "connect6" => bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
        "sendmsg4" => bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG,
        "sendmsg6" => bpf_attach_type::BPF_CGROUP_UDP6_SENDMSG,
        "recvmsg4" => bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG,
        "recvmsg6" => bpf_attach_type::BPF_CGROUP_UDP6_RECVMSG,
        "getpeername4" => bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
        "getpeername6" => bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
        "sock_release" => bpf_attach_type::BPF_CGROUP_INET_SOCK_RELEASE,
        _ => return None,
    } as u32)
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`).
pub fn netns_cookie() -> Result<u64, DataplaneError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io("opening a socket to read the namespace cookie".into())(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    sys::getsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE)
        .map(|c| c as u64)
        .map_err(|e| DataplaneError::SockLoad {
            source: format!(
                "the kernel does not report network namespace cookies (SO_NETNS_COOKIE, Linux 5.14): {e}"
            )
            .into(),
        })
}

/// The root of the cgroup v2 hierarchy: its path and id.
pub fn root_cgroup() -> Result<super::sock::Cgroup, DataplaneError> {
    let mount = super::sock::cgroup2_mount()?;
    let id = std::fs::metadata(&mount)
        .map_err(io(format!("reading {}", mount.display())))?
        .ino();
    Ok(super::sock::Cgroup { path: mount, id })
}

/// Links every socket LB program to the root cgroup (pinned, so the links
/// outlive the process); hooks already linked are left alone. All or
/// nothing. Returns how many links were made. The programs must be loaded
/// (`sock::ensure_loaded`).
pub fn attach(root: &PinRoot) -> Result<usize, DataplaneError> {
    let cg = root_cgroup()?;
    let dir = File::open(&cg.path).map_err(io(format!("opening {}", cg.path.display())))?;
    let s = sock_root(root);
    let links = s.root.join("lb");
    std::fs::create_dir_all(&links).map_err(io(format!("creating {}", links.display())))?;
    let mut made: Vec<PathBuf> = Vec::new();
    let result = (|| {
        for (name, hook) in SOCK_LB_PROGRAMS {
            let pin = link_pin(root, hook);
            if link_live(&pin, cg.id) {
                continue;
            }
            let _ = std::fs::remove_file(&pin);
            let kind = attach_type(hook).ok_or_else(|| DataplaneError::Load {
                source: format!("unknown hook {hook}").into(),
            })?;
            let prog_path = s.prog_dir().join(name);
            let prog =
                sys::obj_get(&prog_path).map_err(io(format!("opening {}", prog_path.display())))?;
            let link = sys::link_create(prog.as_fd(), dir.as_fd(), kind).map_err(|e| {
                DataplaneError::CgroupAttach {
                    path: cg.path.clone(),
                    hook,
                    source: e.into(),
                }
            })?;
            sys::obj_pin(link.as_fd(), &pin).map_err(io(format!("pinning {}", pin.display())))?;
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

/// Removes every socket LB link (the socket LB stops at once). Returns how
/// many were removed.
pub fn detach(root: &PinRoot) -> usize {
    let mut n = 0;
    for (_, hook) in SOCK_LB_PROGRAMS {
        let pin = link_pin(root, hook);
        if pin.exists() {
            unlink(&pin);
            n += 1;
        }
    }
    let _ = std::fs::remove_dir(sock_root(root).root.join("lb"));
    n
}

/// The hooks the socket LB is linked to on the root cgroup (live links only).
#[must_use]
pub fn attached(root: &PinRoot) -> Vec<&'static str> {
    let Ok(cg) = root_cgroup() else {
        return Vec::new();
    };
    SOCK_LB_PROGRAMS
        .iter()
        .filter(|(_, hook)| link_live(&link_pin(root, hook), cg.id))
        .map(|(_, hook)| *hook)
        .collect()
}

/// The loaded socket LB programs read the packet LB's pinned maps (false
/// when they were loaded before the packet dataplane existed, or it was
/// made again since: they must be loaded again, `sock::upgrade(force)`).
pub fn bound(root: &PinRoot) -> Result<bool, DataplaneError> {
    let pin = root.map(map_names::LB_SERVICES);
    let Ok(map) = sys::obj_get(&pin) else {
        return Ok(false);
    };
    let (want, _) = sys::map_id_name(&map).map_err(io(format!("reading {}", pin.display())))?;
    let s = sock_root(root);
    for (name, hook) in SOCK_LB_PROGRAMS {
        let path = s.prog_dir().join(name);
        let Ok(prog) = sys::obj_get(&path) else {
            return Ok(false);
        };
        let (_, maps) = sys::prog_maps(&prog).map_err(io(format!("reading {}", path.display())))?;
        // Only connect and sendmsg look services up; the others read the
        // socket LB's own maps.
        let balances = hook.starts_with("connect") || hook.starts_with("sendmsg");
        if balances && !maps.contains(&want) {
            return Ok(false);
        }
    }
    // The links must run the pinned programs.
    for (name, hook) in SOCK_LB_PROGRAMS {
        let pin = link_pin(root, hook);
        let Ok(link) = sys::obj_get(&pin) else {
            continue;
        };
        let info = sys::link_info(&link).map_err(io(format!("reading {}", pin.display())))?;
        let pinned = aya::programs::ProgramInfo::from_pin(s.prog_dir().join(name))
            .map(|i| i.id())
            .ok();
        if pinned != Some(info.prog_id) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The socket LB's settings as the kernel holds them.
pub fn config(root: &PinRoot) -> Result<SockLbConfig, DataplaneError> {
    let m: Array<MapData, SockLbConfig> = typed(&sock_root(root), names::SOCK_LB_CONFIG)?;
    m.get(&0, 0)
        .map_err(|e| DataplaneError::map_err("read", names::SOCK_LB_CONFIG, e))
}

/// Turns the socket LB on for the namespace with `netns_cookie`, or off.
pub fn set_config(root: &PinRoot, enabled: bool, netns_cookie: u64) -> Result<(), DataplaneError> {
    let mut m: Array<MapData, SockLbConfig> = typed(&sock_root(root), names::SOCK_LB_CONFIG)?;
    let cfg = SockLbConfig {
        flags: if enabled { SOCK_LB_F_ENABLED } else { 0 },
        _pad: 0,
        netns_cookie,
    };
    m.set(0, cfg, 0)
        .map_err(|e| DataplaneError::map_err("write", names::SOCK_LB_CONFIG, e))?;
    if config(root)? != cfg {
        return Err(DataplaneError::Readback {
            what: names::SOCK_LB_CONFIG.into(),
        });
    }
    Ok(())
}

/// The services the socket LB leaves to the packet LB.
pub fn off(root: &PinRoot) -> Result<BTreeSet<ServiceKey>, DataplaneError> {
    let m: HashMap<MapData, ServiceKey, u32> = typed(&sock_root(root), names::SOCK_LB_OFF)?;
    m.keys()
        .map(|k| k.map_err(|e| DataplaneError::map_err("read", names::SOCK_LB_OFF, e)))
        .collect()
}

/// Makes the set of services the socket LB leaves alone `want`: new
/// entries first, stale ones after (call before the packet LB's services
/// change, and again after, so no service is balanced against its setting).
pub fn set_off(
    root: &PinRoot,
    want: &BTreeSet<ServiceKey>,
    remove_stale: bool,
) -> Result<(), DataplaneError> {
    let mut m: HashMap<MapData, ServiceKey, u32> = typed(&sock_root(root), names::SOCK_LB_OFF)?;
    let have = off(root)?;
    for k in want.difference(&have) {
        m.insert(*k, 1, 0)
            .map_err(|e| DataplaneError::map_err("write", names::SOCK_LB_OFF, e))?;
    }
    if remove_stale {
        for k in have.difference(want) {
            match m.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(DataplaneError::map_err("delete", names::SOCK_LB_OFF, e)),
            }
        }
    }
    Ok(())
}

/// The socket LB's event counters, summed over CPUs (by `sock_lb_stat` name).
pub fn stats(root: &PinRoot) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
    let m: PerCpuArray<MapData, u64> = typed(&sock_root(root), names::SOCK_LB_STATS)?;
    let mut out = Vec::new();
    for (i, name) in sock_lb_stat::NAMES.iter().enumerate() {
        if name.is_empty() {
            continue;
        }
        let v = m
            .get(&(i as u32), 0)
            .map_err(|e| DataplaneError::map_err("read", names::SOCK_LB_STATS, e))?;
        out.push((*name, v.iter().sum()));
    }
    Ok(out)
}

/// Sockets balanced to each of `slots` (backend slots), summed over CPUs.
pub fn backend_sockets(
    root: &PinRoot,
    slots: impl Iterator<Item = u32>,
) -> Result<BTreeMap<u32, u64>, DataplaneError> {
    let m: PerCpuArray<MapData, u64> = typed(&sock_root(root), names::SOCK_LB_BACKENDS)?;
    let mut out = BTreeMap::new();
    for slot in slots {
        let v = m
            .get(&slot, 0)
            .map_err(|e| DataplaneError::map_err("read", names::SOCK_LB_BACKENDS, e))?;
        out.insert(slot, v.iter().sum());
    }
    Ok(out)
}

/// The translated sockets the kernel remembers (cookie -> VIP and backend).
pub fn sockets(root: &PinRoot) -> Result<Vec<(u64, SockLbSock)>, DataplaneError> {
    let m: HashMap<MapData, u64, SockLbSock> = typed(&sock_root(root), names::SOCK_LB_SOCKS)?;
    m.iter()
        .map(|r| r.map_err(|e| DataplaneError::map_err("read", names::SOCK_LB_SOCKS, e)))
        .collect()
}

/// The socket LB as the kernel holds it (`status`, `lb list`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SockLbState {
    /// Linked to every hook and switched on.
    pub on: bool,
    /// The cgroup the programs are linked to (the cgroup v2 root).
    pub cgroup: Option<String>,
    /// Hooks linked.
    pub hooks: Vec<String>,
    /// Translated sockets remembered now, and the capacity.
    pub sockets: usize,
    pub capacity: u32,
    /// Event counters (`connect`, `sendmsg`, `no_backend`, ...).
    pub events: Vec<(String, u64)>,
}

/// The socket LB as the kernel holds it now.
#[must_use]
pub fn state(root: &PinRoot) -> SockLbState {
    let hooks: Vec<String> = attached(root).into_iter().map(str::to_string).collect();
    let enabled = config(root).is_ok_and(|c| c.flags & sluice_common::sock::SOCK_LB_F_ENABLED != 0);
    SockLbState {
        on: enabled && hooks.len() == sluice_common::sock::SOCK_LB_PROGRAMS.len(),
        cgroup: (!hooks.is_empty())
            .then(|| root_cgroup().ok())
            .flatten()
            .map(|c| c.path.display().to_string()),
        hooks,
        sockets: sockets(root).map(|v| v.len()).unwrap_or(0),
        capacity: sluice_common::sock::SOCK_LB_CAPACITY,
        events: stats(root)
            .map(|v| v.into_iter().map(|(n, c)| (n.to_string(), c)).collect())
            .unwrap_or_default(),
    }
}
