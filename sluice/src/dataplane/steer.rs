//! sk_lookup steering's kernel side: the program's link on a network
//! namespace (pinned at `sock/steer/link`), the rule table written with a
//! generation flip, and the destinations: one socket each (taken from a
//! process by pid and fd), the steer owning the slot, counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::maps::{Array, LpmTrie, MapData, PerCpuArray, SockHash, lpm_trie::Key};
use aya_obj::generated::bpf_attach_type;
use sluice_common::steer::{
    MAX_STEER_DESTS, STEER_PROGRAMS, SteerDest, SteerEntry, SteerKey, steer_map_names as names,
    steer_stat,
};

use super::{
    DataplaneError, PinRoot,
    policy::typed,
    sock::{io, sock_root, unlink},
    sys,
};

/// Where the steering link is pinned.
#[must_use]
pub fn link_pin(root: &PinRoot) -> PathBuf {
    sock_root(root).root.join("steer").join("link")
}

/// The inode number of the network namespace at `netns` (a
/// `/run/netns/NAME` or `/proc/.../ns/net` path).
pub fn netns_ino(netns: &Path) -> Result<u64, DataplaneError> {
    Ok(std::fs::metadata(netns)
        .map_err(io(format!("reading {}", netns.display())))?
        .ino())
}

/// The network namespace (inode number) the pinned link steers, if it is live.
#[must_use]
pub fn attached(root: &PinRoot) -> Option<u64> {
    let info = sys::obj_get(&link_pin(root))
        .and_then(sys::link_info)
        .ok()?;
    (info.prog_id != 0 && info.netns_ino != 0).then_some(u64::from(info.netns_ino))
}

/// Links the steering program to the network namespace at `netns`
/// (pinned, so it outlives the process). A live link to that namespace is
/// left alone; one to another namespace is replaced. Returns whether a
/// link was made. The program must be loaded (`sock::ensure_loaded`).
pub fn attach(root: &PinRoot, netns: &Path) -> Result<bool, DataplaneError> {
    let ino = netns_ino(netns)?;
    if attached(root) == Some(ino) {
        return Ok(false);
    }
    let pin = link_pin(root);
    let dir = pin.parent().expect("the pin has a directory");
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let ns = File::open(netns).map_err(io(format!("opening {}", netns.display())))?;
    let (name, _) = STEER_PROGRAMS[0];
    let prog_path = sock_root(root).prog_dir().join(name);
    let prog = sys::obj_get(&prog_path).map_err(io(format!("opening {}", prog_path.display())))?;
    let link = sys::link_create(prog.as_fd(), ns.as_fd(), bpf_attach_type::BPF_SK_LOOKUP as u32)
        .map_err(|e| DataplaneError::Steer {
            problem: format!(
                "linking the sk_lookup program to network namespace {} failed: {e} (sk_lookup needs Linux 5.9)",
                netns.display()
            ),
        })?;
    // The new link is pinned beside the old one and renamed over it (one
    // step on bpffs): for a moment both run (the same program and maps:
    // the same answer); the old link goes with its pin.
    let tmp = next_pin(root);
    let _ = std::fs::remove_file(&tmp);
    sys::obj_pin(link.as_fd(), &tmp).map_err(io(format!("pinning {}", tmp.display())))?;
    std::fs::rename(&tmp, &pin).map_err(io(format!("renaming {}", tmp.display())))?;
    Ok(true)
}

/// Where a new link is pinned before it replaces the old one (bpffs
/// refuses dots in names).
fn next_pin(root: &PinRoot) -> PathBuf {
    link_pin(root).with_file_name("link_next")
}

/// Removes the steering link (steering stops at once). Returns whether
/// there was one.
pub fn detach(root: &PinRoot) -> bool {
    let pin = link_pin(root);
    let had = pin.exists();
    unlink(&pin);
    // One left by a process that died between pinning and renaming.
    unlink(&next_pin(root));
    if let Some(dir) = pin.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    had
}

/// A socket taken from a process, with what the kernel says of it.
#[derive(Debug)]
pub struct TakenSocket {
    pub fd: OwnedFd,
    /// 4 or 6 (`SO_DOMAIN`).
    pub family: u8,
    /// 6 or 17 (`SO_PROTOCOL`).
    pub proto: u8,
    /// A TCP socket in LISTEN (`SO_ACCEPTCONN`).
    pub listening: bool,
    /// The local address (`getsockname`).
    pub local: Option<std::net::SocketAddr>,
    /// A UDP socket with a peer (connected: sk_lookup cannot deliver to it).
    pub connected: bool,
    /// An AF_INET6 socket with `IPV6_V6ONLY`.
    pub v6only: bool,
    pub cookie: u64,
    /// Inode of the socket's network namespace.
    pub netns_ino: u64,
}

fn sockaddr(fd: RawFd, peer: bool) -> std::io::Result<Option<std::net::SocketAddr>> {
    use nix::sys::socket::{SockaddrStorage, getpeername, getsockname};
    let addr: SockaddrStorage = if peer {
        getpeername(fd)
    } else {
        getsockname(fd)
    }
    .map_err(std::io::Error::from)?;
    Ok(if let Some(v4) = addr.as_sockaddr_in() {
        Some(std::net::SocketAddr::from(std::net::SocketAddrV4::from(
            *v4,
        )))
    } else {
        addr.as_sockaddr_in6()
            .map(|v6| std::net::SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
    })
}

/// What the kernel says of socket `fd` (an error: not an IP socket).
pub fn inspect(fd: OwnedFd) -> Result<TakenSocket, std::io::Error> {
    const SO_COOKIE: libc::c_int = 57;
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    let raw = fd.as_raw_fd();
    let domain = sys::getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let family = match domain as i32 {
        libc::AF_INET => 4,
        libc::AF_INET6 => 6,
        _ => {
            return Err(std::io::Error::other("not an IPv4 or IPv6 socket"));
        }
    };
    let proto = sys::getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_PROTOCOL)? as u8;
    let listening = sys::getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0;
    let cookie = sys::getsockopt_int(raw, libc::SOL_SOCKET, SO_COOKIE)? as u64;
    let v6only =
        family == 6 && sys::getsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0;
    let local = sockaddr(raw, false)?;
    let connected = match sockaddr(raw, true) {
        Ok(_) => true,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => false,
        Err(e) => return Err(e),
    };
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd.
    let ns = unsafe { libc::ioctl(raw, SIOCGSKNS as _) };
    if ns < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    let netns_ino = File::from(ns).metadata()?.ino();
    Ok(TakenSocket {
        fd,
        family,
        proto,
        listening,
        local,
        connected,
        v6only,
        cookie,
        netns_ino,
    })
}

/// Duplicates file descriptor `fd` of process `pid` into this one
/// (`pidfd_getfd`, Linux 5.6; needs ptrace rights over the process: root).
pub fn take_fd(pid: u32, fd: RawFd) -> Result<OwnedFd, DataplaneError> {
    let steer = |problem: String| DataplaneError::Steer { problem };
    // SAFETY: plain syscalls; the returned fds are owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(steer(match e.raw_os_error() {
            Some(libc::ESRCH) => format!("no process {pid}"),
            _ => format!("opening process {pid}: {e}"),
        }));
    }
    // SAFETY: as above.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: as above.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        let e = std::io::Error::last_os_error();
        return Err(steer(match e.raw_os_error() {
            Some(libc::EBADF) => format!("process {pid} has no file descriptor {fd}"),
            Some(libc::EPERM) => {
                format!(
                    "taking fd {fd} of process {pid} was refused (it needs ptrace rights over the process: run the agent as root)"
                )
            }
            Some(libc::ESRCH) => format!("process {pid} exited"),
            _ => format!("taking fd {fd} of process {pid}: {e}"),
        }));
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(got as RawFd) })
}

/// The socket file descriptors of process `pid` (from /proc/PID/fd).
pub fn socket_fds(pid: u32) -> Result<Vec<RawFd>, DataplaneError> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = std::fs::read_dir(&dir).map_err(|e| DataplaneError::Steer {
        problem: if e.kind() == std::io::ErrorKind::NotFound {
            format!("no process {pid}")
        } else {
            format!("reading {}: {e}", dir.display())
        },
    })?;
    let mut out: Vec<RawFd> = entries
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// A delete found no entry (aya reports it as `KeyNotFound` for some maps
/// and as the syscall's ENOENT for others).
fn missing(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// The steering maps, opened from their pins.
pub struct SteerMaps {
    generation: Array<MapData, u32>,
    rules: LpmTrie<MapData, SteerKey, SteerEntry>,
    socks: SockHash<MapData, u32>,
    dests: Array<MapData, SteerDest>,
    stats: PerCpuArray<MapData, u64>,
}

/// A steer's name as `SteerDest` holds it.
#[must_use]
pub fn dest_name(name: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    let n = name.len().min(32);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// A taken slot as `STEER_DESTS` holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dest {
    pub name: String,
    /// The socket registered last (0: none; it may have closed since:
    /// [`SteerMaps::live`] says which are open).
    pub cookie: u64,
    pub socket: SocketFacts,
}

/// What a socket is, as far as steering cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketFacts {
    /// 4 or 6.
    pub family: u8,
    /// 6 or 17.
    pub proto: u8,
    /// TCP in LISTEN.
    pub listening: bool,
    /// UDP with a peer.
    pub connected: bool,
    /// Bound to a port.
    pub bound: bool,
    /// AF_INET6 with `IPV6_V6ONLY`.
    pub v6only: bool,
    pub netns_ino: u64,
}

impl TakenSocket {
    #[must_use]
    pub fn facts(&self) -> SocketFacts {
        SocketFacts {
            family: self.family,
            proto: self.proto,
            listening: self.listening,
            connected: self.connected,
            bound: self.local.is_some_and(|a| a.port() != 0),
            v6only: self.v6only,
            netns_ino: self.netns_ino,
        }
    }
}

fn name_of(d: &SteerDest) -> String {
    let end = d.name.iter().position(|b| *b == 0).unwrap_or(d.name.len());
    String::from_utf8_lossy(&d.name[..end]).into_owned()
}

impl SteerMaps {
    pub fn open(root: &PinRoot) -> Result<Self, DataplaneError> {
        let s = sock_root(root);
        Ok(Self {
            generation: typed(&s, names::STEER_GENERATION)?,
            rules: typed(&s, names::STEER_RULES)?,
            socks: typed(&s, names::STEER_SOCKS)?,
            dests: typed(&s, names::STEER_DESTS)?,
            stats: typed(&s, names::STEER_STATS)?,
        })
    }

    /// The generation lookups use now.
    pub fn generation(&self) -> Result<u8, DataplaneError> {
        Ok((self
            .generation
            .get(&0, 0)
            .map_err(|e| DataplaneError::map_err("read", names::STEER_GENERATION, e))?
            & 1) as u8)
    }

    /// Slot -> the steer owning it and the socket registered (taken slots only).
    pub fn dests(&self) -> Result<BTreeMap<u16, Dest>, DataplaneError> {
        let mut out = BTreeMap::new();
        for slot in 0..MAX_STEER_DESTS {
            let d = self
                .dests
                .get(&slot, 0)
                .map_err(|e| DataplaneError::map_err("read", names::STEER_DESTS, e))?;
            if d.name[0] != 0 {
                out.insert(
                    slot as u16,
                    Dest {
                        name: name_of(&d),
                        cookie: d.cookie,
                        socket: SocketFacts {
                            family: d.family,
                            proto: d.proto,
                            listening: d.listening != 0,
                            connected: false,
                            bound: true,
                            v6only: d.v6only != 0,
                            netns_ino: d.netns_ino,
                        },
                    },
                );
            }
        }
        Ok(out)
    }

    /// Gives `slot` to steer `name` (no socket yet; counters zeroed).
    pub fn claim(&mut self, slot: u16, name: &str) -> Result<(), DataplaneError> {
        self.forget_socket(slot)?;
        self.zero_stats(slot)?;
        self.set_dest(
            slot,
            SteerDest {
                name: dest_name(name),
                ..SteerDest::default()
            },
        )
    }

    /// Frees `slot`: its socket is let go and its owner forgotten.
    pub fn release(&mut self, slot: u16) -> Result<(), DataplaneError> {
        self.forget_socket(slot)?;
        self.set_dest(slot, SteerDest::default())
    }

    fn set_dest(&mut self, slot: u16, d: SteerDest) -> Result<(), DataplaneError> {
        self.dests
            .set(u32::from(slot), d, 0)
            .map_err(|e| DataplaneError::map_err("write", names::STEER_DESTS, e))
    }

    /// Registers socket `s` for `slot`, replacing any.
    pub fn set_socket(&mut self, slot: u16, s: &TakenSocket) -> Result<(), DataplaneError> {
        self.socks
            .insert(u32::from(slot), s.fd.as_raw_fd(), 0)
            .map_err(|e| DataplaneError::map_err("write", names::STEER_SOCKS, e))?;
        let d = self
            .dests
            .get(&u32::from(slot), 0)
            .map_err(|e| DataplaneError::map_err("read", names::STEER_DESTS, e))?;
        self.set_dest(
            slot,
            SteerDest {
                cookie: s.cookie,
                netns_ino: s.netns_ino,
                name: d.name,
                family: s.family,
                proto: s.proto,
                listening: u8::from(s.listening),
                v6only: u8::from(s.v6only),
                _pad: 0,
            },
        )
    }

    /// Lets go of `slot`'s socket (lookups then count `no_socket`).
    pub fn forget_socket(&mut self, slot: u16) -> Result<(), DataplaneError> {
        match self.socks.remove(&u32::from(slot)) {
            Ok(()) => {}
            Err(e) if missing(&e) => {}
            Err(e) => return Err(DataplaneError::map_err("delete", names::STEER_SOCKS, e)),
        }
        let d = self
            .dests
            .get(&u32::from(slot), 0)
            .map_err(|e| DataplaneError::map_err("read", names::STEER_DESTS, e))?;
        if d.cookie != 0 {
            self.set_dest(
                slot,
                SteerDest {
                    name: d.name,
                    ..SteerDest::default()
                },
            )?;
        }
        Ok(())
    }

    /// Slots with a live socket (an entry goes when its socket closes).
    pub fn live(&self) -> Result<BTreeSet<u16>, DataplaneError> {
        self.socks
            .keys()
            .map(|k| {
                k.map(|k| k as u16)
                    .map_err(|e| DataplaneError::map_err("read", names::STEER_SOCKS, e))
            })
            .collect()
    }

    fn zero_stats(&mut self, slot: u16) -> Result<(), DataplaneError> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| DataplaneError::map_err("read", names::STEER_STATS, e))?;
        for i in 0..steer_stat::PER_DEST {
            let zero = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                .map_err(|e| DataplaneError::map_err("write", names::STEER_STATS, e))?;
            self.stats
                .set(u32::from(slot) * steer_stat::PER_DEST + i, zero, 0)
                .map_err(|e| DataplaneError::map_err("write", names::STEER_STATS, e))?;
        }
        Ok(())
    }

    /// A slot's counters, summed over CPUs (`steer_stat` order).
    pub fn stats(&self, slot: u16) -> Result<Vec<u64>, DataplaneError> {
        (0..steer_stat::PER_DEST)
            .map(|i| {
                self.stats
                    .get(&(u32::from(slot) * steer_stat::PER_DEST + i), 0)
                    .map(|v| v.iter().sum())
                    .map_err(|e| DataplaneError::map_err("read", names::STEER_STATS, e))
            })
            .collect()
    }

    /// The entries of generation `g`: (prefix length, key, value).
    pub fn table(&self, g: u8) -> Result<Vec<(u32, SteerKey, SteerEntry)>, DataplaneError> {
        let mut out = Vec::new();
        for k in self.rules.keys() {
            let k = k.map_err(|e| DataplaneError::map_err("read", names::STEER_RULES, e))?;
            if k.data().generation == g {
                let v = self
                    .rules
                    .get(&k, 0)
                    .map_err(|e| DataplaneError::map_err("read", names::STEER_RULES, e))?;
                out.push((k.prefix_len(), k.data(), v));
            }
        }
        out.sort_by_key(|(len, key, _)| (*key, *len));
        Ok(out)
    }

    fn clear(&mut self, g: u8) -> Result<(), DataplaneError> {
        // Collected first: deleting while walking the trie would skip keys.
        let keys: Vec<Key<SteerKey>> = self
            .rules
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation == g)
            .collect();
        for k in keys {
            match self.rules.remove(&k) {
                Ok(()) => {}
                Err(e) if missing(&e) => {}
                Err(e) => return Err(DataplaneError::map_err("delete", names::STEER_RULES, e)),
            }
        }
        Ok(())
    }

    /// Writes `entries` (their generation byte ignored) as the standby
    /// generation, reads it back and flips lookups to it: each lookup sees
    /// the old table or the new one, never a mix. The old generation stays
    /// whole until the next commit clears it (a lookup may still be reading
    /// it). Nothing is written when the active table is `entries` already.
    /// Returns whether it flipped.
    pub fn commit(
        &mut self,
        entries: &[(u32, SteerKey, SteerEntry)],
    ) -> Result<bool, DataplaneError> {
        let old = self.generation()?;
        let next = 1 - old;
        let mut in_force: Vec<(u32, SteerKey, SteerEntry)> = entries
            .iter()
            .map(|(len, k, e)| {
                (
                    *len,
                    SteerKey {
                        generation: old,
                        ..*k
                    },
                    *e,
                )
            })
            .collect();
        in_force.sort_by_key(|(len, key, _)| (*key, *len));
        if self.table(old)? == in_force {
            return Ok(false);
        }
        self.clear(next)?;
        let mut want: Vec<(u32, SteerKey, SteerEntry)> = entries
            .iter()
            .map(|(len, k, v)| {
                (
                    *len,
                    SteerKey {
                        generation: next,
                        ..*k
                    },
                    *v,
                )
            })
            .collect();
        for (len, k, v) in &want {
            self.rules
                .insert(&Key::new(*len, *k), *v, 0)
                .map_err(|e| DataplaneError::map_err("write", names::STEER_RULES, e))?;
        }
        want.sort_by_key(|(len, key, _)| (*key, *len));
        if self.table(next)? != want {
            return Err(DataplaneError::Readback {
                what: format!("steering rules of generation {next}"),
            });
        }
        self.generation
            .set(0, u32::from(next), 0)
            .map_err(|e| DataplaneError::map_err("write", names::STEER_GENERATION, e))?;
        if self.generation()? != next {
            return Err(DataplaneError::Readback {
                what: format!("{} is not {next}", names::STEER_GENERATION),
            });
        }
        Ok(true)
    }
}

/// Flow records lost to a full `STEER_FLOWS` ring (0 when not loaded).
#[must_use]
pub fn flows_lost(root: &PinRoot) -> u64 {
    let s = sock_root(root);
    let Ok(lost) = typed::<PerCpuArray<MapData, u64>>(&s, names::STEER_LOST) else {
        return 0;
    };
    lost.get(&0, 0).map_or(0, |v| v.iter().sum())
}

/// Steering as `status` shows it: the link, the namespace, how many steers
/// hold a slot and how many have a live socket.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SteerStatus {
    /// Inode of the namespace linked.
    pub netns_ino: u64,
    /// Its name under /run/netns, or `host` for the initial namespace.
    pub netns: Option<String>,
    pub steers: usize,
    pub sockets: usize,
}

/// The name of the namespace with inode `ino` (under /run/netns, or `host`).
pub fn netns_name(ino: u64) -> Option<String> {
    if std::fs::metadata("/proc/1/ns/net").is_ok_and(|m| m.ino() == ino) {
        return Some("host".into());
    }
    std::fs::read_dir("/run/netns")
        .ok()?
        .flatten()
        .find_map(|e| {
            e.metadata()
                .is_ok_and(|m| m.ino() == ino)
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
}

/// Steering's link and slots now (`None`: not linked).
#[must_use]
pub fn status(root: &PinRoot) -> Option<SteerStatus> {
    let ino = attached(root)?;
    let maps = SteerMaps::open(root).ok();
    Some(SteerStatus {
        netns_ino: ino,
        netns: netns_name(ino),
        steers: maps
            .as_ref()
            .and_then(|m| m.dests().ok())
            .map_or(0, |d| d.len()),
        sockets: maps
            .as_ref()
            .and_then(|m| m.live().ok())
            .map_or(0, |l| l.len()),
    })
}
