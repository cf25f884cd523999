//! The agent's state machine: desired state in, reconcile against the pins,
//! every change all-or-nothing (kernel and store), versions kept for rollback.
//! Blocking; the API runs it on a blocking thread behind a mutex.

use std::{path::PathBuf, time::Instant};

use tracing::{info, warn};

use super::store::{State, Store, StoreError, content_hash};
use crate::{
    dataplane::{self, DataplaneError, PinRoot, PolicyMaps, attach},
    policy::{
        Op, PolicyDiff, change_to,
        config::{self, AgentSettings, ConfigErrors},
        pinned_policy,
    },
};

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
    #[error("version {version} is not in the history (kept: {kept})")]
    NoSuchVersion { version: u64, kept: String },
    #[error(transparent)]
    Lb(#[from] dataplane::lb::LbError),
}

/// A backend of a service, as health checks and `down` sets name it.
pub type MemberKey = (crate::lb::ServiceId, crate::lb::BackendAddr);

/// What one reconcile did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReconcileReport {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    /// Interfaces that could not be attached (retried later).
    #[serde(default)]
    pub failed: Vec<String>,
    /// Entries, rules and settings that had to change in the maps.
    pub changes: usize,
    pub millis: f64,
}

/// What must keep working after a change: the caller's own session, and the
/// agent's listeners. `force` skips the check.
#[derive(Debug, Clone, Default)]
pub struct Safety {
    pub session: Option<crate::policy::eval::Probe>,
    pub force: bool,
}

/// The result of a change through the agent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    pub version: u64,
    pub diff: PolicyDiff,
    pub reconcile: ReconcileReport,
}

pub struct Core {
    pub settings: AgentSettings,
    pub config_path: Option<PathBuf>,
    pub root: PinRoot,
    store: Store,
    pub state: State,
    /// Counters for the metrics endpoint.
    pub applies: u64,
    pub apply_failures: u64,
    pub drift_corrections: u64,
    pub metrics: super::metrics::AgentMetrics,
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
    lb_applied: Option<(Vec<crate::lb::ServiceSpec>, Vec<MemberKey>)>,
    /// `[lb] connections` value already warned about (pinned size differs).
    lb_size_warned: Option<u32>,
}

fn iface_label(i: &crate::policy::Interface) -> String {
    format!("{}:{}", i.netns.as_deref().unwrap_or("host"), i.name)
}

impl Core {
    /// Loads the saved state, takes in the config file if it changed since,
    /// and makes the pins match.
    pub fn start(
        settings: AgentSettings,
        config: Option<(PathBuf, String)>,
    ) -> Result<(Self, ReconcileReport), AgentError> {
        let store = Store::open(&settings.state_dir)?;
        let saved = store.load()?;
        let resumed = saved.is_some();
        let mut state = saved.unwrap_or_default();
        let mut cause = None;
        if let Some((path, text)) = &config {
            let hash = content_hash(text);
            if hash != state.config_hash {
                let cfg = config::parse(path, text)?;
                state.base = cfg.desired;
                state.base_source = path.display().to_string();
                state.base_hash = hash.clone();
                state.config_hash = hash;
                cause = Some(format!("config file {} loaded", path.display()));
            }
        }
        let mut core = Self {
            root: PinRoot::new(&settings.pin_root),
            settings,
            config_path: config.map(|(p, _)| p),
            store,
            state,
            applies: 0,
            apply_failures: 0,
            drift_corrections: 0,
            metrics: super::metrics::AgentMetrics::default(),
            refused_hash: None,
            ddos: config::DdosSettings::default(),
            lb: config::LbSettings::default(),
            health_down: std::collections::HashSet::new(),
            checker: None,
            lb_applied: None,
            lb_size_warned: None,
        };
        info!(
            resumed,
            version = core.state.current_version(),
            pinned = core.root.is_set_up(),
            "agent state loaded"
        );
        if core.root.is_set_up() {
            // A new build takes over the running links atomically, maps kept.
            let up = attach::upgrade(&core.root, false)?;
            if !up.unchanged {
                info!(old = %up.old_tag, new = %up.new_tag, links = up.links, "program upgraded on the live links; maps kept");
            }
        }
        let report = core.reconcile(false)?;
        if report.changes > 0 && cause.is_none() {
            warn!(
                changes = report.changes,
                "pinned maps differed from the saved desired state; corrected"
            );
        }
        if let Some(cause) = cause {
            core.state.record("agent", cause, core.settings.history);
        } else if core.state.history.is_empty() {
            core.state
                .record("agent", "agent started".into(), core.settings.history);
        }
        core.store.save(&core.state)?;
        Ok((core, report))
    }

    /// Makes links and maps match the desired state. `strict`: an interface
    /// that cannot be attached is an error (a user's change); otherwise it is
    /// logged and retried by the next drift check (start, timers), so a
    /// namespace that appears later is picked up.
    pub fn reconcile(&mut self, strict: bool) -> Result<ReconcileReport, AgentError> {
        let started = Instant::now();
        let desired = self.state.desired();
        let mut report = ReconcileReport::default();
        for iface in &desired.interfaces {
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
            if !r.readopted {
                info!(interface = %iface_label(iface), mode = r.mode.name(), program = r.program_id, "attached");
                report.attached.push(iface_label(iface));
            }
        }
        // Links the desired state no longer names, after the new ones exist
        // (the last detach would remove the maps).
        let st = attach::status(&self.root)?;
        for a in &st.attachments {
            let wanted = desired.interfaces.iter().any(|i| {
                i.name == a.interface && crate::netns::label(i.netns.as_deref()) == a.netns
            });
            if !wanted {
                attach::detach(&self.root, &a.interface, &a.netns)?;
                info!(interface = %a.interface, netns = %a.netns, "detached (no longer in desired state)");
                report.detached.push(format!("{}:{}", a.netns, a.interface));
            }
        }
        if self.root.is_set_up() {
            let mut maps = PolicyMaps::open(&self.root)?;
            let current = pinned_policy(&maps)?;
            if current != desired.policy {
                let diff = PolicyDiff::between(&current, &desired.policy);
                report.changes = diff.size();
                let change = change_to(&maps, &current, &desired.policy)?;
                maps.commit(change)?;
            }
            self.reconcile_lb(&desired, !strict)?;
        }
        report.millis = started.elapsed().as_secs_f64() * 1000.0;
        Ok(report)
    }

    /// Makes the LB maps match the desired services (minus the backends
    /// health checks found down) and the `[lb]` settings. `force`: even when
    /// nothing changed since the last apply (drift checks).
    pub fn reconcile_lb(
        &mut self,
        desired: &crate::policy::Desired,
        force: bool,
    ) -> Result<(), AgentError> {
        if !self.root.is_set_up() {
            return Ok(());
        }
        let cfg = dataplane::lb::config(&self.root)?;
        let (interval, tolerance) = dataplane::runtime::gcra(
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
        let specs: Vec<crate::lb::ServiceSpec> =
            desired.services.iter().map(|s| s.spec.clone()).collect();
        // Only members still in the desired state can be down.
        self.health_down.retain(|(sid, b)| {
            specs
                .iter()
                .any(|s| s.id == *sid && s.backends.iter().any(|x| x.addr == *b))
        });
        let mut down: Vec<MemberKey> = self.health_down.iter().copied().collect();
        down.sort();
        let key = (specs, down);
        if !force && self.lb_applied.as_ref() == Some(&key) {
            return Ok(());
        }
        let r = dataplane::lb::apply(&self.root, &key.0, &self.health_down)?;
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
        Ok(())
    }

    /// A health check changed its verdict on a backend: the tables follow.
    pub fn set_health(&mut self, member: MemberKey, up: bool) -> Result<(), AgentError> {
        let changed = if up {
            self.health_down.remove(&member)
        } else {
            self.health_down.insert(member)
        };
        if changed {
            let desired = self.state.desired();
            self.reconcile_lb(&desired, false)?;
        }
        Ok(())
    }

    /// Replaces the state with `next` if the kernel takes it; on failure the
    /// old state is restored everywhere and the error returned.
    /// Refuses a policy that would drop the caller's session or the metrics
    /// endpoint (the API is a unix socket, out of XDP's reach).
    fn guard(&self, policy: &crate::policy::Policy, safety: &Safety) -> Result<(), AgentError> {
        if safety.force {
            return Ok(());
        }
        let mut probes: Vec<crate::policy::eval::Probe> = safety.session.iter().cloned().collect();
        if let Some(addr) = self.settings.metrics
            && !addr.ip().is_loopback()
        {
            // A scraper that is on no list: only rules and the default decide.
            let src: std::net::IpAddr = if addr.is_ipv4() {
                std::net::Ipv4Addr::new(192, 0, 2, 1).into()
            } else {
                "2001:db8::1".parse().expect("valid address")
            };
            probes.push(crate::policy::eval::Probe {
                what: "the agent's metrics endpoint".into(),
                src,
                dst: addr.ip(),
                proto: 6,
                dport: Some(addr.port()),
            });
        }
        for p in probes {
            let (verdict, _, why) = crate::policy::eval::judge(policy, &p);
            if verdict == sluice_common::Verdict::Drop {
                return Err(AgentError::LockOut {
                    probe: p.to_string(),
                    why,
                });
            }
        }
        Ok(())
    }

    fn commit_state(
        &mut self,
        next: State,
        author: &str,
        cause: String,
        safety: &Safety,
    ) -> Result<Applied, AgentError> {
        if next.desired() == self.state.desired() {
            // Nothing would change (a repeated setting, a file with the same
            // policy): keep the bookkeeping, record no version.
            self.state = next;
            self.store.save(&self.state)?;
            return Ok(Applied {
                version: self.state.current_version(),
                diff: PolicyDiff::default(),
                reconcile: ReconcileReport::default(),
            });
        }
        if let Err(e) = self.guard(&next.desired().policy, safety) {
            self.apply_failures += 1;
            return Err(e);
        }
        let started = Instant::now();
        let before = self.state.desired().policy;
        let old = std::mem::replace(&mut self.state, next);
        let result = self.commit_inner(old, before, author, cause);
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    fn commit_inner(
        &mut self,
        old: State,
        before: crate::policy::Policy,
        author: &str,
        cause: String,
    ) -> Result<Applied, AgentError> {
        match self.reconcile(true) {
            Ok(reconcile) => {
                let version = self
                    .state
                    .record(author, cause.clone(), self.settings.history);
                if let Err(e) = self.store.save(&self.state) {
                    // Keep kernel and store in step: undo in the kernel too.
                    self.state = old;
                    let _ = self.reconcile(false);
                    self.apply_failures += 1;
                    return Err(e.into());
                }
                self.applies += 1;
                let diff = PolicyDiff::between(&before, &self.state.desired().policy);
                info!(version, author, cause = %cause, changes = reconcile.changes, millis = reconcile.millis, "applied");
                Ok(Applied {
                    version,
                    diff,
                    reconcile,
                })
            }
            Err(e) => {
                warn!(error = %e, cause = %cause, "change refused; previous state restored");
                self.state = old;
                let _ = self.reconcile(false);
                self.apply_failures += 1;
                Err(e)
            }
        }
    }

    /// Drops overlay ops that no longer do anything (keeps the store lean).
    pub fn compact_overlay(&mut self) {
        let compact = crate::policy::compact_overlay(&self.state.base, &self.state.overlay);
        if compact != self.state.overlay {
            self.state.overlay = compact;
            if let Err(e) = self.store.save(&self.state) {
                warn!(error = %e, "saving the compacted overlay failed");
            }
        }
    }

    /// A runtime change (CLI through the API).
    pub fn change(
        &mut self,
        ops: Vec<Op>,
        author: &str,
        safety: &Safety,
    ) -> Result<Applied, AgentError> {
        let mut next = self.state.clone();
        let mut desired = next.desired();
        for op in &ops {
            if let Err(e) = op.apply(&mut desired, true) {
                self.apply_failures += 1;
                return Err(AgentError::Refused(e));
            }
        }
        let cause = ops.iter().map(Op::describe).collect::<Vec<_>>().join("; ");
        next.overlay.extend(ops);
        next.overlay = crate::policy::compact_overlay(&next.base, &next.overlay);
        self.commit_state(next, author, cause, safety)
    }

    /// `sluice apply FILE`: the file becomes the base; runtime changes stay on top.
    pub fn apply_file(
        &mut self,
        path: PathBuf,
        text: &str,
        author: &str,
        safety: &Safety,
    ) -> Result<Applied, AgentError> {
        let cfg = match config::parse(&path, text) {
            Ok(c) => c,
            Err(e) => {
                self.apply_failures += 1;
                return Err(e.into());
            }
        };
        let mut next = self.state.clone();
        next.base = cfg.desired;
        next.base_source = path.display().to_string();
        next.base_hash = content_hash(text);
        self.commit_state(next, author, format!("applied {}", path.display()), safety)
    }

    /// What applying the file would change.
    pub fn diff_file(&self, path: PathBuf, text: &str) -> Result<PolicyDiff, AgentError> {
        let cfg = config::parse(&path, text)?;
        let mut next = self.state.clone();
        next.base = cfg.desired;
        Ok(PolicyDiff::between(
            &self.state.desired().policy,
            &next.desired().policy,
        ))
    }

    /// Goes back to the policy of `version` (default: the one before the current).
    pub fn rollback(
        &mut self,
        version: Option<u64>,
        author: &str,
        safety: &Safety,
    ) -> Result<Applied, AgentError> {
        let current = self.state.current_version();
        let target = version.unwrap_or(current.saturating_sub(1));
        let Some(v) = self
            .state
            .history
            .iter()
            .find(|v| v.number == target)
            .cloned()
        else {
            let kept: Vec<String> = self
                .state
                .history
                .iter()
                .map(|v| v.number.to_string())
                .collect();
            return Err(AgentError::NoSuchVersion {
                version: target,
                kept: kept.join(", "),
            });
        };
        let mut next = self.state.clone();
        next.base.policy = v.policy;
        next.overlay.clear();
        self.commit_state(
            next,
            author,
            format!("rollback to version {target}"),
            safety,
        )
    }

    /// Re-reads the agent's own config file (SIGHUP, or it changed on disk).
    pub fn reload(&mut self) -> Result<Option<Applied>, AgentError> {
        let Some(path) = self.config_path.clone() else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            AgentError::Config(ConfigErrors(vec![config::Diagnostic {
                file: path.clone(),
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }]))
        })?;
        let hash = content_hash(&text);
        if hash == self.state.config_hash {
            return Ok(None);
        }
        match self.apply_file(path.clone(), &text, "agent (reload)", &Safety::default()) {
            Ok(applied) => {
                self.state.config_hash = hash;
                self.refused_hash = None;
                if let Ok(cfg) = config::parse(&path, &text) {
                    self.ddos = cfg.ddos;
                    self.lb = cfg.lb;
                }
                self.store.save(&self.state)?;
                Ok(Some(applied))
            }
            Err(e) => {
                // Not retried until the file changes again (or SIGHUP).
                self.refused_hash = Some(hash);
                Err(e)
            }
        }
    }

    /// SIGHUP: reload even a file that was refused before.
    pub fn reload_now(&mut self) -> Result<Option<Applied>, AgentError> {
        self.refused_hash = None;
        self.reload()
    }

    /// Hash of the config file on disk, to notice edits cheaply.
    pub fn config_changed(&self) -> bool {
        self.config_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| content_hash(&t))
            .is_some_and(|h| h != self.state.config_hash && Some(&h) != self.refused_hash.as_ref())
    }

    /// Compares the pins with desired state and corrects any drift.
    pub fn check_drift(&mut self) -> Result<usize, AgentError> {
        let r = self.reconcile(false)?;
        let n = r.changes + r.attached.len() + r.detached.len();
        if n > 0 {
            self.drift_corrections += 1;
            warn!(
                changes = n,
                "drift: pins differed from desired state; corrected"
            );
        }
        Ok(n)
    }

    /// On graceful shutdown with --detach-on-exit.
    pub fn detach_all(&mut self) -> Result<(), AgentError> {
        let st = attach::status(&self.root)?;
        for a in st.attachments {
            attach::detach(&self.root, &a.interface, &a.netns)?;
        }
        Ok(())
    }

    pub fn dataplane_status(&self) -> Result<dataplane::Status, AgentError> {
        Ok(attach::status(&self.root)?)
    }
}
