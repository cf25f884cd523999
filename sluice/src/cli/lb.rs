//! `sluice lb`: load-balanced services and their backends. Through the
//! agent when one runs (health checks live there), else straight to the pins.

use clap::{Args, Subcommand};
use hyper::Method;

use super::output;
use crate::api::client::Client;
use crate::{
    api::Applied,
    dataplane::{self, PinRoot},
    engine::lb_view::LbView,
    model::lb::{
        BackendAddr, BackendSpec, CheckKind, DEFAULT_WEIGHT, HealthConf, LbOp, LbService, Mode,
        ServiceId, ServiceSpec,
    },
};

#[derive(Debug, Args)]
pub struct LbArgs {
    #[command(subcommand)]
    pub command: LbCommand,
}

#[derive(Debug, Subcommand)]
pub enum LbCommand {
    /// Services (VIP:PORT/PROTO): add, delete.
    Service {
        #[command(subcommand)]
        action: ServiceCommand,
    },
    /// Backends of a service: add, delete, drain, weight.
    Backend {
        #[command(subcommand)]
        action: BackendCommand,
    },
    /// Services with their backends: weight, state, health, table share,
    /// packets, connections and active connections.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Add a service, e.g. `lb service add 198.18.0.10:80/tcp --backend 198.18.1.2:8080`.
    Add {
        /// VIP:PORT[/tcp|/udp] (default tcp); VIP:* for every port.
        service: ServiceId,
        /// nat: rewrite the destination, translate replies back (backends
        /// route through this host); dsr: MAC rewrite only, backends hold the
        /// VIP and answer clients directly (same L2 segment).
        /// vxlan: DSR through a VXLAN tunnel (outer IPv4, UDP 4789) to
        /// backends anywhere routable; needs --vni.
        #[arg(long, value_enum, default_value = "nat")]
        mode: ModeArg,
        /// The VXLAN network id of the backends' VXLAN devices (--mode vxlan).
        #[arg(long, value_name = "VNI")]
        vni: Option<u32>,
        /// A backend ADDR[:PORT][,weight=N]; repeat for more.
        #[arg(long = "backend", value_name = "BACKEND")]
        backends: Vec<String>,
        /// Health check run by the agent: tcp (connect) or http (GET).
        #[arg(long, value_enum)]
        health: Option<CheckArg>,
        /// HTTP check: path to GET.
        #[arg(long, default_value = "/", requires = "health")]
        health_path: String,
        /// HTTP check: the status that means healthy.
        #[arg(long, default_value_t = 200, requires = "health")]
        health_expect: u16,
        /// Port to check (default: the backend's, else the service's).
        #[arg(long, requires = "health")]
        health_port: Option<u16>,
        /// Network namespace to probe from (default: the namespace of the
        /// interfaces the agent balances on, when they share one).
        #[arg(long, requires = "health", value_name = "NAME")]
        health_netns: Option<String>,
        /// Time between checks (e.g. 2s, 500ms).
        #[arg(long, default_value = "2s", requires = "health")]
        health_interval: String,
        /// How long one check may take.
        #[arg(long, default_value = "1s", requires = "health")]
        health_timeout: String,
        /// Passes in a row before a down backend is up again.
        #[arg(long, default_value_t = 2, requires = "health")]
        health_rise: u32,
        /// Failures in a row before a backend is down.
        #[arg(long, default_value_t = 3, requires = "health")]
        health_fall: u32,
        /// Local clients' connect()/sendmsg() to the service get a backend
        /// at the socket (the socket LB, docs/sock.md); off leaves them to
        /// the packet LB.
        #[arg(
            long = "socket-lb",
            value_enum,
            default_value = "on",
            value_name = "on|off"
        )]
        socket_lb: OnOff,
    },
    /// Delete a service (its connections end at the VIP).
    Del { service: ServiceId },
    /// Change a service's settings: the socket LB for it on or off.
    Set {
        service: ServiceId,
        /// The socket LB for this service: on, or off (local clients go
        /// through the packet LB).
        #[arg(long = "socket-lb", value_enum, value_name = "on|off")]
        socket_lb: OnOff,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a service.
    Add {
        service: ServiceId,
        /// ADDR[:PORT] (no port: the client's destination port).
        backend: BackendAddr,
        #[arg(long, default_value_t = DEFAULT_WEIGHT)]
        weight: u32,
    },
    /// Remove a backend (its pinned connections are balanced again).
    Del {
        service: ServiceId,
        backend: BackendAddr,
    },
    /// Take no new connections; existing ones go on. `--undo` to take new ones again.
    Drain {
        service: ServiceId,
        backend: BackendAddr,
        #[arg(long)]
        undo: bool,
    },
    /// Change a backend's weight (the table is rebuilt and swapped in).
    Weight {
        service: ServiceId,
        backend: BackendAddr,
        weight: u32,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    Nat,
    Dsr,
    Vxlan,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CheckArg {
    Tcp,
    Http,
}

#[derive(Debug, thiserror::Error)]
pub enum LbCliError {
    #[error(
        "invalid backend {text:?}: expected ADDR[:PORT][,weight=N], e.g. 198.18.1.2:8080,weight=2"
    )]
    Backend { text: String },
    #[error("invalid {what} {text:?}: a duration like 500ms, 2s or 1m")]
    Duration { what: &'static str, text: String },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Lb(#[from] crate::engine::lb::ApplyError),
    #[error(transparent)]
    Dataplane(#[from] dataplane::DataplaneError),
    #[error(transparent)]
    Client(#[from] crate::api::client::ClientError),
}

fn backend_arg(text: &str) -> Result<BackendSpec, LbCliError> {
    let bad = || LbCliError::Backend { text: text.into() };
    let (addr, weight) = match text.split_once(',') {
        Some((a, w)) => {
            let w = w.strip_prefix("weight=").ok_or_else(bad)?;
            (a, w.parse::<u32>().map_err(|_| bad())?)
        }
        None => (text, DEFAULT_WEIGHT),
    };
    Ok(BackendSpec {
        addr: addr.parse().map_err(|_| bad())?,
        weight,
        draining: false,
    })
}

fn duration_ms(what: &'static str, text: &str) -> Result<u64, LbCliError> {
    crate::model::policy::parse_duration_ms(text).ok_or_else(|| LbCliError::Duration {
        what,
        text: text.into(),
    })
}

/// The change a command asks for (None: a read).
fn change_of(cmd: &LbCommand) -> Result<Option<LbOp>, LbCliError> {
    Ok(Some(match cmd {
        LbCommand::List => return Ok(None),
        LbCommand::Service { action } => match action {
            ServiceCommand::Add {
                service,
                mode,
                vni,
                backends,
                health,
                health_path,
                health_expect,
                health_port,
                health_netns,
                health_interval,
                health_timeout,
                health_rise,
                health_fall,
                socket_lb,
            } => {
                let backends = backends
                    .iter()
                    .map(|b| backend_arg(b))
                    .collect::<Result<Vec<_>, _>>()?;
                let health = match health {
                    None => None,
                    Some(kind) => {
                        let mut h = HealthConf::new(match kind {
                            CheckArg::Tcp => CheckKind::Tcp,
                            CheckArg::Http => CheckKind::Http,
                        });
                        h.path.clone_from(health_path);
                        h.expect = *health_expect;
                        h.port = *health_port;
                        if let Some(n) = health_netns {
                            if n.is_empty() || n.contains('/') || n == "." || n == ".." {
                                return Err(LbCliError::Refused(format!(
                                    "--health-netns {n:?} is not a network namespace name"
                                )));
                            }
                            h.netns = Some(n.clone());
                        }
                        h.interval_ms = duration_ms("--health-interval", health_interval)?;
                        h.timeout_ms = duration_ms("--health-timeout", health_timeout)?;
                        h.rise = *health_rise;
                        h.fall = *health_fall;
                        Some(h)
                    }
                };
                LbOp::ServiceAdd {
                    service: LbService {
                        spec: ServiceSpec {
                            id: *service,
                            mode: match (mode, vni) {
                                (ModeArg::Vxlan, Some(vni)) => Mode::Vxlan { vni: *vni },
                                (ModeArg::Vxlan, None) => {
                                    return Err(LbCliError::Refused(
                                        "--mode vxlan needs --vni (the backends' VXLAN network id)"
                                            .into(),
                                    ));
                                }
                                (_, Some(_)) => {
                                    return Err(LbCliError::Refused(
                                        "--vni goes with --mode vxlan".into(),
                                    ));
                                }
                                (ModeArg::Nat, None) => Mode::Nat,
                                (ModeArg::Dsr, None) => Mode::Dsr,
                            },
                            backends,
                        },
                        health,
                        socket: *socket_lb == OnOff::On,
                    },
                }
            }
            ServiceCommand::Del { service } => LbOp::ServiceDel { id: *service },
            ServiceCommand::Set { service, socket_lb } => LbOp::ServiceSet {
                id: *service,
                socket: *socket_lb == OnOff::On,
            },
        },
        LbCommand::Backend { action } => match action {
            BackendCommand::Add {
                service,
                backend,
                weight,
            } => LbOp::BackendAdd {
                service: *service,
                backend: BackendSpec {
                    addr: *backend,
                    weight: *weight,
                    draining: false,
                },
            },
            BackendCommand::Del { service, backend } => LbOp::BackendDel {
                service: *service,
                backend: *backend,
            },
            BackendCommand::Drain {
                service,
                backend,
                undo,
            } => LbOp::BackendSet {
                service: *service,
                backend: *backend,
                weight: None,
                draining: Some(!undo),
            },
            BackendCommand::Weight {
                service,
                backend,
                weight,
            } => LbOp::BackendSet {
                service: *service,
                backend: *backend,
                weight: Some(*weight),
                draining: None,
            },
        },
    }))
}

/// Runs the command through the agent.
pub fn via_agent(client: &Client, args: &LbArgs, out: &output::Out) -> Result<(), LbCliError> {
    match change_of(&args.command)? {
        None => {
            let v: LbView = client.call(Method::GET, "/v1/lb", None::<&()>)?;
            out.lb(&v);
        }
        Some(op) => {
            let a: Applied = client.call(Method::POST, "/v1/lb/change", Some(&op))?;
            out.applied(&op.describe(), &a);
        }
    }
    Ok(())
}

/// Runs the command on the pins (no agent: no health checks).
pub fn direct(root: &PinRoot, args: &LbArgs, out: &output::Out) -> Result<(), LbCliError> {
    if !root.is_set_up() {
        return Err(dataplane::DataplaneError::NotAttached {
            root: root.root.clone(),
        }
        .into());
    }
    let Some(op) = change_of(&args.command)? else {
        out.lb(&crate::engine::lb_view::view(
            root,
            None,
            &|_| None,
            None,
            true,
        )?);
        return Ok(());
    };
    if let LbOp::ServiceAdd { service } = &op
        && service.health.is_some()
    {
        return Err(LbCliError::Refused(
            "health checks are run by the agent: start `sluice agent` (or add the service \
             without --health)"
                .into(),
        ));
    }
    let mut services = pinned_services(root)?;
    op.apply(&mut services, true).map_err(LbCliError::Refused)?;
    crate::model::lb::validate(&services).map_err(LbCliError::Refused)?;
    // The socket LB is the agent's; its per-service settings are kept.
    crate::engine::sock_lb::prepare(root, &services)?;
    let specs: Vec<ServiceSpec> = services.iter().map(|s| s.spec.clone()).collect();
    let report = crate::engine::lb::apply(root, &specs, &std::collections::HashSet::new())?;
    if dataplane::sock::is_loaded(root) {
        dataplane::sock_lb::set_off(root, &crate::engine::sock_lb::off_keys(&services), true)?;
    }
    out.lb_applied(&op.describe(), &report);
    Ok(())
}

/// The services the pins hold, as desired services (no health checks:
/// those live in the agent).
pub(crate) fn pinned_services(root: &PinRoot) -> Result<Vec<LbService>, dataplane::DataplaneError> {
    let off = if dataplane::sock::is_loaded(root) {
        dataplane::sock_lb::off(root)?
    } else {
        std::collections::BTreeSet::new()
    };
    Ok(crate::engine::lb::read(root)?
        .into_iter()
        .map(|s| LbService {
            spec: ServiceSpec {
                id: s.id,
                mode: s.mode,
                backends: s
                    .members
                    .iter()
                    .map(|m| BackendSpec {
                        addr: m.backend,
                        weight: m.weight,
                        draining: m.draining,
                    })
                    .collect(),
            },
            health: None,
            socket: !off.contains(&crate::engine::lb::service_key(&s.id)),
        })
        .collect())
}
