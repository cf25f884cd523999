//! `sluice workload`: the socket layer's workloads (a cgroup v2 path and the
//! policy for its processes' connect(), sendmsg() and bind()). Kept by the
//! agent: its desired state, history and drift checks own the cgroup links.

use clap::{Args, Subcommand, ValueEnum};
use hyper::Method;

use super::output;
use crate::{
    api::{Applied, client::Client},
    engine::sock::WorkloadState,
    model::sock::{RuleKind, SockAction, SockRuleSpec, Workload, WorkloadOp},
};

#[derive(Debug, Args)]
pub struct WorkloadArgs {
    #[command(subcommand)]
    pub command: WorkloadCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ActionArg {
    Allow,
    Deny,
}

impl From<ActionArg> for SockAction {
    fn from(a: ActionArg) -> Self {
        match a {
            ActionArg::Allow => Self::Allow,
            ActionArg::Deny => Self::Deny,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum WorkloadCommand {
    /// Add a workload, e.g. `workload add web --cgroup system.slice/nginx.service
    /// --connect-default deny --connect "allow tcp to 198.18.0.0/24 port 443"`.
    Add {
        /// 1-32 of a-z, 0-9, _ and -.
        name: String,
        /// The cgroup's path below the cgroup v2 mount (it must exist; its
        /// descendants are covered too).
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        /// What would be denied is allowed and counted as `audit`.
        #[arg(long)]
        audit: bool,
        /// For connect()/sendmsg() no rule matched.
        #[arg(long, value_enum, default_value = "allow")]
        connect_default: ActionArg,
        /// For bind() no rule matched.
        #[arg(long, value_enum, default_value = "allow")]
        bind_default: ActionArg,
        /// A connect/sendmsg rule `allow|deny [tcp|udp] [to PREFIX] [port N[-M]]`;
        /// repeat for more (first match wins).
        #[arg(long = "connect", value_name = "RULE")]
        connect: Vec<String>,
        /// A bind rule `allow|deny [tcp|udp] [at PREFIX] [port N[-M]]`; repeat for more.
        #[arg(long = "bind", value_name = "RULE")]
        bind: Vec<String>,
    },
    /// Delete a workload (its cgroup links go; its processes are no longer judged).
    Del { name: String },
    /// Workloads with their cgroups, links and decision counters.
    List,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadCliError {
    #[error("{0}")]
    Refused(String),
    #[error(
        "workloads are kept by the agent (it owns the cgroup links and their history): start \
         `sluice agent` with [[workload]] sections in its config, or run this command while it runs"
    )]
    NeedsAgent,
    #[error(transparent)]
    Client(#[from] crate::api::client::ClientError),
}

fn change_of(cmd: &WorkloadCommand) -> Result<Option<WorkloadOp>, WorkloadCliError> {
    Ok(Some(match cmd {
        WorkloadCommand::List => return Ok(None),
        WorkloadCommand::Del { name } => WorkloadOp::Del { name: name.clone() },
        WorkloadCommand::Add {
            name,
            cgroup,
            audit,
            connect_default,
            bind_default,
            connect,
            bind,
        } => {
            let rules = |list: &[String], kind| {
                list.iter()
                    .map(|t| {
                        SockRuleSpec::parse(t, kind).map_err(|e| {
                            WorkloadCliError::Refused(format!("invalid rule {t:?}: {e}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let w = Workload {
                name: name.clone(),
                cgroup: cgroup.clone(),
                audit: *audit,
                connect_default: (*connect_default).into(),
                bind_default: (*bind_default).into(),
                connect: rules(connect, RuleKind::Connect)?,
                bind: rules(bind, RuleKind::Bind)?,
            };
            w.validate().map_err(WorkloadCliError::Refused)?;
            WorkloadOp::Add { workload: w }
        }
    }))
}

/// Runs the command through the agent.
pub fn via_agent(
    client: &Client,
    args: &WorkloadArgs,
    out: &output::Out,
) -> Result<(), WorkloadCliError> {
    match change_of(&args.command)? {
        None => {
            let v: Vec<WorkloadState> = client.call(Method::GET, "/v1/workloads", None::<&()>)?;
            out.workloads(&v);
        }
        Some(op) => {
            let a: Applied = client.call(Method::POST, "/v1/workloads/change", Some(&op))?;
            out.applied(&op.describe(), &a);
        }
    }
    Ok(())
}

/// Without an agent: the input is still checked (a bad rule is named),
/// then the command is refused.
pub fn direct(args: &WorkloadArgs) -> Result<(), WorkloadCliError> {
    change_of(&args.command)?;
    Err(WorkloadCliError::NeedsAgent)
}
