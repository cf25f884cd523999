//! The `sluice` command line: argument parsing, the network-namespace switch,
//! and rendering results as tables or JSON. Work is done by `dataplane`.

mod output;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use sluice_common::{ListId, Verdict};

use crate::{
    dataplane::{self, AttachMode, Change, PinRoot, PolicyMaps, attach, policy::list_for, stats},
    policy::{self, RuleSpec},
};

/// sluice: an eBPF/XDP dataplane. Filters packets at the driver with
/// allow/deny prefix lists and L4 rules, changed live without reloading.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about = None, max_term_width = 100)]
pub struct Cli {
    /// Run in network namespace NAME (as `ip -n NAME`), keeping the host's
    /// bpffs so pins outlive the command.
    #[arg(short = 'n', long = "netns", global = true, value_name = "NAME")]
    pub netns: Option<String>,

    /// Where sluice pins its program, links and maps.
    #[arg(
        long,
        global = true,
        env = "SLUICE_PIN_ROOT",
        default_value = dataplane::DEFAULT_PIN_ROOT,
        value_name = "DIR"
    )]
    pub pin_root: PathBuf,

    /// Print results as JSON.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the XDP firewall to an interface (re-adopts an existing attachment).
    Attach {
        /// Interface name, e.g. eth0.
        iface: String,
        /// native: in the driver; generic: in the stack; auto: native, else generic.
        #[arg(long, value_enum, default_value = "auto")]
        mode: AttachMode,
    },
    /// Detach from an interface; the last detach removes every pin.
    Detach {
        /// Interface name.
        iface: String,
    },
    /// What is attached where, the program, and the policy in force.
    Status,
    /// Counters by verdict, reason, family and protocol; busiest entries and rules.
    Stats {
        /// How many top list entries and rules to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// The deny list: sources whose packets are dropped.
    Deny(ListArgs),
    /// The allow list: sources that are always passed (they skip deny and rules).
    Allow(ListArgs),
    /// L4 rules, evaluated in order after the lists; first match wins.
    Rule {
        #[command(subcommand)]
        action: RuleCommand,
    },
    /// Set the action for IP traffic nothing matched (initially pass).
    Default {
        #[arg(value_enum)]
        action: ActionArg,
    },
    /// Set the action for frames that cannot be parsed (initially drop).
    Malformed {
        #[arg(value_enum)]
        action: ActionArg,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ActionArg {
    Pass,
    Drop,
}

impl From<ActionArg> for Verdict {
    fn from(a: ActionArg) -> Self {
        match a {
            ActionArg::Pass => Self::Pass,
            ActionArg::Drop => Self::Drop,
        }
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(subcommand)]
    pub action: ListCommand,
}

#[derive(Debug, Subcommand)]
pub enum ListCommand {
    /// Add prefixes (IPv4 or IPv6 CIDRs or addresses), all or none.
    Add(PrefixArgs),
    /// Remove prefixes, all or none.
    Del(PrefixArgs),
    /// List entries with their hit counters.
    List,
}

#[derive(Debug, Args)]
pub struct PrefixArgs {
    /// Prefixes such as 198.18.0.0/24, 2001:2::/48 or 198.18.0.7.
    #[arg(value_name = "CIDR")]
    pub prefixes: Vec<String>,
    /// Also read prefixes from FILE, one per line (# comments allowed).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum RuleCommand {
    /// Add a rule: ACTION [PROTO] [dport N|N-M] [src CIDR] [dst CIDR].
    ///
    /// ACTION is drop or pass; PROTO is tcp, udp, icmp, icmpv6 or `proto N`.
    /// Examples: `drop udp dport 4444`, `drop icmp`,
    /// `drop tcp dport 1-1023 dst 198.18.0.0/24`.
    Add {
        /// Insert at this position (0 = first) instead of appending.
        #[arg(long, value_name = "POS")]
        at: Option<usize>,
        /// The rule, e.g. `drop tcp dport 1-1023 dst 198.18.0.0/24`.
        #[arg(required = true, num_args = 1.., value_name = "RULE")]
        words: Vec<String>,
    },
    /// Delete rules by id (see `rule list`).
    Del {
        /// Rule ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<u32>,
    },
    /// List rules in evaluation order with their hit counters.
    List,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Dataplane(#[from] dataplane::DataplaneError),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("no prefixes given (pass CIDRs or --file FILE)")]
    NoPrefixes,
}

fn gather_prefixes(args: &PrefixArgs) -> Result<Vec<IpNet>, CliError> {
    let mut out = Vec::new();
    for p in &args.prefixes {
        out.push(policy::parse_prefix(p)?);
    }
    if let Some(f) = &args.file {
        out.extend(policy::read_prefix_file(f)?);
    }
    if out.is_empty() {
        return Err(CliError::NoPrefixes);
    }
    Ok(out)
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    if let Some(ns) = &cli.netns {
        match crate::netns::enter(ns) {
            // A deleted namespace strands its attachments; detaching only
            // needs the name the link was pinned under.
            Err(crate::netns::NetnsError::Missing { .. })
                if matches!(cli.command, Command::Detach { .. }) => {}
            other => other?,
        }
    }
    let label = crate::netns::label(cli.netns.as_deref());
    let root = PinRoot::new(&cli.pin_root);
    let out = output::Out { json: cli.json };
    match cli.command {
        Command::Attach { iface, mode } => {
            let report = attach::attach(&root, &iface, mode, &label)?;
            out.attach(&report);
        }
        Command::Detach { iface } => {
            let report = attach::detach(&root, &iface, &label)?;
            out.detach(&report);
        }
        Command::Status => out.status(&attach::status(&root)?),
        Command::Stats { top } => {
            let maps = PolicyMaps::open(&root)?;
            out.stats(&stats::collect(&maps, top)?);
        }
        Command::Deny(args) => list_command(&root, false, args, &out)?,
        Command::Allow(args) => list_command(&root, true, args, &out)?,
        Command::Rule { action } => rule_command(&root, action, &out)?,
        Command::Default { action } => {
            let mut maps = PolicyMaps::open(&root)?;
            let report = maps.commit(Change {
                default_action: Some(action.into()),
                ..Change::default()
            })?;
            out.done(
                &format!("default action: {}", Verdict::from(action).name()),
                &report,
            );
        }
        Command::Malformed { action } => {
            let mut maps = PolicyMaps::open(&root)?;
            let report = maps.commit(Change {
                malformed_action: Some(action.into()),
                ..Change::default()
            })?;
            out.done(
                &format!("malformed-frame action: {}", Verdict::from(action).name()),
                &report,
            );
        }
    }
    Ok(())
}

fn list_command(
    root: &PinRoot,
    allow: bool,
    args: ListArgs,
    out: &output::Out,
) -> Result<(), CliError> {
    let kind = if allow { "allow" } else { "deny" };
    match args.action {
        ListCommand::Add(p) => {
            let nets = gather_prefixes(&p)?;
            let mut maps = PolicyMaps::open(root)?;
            let report = maps.commit(Change {
                add: nets.iter().map(|n| (list_for(allow, n), *n)).collect(),
                ..Change::default()
            })?;
            out.done(
                &format!(
                    "{kind} list: {} added, {} already present",
                    report.added, report.already_present
                ),
                &report,
            );
        }
        ListCommand::Del(p) => {
            let nets = gather_prefixes(&p)?;
            let mut maps = PolicyMaps::open(root)?;
            let report = maps.commit(Change {
                del: nets.iter().map(|n| (list_for(allow, n), *n)).collect(),
                ..Change::default()
            })?;
            out.done(&format!("{kind} list: {} removed", report.deleted), &report);
        }
        ListCommand::List => {
            let maps = PolicyMaps::open(root)?;
            let (v4, v6) = if allow {
                (ListId::AllowV4, ListId::AllowV6)
            } else {
                (ListId::DenyV4, ListId::DenyV6)
            };
            let mut entries = maps.list_entries(v4)?;
            entries.extend(maps.list_entries(v6)?);
            out.list(kind, &entries);
        }
    }
    Ok(())
}

fn rule_command(root: &PinRoot, action: RuleCommand, out: &output::Out) -> Result<(), CliError> {
    match action {
        RuleCommand::Add { at, words } => {
            let spec = RuleSpec::parse(&words)?;
            let mut maps = PolicyMaps::open(root)?;
            let mut rules: Vec<_> = maps.rules()?.into_iter().map(|r| r.rule).collect();
            let pos = at.unwrap_or(rules.len());
            if pos > rules.len() {
                return Err(dataplane::DataplaneError::BadPosition {
                    at: pos,
                    len: rules.len(),
                }
                .into());
            }
            rules.insert(pos, spec.to_rule());
            let report = maps.commit(Change {
                rules: Some(rules),
                ..Change::default()
            })?;
            let id = report.new_rule_ids.first().copied().unwrap_or(0);
            out.done(
                &format!("rule {id} added at position {pos}: {spec}"),
                &report,
            );
        }
        RuleCommand::Del { ids } => {
            let mut maps = PolicyMaps::open(root)?;
            let mut rules: Vec<_> = maps.rules()?.into_iter().map(|r| r.rule).collect();
            for id in &ids {
                if !rules.iter().any(|r| r.id == *id) {
                    return Err(dataplane::DataplaneError::NoSuchRule { id: *id }.into());
                }
            }
            rules.retain(|r| !ids.contains(&r.id));
            let report = maps.commit(Change {
                rules: Some(rules),
                ..Change::default()
            })?;
            let list: Vec<String> = ids.iter().map(u32::to_string).collect();
            out.done(&format!("rule {} deleted", list.join(", ")), &report);
        }
        RuleCommand::List => {
            let maps = PolicyMaps::open(root)?;
            out.rules(
                &maps
                    .rules()?
                    .iter()
                    .map(policy::RuleRow::from_view)
                    .collect::<Vec<_>>(),
            );
        }
    }
    Ok(())
}
