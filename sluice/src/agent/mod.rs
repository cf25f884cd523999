//! The long-lived agent: owns desired state (config file plus runtime
//! changes), keeps the pins in line with it, and serves the API.

pub mod api;
pub mod core;
pub mod ddos;
pub mod flows;
pub mod health;
pub mod lb;
pub mod metrics;
pub mod store;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::UnixListener,
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use self::core::{AgentError, Core};
use crate::model::policy::config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub log_format: LogFormat,
    /// Detach every interface on a graceful shutdown (default: leave the
    /// dataplane running, pinned).
    pub detach_on_exit: bool,
    /// How often the pins are compared with desired state.
    pub drift_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("another agent is already serving {path}")]
    AlreadyRunning { path: PathBuf },
    #[error(
        "missing capabilities: {missing}; the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN \
         (run as root or grant them, e.g. AmbientCapabilities= in the systemd unit)"
    )]
    Capabilities { missing: String },
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Capabilities the agent needs, by bit number in the effective set.
const NEEDED_CAPS: [(u32, &str); 3] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

/// Names the needed capabilities missing from the effective set.
pub fn missing_capabilities() -> Vec<&'static str> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return Vec::new();
    };
    NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| eff & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Binds the API socket: root-only (0600), refusing to steal it from a live agent.
fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, RunError> {
    let err = |source| RunError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(RunError::AlreadyRunning {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // Created under a tight umask so the socket is never briefly open to others.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(opts: &Options) -> Result<(), RunError> {
    let missing = missing_capabilities();
    if !missing.is_empty() {
        return Err(RunError::Capabilities {
            missing: missing.join(", "),
        });
    }
    let text = config::read(&opts.config, crate::files::DEFAULT_FILE_SIZE_LIMIT)
        .map_err(AgentError::from)?;
    let cfg = config::parse(&opts.config, &text).map_err(AgentError::from)?;
    let limits = crate::api::Limits {
        file_size_limit: cfg.agent.file_size_limit,
    };
    let settings = cfg.agent.clone();
    let flow_settings = cfg.flows;
    let listener_path = settings.socket.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| RunError::Socket {
            path: listener_path.clone(),
            source,
        })?;
    let std_listener = bind_socket(&listener_path)?;
    let hash = store::content_hash(&text);
    let (ddos, lb) = (cfg.ddos, cfg.lb);
    let started = Core::start(settings, Some((opts.config.clone(), cfg, hash)));
    let (mut core, report) = match started {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&listener_path);
            return Err(e.into());
        }
    };
    core.ddos = ddos;
    core.lb = lb;
    if let Err(e) = core.reconcile_lb(true) {
        warn!(error = %e, "cannot apply the [lb] settings yet; will retry");
    }
    let socket_path = listener_path.clone();
    let flows = flows::Flows::new(
        core.root.clone(),
        flow_settings,
        core.workload_names.clone(),
    );
    // Sampling is on before the API answers, so no early packet goes unrecorded.
    if let Err(e) = flows.apply() {
        warn!(error = %e, "cannot write the flow sampling settings; will retry");
    }
    let result = rt.block_on(async move {
        std_listener
            .set_nonblocking(true)
            .map_err(|source| RunError::Socket { path: listener_path.clone(), source })?;
        let listener = UnixListener::from_std(std_listener)
            .map_err(|source| RunError::Socket { path: listener_path.clone(), source })?;
        info!(
            socket = %listener_path.display(),
            version = core.state.current_version(),
            attached = ?report.attached,
            changes = report.changes,
            "agent ready"
        );
        let metrics_addr = core.settings.metrics;
        let mut agent_metrics = core.metrics.clone();
        agent_metrics.flows = Some(flows.clone());
        let flow_reader = flows::spawn_reader(flows.clone());
        let shared: core::Shared = Arc::new(Mutex::new(core));
        let metrics_task = match metrics_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| RunError::Metrics { addr, source })?;
                info!(%addr, "metrics endpoint listening");
                Some(tokio::spawn(metrics::serve(listener, shared.clone(), agent_metrics)))
            }
            None => None,
        };
        let ddos_task = tokio::spawn(ddos::run(shared.clone()));
        let lb_task = tokio::spawn(lb::run(shared.clone()));
        let app = api::router(shared.clone())
            .layer(axum::Extension(flows.clone()))
            .layer(axum::Extension(limits));
        let server = axum::serve(listener, app.into_make_service_with_connect_info::<api::Peer>());

        let mut term = signal(SignalKind::terminate()).map_err(|source| RunError::Socket { path: listener_path.clone(), source })?;
        let mut int = signal(SignalKind::interrupt()).map_err(|source| RunError::Socket { path: listener_path.clone(), source })?;
        let mut hup = signal(SignalKind::hangup()).map_err(|source| RunError::Socket { path: listener_path.clone(), source })?;
        let background = shared.clone();
        let background_flows = flows.clone();
        let drift_every = opts.drift_interval;
        let tasks = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut since_drift = Duration::ZERO;
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        info!("SIGHUP: reloading the config file");
                        reload(&background, true).await;
                        reload_flow_settings(&background, &background_flows).await;
                    }
                    _ = tick.tick() => {
                        since_drift += Duration::from_secs(1);
                        if config_changed(&background).await {
                            info!("config file changed on disk: reloading");
                            reload(&background, false).await;
                            reload_flow_settings(&background, &background_flows).await;
                        }
                        if since_drift >= drift_every {
                            since_drift = Duration::ZERO;
                            let c = background.clone();
                            // The read-back of a large policy takes seconds:
                            // done without the lock, changes go on meanwhile.
                            let r = tokio::task::spawn_blocking(move || {
                                let target = c.lock().map_err(|_| ())?.drift_target();
                                let read = match target {
                                    Some((root, version)) => core::read_back(&root).ok().map(|p| (version, p)),
                                    None => None,
                                };
                                c.lock().map_err(|_| ()).map(|mut c| c.check_drift(read))
                            })
                            .await;
                            if let Ok(Ok(Err(e))) = r {
                                warn!(error = %e, "drift check failed");
                            }
                        }
                    }
                }
            }
        });
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = int.recv() => info!("SIGINT: shutting down"),
            }
        };
        if let Err(e) = server.with_graceful_shutdown(shutdown).await {
            error!(error = %e, "API server failed");
        }
        tasks.abort();
        flow_reader.abort();
        ddos_task.abort();
        lb_task.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        let _ = std::fs::remove_file(&listener_path);
        if opts.detach_on_exit {
            let c = shared.clone();
            let r = tokio::task::spawn_blocking(move || c.lock().map_err(|_| ()).map(|mut c| c.detach_all())).await;
            match r {
                Ok(Ok(Ok(()))) => info!("detached every interface (--detach-on-exit)"),
                other => warn!(result = ?other.map(|r| r.map(|r| r.map_err(|e| e.to_string()))), "detach on exit failed"),
            }
        } else {
            info!("dataplane left running (pinned); restart the agent to manage it again");
        }
        Ok(())
    });
    // Whatever happened, a socket nobody serves must not linger.
    let _ = std::fs::remove_file(&socket_path);
    result
}

/// The agent's config file: where, its size limit, and whether `hash` is known.
fn config_file(core: &core::Shared) -> Option<(PathBuf, u64)> {
    let c = core.lock().ok()?;
    Some((c.config_path.clone()?, c.settings.file_size_limit))
}

/// Whether the config file on disk differs from what the agent took in (or
/// refused). Reads the file outside the agent's lock.
async fn config_changed(core: &core::Shared) -> bool {
    let c = core.clone();
    tokio::task::spawn_blocking(move || {
        let Some((path, limit)) = config_file(&c) else {
            return false;
        };
        let Ok(text) = config::read(&path, limit) else {
            return false;
        };
        let hash = store::content_hash(&text);
        c.lock().is_ok_and(|c| !c.config_known(&hash, false))
    })
    .await
    .unwrap_or(false)
}

/// Re-reads the config file (read and parsed outside the agent's lock; the
/// lock is taken only to apply it).
async fn reload(core: &core::Shared, forced: bool) {
    let c = core.clone();
    let r = tokio::task::spawn_blocking(
        move || -> Result<Result<Option<crate::api::Applied>, AgentError>, ()> {
            let (path, limit) = config_file(&c).ok_or(())?;
            let parsed = config::read(&path, limit).map(|text| {
                let hash = store::content_hash(&text);
                (hash, config::parse_with(&path, &text, Some(limit)))
            });
            let mut guard = c.lock().map_err(|_| ())?;
            if forced {
                guard.forget_refused();
            }
            match parsed {
                Ok((hash, cfg)) => {
                    if guard.config_known(&hash, forced) {
                        return Ok(Ok(None));
                    }
                    Ok(guard.reload_parsed(hash, cfg))
                }
                Err(e) => Ok(Err(AgentError::from(e))),
            }
        },
    )
    .await;
    match r {
        Ok(Ok(Ok(Some(applied)))) => info!(
            version = applied.version,
            changes = applied.reconcile.changes,
            "reloaded"
        ),
        Ok(Ok(Ok(None))) => info!("config file unchanged"),
        Ok(Ok(Err(e))) => warn!(error = %e, "reload refused; the running policy stays"),
        _ => warn!("reload failed"),
    }
}

/// After a reload: the `[flows]` settings of the config file the agent
/// took in (a file it refused changes nothing).
async fn reload_flow_settings(core: &self::core::Shared, flows: &Arc<flows::Flows>) {
    let core = core.clone();
    let settings = tokio::task::spawn_blocking(move || {
        let (path, hash, limit) = {
            let c = core.lock().ok()?;
            (
                c.config_path.clone()?,
                c.state.config_hash.clone(),
                c.settings.file_size_limit,
            )
        };
        let text = crate::model::policy::config::read(&path, limit).ok()?;
        if store::content_hash(&text) != hash {
            return None;
        }
        crate::model::policy::config::parse(&path, &text)
            .ok()
            .map(|c| c.flows)
    })
    .await
    .ok()
    .flatten();
    if let Some(s) = settings {
        flows.set_settings(s);
    }
}
