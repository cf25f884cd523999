//! Whether the maps sluice writes are the maps the attached programs read.
//! Every live program's own map list (ids, fixed at load) against the pins.
//!
//! A pin is only a name: remove `maps/DENY_V4` and the next loader creates
//! and pins a fresh, unconnected map under it while the attached program
//! keeps reading the old one. Writes through the pin would then succeed and
//! change nothing packets see. This module finds that (by map id, from the
//! programs themselves) and repairs what it can by pinning the program's own
//! map again.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    os::fd::{AsFd as _, OwnedFd},
};

use sluice_common::{JUMP_SLOTS, map_names};

use super::{DataplaneError, pins::PinRoot, sys};

/// One way the pins and the live programs disagree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Finding {
    /// No pin where the programs' map belongs.
    Missing { map: String, used_id: u32 },
    /// The pin holds another map than the one the programs read.
    Replaced {
        map: String,
        pinned_id: u32,
        used_id: u32,
    },
    /// Live programs read different maps under one name (only a reload of
    /// every program with the pinned maps mends this).
    Split {
        map: String,
        /// (program, map id) pairs.
        readers: Vec<(String, u32)>,
    },
}

impl Finding {
    pub fn map(&self) -> &str {
        match self {
            Self::Missing { map, .. } | Self::Replaced { map, .. } | Self::Split { map, .. } => map,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { map, used_id } => write!(
                f,
                "pinned map {map} is missing; the attached program reads map id {used_id}"
            ),
            Self::Replaced {
                map,
                pinned_id,
                used_id,
            } => write!(
                f,
                "pinned map {map} (id {pinned_id}) is not the map the attached program reads \
                 (id {used_id})"
            ),
            Self::Split { map, readers } => {
                let r: Vec<String> = readers
                    .iter()
                    .map(|(p, id)| format!("{p}: id {id}"))
                    .collect();
                write!(
                    f,
                    "live programs read different {map} maps ({})",
                    r.join(", ")
                )
            }
        }
    }
}

/// The result of a check (and, for [`repair`], what was mended).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Live programs looked at: (what, program id).
    pub programs: Vec<(String, u32)>,
    /// Distinct map names the programs read that sluice pins.
    pub maps_checked: usize,
    /// What is wrong now.
    pub findings: Vec<Finding>,
    /// What [`repair`] mended (pins put back to the programs' maps).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<Finding>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Map name -> map id -> the programs that read it.
pub type Used = BTreeMap<String, BTreeMap<u32, Vec<String>>>;

fn io(what: String) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |source| DataplaneError::Io { what, source }
}

/// The programs that run (or will run on the next attach) for `root`: the
/// pinned XDP and TC programs, the programs of every pinned link, and what
/// the XDP programs tail-call.
fn live_programs(root: &PinRoot) -> Result<Vec<(String, u32, OwnedFd)>, DataplaneError> {
    let pinned_progs = [
        (root.prog(), "pinned XDP program".to_string()),
        (
            root.prog_dir().join(sluice_common::TC_EGRESS_PROGRAM),
            "pinned TC program".to_string(),
        ),
    ];
    programs_of(
        &pinned_progs,
        &[root.links_dir(), root.root.join("tc-links")],
        true,
    )
}

/// The socket layer's live programs: its pinned programs and the programs
/// of its cgroup links.
fn live_sock_programs(root: &PinRoot) -> Result<Vec<(String, u32, OwnedFd)>, DataplaneError> {
    let s = super::sock::sock_root(root);
    let pinned: Vec<(std::path::PathBuf, String)> = super::sock::object_programs()
        .map(|name| (s.prog_dir().join(name), format!("pinned program {name}")))
        .collect();
    programs_of(
        &pinned,
        &[s.links_dir(), s.root.join("lb"), s.root.join("steer")],
        false,
    )
}

/// The programs pinned at `pinned`, those of the links pinned in
/// `link_dirs`, and (`jumps`) what they tail-call.
fn programs_of(
    pinned_progs: &[(std::path::PathBuf, String)],
    link_dirs: &[std::path::PathBuf],
    jumps: bool,
) -> Result<Vec<(String, u32, OwnedFd)>, DataplaneError> {
    let mut out: Vec<(String, u32, OwnedFd)> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut add = |label: String, fd: OwnedFd, out: &mut Vec<(String, u32, OwnedFd)>| {
        let (id, _) = sys::prog_maps(&fd).map_err(io(format!("reading program {label}")))?;
        if seen.insert(id) {
            out.push((label, id, fd));
        }
        Ok::<_, DataplaneError>(())
    };
    for (path, label) in pinned_progs {
        match sys::obj_get(path) {
            Ok(fd) => add(label.clone(), fd, &mut out)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
        }
    }
    for dir in link_dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
        };
        for e in entries {
            let e = e.map_err(io(format!("reading {}", dir.display())))?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(pinned) = sys::obj_get(&path) else {
                continue;
            };
            if name.ends_with(":clsact") {
                // The clsact fallback pins the program its filter runs (a
                // filter is no bpf object).
                add(format!("clsact filter {name}"), pinned, &mut out)?;
                continue;
            }
            let Ok(info) = sys::link_info(&pinned) else {
                continue;
            };
            if info.prog_id == 0 {
                continue;
            }
            // A link whose program is gone runs nothing.
            let Ok(fd) = sys::prog_fd_by_id(info.prog_id) else {
                continue;
            };
            add(format!("link {name}"), fd, &mut out)?;
        }
    }
    if !jumps {
        return Ok(out);
    }
    // Tail-call targets, read from the JUMP map each XDP program uses.
    let mut jump_ids = BTreeSet::new();
    for (_, _, fd) in &out {
        let (_, maps) = sys::prog_maps(fd).map_err(io("reading a program".into()))?;
        for id in maps {
            let Ok(map) = sys::map_fd_by_id(id) else {
                continue;
            };
            if sys::map_id_name(&map).is_ok_and(|(_, n)| n == map_names::JUMP) {
                jump_ids.insert(id);
            }
        }
    }
    for id in jump_ids {
        let map = sys::map_fd_by_id(id).map_err(io(format!("opening map id {id}")))?;
        for slot in 0..JUMP_SLOTS {
            if let Some(prog) = sys::prog_array_get(map.as_fd(), slot)
                .map_err(io(format!("reading {} slot {slot}", map_names::JUMP)))?
            {
                let fd = sys::prog_fd_by_id(prog)
                    .map_err(io(format!("opening tail-called program {prog}")))?;
                add(format!("tail call {slot}"), fd, &mut out)?;
            }
        }
    }
    Ok(out)
}

/// Which map (by id) each live program reads, by map name, for the names in
/// `names` (the maps sluice pins).
pub fn used_maps(
    root: &PinRoot,
    names: &BTreeSet<String>,
) -> Result<(Vec<(String, u32)>, Used), DataplaneError> {
    used_maps_of(live_programs(root)?, names)
}

fn used_maps_of(
    progs: Vec<(String, u32, OwnedFd)>,
    names: &BTreeSet<String>,
) -> Result<(Vec<(String, u32)>, Used), DataplaneError> {
    let mut used: Used = BTreeMap::new();
    for (label, _, fd) in &progs {
        let (_, maps) = sys::prog_maps(fd).map_err(io(format!("reading program {label}")))?;
        for id in maps {
            let Ok(map) = sys::map_fd_by_id(id) else {
                continue;
            };
            let (_, name) = sys::map_id_name(&map).map_err(io(format!("reading map id {id}")))?;
            if names.contains(&name) {
                used.entry(name)
                    .or_default()
                    .entry(id)
                    .or_default()
                    .push(label.clone());
            }
        }
    }
    Ok((progs.into_iter().map(|(l, id, _)| (l, id)).collect(), used))
}

/// The id of the map pinned as `name` under `root`, if any.
pub fn pinned_id(root: &PinRoot, name: &str) -> Result<Option<u32>, DataplaneError> {
    let path = root.map(name);
    match sys::obj_get(&path) {
        Ok(fd) => Ok(Some(
            sys::map_id_name(&fd)
                .map_err(io(format!("reading {}", path.display())))?
                .0,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("opening {}", path.display()))(e)),
    }
}

fn pinned_names() -> Result<BTreeSet<String>, DataplaneError> {
    let mut names: BTreeSet<String> = super::pins::expected_maps(super::OBJECT)?
        .into_iter()
        .map(|s| s.name)
        .collect();
    // Made by sluice itself, not by the loader (see attach::create_maglev_outer).
    names.insert(map_names::LB_MAGLEV.to_string());
    Ok(names)
}

/// Compares the pins with the maps the live programs read. Changes nothing.
pub fn check(root: &PinRoot) -> Result<Report, DataplaneError> {
    let names = pinned_names()?;
    let (programs, used) = used_maps(root, &names)?;
    compare(root, programs, &used)
}

/// [`check`] for the socket layer: its pins under `sock/` against the maps
/// its pinned programs and cgroup links read.
pub fn check_sock(root: &PinRoot) -> Result<Report, DataplaneError> {
    // The packet LB's maps the socket LB shares are checked by
    // `sock_lb::bound`, not against pins under `sock/`.
    let names: BTreeSet<String> = super::pins::expected_maps(super::sock::SOCK_OBJECT)?
        .into_iter()
        .map(|s| s.name)
        .filter(|n| !sluice_common::sock::sock_map_names::SHARED_LB_MAPS.contains(&n.as_str()))
        .collect();
    let (programs, used) = used_maps_of(live_sock_programs(root)?, &names)?;
    compare(&super::sock::sock_root(root), programs, &used)
}

/// [`repair`] for the socket layer. The caller holds the root lock.
pub fn repair_sock(root: &PinRoot) -> Result<Report, DataplaneError> {
    let report = check_sock(root)?;
    mend(&super::sock::sock_root(root), report)
}

/// The findings of `used` against the pins of `pins`.
fn compare(
    pins: &PinRoot,
    programs: Vec<(String, u32)>,
    used: &Used,
) -> Result<Report, DataplaneError> {
    let root = pins;
    let mut report = Report {
        programs,
        maps_checked: used.len(),
        ..Report::default()
    };
    for (name, ids) in used {
        if ids.len() > 1 {
            report.findings.push(Finding::Split {
                map: name.clone(),
                readers: ids
                    .iter()
                    .flat_map(|(id, progs)| progs.iter().map(|p| (p.clone(), *id)))
                    .collect(),
            });
            continue;
        }
        let Some(&used_id) = ids.keys().next() else {
            continue;
        };
        match pinned_id(root, name)? {
            None => report.findings.push(Finding::Missing {
                map: name.clone(),
                used_id,
            }),
            Some(p) if p != used_id => report.findings.push(Finding::Replaced {
                map: name.clone(),
                pinned_id: p,
                used_id,
            }),
            Some(_) => {}
        }
    }
    Ok(report)
}

/// Like [`check`], then pins the programs' own map wherever a pin is missing
/// or holds another map. What cannot be mended this way (a split) stays in
/// `findings`. The caller holds the root lock.
pub fn repair(root: &PinRoot) -> Result<Report, DataplaneError> {
    let report = check(root)?;
    mend(root, report)
}

/// Pins each program's own map where `report` found a pin missing or
/// holding another map (splits stay in `findings`).
fn mend(root: &PinRoot, mut report: Report) -> Result<Report, DataplaneError> {
    let mut left = Vec::new();
    for f in std::mem::take(&mut report.findings) {
        let (map, used_id) = match &f {
            Finding::Missing { map, used_id } | Finding::Replaced { map, used_id, .. } => {
                (map.clone(), *used_id)
            }
            Finding::Split { .. } => {
                left.push(f);
                continue;
            }
        };
        let path = root.map(&map);
        let fd = sys::map_fd_by_id(used_id).map_err(io(format!("opening map id {used_id}")))?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing {}", path.display()))(e)),
        }
        std::fs::create_dir_all(root.maps_dir())
            .map_err(io(format!("creating {}", root.maps_dir().display())))?;
        sys::obj_pin(fd.as_fd(), &path).map_err(io(format!("pinning {}", path.display())))?;
        report.repaired.push(f);
    }
    report.findings = left;
    Ok(report)
}
