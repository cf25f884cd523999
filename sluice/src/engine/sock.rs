//! Makes the socket layer's kernel state (cgroup links, workload slots,
//! the policy generation) match a set of workloads, and reads it back.

use std::collections::{BTreeMap, BTreeSet};

use sluice_common::{
    Verdict,
    sock::{MAX_WORKLOADS, SockHook, SockReason, sock_counter_slot},
};

use crate::{
    dataplane::{
        DataplaneError, PinRoot, integrity, pins,
        sock::{self, Cgroup, SlotPolicy, SockMaps},
    },
    model::sock::Workload,
};

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    pub workloads: usize,
    /// cgroup links made / removed.
    pub linked: usize,
    pub unlinked: usize,
    /// Workloads left out because their cgroup is gone (not in force).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// The cgroup id, name and path of each workload in force (for
    /// naming records).
    #[serde(skip)]
    pub ids: Vec<(u64, String, std::path::PathBuf)>,
    /// Map pins that did not lead to the maps the socket programs read and
    /// were pinned again before writing (each meant writes through that pin
    /// would have changed nothing sockets see).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
}

/// Decisions of one kind, as counted in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Count {
    pub hook: String,
    /// allow, deny or audit.
    pub verdict: String,
    /// rule or default.
    pub reason: String,
    pub calls: u64,
}

/// A workload as configured, with what the kernel holds for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkloadState {
    #[serde(flatten)]
    pub workload: Workload,
    /// Absolute path of the cgroup.
    pub path: String,
    pub cgroup_id: Option<u64>,
    /// Every socket program is linked to the cgroup.
    pub attached: bool,
    pub hooks: Vec<String>,
    /// Nonzero counters only.
    pub counts: Vec<Count>,
    /// Why the cgroup cannot be found, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "allow",
        Verdict::Drop => "deny",
        Verdict::Audit => "audit",
    }
}

/// Resolves the workloads' cgroups. A cgroup that cannot be found is the
/// error (nothing is changed) when `required` says so for its workload
/// (one being added or changed); otherwise the workload is left out (its
/// cgroup went away: the kernel dropped its links) and named in `missing`.
pub fn resolve<'a>(
    workloads: &'a [Workload],
    required: &dyn Fn(&Workload) -> bool,
    missing: &mut Vec<String>,
) -> Result<Vec<(&'a Workload, Cgroup)>, DataplaneError> {
    if workloads.is_empty() {
        return Ok(Vec::new());
    }
    let mount = sock::cgroup2_mount()?;
    let mut out = Vec::new();
    for w in workloads {
        match sock::resolve_cgroup(&mount, &w.cgroup) {
            Ok(c) => out.push((w, c)),
            Err(e) if required(w) => return Err(e),
            Err(_) => missing.push(w.name.clone()),
        }
    }
    Ok(out)
}

/// Makes the kernel hold exactly `workloads` (those whose cgroup exists;
/// see [`resolve`] for `required`): their cgroups resolved first, then the policy written to the
/// standby generation and flipped to, then links made for new cgroups and
/// removed for cgroups no longer named. With no workloads, the socket
/// layer's pins are removed.
pub fn apply(
    root: &PinRoot,
    workloads: &[Workload],
    required: &dyn Fn(&Workload) -> bool,
) -> Result<ApplyReport, DataplaneError> {
    let mut missing = Vec::new();
    let resolved = resolve(workloads, required, &mut missing)?;
    let (workloads, cgroups): (Vec<&Workload>, Vec<Cgroup>) = resolved.into_iter().unzip();
    let mut report = ApplyReport {
        workloads: workloads.len(),
        missing,
        ids: workloads
            .iter()
            .zip(&cgroups)
            .map(|(w, c)| (c.id, w.name.clone(), c.path.clone()))
            .collect(),
        ..ApplyReport::default()
    };
    let sock_dir = sock::sock_root(root).root;
    if workloads.is_empty() {
        if sock_dir.exists() {
            let _lock = pins::RootLock::acquire(&root.root)?;
            let links = sock::links(root)?;
            report.unlinked = links.values().map(Vec::len).sum();
            if crate::dataplane::sock_lb::attached(root).is_empty()
                && !crate::dataplane::steer::link_pin(root).exists()
            {
                sock::remove_all(root)?;
            } else {
                // The socket LB or steering still runs the object: only
                // the workloads go.
                for id in links.keys() {
                    sock::detach(root, *id);
                }
            }
        }
        return Ok(report);
    }
    pins::ensure_bpffs(&root.root)?;
    std::fs::create_dir_all(&root.root).map_err(|source| DataplaneError::Io {
        what: format!("creating {}", root.root.display()),
        source,
    })?;
    let _lock = pins::RootLock::acquire(&root.root)?;
    // Map pins go back to the maps the live links' programs read first:
    // programs loaded afresh (their pins gone) then reuse those maps
    // instead of making new ones no link reads.
    let early = integrity::repair_sock(root)?;
    sock::ensure_loaded(root)?;
    // Writes must reach the maps the live programs read, whatever happened
    // to the pins since.
    let mut integrity = integrity::repair_sock(root)?;
    integrity.repaired.splice(0..0, early.repaired);
    report.repaired = integrity.repaired.iter().map(ToString::to_string).collect();
    if !integrity.findings.is_empty() {
        // Programs that disagree among themselves: nothing is written.
        return Err(DataplaneError::Unbound {
            findings: integrity.findings,
        });
    }
    let mut maps = SockMaps::open(root)?;
    let wanted: BTreeSet<u64> = cgroups.iter().map(|c| c.id).collect();
    let slots = maps.slots()?;

    // 1. Workloads no longer named: flip to a generation without them,
    //    then unlink their cgroups and free their slots.
    let gone: Vec<u64> = slots
        .keys()
        .copied()
        .filter(|id| !wanted.contains(id))
        .collect();
    if !gone.is_empty() {
        let kept: Vec<SlotPolicy> = workloads
            .iter()
            .zip(&cgroups)
            .filter_map(|(w, c)| slots.get(&c.id).map(|s| entry(*s, w)))
            .collect();
        maps.commit(&kept)?;
        for id in &gone {
            report.unlinked += sock::detach(root, *id);
            maps.remove_slot(*id)?;
        }
    }
    // Link pins of cgroups no longer named (live or left dead).
    for id in sock::pinned_link_ids(root)
        .into_iter()
        .filter(|id| !wanted.contains(id))
    {
        report.unlinked += sock::detach(root, id);
    }

    // 2. New workloads get free slots (counters zeroed), then one flip
    //    puts the whole set in force.
    let freed: BTreeSet<u32> = gone
        .iter()
        .filter_map(|id| slots.get(id))
        .copied()
        .collect();
    if !freed.is_empty() {
        // A call that read the old generation before the flip above may
        // still be scanning it; let it finish before that generation is
        // written again (programs run for microseconds).
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut slots: BTreeMap<u64, u32> = maps.slots()?;
    let taken: BTreeSet<u32> = slots.values().copied().collect();
    // Slots freed just now come last: an in-flight call of a removed
    // workload must not find a new workload's policy under its slot.
    let mut free = (0..MAX_WORKLOADS)
        .filter(|s| !taken.contains(s) && !freed.contains(s))
        .chain(freed.iter().copied());
    for c in &cgroups {
        if let std::collections::btree_map::Entry::Vacant(e) = slots.entry(c.id) {
            // Cannot run out: at most MAX_WORKLOADS are named, and the
            // slots of those no longer named were freed above.
            let Some(slot) = free.next() else {
                return Err(DataplaneError::Readback {
                    what: format!("no free workload slot for {}", c.path.display()),
                });
            };
            maps.zero_stats(slot)?;
            maps.set_slot(c.id, slot)?;
            e.insert(slot);
        }
    }
    let entries: Vec<SlotPolicy> = workloads
        .iter()
        .zip(&cgroups)
        .map(|(w, c)| entry(slots[&c.id], w))
        .collect();
    maps.commit(&entries)?;

    // 3. Links last: a cgroup's calls are judged only once its policy is in force.
    for c in &cgroups {
        report.linked += sock::attach(root, c)?;
    }
    Ok(report)
}

fn entry(slot: u32, w: &Workload) -> SlotPolicy {
    let (policy, rules) = w.to_kernel();
    SlotPolicy {
        slot,
        policy,
        rules,
    }
}

/// Each workload with its cgroup, links and counters.
pub fn read(root: &PinRoot, workloads: &[Workload]) -> Vec<WorkloadState> {
    let mount = sock::cgroup2_mount().ok();
    let maps = if sock::is_loaded(root) {
        SockMaps::open(root).ok()
    } else {
        None
    };
    let slots = maps
        .as_ref()
        .and_then(|m| m.slots().ok())
        .unwrap_or_default();
    let links = sock::links(root).unwrap_or_default();
    workloads
        .iter()
        .map(|w| {
            let resolved = match &mount {
                Some(m) => sock::resolve_cgroup(m, &w.cgroup).map_err(|e| e.to_string()),
                None => Err(DataplaneError::NoCgroup2.to_string()),
            };
            let path = match (&resolved, &mount) {
                (Ok(c), _) => c.path.display().to_string(),
                (Err(_), Some(m)) => m.join(&w.cgroup).display().to_string(),
                (Err(_), None) => w.cgroup.clone(),
            };
            let id = resolved.as_ref().ok().map(|c| c.id);
            let hooks = id.and_then(|i| links.get(&i).cloned()).unwrap_or_default();
            let counts = match (id.and_then(|i| slots.get(&i)), &maps) {
                (Some(slot), Some(m)) => counts(m, *slot),
                _ => Vec::new(),
            };
            WorkloadState {
                workload: w.clone(),
                path,
                cgroup_id: id,
                attached: hooks.len() == sluice_common::sock::SOCK_PROGRAMS.len(),
                hooks,
                counts,
                problem: resolved.err(),
            }
        })
        .collect()
}

fn counts(maps: &SockMaps, slot: u32) -> Vec<Count> {
    let Ok(stats) = maps.stats(slot) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for hook in SockHook::ALL {
        for v in Verdict::ALL {
            for r in SockReason::ALL {
                let i = sock_counter_slot(0, hook as u32, v as u32, r as u32) as usize;
                let calls = stats.get(i).copied().unwrap_or(0);
                if calls > 0 {
                    out.push(Count {
                        hook: hook.name().into(),
                        verdict: verdict_word(v).into(),
                        reason: r.name().into(),
                        calls,
                    });
                }
            }
        }
    }
    out
}
