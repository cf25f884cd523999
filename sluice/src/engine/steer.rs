//! Steering as the engine drives it: the desired steers become slots, a
//! rule table (one generation flip) and a link on the served network
//! namespace; sockets are registered per steer, taken from a process by
//! pid and fd after checking they can take the steered traffic.

use std::collections::BTreeMap;

use sluice_common::steer::{MAX_STEER_DESTS, steer_stat};

use crate::{
    dataplane::{DataplaneError, PinRoot, pins, sock, sock_lb, steer},
    model::{
        lb::Proto,
        steer::{self as model, Steer},
    },
};

/// What `apply` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    /// Steers in force.
    pub steers: usize,
    /// Rule table entries written (one generation).
    pub entries: usize,
    /// The namespace link was made / removed.
    pub linked: bool,
    pub unlinked: bool,
    /// Registered sockets let go because they no longer fit their steer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
}

/// Makes the kernel steer as `steers` say in network namespace `netns`:
/// slots kept per name (new steers take free ones, zeroed), the rule table
/// written to the standby generation and flipped, slots of removed steers
/// freed (their sockets let go), the namespace linked. No steers: the link
/// goes first, then the table and slots.
pub fn apply(
    root: &PinRoot,
    steers: &[Steer],
    netns: Option<&str>,
) -> Result<ApplyReport, DataplaneError> {
    model::validate(steers).map_err(|problem| DataplaneError::Steer { problem })?;
    let mut report = ApplyReport {
        steers: steers.len(),
        ..ApplyReport::default()
    };
    if steers.is_empty() {
        if !sock::is_loaded(root) {
            return Ok(report);
        }
        let _lock = pins::RootLock::acquire(&root.root)?;
        report.unlinked = steer::detach(root);
        let mut maps = steer::SteerMaps::open(root)?;
        maps.commit(&[])?;
        for slot in maps.dests()?.keys() {
            maps.release(*slot)?;
        }
        drop(maps);
        // Nothing else runs the socket object: its pins go.
        if sock::links(root)?.is_empty() && sock_lb::attached(root).is_empty() {
            sock::remove_all(root)?;
        }
        return Ok(report);
    }
    let path = crate::netns::path(netns);
    if !path.exists() {
        return Err(DataplaneError::Steer {
            problem: format!(
                "network namespace {} does not exist",
                netns.unwrap_or("(own)")
            ),
        });
    }
    let target_ino = steer::netns_ino(&path)?;
    sock::ensure_loaded(root)?;
    let _lock = pins::RootLock::acquire(&root.root)?;
    let mut maps = steer::SteerMaps::open(root)?;
    let held = maps.dests()?;
    let live = maps.live()?;
    let by_name: BTreeMap<&str, u16> = held.iter().map(|(s, d)| (d.name.as_str(), *s)).collect();
    let mut slots = Vec::with_capacity(steers.len());
    let mut taken: Vec<u16> = steers
        .iter()
        .filter_map(|s| by_name.get(s.name.as_str()).copied())
        .collect();
    for s in steers {
        let slot = if let Some(slot) = by_name.get(s.name.as_str()) {
            // Kept: its socket must still fit the steer as it is now (a
            // changed protocol or family, a socket of another namespace).
            if live.contains(slot)
                && let Some(why) = unfit(s, &held[slot].socket, Some(target_ino))
            {
                maps.forget_socket(*slot)?;
                report
                    .dropped
                    .push(format!("steer {}: its socket was let go: {why}", s.name));
            }
            *slot
        } else {
            // A slot no desired steer keeps and no other holds; else one
            // of a steer this change removes (it leaves the table now).
            let free = (0..MAX_STEER_DESTS as u16)
                .find(|x| !taken.contains(x) && !held.contains_key(x))
                .or_else(|| (0..MAX_STEER_DESTS as u16).find(|x| !taken.contains(x)))
                .ok_or_else(|| DataplaneError::Steer {
                    problem: format!("no free steering slot (at most {MAX_STEER_DESTS} steers)"),
                })?;
            maps.claim(free, &s.name)?;
            taken.push(free);
            free
        };
        slots.push(slot);
    }
    let table = model::compile(steers, |i| slots[i])
        .map_err(|problem| DataplaneError::Steer { problem })?;
    let entries: Vec<_> = table
        .iter()
        .map(|e| (e.prefix_len, e.key, e.entry))
        .collect();
    maps.commit(&entries)?;
    report.entries = entries.len();
    // Slots of removed steers (not those just given to new ones).
    for (slot, d) in &held {
        if !slots.contains(slot) && !steers.iter().any(|s| s.name == d.name) {
            maps.release(*slot)?;
        }
    }
    report.linked = steer::attach(root, &path)?;
    Ok(report)
}

/// What `register` took.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registered {
    pub steer: String,
    pub pid: u32,
    pub fd: i32,
    pub cookie: u64,
    /// The socket's own address.
    pub local: Option<String>,
    /// A socket was registered before and is replaced.
    pub replaced: bool,
}

/// Why a socket (`s`) cannot take steer `st`'s traffic, if it cannot;
/// `netns_ino`: the namespace steered.
fn unfit(st: &Steer, s: &steer::SocketFacts, netns_ino: Option<u64>) -> Option<String> {
    let want = st.proto.number();
    if s.proto != want {
        return Some(format!(
            "it is a {} socket; steer {} is {}",
            match s.proto {
                6 => "TCP",
                17 => "UDP",
                _ => "non-TCP/UDP",
            },
            st.name,
            st.proto.name()
        ));
    }
    if st.proto == Proto::Tcp && !s.listening {
        return Some("it is not listening (call listen() first)".into());
    }
    if st.proto == Proto::Udp {
        if s.connected {
            return Some("it is connected (steered datagrams need an unconnected socket)".into());
        }
        if !s.bound {
            return Some("it is not bound (bind it first)".into());
        }
    }
    let v4 = st.prefixes.iter().any(|p| matches!(p, ipnet::IpNet::V4(_)));
    let v6 = st.prefixes.iter().any(|p| matches!(p, ipnet::IpNet::V6(_)));
    if v6 && s.family == 4 {
        return Some(format!(
            "it is an IPv4 socket; steer {} has IPv6 prefixes (use an IPv6 socket)",
            st.name
        ));
    }
    if v4 && s.family == 6 && s.v6only {
        return Some(format!(
            "it is an IPv6-only socket; steer {} has IPv4 prefixes (clear IPV6_V6ONLY)",
            st.name
        ));
    }
    if let Some(ino) = netns_ino
        && s.netns_ino != ino
    {
        return Some("it belongs to another network namespace than the one steered".into());
    }
    None
}

/// Registers a socket of process `pid` for steer `name`: its file
/// descriptor `fd`, or (no `fd`) the one socket of the process that can
/// take the steer's traffic. The socket is checked (protocol, listening or
/// bound, family, namespace) before anything changes.
pub fn register(
    root: &PinRoot,
    steers: &[Steer],
    netns: Option<&str>,
    name: &str,
    pid: u32,
    fd: Option<i32>,
) -> Result<Registered, DataplaneError> {
    let refuse = |problem: String| DataplaneError::Steer { problem };
    let st = steers
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| refuse(format!("no steer {name}")))?;
    if !sock::is_loaded(root) {
        return Err(refuse(format!(
            "steer {name} is not in force (no steering loaded)"
        )));
    }
    let mut maps = steer::SteerMaps::open(root)?;
    let dests = maps.dests()?;
    let slot = dests
        .iter()
        .find(|(_, d)| d.name == name)
        .map(|(s, _)| *s)
        .ok_or_else(|| refuse(format!("steer {name} is not in force yet")))?;
    let had = maps.live()?.contains(&slot);
    // The namespace the desired state steers (whether or not its link is
    // up right now).
    let netns = Some(steer::netns_ino(&crate::netns::path(netns))?);
    let (fd, sock) = match fd {
        Some(fd) => {
            let taken = steer::take_fd(pid, fd)?;
            let s = steer::inspect(taken).map_err(|e| {
                refuse(format!(
                    "fd {fd} of process {pid} is not an IP socket ({e})"
                ))
            })?;
            if let Some(why) = unfit(st, &s.facts(), netns) {
                return Err(refuse(format!(
                    "fd {fd} of process {pid} cannot take steer {name}'s traffic: {why}"
                )));
            }
            (fd, s)
        }
        None => {
            let mut fit = Vec::new();
            let mut seen = Vec::new();
            for fd in steer::socket_fds(pid)? {
                let Ok(taken) = steer::take_fd(pid, fd) else {
                    continue;
                };
                let Ok(s) = steer::inspect(taken) else {
                    continue;
                };
                match unfit(st, &s.facts(), netns) {
                    None => fit.push((fd, s)),
                    Some(why) => seen.push(format!("fd {fd}: {why}")),
                }
            }
            match fit.len() {
                1 => fit.remove(0),
                0 => {
                    return Err(refuse(format!(
                        "process {pid} has no socket that can take steer {name}'s traffic{}",
                        if seen.is_empty() {
                            " (it has no IP sockets)".to_string()
                        } else {
                            format!(" ({})", seen.join("; "))
                        }
                    )));
                }
                _ => {
                    let fds: Vec<String> = fit.iter().map(|(fd, _)| fd.to_string()).collect();
                    return Err(refuse(format!(
                        "process {pid} has {} sockets that fit steer {name} (fds {}): name one with --fd",
                        fit.len(),
                        fds.join(", ")
                    )));
                }
            }
        }
    };
    maps.set_socket(slot, &sock)?;
    Ok(Registered {
        steer: name.to_string(),
        pid,
        fd,
        cookie: sock.cookie,
        local: sock.local.map(|a| a.to_string()),
        replaced: had,
    })
}

/// Lets go of steer `name`'s socket (its traffic is then refused, or
/// passed on with `on_missing = pass`). Returns whether one was registered.
pub fn unregister(root: &PinRoot, name: &str) -> Result<bool, DataplaneError> {
    let mut maps = steer::SteerMaps::open(root)?;
    let dests = maps.dests()?;
    let Some((slot, _)) = dests.iter().find(|(_, d)| d.name == name) else {
        return Err(DataplaneError::Steer {
            problem: format!("steer {name} is not in force"),
        });
    };
    let had = maps.live()?.contains(slot);
    maps.forget_socket(*slot)?;
    Ok(had)
}

/// One steer as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SteerState {
    pub steer: Steer,
    /// Its destination slot (None: not in force).
    pub slot: Option<u16>,
    /// The registered socket's cookie, while the socket is open.
    pub socket: Option<u64>,
    /// Counters by `steer_stat` name.
    pub counters: BTreeMap<String, u64>,
}

/// Steering as `sluice steer list` and `status` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SteerView {
    /// The sk_lookup link is live on the namespace with this inode number.
    pub netns_ino: Option<u64>,
    /// Its name under /run/netns, or `host`.
    pub netns: Option<String>,
    pub steers: Vec<SteerState>,
    /// Flow records lost to a full ring.
    pub flows_lost: u64,
}

/// Steering as the kernel holds it now, for `steers`.
#[must_use]
pub fn read(root: &PinRoot, steers: &[Steer]) -> SteerView {
    let maps = sock::is_loaded(root)
        .then(|| steer::SteerMaps::open(root).ok())
        .flatten();
    let dests = maps
        .as_ref()
        .and_then(|m| m.dests().ok())
        .unwrap_or_default();
    let live = maps
        .as_ref()
        .and_then(|m| m.live().ok())
        .unwrap_or_default();
    let rows = steers
        .iter()
        .map(|s| {
            let found = dests.iter().find(|(_, d)| d.name == s.name);
            let slot = found.map(|(slot, _)| *slot);
            let socket = found
                .filter(|(slot, d)| d.cookie != 0 && live.contains(slot))
                .map(|(_, d)| d.cookie);
            let counters = match (slot, &maps) {
                (Some(slot), Some(m)) => m
                    .stats(slot)
                    .map(|v| {
                        steer_stat::NAMES
                            .iter()
                            .zip(v)
                            .map(|(n, c)| ((*n).to_string(), c))
                            .collect()
                    })
                    .unwrap_or_default(),
                _ => BTreeMap::new(),
            };
            SteerState {
                steer: s.clone(),
                slot,
                socket,
                counters,
            }
        })
        .collect();
    let netns_ino = steer::attached(root);
    SteerView {
        netns: netns_ino.and_then(steer::netns_name),
        netns_ino,
        steers: rows,
        flows_lost: steer::flows_lost(root),
    }
}
