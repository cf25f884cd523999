//! `sluice steer`: sk_lookup steering. A steer delivers a protocol's
//! traffic to address prefixes and a port range to one socket of a named
//! service, whatever address that socket is bound to. Kept by the agent
//! (desired state, history); sockets are registered at run time.

use clap::{Args, Subcommand, ValueEnum};
use hyper::Method;

use super::output;
use crate::{
    api::{Applied, client::Client},
    engine::steer::{Registered, SteerView},
    model::{
        lb::Proto,
        steer::{OnMissing, PortRange, Steer, SteerOp},
    },
};

#[derive(Debug, Args)]
pub struct SteerArgs {
    #[command(subcommand)]
    pub command: SteerCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnMissingArg {
    Drop,
    Pass,
}

#[derive(Debug, Subcommand)]
pub enum SteerCommand {
    /// Add a steer, e.g. `steer add web --proto tcp --prefix 198.18.5.0/24
    /// --ports 1-65535`; then register its socket with `steer register`.
    Add {
        /// 1-32 of a-z, 0-9, _ and -.
        name: String,
        #[arg(long, value_enum)]
        proto: ProtoArg,
        /// An IPv4 or IPv6 prefix steered; repeat for more.
        #[arg(long = "prefix", value_name = "PREFIX", required = true)]
        prefixes: Vec<String>,
        /// Destination ports steered: N or N-M.
        #[arg(long, default_value = "1-65535")]
        ports: String,
        /// While no socket is registered: refuse the traffic (drop), or let
        /// the normal socket lookup run (pass).
        #[arg(long, value_enum, default_value = "drop")]
        on_missing: OnMissingArg,
    },
    /// Delete a steer (its traffic goes back to the normal socket lookup).
    Del { name: String },
    /// Steers with their socket and counters.
    List,
    /// Register the socket a steer delivers to: the agent takes file
    /// descriptor FD of process PID (root: pidfd_getfd). Without --pid, this
    /// command's own descriptor (a systemd socket unit passes it as fd 3:
    /// `ExecStart=sluice steer register NAME --fd 3`). Without --fd, the one
    /// socket of the process that fits the steer.
    Register {
        name: String,
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long)]
        fd: Option<i32>,
    },
    /// Let go of a steer's socket (its traffic is then refused, or passed
    /// on with --on-missing pass).
    Unregister { name: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SteerCliError {
    #[error("{0}")]
    Refused(String),
    #[error(
        "steers are kept by the agent (it owns the sk_lookup link, the rule table and the \
         sockets): start `sluice agent` with [[steer]] sections in its config, or run this \
         command while it runs"
    )]
    NeedsAgent,
    #[error(transparent)]
    Client(#[from] crate::api::client::ClientError),
}

fn change_of(cmd: &SteerCommand) -> Result<Option<SteerOp>, SteerCliError> {
    Ok(Some(match cmd {
        SteerCommand::List | SteerCommand::Register { .. } | SteerCommand::Unregister { .. } => {
            return Ok(None);
        }
        SteerCommand::Del { name } => SteerOp::Del { name: name.clone() },
        SteerCommand::Add {
            name,
            proto,
            prefixes,
            ports,
            on_missing,
        } => {
            let prefixes = prefixes
                .iter()
                .map(|p| {
                    p.parse().map_err(|_| {
                        SteerCliError::Refused(format!("`{p}` is not a prefix (ADDR/LEN)"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let s = Steer {
                name: name.clone(),
                proto: match proto {
                    ProtoArg::Tcp => Proto::Tcp,
                    ProtoArg::Udp => Proto::Udp,
                },
                prefixes,
                ports: ports.parse::<PortRange>().map_err(SteerCliError::Refused)?,
                on_missing: match on_missing {
                    OnMissingArg::Drop => OnMissing::Drop,
                    OnMissingArg::Pass => OnMissing::Pass,
                },
            };
            s.validate().map_err(SteerCliError::Refused)?;
            SteerOp::Add { steer: s }
        }
    }))
}

/// Runs the command through the agent.
pub fn via_agent(
    client: &Client,
    args: &SteerArgs,
    out: &output::Out,
) -> Result<(), SteerCliError> {
    if let Some(op) = change_of(&args.command)? {
        let a: Applied = client.call(Method::POST, "/v1/steers/change", Some(&op))?;
        out.applied(&op.describe(), &a);
        return Ok(());
    }
    match &args.command {
        SteerCommand::Register { name, pid, fd } => {
            // This process's own descriptor (a systemd socket unit's fd 3)
            // stays open while the agent takes it: the call waits.
            let body = serde_json::json!({
                "pid": pid.unwrap_or_else(std::process::id),
                "fd": fd,
            });
            let r: Registered = client.call(
                Method::POST,
                &format!("/v1/steers/{name}/socket"),
                Some(&body),
            )?;
            out.steer_registered(&r);
        }
        SteerCommand::Unregister { name } => {
            let v: serde_json::Value = client.call(
                Method::DELETE,
                &format!("/v1/steers/{name}/socket"),
                None::<&()>,
            )?;
            out.steer_unregistered(name, v["unregistered"].as_bool().unwrap_or(false));
        }
        _ => {
            let v: SteerView = client.call(Method::GET, "/v1/steers", None::<&()>)?;
            out.steers(&v);
        }
    }
    Ok(())
}

/// Without an agent: the input is still checked, then the command is refused.
pub fn direct(args: &SteerArgs) -> Result<(), SteerCliError> {
    change_of(&args.command)?;
    Err(SteerCliError::NeedsAgent)
}
