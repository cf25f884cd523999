//! The agent's state machine: desired state in, the kernel made to match,
//! every change all-or-nothing (kernel and store) and journaled, versions
//! kept for rollback. Blocking; the API runs it on a blocking thread behind
//! a mutex.
//!
//! One path carries every change (`run_step`): compute the change's delta on
//! the desired state in place, check it (lock-out guard, deny-everything),
//! journal it, write only the delta to the kernel, read it back from the
//! maps the attached program uses, then journal the outcome. A change costs
//! time and bytes in proportion to itself, not to the policy's size.

use std::{path::PathBuf, time::Instant};

use tracing::{error, info, warn};

use super::store::{self, Pending, Record, State, Step, Store, StoreError, Summary, Version};
use crate::{
    api::{Applied, ReconcileReport},
    dataplane::{
        self, DataplaneError, PinRoot, PolicyMaps, attach, integrity,
        lockfile::{LockError, OwnerLock},
    },
    model::policy::{
        self, Delta, Desired, Op, Policy, PolicyDiff,
        config::{self, AgentSettings, ConfigErrors},
        delta::fingerprint,
    },
};

/// Metrics that live as long as the agent (the rest is read per scrape).
#[derive(Clone)]
pub struct AgentMetrics {
    pub apply_seconds: prometheus_client::metrics::histogram::Histogram,
    /// The flow reader, once it runs.
    pub flows: Option<std::sync::Arc<super::flows::Flows>>,
    /// Sources put on the deny list by escalation.
    pub escalations: prometheus_client::metrics::counter::Counter,
    /// Temporary deny entries expired.
    pub expirations: prometheus_client::metrics::counter::Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            apply_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16),
            ),
            flows: None,
            escalations: prometheus_client::metrics::counter::Counter::default(),
            expirations: prometheus_client::metrics::counter::Counter::default(),
        }
    }
}

/// The agent's state as its tasks and the API server share it.
pub type Shared = std::sync::Arc<std::sync::Mutex<Core>>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("{0}")]
    Refused(String),
    #[error(
        "this policy would drop {probe} ({why}); fix the policy, or repeat with --force \
         if you really mean it"
    )]
    LockOut { probe: String, why: String },
    #[error(
        "deny {prefix} drops every {family} packet that no allow entry passes; repeat with \
         --force if you really mean it"
    )]
    DenyEverything {
        prefix: String,
        family: &'static str,
    },
    #[error("version {version} is not in the history (kept: {kept})")]
    NoSuchVersion { version: u64, kept: String },
    #[error(
        "version {version} cannot be rebuilt from the history (its fingerprint does not match); \
         the history is not trustworthy for rollback: apply a config file instead"
    )]
    HistoryMismatch { version: u64 },
    #[error(transparent)]
    Lb(#[from] crate::engine::lb::ApplyError),
    #[error(
        "pin root {root} is owned by {owner}; one agent per pin root (stop it, or give this \
         agent another [agent] pin_root)"
    )]
    Owned {
        root: PathBuf,
        owner: crate::dataplane::lockfile::Owner,
    },
    #[error("owner lock for pin root {root}: {source}")]
    OwnerLock {
        root: PathBuf,
        #[source]
        source: LockError,
    },
    /// A change that failed after it was journaled: what failed, and whether
    /// the previous state was put back (checked in the kernel).
    #[error(
        "{error}; {}",
        match restored {
            Ok(()) => "nothing changed: the previous policy is in force (checked in the kernel)"
                .to_string(),
            Err(e) => format!(
                "PUTTING THE PREVIOUS POLICY BACK FAILED ({e}): the kernel may hold part of the \
                 change; the agent retries at its next drift check"
            ),
        }
    )]
    Failed {
        error: Box<AgentError>,
        restored: Result<(), Box<AgentError>>,
    },
}

impl AgentError {
    /// The error behind a [`AgentError::Failed`] wrapper.
    pub fn root_cause(&self) -> &AgentError {
        match self {
            Self::Failed { error, .. } => error.root_cause(),
            other => other,
        }
    }
}

/// What the LB maps were last made to hold: services, down members, and
/// the socket LB's settings (on, services it leaves alone).
type LbApplied = (
    Vec<crate::model::lb::ServiceSpec>,
    Vec<MemberKey>,
    (bool, Vec<crate::model::lb::ServiceId>),
);

/// A backend of a service, as health checks and `down` sets name it.
pub use crate::model::lb::MemberKey;

/// What must keep working after a change: the caller's own session, and the
/// agent's listeners. `force` skips the check.
#[derive(Debug, Clone, Default)]
pub struct Safety {
    pub session: Option<crate::model::policy::eval::Probe>,
    pub force: bool,
}

/// Who asks for a change, and how.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    pub author: String,
    /// The caller's request id (`X-Sluice-Request`), kept in history.
    pub request: Option<String>,
    pub safety: Safety,
    /// An interface that cannot be attached yet is logged and retried by the
    /// drift check instead of refusing the change (the config file at start,
    /// where a namespace may appear later).
    pub retry_interfaces: bool,
}

impl Ctx {
    pub fn agent(author: &str) -> Self {
        Self {
            author: author.to_string(),
            request: None,
            safety: Safety::default(),
            retry_interfaces: false,
        }
    }
}

/// A change computed on the desired state but not yet final.
struct Prepared {
    step: Step,
    delta: Delta,
    /// The desired state before, when the step replaced it whole.
    old: Option<Desired>,
}

pub struct Core {
    pub settings: AgentSettings,
    pub config_path: Option<PathBuf>,
    pub root: PinRoot,
    store: Store,
    pub state: State,
    /// Desired state (the base with the overlay on top), kept up to date
    /// change by change.
    pub desired: Desired,
    /// `policy::delta::fingerprint` of `desired.policy`.
    fingerprint: u64,
    /// Counters for the metrics endpoint.
    pub applies: u64,
    pub apply_failures: u64,
    pub drift_corrections: u64,
    /// Map pins put back to the maps the attached programs read.
    pub integrity_repairs: u64,
    /// Problems the last integrity check found and could not mend.
    pub integrity_problems: usize,
    /// Changes a crash interrupted that were finished or undone on start.
    pub recovered: Option<String>,
    pub metrics: AgentMetrics,
    /// Hash of a config file version the agent refused (not retried).
    refused_hash: Option<String>,
    /// `[ddos]` settings of the config file; kept in the kernel by the DDoS task.
    pub ddos: config::DdosSettings,
    /// `[lb]` settings of the config file.
    pub lb: config::LbSettings,
    /// Backends health checks found down (left out of their tables).
    pub health_down: std::collections::HashSet<MemberKey>,
    /// The health checker (status for the API and metrics).
    pub checker: Option<std::sync::Arc<super::health::Checker<MemberKey>>>,
    /// What the LB maps were last made to match (skip identical re-applies).
    lb_applied: Option<LbApplied>,
    /// Why the socket LB could not be put in force (warned once per cause).
    pub sock_lb_error: Option<String>,
    /// `[lb] connections` value already warned about (pinned size differs).
    lb_size_warned: Option<u32>,
    /// Workloads whose cgroup the last reconcile did not find (warned once).
    sock_missing: Vec<String>,
    /// The last error putting the steers in force (warned once).
    pub steer_error: Option<String>,
    /// Workload cgroup id -> name, for the flow reader's socket records.
    pub workload_names: super::flows::WorkloadNames,
    /// Held while the agent runs: one owner per pin root.
    _owner: OwnerLock,
}

fn iface_label(i: &crate::model::policy::Interface) -> String {
    format!("{}:{}", i.netns.as_deref().unwrap_or("host"), i.name)
}

/// "deny 0.0.0.0/0": drops everything the allow list does not pass.
fn deny_everything(delta: &Delta) -> Option<&ipnet::IpNet> {
    delta.deny_add.iter().find(|n| n.prefix_len() == 0)
}

impl Core {
    /// Takes ownership of the pin root, loads the store (replaying the
    /// journal, finishing or undoing a change a crash interrupted), takes in
    /// the config file if it changed since, and makes the pins match.
    pub fn start(
        settings: AgentSettings,
        config: Option<(PathBuf, config::Config, String)>,
    ) -> Result<(Self, ReconcileReport), AgentError> {
        let owner =
            OwnerLock::acquire(&settings.pin_root, &settings.socket).map_err(|e| match e {
                LockError::Busy { .. } => {
                    match crate::dataplane::lockfile::owner_of(&settings.pin_root) {
                        Ok(Some(owner)) => AgentError::Owned {
                            root: settings.pin_root.clone(),
                            owner,
                        },
                        _ => AgentError::OwnerLock {
                            root: settings.pin_root.clone(),
                            source: e,
                        },
                    }
                }
                other => AgentError::OwnerLock {
                    root: settings.pin_root.clone(),
                    source: other,
                },
            })?;
        let mut store = Store::open(&settings.state_dir)?;
        let loaded = store.load()?;
        if loaded.torn_tail {
            warn!(
                "the journal's last line was torn by a crash while it was written; dropped it (that record never took effect)"
            );
        }
        let resumed = loaded.state.is_some() || !loaded.committed.is_empty();
        let state = loaded.state.unwrap_or_default();
        let desired = state.replay();
        let fingerprint = fingerprint(&desired.policy);
        let mut core = Self {
            // The connection table is sized when the dataplane is first created.
            root: PinRoot::new(&settings.pin_root).with_conn_capacity(
                config
                    .as_ref()
                    .map_or(sluice_common::lb::CONN_CAPACITY, |(_, c, _)| {
                        c.lb.connections
                    }),
            ),
            settings,
            config_path: config.as_ref().map(|(p, _, _)| p.clone()),
            store,
            state,
            desired,
            fingerprint,
            applies: 0,
            apply_failures: 0,
            drift_corrections: 0,
            integrity_repairs: 0,
            integrity_problems: 0,
            recovered: None,
            metrics: AgentMetrics::default(),
            refused_hash: None,
            ddos: config::DdosSettings::default(),
            lb: config::LbSettings::default(),
            health_down: std::collections::HashSet::new(),
            checker: None,
            lb_applied: None,
            sock_lb_error: None,
            lb_size_warned: None,
            sock_missing: Vec::new(),
            workload_names: super::flows::WorkloadNames::default(),
            steer_error: None,
            _owner: owner,
        };
        // Replay what the journal holds after the snapshot.
        let replayed = loaded.committed.len();
        for (p, version) in loaded.committed {
            let prepared = core.prepare(&p.step, false)?;
            let made = core.finish(prepared, &p);
            if made != version {
                warn!(
                    seq = p.seq,
                    ?made,
                    ?version,
                    "a replayed journal record made another version than recorded"
                );
            }
        }
        if let Some(v) = core.state.history.back()
            && v.fingerprint != core.fingerprint
        {
            error!(
                version = v.number,
                "the desired state does not match the fingerprint of the last version in history; \
                 rollback will refuse versions it cannot rebuild exactly"
            );
        }
        info!(
            resumed,
            replayed,
            version = core.state.current_version(),
            pinned = core.root.is_set_up(),
            "agent state loaded"
        );
        if core.root.is_set_up() {
            core.repair_integrity("start")?;
        }
        if core.root.is_set_up() || crate::dataplane::sock::is_loaded(&core.root) {
            // A new build takes over the running links atomically, maps kept.
            let up = attach::upgrade(&core.root, false)?;
            if !up.unchanged && core.root.is_set_up() {
                info!(old = %up.old_tag, new = %up.new_tag, links = up.links, "program upgraded on the live links; maps kept");
            }
            if let Some(s) = up.sock.filter(|s| s.programs > 0) {
                info!(
                    programs = s.programs,
                    links = s.links,
                    "socket programs upgraded on the workloads' cgroup links; maps kept"
                );
            }
        }
        if let Some(p) = loaded.pending {
            core.recover(p)?;
        }
        let mut config_applied = false;
        let mut attached_by_config = Vec::new();
        if let Some((path, cfg, hash)) = config
            && hash != core.state.config_hash
        {
            if core.state.history.is_empty() && core.root.is_set_up() {
                // A first start on pins that already hold a policy (made
                // without an agent): the config replaces it; say so.
                let pinned = PolicyMaps::open(&core.root)
                    .map_err(AgentError::from)
                    .and_then(|m| {
                        crate::engine::policy::pinned_policy(&m).map_err(AgentError::from)
                    });
                if let Ok(pinned) = pinned
                    && pinned != Policy::default()
                    && pinned != cfg.desired.policy
                {
                    let d = Delta::between_policies(&pinned, &cfg.desired.policy);
                    warn!(
                        pin_root = %core.root.root.display(),
                        changes = d.size(),
                        "the pins hold a policy made without the agent; the config file replaces it \
                         (`sluice export` before an agent's first start keeps a copy)"
                    );
                }
            }
            let applied = core.run_step(
                Step::Base {
                    base: Box::new(cfg.desired),
                    source: path.display().to_string(),
                    hash: hash.clone(),
                    config_hash: Some(hash),
                },
                &Ctx {
                    author: "agent".into(),
                    request: None,
                    // The agent's own file is the operator's intent.
                    safety: Safety {
                        session: None,
                        force: true,
                    },
                    retry_interfaces: true,
                },
                format!("config file {} loaded", path.display()),
            )?;
            attached_by_config = applied.reconcile.attached;
            config_applied = true;
        }
        let mut report = core.reconcile(false)?;
        // What start attached, whether the config step or the reconcile did.
        attached_by_config.append(&mut report.attached);
        report.attached = attached_by_config;
        if report.changes > 0 {
            warn!(
                changes = report.changes,
                "pinned maps differed from the saved desired state; corrected"
            );
        }
        if core.state.history.is_empty() && !config_applied {
            core.run_step(Step::Note, &Ctx::agent("agent"), "agent started".into())?;
        }
        // Start each run from a compact store.
        if core.store.sizes().1 > 0 {
            core.snapshot()?;
        }
        Ok((core, report))
    }

    /// A change the journal shows as begun but never finished: the agent
    /// died while carrying it out. If the kernel already judges packets by
    /// its result, it is finished; otherwise it is undone. Either way history
    /// says so.
    fn recover(&mut self, p: Pending) -> Result<(), AgentError> {
        let prepared = match self.prepare(&p.step, false) {
            Ok(prepared) => prepared,
            Err(e) => {
                // It cannot even be computed again (a rollback to a version
                // no longer kept): undo it; the reconcile after this puts
                // the kernel back to the state before it.
                warn!(error = %e, cause = %p.cause, "an interrupted change cannot be computed again; undoing it");
                self.store.append(&Record::Abort {
                    seq: p.seq,
                    error: format!(
                        "interrupted by an agent crash; undone when the agent restarted ({e})"
                    ),
                })?;
                let cause = format!(
                    "undone after a crash: {} (request {}, by {}) could not be finished",
                    p.cause,
                    p.request.as_deref().unwrap_or("-"),
                    p.author
                );
                self.recovered = Some(cause.clone());
                self.run_step(Step::Note, &Ctx::agent("agent (recovery)"), cause)?;
                return Ok(());
            }
        };
        let kernel = if self.root.is_set_up() {
            let mut maps = PolicyMaps::open(&self.root)?;
            maps.repair()?;
            Some(crate::engine::policy::pinned_policy(&maps)?)
        } else {
            None
        };
        // A change that touches no policy (interfaces, services) is finished:
        // applying it again is harmless and it is what was asked.
        let completed =
            prepared.delta.policy_is_empty() || kernel.as_ref() == Some(&self.desired.policy);
        let request = p.request.clone().unwrap_or_else(|| "-".into());
        if completed {
            self.store.append(&Record::Commit {
                seq: p.seq,
                version: Some(self.state.current_version() + 1),
            })?;
            let mut p = p;
            p.cause = format!(
                "{} (interrupted by an agent crash; finished when it restarted)",
                p.cause
            );
            let v = self.finish(prepared, &p);
            warn!(version = v, request = %request, cause = %p.cause, "an interrupted change had taken effect in the kernel: finished it");
            self.recovered = Some(format!("finished: {} (request {request})", p.cause));
        } else {
            self.cancel(prepared);
            self.store.append(&Record::Abort {
                seq: p.seq,
                error: "interrupted by an agent crash before it took effect; undone when the agent restarted".into(),
            })?;
            let cause = format!(
                "undone after a crash: {} (request {request}, by {}) had not taken effect",
                p.cause, p.author
            );
            warn!(request = %request, cause = %p.cause, "an interrupted change had not taken effect in the kernel: undid it");
            self.recovered = Some(cause.clone());
            self.run_step(Step::Note, &Ctx::agent("agent (recovery)"), cause)?;
        }
        Ok(())
    }

    /// Applies `step` to the desired state in place; returns what changed.
    /// `strict`: a new request (ops that do not fit are refused).
    fn prepare(&mut self, step: &Step, strict: bool) -> Result<Prepared, AgentError> {
        let (delta, old) = match step {
            Step::Ops { ops } => (
                policy::delta::apply_ops(&mut self.desired, ops, strict)
                    .map_err(AgentError::Refused)?,
                None,
            ),
            Step::Base { base, .. } => {
                let mut next = (**base).clone();
                for op in &crate::model::policy::overlay_for_base(base, &self.state.overlay) {
                    let _ = op.apply(&mut next, false);
                }
                // The file's workloads and those added at run time must fit
                // together (no nesting, no shared cgroup, at most 64).
                if strict {
                    crate::model::sock::validate(&next.workloads).map_err(|e| {
                        AgentError::Refused(format!("{e} (with the workloads added at run time)"))
                    })?;
                    crate::model::steer::validate(&next.steers).map_err(|e| {
                        AgentError::Refused(format!("{e} (with the steers added at run time)"))
                    })?;
                }
                let delta = Delta::between(&self.desired, &next);
                (delta, Some(std::mem::replace(&mut self.desired, next)))
            }
            Step::Rollback { to } => {
                let target = self.policy_at(*to)?;
                let mut next = self.desired.clone();
                next.policy = target;
                next.workloads = self.workloads_at(*to);
                next.steers = self.steers_at(*to);
                let deny = &next.policy.deny;
                next.temp_deny.retain(|n, _| deny.contains(n));
                let delta = Delta::between(&self.desired, &next);
                (delta, Some(std::mem::replace(&mut self.desired, next)))
            }
            Step::Note => (Delta::default(), None),
        };
        Ok(Prepared {
            step: step.clone(),
            delta,
            old,
        })
    }

    /// Puts the desired state back as it was before `prepare`.
    fn cancel(&mut self, p: Prepared) {
        match p.old {
            Some(old) => self.desired = old,
            None => p.delta.inverse().apply_to(&mut self.desired),
        }
    }

    /// Makes a prepared change final in the state (base, overlay, history).
    /// Returns the version it made, if any.
    fn finish(&mut self, p: Prepared, meta: &Pending) -> Option<u64> {
        match &p.step {
            Step::Ops { ops } => self.state.overlay.extend(ops.iter().cloned()),
            Step::Base {
                base,
                source,
                hash,
                config_hash,
            } => {
                self.state.overlay =
                    crate::model::policy::overlay_for_base(base, &self.state.overlay);
                self.state.base = (**base).clone();
                self.state.base_source.clone_from(source);
                self.state.base_hash.clone_from(hash);
                if let Some(h) = config_hash {
                    self.state.config_hash.clone_from(h);
                }
            }
            Step::Rollback { .. } => {
                // The restored policy becomes the base's; runtime policy
                // changes go, runtime interfaces and services stay.
                self.state.base.policy = self.desired.policy.clone();
                self.state.base.temp_deny = self.desired.temp_deny.clone();
                self.state.base.workloads = self.desired.workloads.clone();
                self.state.base.steers = self.desired.steers.clone();
                self.state
                    .overlay
                    .retain(|o| matches!(o, Op::Attach { .. } | Op::Detach { .. } | Op::Lb { .. }));
            }
            Step::Note => {}
        }
        self.fingerprint = p
            .delta
            .fingerprint_after(self.fingerprint, &self.desired.policy);
        if p.delta.is_empty() && !matches!(p.step, Step::Note) {
            return None;
        }
        let number = self.state.current_version() + 1;
        self.state.history.push_back(Version {
            number,
            time: meta.time,
            author: meta.author.clone(),
            cause: meta.cause.clone(),
            request: meta.request.clone(),
            delta: p.delta,
            fingerprint: self.fingerprint,
            summary: Summary::of(&self.desired.policy, self.desired.services.len()),
        });
        while self.state.history.len() > self.settings.history.max(1) {
            self.state.history.pop_front();
        }
        Some(number)
    }

    /// The workloads of a kept version (`policy_at` checks the version is
    /// kept): the current ones with every later version's change undone.
    fn workloads_at(&self, version: u64) -> Vec<crate::model::sock::Workload> {
        let mut w = self.desired.workloads.clone();
        for later in self.state.history.iter().rev() {
            if later.number <= version {
                break;
            }
            if let Some((before, _)) = &later.delta.workloads {
                w.clone_from(before);
            }
        }
        w
    }

    /// The steers of a kept version, as [`Core::workloads_at`].
    fn steers_at(&self, version: u64) -> Vec<crate::model::steer::Steer> {
        let mut s = self.desired.steers.clone();
        for later in self.state.history.iter().rev() {
            if later.number <= version {
                break;
            }
            if let Some((before, _)) = &later.delta.steers {
                s.clone_from(before);
            }
        }
        s
    }

    /// The policy of a kept version, rebuilt from the current one by undoing
    /// the versions after it, and checked against its fingerprint.
    pub fn policy_at(&self, version: u64) -> Result<Policy, AgentError> {
        let Some(v) = self.state.history.iter().find(|v| v.number == version) else {
            let kept: Vec<String> = self
                .state
                .history
                .iter()
                .map(|v| v.number.to_string())
                .collect();
            return Err(AgentError::NoSuchVersion {
                version,
                kept: kept.join(", "),
            });
        };
        let mut p = self.desired.policy.clone();
        for later in self.state.history.iter().rev() {
            if later.number <= version {
                break;
            }
            later.delta.inverse().apply_to_policy(&mut p);
        }
        if fingerprint(&p) != v.fingerprint {
            return Err(AgentError::HistoryMismatch { version });
        }
        Ok(p)
    }

    /// Makes links and maps match the desired state, reading the whole
    /// policy back from the kernel (start and drift checks; changes write
    /// only their delta). `strict`: an interface that cannot be attached is
    /// an error; otherwise it is logged and retried by the next drift check,
    /// so a namespace that appears later is picked up.
    pub fn reconcile(&mut self, strict: bool) -> Result<ReconcileReport, AgentError> {
        self.reconcile_with(strict, None)
    }

    /// [`Core::reconcile`], given the policy the maps held when read just
    /// before (without the agent's lock) at `version`; read again if a
    /// change came in between.
    fn reconcile_with(
        &mut self,
        strict: bool,
        read: Option<(u64, Policy)>,
    ) -> Result<ReconcileReport, AgentError> {
        let started = Instant::now();
        let mut report = ReconcileReport::default();
        if self.root.is_set_up() {
            report.repaired_pins = self.repair_integrity("drift check")?;
        }
        self.reconcile_interfaces(strict, &mut report)?;
        if self.root.is_set_up() {
            // The maps (and the root lock they hold) go before the LB's turn.
            let mut maps = PolicyMaps::open(&self.root)?;
            let repaired = maps.repair()?;
            let current = match read {
                Some((v, p)) if v == self.state.current_version() && !repaired => p,
                _ => crate::engine::policy::pinned_policy(&maps)?,
            };
            if current != self.desired.policy {
                let delta = Delta::between_policies(&current, &self.desired.policy);
                report.changes = delta.size();
                let r = crate::engine::policy::write(&mut maps, &delta, &self.desired.policy)?;
                if let Some(why) = r.resync_pending {
                    warn!(why = %why, "the standby generation could not be brought up to date; retried at the next change");
                }
            } else if repaired {
                warn!("an interrupted change had left the standby generation behind; repaired");
            }
            drop(maps);
            report.lb = self.reconcile_lb(!strict)?;
        }
        report.sock = self.reconcile_sock();
        report.steer = self.reconcile_steer();
        report.millis = started.elapsed().as_secs_f64() * 1000.0;
        Ok(report)
    }

    /// Makes the socket layer hold the desired workloads (start and drift
    /// checks). A cgroup that cannot be found is logged and retried at the
    /// next drift check (it may be created later, like a namespace).
    fn reconcile_sock(&mut self) -> Option<crate::engine::sock::ApplyReport> {
        if self.desired.workloads.is_empty()
            && !crate::dataplane::sock::sock_root(&self.root).root.exists()
        {
            return None;
        }
        match crate::engine::sock::apply(&self.root, &self.desired.workloads, &|_| false) {
            Ok(r) => {
                if !r.missing.is_empty() && self.sock_missing != r.missing {
                    warn!(workloads = ?r.missing, "workload cgroups not found: not in force until they exist (checked at every drift check)");
                }
                self.sock_missing.clone_from(&r.missing);
                self.publish_workload_names(&r);
                if r.linked + r.unlinked > 0 {
                    info!(
                        workloads = r.workloads,
                        linked = r.linked,
                        unlinked = r.unlinked,
                        "socket layer updated"
                    );
                }
                Some(r)
            }
            Err(e) => {
                warn!(error = %e, "cannot put the workloads in force yet; will retry");
                None
            }
        }
    }

    /// The network namespace steering serves: the interfaces' when they
    /// share one, else the agent's (as for the socket LB and health checks).
    fn steer_netns(&self) -> Option<String> {
        crate::engine::lb_view::default_probe_netns(&self.desired.interfaces)
    }

    /// Makes the kernel steer as desired (start and drift checks): a
    /// failure is warned once and retried at the next drift check.
    fn reconcile_steer(&mut self) -> Option<crate::engine::steer::ApplyReport> {
        if self.desired.steers.is_empty() && !crate::dataplane::steer::link_pin(&self.root).exists()
        {
            return None;
        }
        let netns = self.steer_netns();
        match crate::engine::steer::apply(&self.root, &self.desired.steers, netns.as_deref()) {
            Ok(r) => {
                if r.linked || r.unlinked {
                    info!(
                        steers = r.steers,
                        linked = r.linked,
                        unlinked = r.unlinked,
                        "steering updated"
                    );
                }
                for d in &r.dropped {
                    warn!(what = %d, "steering socket let go");
                }
                self.steer_error = None;
                Some(r)
            }
            Err(e) => {
                let text = e.to_string();
                if self.steer_error.as_deref() != Some(text.as_str()) {
                    warn!(error = %e, "cannot put the steers in force yet; will retry");
                }
                self.steer_error = Some(text);
                None
            }
        }
    }

    /// Attaches every desired interface, then detaches the links desired
    /// state no longer names (after the new ones exist: the last detach
    /// would remove the maps).
    fn reconcile_interfaces(
        &mut self,
        strict: bool,
        report: &mut ReconcileReport,
    ) -> Result<(), AgentError> {
        for iface in &self.desired.interfaces {
            let root = self.root.clone();
            let (name, mode, ns) = (iface.name.clone(), iface.mode, iface.netns.clone());
            let label = crate::netns::label(ns.as_deref());
            let result = crate::netns::run_in(ns.as_deref(), move || {
                attach::attach(&root, &name, mode, &label)
            })
            .map_err(AgentError::from)
            .and_then(|r| r.map_err(AgentError::from));
            let r = match result {
                Ok(r) => r,
                Err(e) if !strict => {
                    warn!(interface = %iface_label(iface), error = %e, "cannot attach yet; will retry");
                    report.failed.push(format!("{}: {e}", iface_label(iface)));
                    continue;
                }
                Err(e) => return Err(e),
            };
            for f in &r.repaired {
                error!(finding = %f, "a map pin did not lead to the map the attached program reads; pinned the program's own map again");
                self.integrity_repairs += 1;
                report.repaired_pins.push(f.to_string());
            }
            if !r.readopted {
                info!(interface = %iface_label(iface), mode = r.mode.name(), program = r.program_id, "attached");
                report.attached.push(iface_label(iface));
            }
        }
        let st = attach::status(&self.root)?;
        for a in &st.attachments {
            let wanted = self.desired.interfaces.iter().any(|i| {
                i.name == a.interface && crate::netns::label(i.netns.as_deref()) == a.netns
            });
            if !wanted {
                attach::detach(&self.root, &a.interface, &a.netns)?;
                info!(interface = %a.interface, netns = %a.netns, "detached (no longer in desired state)");
                report.detached.push(format!("{}:{}", a.netns, a.interface));
            }
        }
        Ok(())
    }

    /// Checks that the pinned maps are the ones the attached programs read;
    /// pins the programs' own maps again where they are not (said loudly);
    /// programs that disagree among themselves are all loaded again with
    /// the pinned maps. Returns what was repaired.
    fn repair_integrity(&mut self, when: &str) -> Result<Vec<String>, AgentError> {
        let report = {
            let _lock = dataplane::pins::RootLock::acquire(&self.root.root)?;
            integrity::repair(&self.root)?
        };
        let mut repaired: Vec<String> = Vec::new();
        for f in &report.repaired {
            error!(when, finding = %f, "a map pin did not lead to the map the attached program reads; pinned the program's own map again (writes through the old pin would have changed nothing packets see)");
            self.integrity_repairs += 1;
            repaired.push(f.to_string());
        }
        self.integrity_problems = report.findings.len();
        if !report.findings.is_empty() {
            for f in &report.findings {
                error!(when, finding = %f, "live programs read different maps; loading every program again with the pinned maps");
            }
            let up = attach::upgrade(&self.root, true)?;
            self.integrity_repairs += up.reloaded_for.len() as u64;
            repaired.extend(up.reloaded_for.iter().map(ToString::to_string));
            self.integrity_problems = integrity::check(&self.root)?.findings.len();
        }
        Ok(repaired)
    }

    /// Writes a change's delta to the kernel: interfaces, then the policy
    /// (one generation flip, read back from the maps the program uses),
    /// then the load balancer.
    /// `strict_cgroups`: a workload the change adds or changes must have its
    /// cgroup (a runtime change or `apply`); at start and in a rollback or
    /// an undo, one whose cgroup is missing is left out until it exists.
    fn apply_delta(
        &mut self,
        delta: &Delta,
        strict_interfaces: bool,
        strict_cgroups: bool,
    ) -> Result<ReconcileReport, AgentError> {
        let started = Instant::now();
        let mut report = ReconcileReport::default();
        let required = |before: &[crate::model::sock::Workload]| {
            let before = before.to_vec();
            move |w: &crate::model::sock::Workload| strict_cgroups && !before.contains(w)
        };
        if let Some((before, _)) = &delta.workloads {
            // A cgroup that is not there refuses the change before anything
            // reaches the kernel.
            crate::engine::sock::resolve(
                &self.desired.workloads,
                &required(before),
                &mut Vec::new(),
            )?;
        }
        if self.root.is_set_up() {
            // Writes must reach the maps the program reads, whatever
            // happened to the pins since the last check.
            report.repaired_pins = self.repair_integrity("change")?;
        }
        if delta.interfaces.is_some() {
            self.reconcile_interfaces(strict_interfaces, &mut report)?;
        }
        if self.root.is_set_up() {
            if !delta.policy_is_empty() {
                let mut maps = PolicyMaps::open(&self.root)?;
                let r = crate::engine::policy::write(&mut maps, delta, &self.desired.policy)?;
                if let Some(why) = r.resync_pending {
                    warn!(why = %why, "the change is in force; the standby generation could not be brought up to date (retried at the next change)");
                }
                if r.missing > 0 {
                    warn!(
                        missing = r.missing,
                        "entries to delete were not in the maps (drift); the result is as desired"
                    );
                }
                report.changes = delta.size();
            }
            if delta.services.is_some() || delta.interfaces.is_some() {
                report.lb = self.reconcile_lb(false)?;
            }
        }
        if let Some((before, _)) = &delta.workloads {
            // Workloads this change adds or changes must have their cgroup;
            // the others may have lost theirs since (not in force until it
            // is back, as at a drift check).
            let r =
                crate::engine::sock::apply(&self.root, &self.desired.workloads, &required(before))?;
            self.publish_workload_names(&r);
            info!(
                workloads = r.workloads,
                linked = r.linked,
                unlinked = r.unlinked,
                "socket layer updated"
            );
            report.sock = Some(r);
        }
        // The interfaces name the namespace steered: they move it.
        if delta.steers.is_some() || (delta.interfaces.is_some() && !self.desired.steers.is_empty())
        {
            let netns = self.steer_netns();
            let r =
                crate::engine::steer::apply(&self.root, &self.desired.steers, netns.as_deref())?;
            info!(steers = r.steers, entries = r.entries, "steering updated");
            for d in &r.dropped {
                warn!(what = %d, "steering socket let go");
            }
            self.steer_error = None;
            report.steer = Some(r);
        }
        report.millis = started.elapsed().as_secs_f64() * 1000.0;
        Ok(report)
    }

    /// After a failed change: the kernel goes back to the (restored) desired
    /// state. The inverse delta first (cheap); if that fails, a full
    /// reconcile.
    fn restore_kernel(&mut self, delta: &Delta) -> Result<(), Box<AgentError>> {
        let undo = delta.inverse();
        match self.apply_delta(&undo, false, false) {
            Ok(_) => Ok(()),
            Err(first) => {
                warn!(error = %first, "undoing the failed change's delta failed; reconciling everything");
                self.reconcile(false).map(|_| ()).map_err(Box::new)
            }
        }
    }

    /// Makes the LB maps match the desired services (minus the backends
    /// health checks found down) and the `[lb]` settings. `force`: even when
    /// nothing changed since the last apply (drift checks).
    /// Returns what the maps took, or `None` when nothing needed writing.
    pub fn reconcile_lb(
        &mut self,
        force: bool,
    ) -> Result<Option<crate::engine::lb::ApplyReport>, AgentError> {
        if !self.root.is_set_up() {
            return Ok(None);
        }
        let cfg = dataplane::lb::config(&self.root)?;
        let (interval, tolerance) = sluice_common::settings::gcra(
            self.lb.new_connections_per_second,
            self.lb.new_connections_burst,
        );
        if cfg.tcp_idle_ns != self.lb.tcp_idle_secs * 1_000_000_000
            || cfg.udp_idle_ns != self.lb.udp_idle_secs * 1_000_000_000
            || cfg.new_conn_interval_ns != interval
            || cfg.new_conn_tolerance_ns != tolerance
        {
            dataplane::lb::set_conn_settings(
                &self.root,
                self.lb.tcp_idle_secs,
                self.lb.udp_idle_secs,
                self.lb.new_connections_per_second,
                self.lb.new_connections_burst,
            )?;
        }
        if let Ok(n) = dataplane::lb::pinned_conn_capacity(&self.root)
            && n != self.lb.connections
            && self.lb_size_warned != Some(self.lb.connections)
        {
            warn!(
                pinned = n,
                configured = self.lb.connections,
                "[lb] connections differs from the pinned connection table's size; it applies when the \
                 dataplane is created again (detach every interface, then attach)"
            );
            self.lb_size_warned = Some(self.lb.connections);
        }
        let specs: Vec<crate::model::lb::ServiceSpec> = self
            .desired
            .services
            .iter()
            .map(|s| s.spec.clone())
            .collect();
        // Only members still in the desired state can be down.
        self.health_down.retain(|(sid, b)| {
            specs
                .iter()
                .any(|s| s.id == *sid && s.backends.iter().any(|x| x.addr == *b))
        });
        let mut down: Vec<MemberKey> = self.health_down.iter().copied().collect();
        down.sort();
        let socket_off: Vec<crate::model::lb::ServiceId> = self
            .desired
            .services
            .iter()
            .filter(|s| !s.socket)
            .map(|s| s.spec.id)
            .collect();
        let key = (specs, down, (self.lb.socket, socket_off));
        if !force && self.lb_applied.as_ref() == Some(&key) {
            return Ok(None);
        }
        if let Err(e) = crate::engine::sock_lb::prepare(&self.root, &self.desired.services) {
            warn!(error = %e, "cannot mark the services the socket LB leaves alone");
        }
        let r = crate::engine::lb::apply(&self.root, &key.0, &self.health_down)?;
        self.reconcile_sock_lb();
        if r.tables_rebuilt + r.backends_written + r.backends_freed + r.services_removed > 0 {
            info!(
                services_added = r.services_added,
                services_removed = r.services_removed,
                tables = r.tables_rebuilt,
                backends_written = r.backends_written,
                backends_freed = r.backends_freed,
                "load balancer updated"
            );
        }
        self.lb_applied = Some(key);
        Ok(Some(r))
    }

    /// Puts the socket LB in force (or takes it out) as `[lb] socket` and
    /// the services say. A failure (no cgroup v2, a kernel without the
    /// hooks) is warned once and shown by `status`; the packet LB goes on.
    fn reconcile_sock_lb(&mut self) {
        // The namespace served: the balanced interfaces', as for health checks.
        let netns = crate::engine::lb_view::default_probe_netns(&self.desired.interfaces);
        match crate::engine::sock_lb::apply(
            &self.root,
            self.lb.socket,
            &self.desired.services,
            netns.as_deref(),
        ) {
            Ok(r) => {
                if r.linked + r.unlinked > 0 || r.rebound {
                    info!(
                        on = r.on,
                        linked = r.linked,
                        unlinked = r.unlinked,
                        rebound = r.rebound,
                        "socket load balancer updated"
                    );
                }
                self.sock_lb_error = None;
            }
            Err(e) => {
                let text = e.to_string();
                if self.sock_lb_error.as_deref() != Some(text.as_str()) {
                    warn!(error = %text, "the socket load balancer is not in force; local clients reach services through the packet LB");
                }
                self.sock_lb_error = Some(text);
            }
        }
    }

    /// A health check changed its verdict on a backend: the tables follow.
    pub fn set_health(&mut self, member: MemberKey, up: bool) -> Result<(), AgentError> {
        let changed = if up {
            self.health_down.remove(&member)
        } else {
            self.health_down.insert(member)
        };
        if changed {
            self.reconcile_lb(false)?;
        }
        Ok(())
    }

    /// Refuses a change that would drop the caller's session or the metrics
    /// endpoint (the API is a unix socket, out of XDP's reach), or that adds
    /// a deny-everything entry, unless forced.
    fn guard(&self, delta: &Delta, safety: &Safety) -> Result<(), AgentError> {
        if safety.force || delta.policy_is_empty() {
            return Ok(());
        }
        if let Some(n) = deny_everything(delta) {
            return Err(AgentError::DenyEverything {
                prefix: n.to_string(),
                family: if n.addr().is_ipv4() { "IPv4" } else { "IPv6" },
            });
        }
        let policy = &self.desired.policy;
        let mut probes: Vec<crate::model::policy::eval::Probe> =
            safety.session.iter().cloned().collect();
        if let Some(addr) = self.settings.metrics
            && !addr.ip().is_loopback()
        {
            // A scraper that is on no list: only rules and the default decide.
            let src: std::net::IpAddr = if addr.is_ipv4() {
                std::net::Ipv4Addr::new(192, 0, 2, 1).into()
            } else {
                "2001:db8::1".parse().expect("valid address")
            };
            probes.push(crate::model::policy::eval::Probe {
                what: "the agent's metrics endpoint".into(),
                src,
                dst: addr.ip(),
                proto: 6,
                dport: Some(addr.port()),
                sport: None,
            });
        }
        for p in probes {
            let (verdict, _, why) = crate::model::policy::eval::judge(policy, &p);
            if verdict == sluice_common::Verdict::Drop {
                return Err(AgentError::LockOut {
                    probe: p.to_string(),
                    why,
                });
            }
        }
        Ok(())
    }

    /// The one path of every change: see the module's description.
    fn run_step(&mut self, step: Step, ctx: &Ctx, cause: String) -> Result<Applied, AgentError> {
        let started = Instant::now();
        let result = self.run_step_inner(step, ctx, cause);
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.applies += 1,
            Err(_) => self.apply_failures += 1,
        }
        result
    }

    fn run_step_inner(
        &mut self,
        step: Step,
        ctx: &Ctx,
        cause: String,
    ) -> Result<Applied, AgentError> {
        let prepared = self.prepare(&step, true)?;
        let meta = Pending {
            seq: 0,
            time: store::unix_now(),
            author: ctx.author.clone(),
            cause,
            request: ctx.request.clone(),
            step: Step::Note,
        };
        let bookkeeping_only = prepared.delta.is_empty() && !matches!(step, Step::Note);
        if bookkeeping_only && !matches!(step, Step::Base { .. }) {
            // Nothing would change (a repeated setting): no version.
            self.cancel(prepared);
            return Ok(self.unchanged(ctx));
        }
        if let Err(e) = self.guard(&prepared.delta, &ctx.safety) {
            self.cancel(prepared);
            return Err(e);
        }
        let seq = self.store.next_seq();
        let begin = Record::Begin {
            seq,
            time: meta.time,
            author: meta.author.clone(),
            cause: meta.cause.clone(),
            request: meta.request.clone(),
            step: Box::new(step.clone()),
        };
        if let Err(e) = self.store.append(&begin) {
            // Refused before the kernel changed (a full or read-only state
            // directory): the caller is told, the log says why.
            error!(
                error = %e,
                cause = %meta.cause,
                state_dir = %self.settings.state_dir.display(),
                "cannot write the state journal; change refused, nothing changed"
            );
            self.cancel(prepared);
            return Err(e.into());
        }
        let report = if bookkeeping_only {
            // A file with the same policy: the base's source changes, the kernel not.
            Ok(ReconcileReport::default())
        } else {
            self.apply_delta(
                &prepared.delta,
                !ctx.retry_interfaces,
                !ctx.retry_interfaces && !matches!(step, Step::Rollback { .. }),
            )
        };
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, cause = %meta.cause, "change refused; putting the previous state back");
                let delta = prepared.delta.clone();
                self.cancel(prepared);
                let restored = self.restore_kernel(&delta);
                if let Err(r) = &restored {
                    error!(error = %r, "putting the previous state back failed; the drift check retries");
                }
                if let Err(j) = self.store.append(&Record::Abort {
                    seq,
                    error: e.to_string(),
                }) {
                    warn!(error = %j, "journaling the refusal failed; a restart works it out from the kernel");
                }
                return Err(AgentError::Failed {
                    error: Box::new(e),
                    restored,
                });
            }
        };
        let version = (!bookkeeping_only).then(|| self.state.current_version() + 1);
        if let Err(e) = self.store.append(&Record::Commit { seq, version }) {
            // Unrecorded means undone: kernel and store stay in step.
            error!(error = %e, "journaling the change failed; undoing it in the kernel");
            let delta = prepared.delta.clone();
            self.cancel(prepared);
            let restored = self.restore_kernel(&delta);
            let _ = self.store.append(&Record::Abort {
                seq,
                error: e.to_string(),
            });
            return Err(AgentError::Failed {
                error: Box::new(e.into()),
                restored,
            });
        }
        let diff = prepared.delta.policy_diff();
        let made = self.finish(prepared, &meta);
        debug_assert_eq!(made, version);
        if self.store.wants_snapshot()
            && let Err(e) = self.snapshot()
        {
            warn!(error = %e, "writing a new snapshot failed; the journal keeps everything");
        }
        let version = self.state.current_version();
        info!(version, author = %meta.author, cause = %meta.cause, changes = report.changes, millis = report.millis, "applied");
        Ok(Applied {
            version,
            diff,
            reconcile: report,
            unchanged: false,
            request: ctx.request.clone(),
        })
    }

    fn unchanged(&self, ctx: &Ctx) -> Applied {
        Applied {
            version: self.state.current_version(),
            diff: PolicyDiff::default(),
            reconcile: ReconcileReport::default(),
            unchanged: true,
            request: ctx.request.clone(),
        }
    }

    /// Folds the journal into a new snapshot (the overlay compacted first).
    fn snapshot(&mut self) -> Result<(), AgentError> {
        let compact = crate::model::policy::compact_overlay(&self.state.base, &self.state.overlay);
        if compact != self.state.overlay {
            self.state.overlay = compact;
        }
        self.state.seq = self.store.next_seq().saturating_sub(1);
        self.store.snapshot(&self.state)?;
        Ok(())
    }

    /// A runtime change (CLI through the API).
    pub fn change(&mut self, ops: Vec<Op>, ctx: &Ctx) -> Result<Applied, AgentError> {
        let cause = ops.iter().map(Op::describe).collect::<Vec<_>>().join("; ");
        self.run_step(Step::Ops { ops }, ctx, cause)
    }

    /// [`Core::change`] with the cause history shows given by the caller
    /// (a list replace: what it did, not every entry it touched).
    pub fn change_with_cause(
        &mut self,
        ops: Vec<Op>,
        ctx: &Ctx,
        cause: String,
    ) -> Result<Applied, AgentError> {
        self.run_step(Step::Ops { ops }, ctx, cause)
    }

    /// `sluice apply FILE`: the file (parsed by the caller, outside the
    /// agent's lock) becomes the base; runtime changes stay on top.
    pub fn apply_config(
        &mut self,
        path: &std::path::Path,
        cfg: config::Config,
        hash: String,
        ctx: &Ctx,
    ) -> Result<Applied, AgentError> {
        self.run_step(
            Step::Base {
                base: Box::new(cfg.desired),
                source: path.display().to_string(),
                hash,
                config_hash: None,
            },
            ctx,
            format!("applied {}", path.display()),
        )
    }

    /// What applying a parsed file would change.
    pub fn diff_config(&self, cfg: &config::Config) -> PolicyDiff {
        let mut next = cfg.desired.clone();
        for op in &self.state.overlay {
            let _ = op.apply(&mut next, false);
        }
        Delta::between_policies(&self.desired.policy, &next.policy).policy_diff()
    }

    /// Goes back to the policy of `version` (default: the one before the current).
    pub fn rollback(&mut self, version: Option<u64>, ctx: &Ctx) -> Result<Applied, AgentError> {
        let current = self.state.current_version();
        let target = version.unwrap_or(current.saturating_sub(1));
        self.run_step(
            Step::Rollback { to: target },
            ctx,
            format!("rollback to version {target}"),
        )
    }

    /// SIGHUP: a file refused before is tried again.
    pub fn forget_refused(&mut self) {
        self.refused_hash = None;
    }

    /// Whether `hash` is a config file content the agent has taken in or
    /// refused already (nothing to do on a reload).
    pub fn config_known(&self, hash: &str, forced: bool) -> bool {
        hash == self.state.config_hash || (!forced && self.refused_hash.as_deref() == Some(hash))
    }

    /// Takes in the agent's own config file (read and parsed by the caller,
    /// outside the lock; `Err`: the file could not be parsed).
    pub fn reload_parsed(
        &mut self,
        hash: String,
        parsed: Result<config::Config, ConfigErrors>,
    ) -> Result<Option<Applied>, AgentError> {
        let Some(path) = self.config_path.clone() else {
            return Ok(None);
        };
        if hash == self.state.config_hash {
            return Ok(None);
        }
        let cfg = match parsed {
            Ok(c) => c,
            Err(e) => {
                // Not retried until the file changes again (or SIGHUP).
                self.refused_hash = Some(hash);
                return Err(e.into());
            }
        };
        let (ddos, lb) = (cfg.ddos, cfg.lb);
        let result = self.run_step(
            Step::Base {
                base: Box::new(cfg.desired),
                source: path.display().to_string(),
                hash: hash.clone(),
                config_hash: Some(hash.clone()),
            },
            &Ctx {
                author: "agent (reload)".into(),
                request: None,
                safety: Safety::default(),
                retry_interfaces: false,
            },
            format!("applied {}", path.display()),
        );
        match result {
            Ok(applied) => {
                self.refused_hash = None;
                self.ddos = ddos;
                self.lb = lb;
                Ok(Some(applied))
            }
            Err(e) => {
                self.refused_hash = Some(hash);
                Err(e)
            }
        }
    }

    /// Where to read the policy back for a drift check, and the version it
    /// is to be compared with (`None`: nothing pinned yet).
    pub fn drift_target(&self) -> Option<(PinRoot, u64)> {
        self.root
            .is_set_up()
            .then(|| (self.root.clone(), self.state.current_version()))
    }

    /// Compares the pins with desired state and corrects any drift. `read`:
    /// the policy read back from the maps at a version (see
    /// [`read_back`]), so the lock is not held while a large policy is read.
    pub fn check_drift(&mut self, read: Option<(u64, Policy)>) -> Result<usize, AgentError> {
        let r = self.reconcile_with(false, read)?;
        let n = r.changes + r.attached.len() + r.detached.len() + r.repaired_pins.len();
        if n > 0 {
            self.drift_corrections += 1;
            warn!(
                changes = n,
                repaired_pins = r.repaired_pins.len(),
                "drift: pins differed from desired state; corrected"
            );
        }
        Ok(n)
    }

    /// On graceful shutdown with --detach-on-exit.
    pub fn detach_all(&mut self) -> Result<(), AgentError> {
        let st = attach::status(&self.root)?;
        let mut first_error = None;
        for a in st.attachments {
            if let Err(e) = attach::detach(&self.root, &a.interface, &a.netns) {
                first_error.get_or_insert(AgentError::from(e));
            }
        }
        // And steering's link, then every workload's cgroup links (the
        // socket layer's pins go too), whatever happened above.
        if let Err(e) = crate::engine::steer::apply(&self.root, &[], None) {
            first_error.get_or_insert(AgentError::from(e));
        }
        if let Err(e) = crate::engine::sock::apply(&self.root, &[], &|_| false) {
            first_error.get_or_insert(AgentError::from(e));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Bytes in the store's snapshot and journal.
    pub fn store_sizes(&self) -> (u64, u64) {
        self.store.sizes()
    }

    /// Tells the flow reader which cgroup is which workload; says loudly
    /// which socket-layer map pins had to be put back.
    fn publish_workload_names(&mut self, r: &crate::engine::sock::ApplyReport) {
        for f in &r.repaired {
            error!(finding = %f, "a socket-layer map pin did not lead to the map the socket programs read; pinned the programs' own map again");
            self.integrity_repairs += 1;
        }
        if let Ok(mut names) = self.workload_names.lock() {
            names.clear();
            names.extend(
                r.ids
                    .iter()
                    .map(|(id, name, path)| (*id, (name.clone(), path.clone()))),
            );
        }
    }

    /// Steering as the kernel holds it, for the desired steers.
    pub fn steer_view(&self) -> crate::engine::steer::SteerView {
        crate::engine::steer::read(&self.root, &self.desired.steers)
    }

    /// Registers a socket of process `pid` for steer `name` (runtime
    /// state: the socket lives in a pinned map, not in the history).
    pub fn steer_register(
        &self,
        name: &str,
        pid: u32,
        fd: Option<i32>,
    ) -> Result<crate::engine::steer::Registered, AgentError> {
        let netns = self.steer_netns();
        let r = crate::engine::steer::register(
            &self.root,
            &self.desired.steers,
            netns.as_deref(),
            name,
            pid,
            fd,
        )?;
        info!(steer = name, pid, fd = r.fd, cookie = r.cookie, local = ?r.local, "socket registered for steering");
        Ok(r)
    }

    /// Lets go of steer `name`'s socket.
    pub fn steer_unregister(&self, name: &str) -> Result<bool, AgentError> {
        if !self.desired.steers.iter().any(|s| s.name == name) {
            return Err(AgentError::Refused(format!("no steer {name}")));
        }
        let had = crate::engine::steer::unregister(&self.root, name)?;
        info!(steer = name, had, "steering socket unregistered");
        Ok(had)
    }

    /// The workloads with their cgroups, links and counters.
    pub fn workloads_view(&self) -> Vec<crate::engine::sock::WorkloadState> {
        crate::engine::sock::read(&self.root, &self.desired.workloads)
    }

    /// The LB as `sluice lb list` shows it, with the checker's last errors.
    /// The LB as listed; `walk_active`: count open connections (walks the
    /// connection table).
    pub fn lb_view(
        &self,
        walk_active: bool,
    ) -> Result<crate::engine::lb_view::LbView, DataplaneError> {
        let last_error = |k: &MemberKey| {
            self.checker
                .as_ref()
                .and_then(|ch| ch.status_of(k))
                .and_then(|st| st.last_error)
        };
        crate::engine::lb_view::view(
            &self.root,
            Some(&self.desired.services),
            &last_error,
            crate::engine::lb_view::default_probe_netns(&self.desired.interfaces).as_deref(),
            walk_active,
        )
    }

    pub fn dataplane_status(&self) -> Result<dataplane::Status, AgentError> {
        Ok(crate::engine::status(&self.root)?)
    }
}

/// The policy the maps hold (verified to be the maps the program reads),
/// read without the agent's lock, for [`Core::check_drift`].
pub fn read_back(root: &PinRoot) -> Result<Policy, AgentError> {
    let maps = PolicyMaps::open(root)?;
    Ok(crate::engine::policy::pinned_policy(&maps)?)
}
