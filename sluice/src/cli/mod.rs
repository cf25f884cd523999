//! The `sluice` command line: argument parsing, the network-namespace switch,
//! and rendering results as tables or JSON. Work is done by `dataplane`.

mod capture;
mod flows;
mod lb;
mod output;
mod steer;
mod top;
mod workload;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use sluice_common::{ListId, Verdict};

use crate::{
    api::client,
    dataplane::{self, AttachMode, PinRoot, PolicyMaps, attach, stats},
    engine::policy::{Pinned, Written},
    model::policy::{self, Op, RuleSpec},
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

    /// The agent's API socket. Commands go through the agent when one is
    /// running there (for the same pin root), else straight to the pins.
    #[arg(
        long,
        global = true,
        env = "SLUICE_SOCKET",
        default_value = crate::model::policy::config::DEFAULT_SOCKET,
        value_name = "PATH"
    )]
    pub socket: PathBuf,

    /// Apply even if the agent's lock-out guard objects (the change would
    /// drop your SSH session or the agent's metrics endpoint).
    #[arg(long, global = true)]
    pub force: bool,

    /// Work on the pins directly even when an agent is running (its next
    /// drift check will undo changes that differ from its desired state).
    #[arg(long, global = true)]
    pub no_agent: bool,

    /// The largest file the CLI reads (`--file`, `check`, `apply`, `diff`),
    /// e.g. 256MiB; only regular files are read.
    #[arg(
        long,
        global = true,
        env = "SLUICE_FILE_SIZE_LIMIT",
        default_value = "256MiB",
        value_name = "SIZE",
        value_parser = parse_size_arg
    )]
    pub file_size_limit: u64,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: keep the dataplane in line with a config file plus
    /// runtime changes, serve the API, survive restarts.
    Agent {
        /// The configuration file (see examples/sluice.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log as text or JSON lines (stderr).
        #[arg(long, value_enum, default_value = "text")]
        log_format: crate::agent::LogFormat,
        /// Detach every interface, every workload's cgroup and the steering
        /// link on a graceful shutdown (default: leave the dataplane running).
        #[arg(long)]
        detach_on_exit: bool,
        /// Seconds between checks that the pins still match desired state.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        drift_interval: u64,
    },
    /// Check a configuration file and report every problem with its position.
    Check {
        /// The configuration file.
        file: PathBuf,
    },
    /// Make a configuration file the running policy (through the agent).
    /// A bad file is rejected whole; the running policy stays.
    Apply {
        /// The configuration file.
        file: PathBuf,
    },
    /// Show what applying a configuration file would change (through the agent).
    Diff {
        /// The configuration file.
        file: PathBuf,
    },
    /// Go back to an earlier applied version (default: the one before the current).
    Rollback {
        /// Version number from `sluice history`.
        version: Option<u64>,
    },
    /// Applied versions the agent keeps, with time, author and cause; what
    /// one version changed (`show N`); how two versions differ (`diff A [B]`).
    History {
        #[command(subcommand)]
        what: Option<HistoryCommand>,
    },
    /// What the attached program does with a packet, and why: runs the
    /// real program on a frame built from the description (no second
    /// implementation) and names the list entry, rule, limit or backend.
    ///
    /// Example: `explain tcp src 198.18.0.2 dst 198.18.0.1 dport 22`
    /// (sport 40000, flags syn and 64 bytes unless given). The frame counts
    /// as one packet; it is never sent.
    Explain {
        /// The interface it arrives on (default: the first attached in
        /// this namespace).
        #[arg(long, value_name = "IFACE")]
        interface: Option<String>,
        /// The packet: tcp|udp|icmp|icmpv6|proto N, src ADDR, dst ADDR,
        /// [sport N], dport N (tcp, udp), [flags F,...], [len N], [vlan N].
        #[arg(required = true, num_args = 1.., value_name = "PACKET")]
        words: Vec<String>,
    },
    /// Swap this build's XDP program in on every attached interface,
    /// atomically per interface, keeping the pinned maps (policy, counters).
    Upgrade {
        /// Swap even when the pinned program is this build's already.
        #[arg(long)]
        force: bool,
    },
    /// Attach the XDP firewall to an interface (re-adopts an existing attachment).
    Attach {
        /// Interface name, e.g. eth0.
        iface: String,
        /// native: in the driver; generic: in the stack; auto: native, else generic.
        #[arg(long, default_value = "auto", value_parser = attach_mode_arg())]
        mode: AttachMode,
    },
    /// Detach from an interface; the last detach removes every pin.
    Detach {
        /// Interface name.
        iface: String,
    },
    /// What is attached where, the program, and the policy in force.
    Status,
    /// The policy in force as a configuration file (like iptables-save):
    /// interfaces, policy, lists, rules and services; `apply` takes it back
    /// unchanged. Temporary deny entries are left out. Through the agent:
    /// its desired state; without one: what the pins hold.
    Export,
    /// Counters by verdict, reason, family and protocol; busiest entries and rules.
    Stats {
        /// How many top list entries and rules to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Zero every packet counter (by class, rule and list entry) instead;
        /// `stats` then shows the time of the reset. The policy stays.
        #[arg(long)]
        reset: bool,
    },
    /// Flow records the agent read from the dataplane: recent ones, a live
    /// stream (--follow), or top talkers (`flows top`). Needs the agent.
    Flows(flows::FlowsArgs),
    /// A live view through the agent: packets and bits per second by verdict
    /// and reason, top sources and destinations, map occupancy, event counters.
    Top(top::TopArgs),
    /// The L4 load balancer: services (VIPs) and their backends.
    Lb(lb::LbArgs),
    /// Socket-layer workloads: a cgroup v2 path and the policy for its
    /// processes' connect(), sendmsg() and bind(). Needs the agent.
    Workload(workload::WorkloadArgs),
    /// sk_lookup steering: deliver a protocol's traffic to address prefixes
    /// and a port range to one socket of a named service. Needs the agent.
    Steer(steer::SteerArgs),
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
    /// Write the packets sluice sees on an interface, with each one's verdict
    /// and reason, to a pcapng file (for tcpdump -r and Wireshark).
    Capture(capture::CaptureArgs),
    /// Audit mode for the whole policy: what the lists, rules or default
    /// would drop is passed and counted as `audit` (malformed frames are not
    /// affected). Per rule: `rule add audit drop ...`.
    Audit {
        #[arg(value_enum)]
        state: OnOff,
    },
}

#[derive(Debug, Subcommand)]
pub enum HistoryCommand {
    /// What version N changed: lists, rules, settings (and whether
    /// temporary entries, services or interfaces changed).
    Show {
        /// Version number from `sluice history`.
        version: u64,
    },
    /// How the policy of version A differs from that of version B (default:
    /// the current one): what going from A to B changes.
    Diff { from: u64, to: Option<u64> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
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
    Add(AddArgs),
    /// Remove prefixes, all or none.
    Del(PrefixArgs),
    /// Make the list exactly these prefixes (e.g. a whole list from a
    /// file), in one atomic change: packets see the old list or the new one.
    Replace(PrefixArgs),
    /// Remove every entry, in one atomic change.
    Flush,
    /// List entries with their hit counters.
    List {
        /// Only the entries that cover ADDR (an address or a prefix), most
        /// specific first: the first is the one a packet from ADDR matches.
        #[arg(long, value_name = "ADDR")]
        covering: Option<String>,
    },
}

/// `--covering`: the entries whose prefix holds `q` whole, longest first.
fn print_list(
    out: &output::Out,
    kind: &str,
    mut entries: Vec<crate::api::ListedEntry>,
    covering: Option<&str>,
) -> Result<(), CliError> {
    if let Some(q) = covering {
        let q = policy::parse_prefix_lenient(q)?;
        entries.retain(|e| ipnet::IpNet::contains(&e.prefix, &q));
        entries.sort_by_key(|e| std::cmp::Reverse(e.prefix.prefix_len()));
        if entries.is_empty() && !out.json {
            println!("no {kind} list entry covers {q}");
            return Ok(());
        }
    }
    out.list(kind, &entries);
    Ok(())
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

#[derive(Debug, Args)]
pub struct AddArgs {
    #[command(flatten)]
    pub prefixes: PrefixArgs,
    /// Deny list only: remove the entries again after this long (e.g. 90s,
    /// 10m, 2h, 7d). The agent expires them, so this needs the agent.
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
    /// Why the entries are there (shown by `deny list`); with --ttl.
    #[arg(long, value_name = "TEXT", requires = "ttl")]
    pub reason: Option<String>,
}

/// Seconds of a `--ttl` value: 1s to 365d, whole seconds.
fn ttl_secs(ttl: &str) -> Result<u64, CliError> {
    policy::parse_duration_ms(ttl)
        .filter(|ms| ms % 1000 == 0 && (1_000..=365 * 86_400_000).contains(ms))
        .map(|ms| ms / 1000)
        .ok_or_else(|| CliError::BadTtl {
            ttl: ttl.to_string(),
        })
}

#[derive(Debug, Subcommand)]
pub enum RuleCommand {
    /// Add a rule: ACTION [PROTO] [flags SET[/MASK]] [dport N[-M]] [sport N[-M]] [src CIDR] [dst CIDR].
    ///
    /// ACTION is drop or pass; PROTO is tcp, udp, icmp, icmpv6 or `proto N`.
    /// Examples: `drop udp dport 4444`, `drop icmp`,
    /// `drop tcp dport 1-1023 dst 198.18.0.0/24`, `drop udp sport 53 dport 1024-65535`,
    /// `drop tcp flags syn,fin`.
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
    Engine(#[from] crate::engine::policy::EngineError),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("no prefixes given (pass CIDRs or --file FILE)")]
    NoPrefixes,
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error(transparent)]
    Config(#[from] crate::model::policy::config::ConfigErrors),
    #[error(transparent)]
    Agent(#[from] crate::agent::RunError),
    #[error(
        "`sluice agent` does not take {given}: its pin root, socket and interfaces (with their \
         namespaces) come from the config file ([agent] pin_root, socket; [[interface]] netns), \
         and it logs rather than printing JSON (to run the whole agent inside a namespace: \
         nsenter --net=/run/netns/NAME sluice agent ...)"
    )]
    AgentOptions { given: String },
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(transparent)]
    Flows(#[from] flows::FlowsError),
    #[error(transparent)]
    Top(#[from] top::TopError),
    #[error(transparent)]
    Capture(#[from] capture::CaptureCommandError),
    #[error("invalid --ttl '{ttl}': whole seconds from 1s to 365d, e.g. 90s, 10m, 2h, 7d")]
    BadTtl { ttl: String },
    #[error(transparent)]
    Lb(#[from] lb::LbCliError),
    #[error(transparent)]
    Workload(#[from] workload::WorkloadCliError),
    #[error(transparent)]
    Steer(#[from] steer::SteerCliError),
    #[error(transparent)]
    Explain(#[from] crate::engine::explain::ExplainError),
    #[error("--ttl applies to the deny list only")]
    TtlOnAllow,
    #[error(
        "--ttl needs the agent: it is what removes the entries when their time is up \
         (start `sluice agent`, or add without --ttl)"
    )]
    TtlNeedsAgent,
    #[error(
        "pin root {root} is owned by {owner}: make changes through it (--socket {}), or pass \
         --no-agent to change the pins directly (its next drift check undoes what differs from \
         its desired state)",
        owner.socket.display()
    )]
    Owned {
        root: PathBuf,
        owner: crate::dataplane::lockfile::Owner,
    },
    #[error("reading the pin root's owner lock: {0}")]
    OwnerLock(String),
    #[error(
        "deny {prefix} drops every packet of its family that no allow entry passes; repeat with \
         --force if you really mean it"
    )]
    DenyEverything { prefix: String },
    #[error(
        "--reason must not contain control characters (newlines, escapes) and at most 200 bytes"
    )]
    BadReason,
}

/// `--mode`: the modes, listed in `--help`, parsed by the mode's own names.
fn attach_mode_arg() -> impl clap::builder::TypedValueParser<Value = AttachMode> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(AttachMode::ALL.map(AttachMode::name))
        .try_map(|s| s.parse::<AttachMode>())
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::files::parse_size(s)
        .filter(|n| *n >= 1024)
        .ok_or_else(|| format!("'{s}' is not a size of at least 1024 bytes (e.g. 256MiB)"))
}

/// The desired state the pins hold (no agent): policy, attachments,
/// services (without health checks, which only the agent runs).
fn desired_from_pins(root: &PinRoot) -> Result<policy::Desired, CliError> {
    // One at a time: the policy maps hold the pin root's lock while open,
    // and `status` takes it too.
    let policy = {
        let maps = PolicyMaps::open(root)?;
        crate::engine::policy::pinned_policy(&maps)?
    };
    let interfaces = attach::status(root)?
        .attachments
        .into_iter()
        .map(|a| policy::Interface {
            name: a.interface,
            netns: (a.netns != "host").then_some(a.netns),
            mode: a.mode,
        })
        .collect();
    let services = lb::pinned_services(root)?;
    Ok(policy::Desired {
        interfaces,
        policy,
        temp_deny: std::collections::BTreeMap::new(),
        services,
        // Workloads and steers are kept by the agent only.
        workloads: Vec::new(),
        steers: Vec::new(),
    })
}

fn gather_prefixes(args: &PrefixArgs, limit: u64) -> Result<Vec<IpNet>, CliError> {
    let mut out = Vec::new();
    for p in &args.prefixes {
        out.push(policy::parse_prefix(p)?);
    }
    if let Some(f) = &args.file {
        out.extend(policy::read_prefix_file(f, limit)?);
    }
    if out.is_empty() {
        return Err(CliError::NoPrefixes);
    }
    Ok(out)
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    let out = output::Out { json: cli.json };
    match &cli.command {
        Command::Agent {
            config,
            log_format,
            detach_on_exit,
            drift_interval,
        } => {
            let mut given = Vec::new();
            if let Some(n) = &cli.netns {
                given.push(format!("-n {n}"));
            }
            if cli.json {
                given.push("--json".to_string());
            }
            if cli.pin_root.as_path() != std::path::Path::new(dataplane::DEFAULT_PIN_ROOT) {
                given.push(format!(
                    "--pin-root {} (or SLUICE_PIN_ROOT)",
                    cli.pin_root.display()
                ));
            }
            if cli.socket.as_path()
                != std::path::Path::new(crate::model::policy::config::DEFAULT_SOCKET)
            {
                given.push(format!(
                    "--socket {} (or SLUICE_SOCKET)",
                    cli.socket.display()
                ));
            }
            if !given.is_empty() {
                return Err(CliError::AgentOptions {
                    given: given.join(", "),
                });
            }
            crate::agent::init_logging(*log_format);
            crate::agent::run(&crate::agent::Options {
                config: config.clone(),
                log_format: *log_format,
                detach_on_exit: *detach_on_exit,
                drift_interval: std::time::Duration::from_secs((*drift_interval).max(1)),
            })?;
            return Ok(());
        }
        Command::Check { file } => {
            let text = crate::model::policy::config::read(file, cli.file_size_limit)?;
            let cfg =
                crate::model::policy::config::parse_with(file, &text, Some(cli.file_size_limit))?;
            out.checked(&cfg);
            return Ok(());
        }
        Command::Apply { file } | Command::Diff { file } => {
            let text = crate::model::policy::config::read(file, cli.file_size_limit)?;
            // Check here too, so a bad file is reported even with no agent.
            crate::model::policy::config::parse_with(file, &text, Some(cli.file_size_limit))?;
            let client = client::Client::require(&cli.socket)?.with_force(cli.force);
            let path = std::fs::canonicalize(file).unwrap_or_else(|_| file.clone());
            let body = crate::api::FileBody { path, text };
            if matches!(cli.command, Command::Apply { .. }) {
                let applied: crate::api::Applied =
                    client.call(hyper::Method::POST, "/v1/policy/apply", Some(&body))?;
                out.applied(&format!("applied {}", file.display()), &applied);
            } else {
                let diff: crate::model::policy::PolicyDiff =
                    client.call(hyper::Method::POST, "/v1/policy/diff", Some(&body))?;
                out.diff(&diff);
            }
            return Ok(());
        }
        Command::Rollback { version } => {
            let client = client::Client::require(&cli.socket)?.with_force(cli.force);
            let applied: crate::api::Applied = client.call(
                hyper::Method::POST,
                "/v1/rollback",
                Some(&crate::api::RollbackBody { version: *version }),
            )?;
            out.applied("rolled back", &applied);
            return Ok(());
        }
        Command::History { what } => {
            let client = client::Client::require(&cli.socket)?.with_force(cli.force);
            match what {
                None => {
                    let h: Vec<crate::api::HistoryEntry> =
                        client.call(hyper::Method::GET, "/v1/history", None::<&()>)?;
                    out.history(&h);
                }
                Some(HistoryCommand::Show { version }) => {
                    let v: crate::api::VersionDetail = client.call(
                        hyper::Method::GET,
                        &format!("/v1/history/{version}"),
                        None::<&()>,
                    )?;
                    out.version(&v);
                }
                Some(HistoryCommand::Diff { from, to }) => {
                    let to = to.map(|t| format!("&to={t}")).unwrap_or_default();
                    let d: crate::model::policy::PolicyDiff = client.call(
                        hyper::Method::GET,
                        &format!("/v1/history/diff?from={from}{to}"),
                        None::<&()>,
                    )?;
                    out.diff(&d);
                }
            }
            return Ok(());
        }
        Command::Flows(args) => {
            flows::run(args, &cli.socket, &cli.pin_root, cli.json)?;
            return Ok(());
        }
        Command::Top(args) => {
            top::run(&cli.socket, args, cli.json)?;
            return Ok(());
        }
        _ => {}
    }
    if let Some(ns) = &cli.netns {
        match crate::netns::enter(ns) {
            // A deleted namespace strands its attachments; detaching only
            // needs the name the link was pinned under.
            Err(crate::netns::NetnsError::Missing { .. })
                if matches!(cli.command, Command::Detach { .. }) => {}
            other => other?,
        }
    }
    let root = PinRoot::new(&cli.pin_root);
    // Upgrading is a dataplane operation the agent also does itself on start.
    if !cli.no_agent
        && !matches!(
            cli.command,
            Command::Upgrade { .. } | Command::Capture(_) | Command::Explain { .. }
        )
        && let Some((client, info)) = client::Client::connect(&cli.socket)?
    {
        let client = client.with_force(cli.force);
        if info.pin_root == cli.pin_root {
            via_agent(&client, &cli, &out)?;
            if !cli.json {
                eprintln!("(through the agent at {})", cli.socket.display());
            }
            return Ok(());
        }
    }
    let label = crate::netns::label(cli.netns.as_deref());
    let changes = matches!(
        cli.command,
        Command::Attach { .. }
            | Command::Detach { .. }
            | Command::Default { .. }
            | Command::Malformed { .. }
            | Command::Audit { .. }
            | Command::Deny(ListArgs {
                action: ListCommand::Add(_)
                    | ListCommand::Del(_)
                    | ListCommand::Replace(_)
                    | ListCommand::Flush
            })
            | Command::Allow(ListArgs {
                action: ListCommand::Add(_)
                    | ListCommand::Del(_)
                    | ListCommand::Replace(_)
                    | ListCommand::Flush
            })
            | Command::Rule {
                action: RuleCommand::Add { .. } | RuleCommand::Del { .. }
            }
            | Command::Lb(lb::LbArgs {
                command: lb::LbCommand::Service { .. } | lb::LbCommand::Backend { .. }
            })
    );
    if changes && !cli.no_agent {
        // An agent owns this pin root but is not the one at --socket (or
        // does not answer): changing the pins behind its back would be
        // undone at its next drift check, or fight it.
        if let Some(owner) = crate::dataplane::lockfile::owner_of(&cli.pin_root)
            .map_err(|e| CliError::OwnerLock(e.to_string()))?
        {
            return Err(CliError::Owned {
                root: cli.pin_root.clone(),
                owner,
            });
        }
    }
    let limit = cli.file_size_limit;
    let force = cli.force;
    match cli.command {
        Command::Attach { iface, mode } => {
            let report = attach::attach(&root, &iface, mode, &label)?;
            out.attach(&report);
        }
        Command::Detach { iface } => {
            let report = attach::detach(&root, &iface, &label)?;
            out.detach(&report);
        }
        Command::Status => out.status(&crate::engine::status(&root)?),
        Command::Export => {
            let desired = desired_from_pins(&root)?;
            out.export(
                &desired,
                &format!(
                    "sluice export: what the pins at {} hold (no agent), {}\n\
                     `sluice check` and `sluice apply` take this file; services carry no health checks (those live in the agent)",
                    root.root.display(),
                    output::format_time(crate::api::time::unix_now())
                ),
            );
        }
        Command::Capture(args) => capture::run(&root, &args, &label, cli.json)?,
        Command::Upgrade { force } => out.upgrade(&attach::upgrade(&root, force)?),
        Command::Explain { interface, words } => {
            let d = crate::model::explain::Described::parse(&words)?;
            out.explain(&crate::engine::explain::explain(
                &root,
                &d,
                interface.as_deref(),
                &label,
            )?);
        }
        Command::Stats { reset: true, .. } => {
            let mut maps = PolicyMaps::open(&root)?;
            out.stats_reset(&stats::reset(&mut maps, crate::api::time::unix_now_ns())?);
        }
        Command::Stats { top, .. } => {
            let maps = PolicyMaps::open(&root)?;
            out.stats(&stats::collect(&maps, top)?);
        }
        Command::Lb(args) => lb::direct(&root, &args, &out)?,
        Command::Workload(args) => workload::direct(&args)?,
        Command::Steer(args) => steer::direct(&args)?,
        Command::Deny(args) => list_command(&root, false, args, limit, force, &out)?,
        Command::Allow(args) => list_command(&root, true, args, limit, force, &out)?,
        Command::Rule { action } => rule_command(&root, action, &out)?,
        Command::Default { action } => {
            let w = Pinned::open(&root)?.apply(&[Op::Default {
                action: Verdict::from(action).into(),
            }])?;
            out.done(
                &format!("default action: {}", Verdict::from(action).name()),
                &w.report,
            );
        }
        Command::Audit { state } => {
            let on = state == OnOff::On;
            let w = Pinned::open(&root)?.apply(&[Op::Audit { on }])?;
            out.done(
                &format!("audit mode: {}", if on { "on" } else { "off" }),
                &w.report,
            );
        }
        Command::Malformed { action } => {
            let w = Pinned::open(&root)?.apply(&[Op::Malformed {
                action: Verdict::from(action).into(),
            }])?;
            out.done(
                &format!("malformed-frame action: {}", Verdict::from(action).name()),
                &w.report,
            );
        }
        Command::Agent { .. }
        | Command::Check { .. }
        | Command::Apply { .. }
        | Command::Diff { .. }
        | Command::Rollback { .. }
        | Command::History { .. }
        | Command::Flows(_)
        | Command::Top(_) => {
            unreachable!("handled above")
        }
    }
    if changes && !cli.json && cli.socket.exists() && !cli.no_agent {
        eprintln!(
            "(no agent answering for this pin root at {}: changed the pins directly)",
            cli.socket.display()
        );
    }
    Ok(())
}

/// The same commands, carried out by the agent so its desired state (and
/// history) records them.
fn via_agent(client: &client::Client, cli: &Cli, out: &output::Out) -> Result<(), CliError> {
    use crate::{api, api::Applied};
    use hyper::Method;
    match &cli.command {
        Command::Attach { iface, mode } => {
            let a: Applied = client.call(
                Method::POST,
                "/v1/interfaces/attach",
                Some(&crate::model::policy::Interface {
                    name: iface.clone(),
                    netns: cli.netns.clone(),
                    mode: *mode,
                }),
            )?;
            out.applied(
                &format!(
                    "attached {iface} (netns {})",
                    cli.netns.as_deref().unwrap_or("host")
                ),
                &a,
            );
        }
        Command::Detach { iface } => {
            let a: Applied = client.call(
                Method::POST,
                "/v1/interfaces/detach",
                Some(&api::DetachBody {
                    name: iface.clone(),
                    netns: cli.netns.clone(),
                }),
            )?;
            out.applied(
                &format!(
                    "detached {iface} (netns {})",
                    cli.netns.as_deref().unwrap_or("host")
                ),
                &a,
            );
        }
        Command::Status => out.status(&client.call(Method::GET, "/v1/status", None::<&()>)?),
        Command::Export => {
            let d: api::DesiredBody = client.call(Method::GET, "/v1/policy", None::<&()>)?;
            out.export(
                &d.desired,
                &format!(
                    "sluice export: the agent's desired state, version {}, {}\n\
                     `sluice check` and `sluice apply` take this file; temporary deny entries are left out",
                    d.version,
                    output::format_time(crate::api::time::unix_now())
                ),
            );
        }
        Command::Lb(args) => lb::via_agent(client, args, out)?,
        Command::Workload(args) => workload::via_agent(client, args, out)?,
        Command::Steer(args) => steer::via_agent(client, args, out)?,
        Command::Stats { reset: true, .. } => {
            out.stats_reset(&client.call(Method::POST, "/v1/stats/reset", None::<&()>)?);
        }
        Command::Stats { top, .. } => {
            out.stats(&client.call(Method::GET, &format!("/v1/stats?top={top}"), None::<&()>)?)
        }
        Command::Deny(args) | Command::Allow(args) => {
            let kind = if matches!(cli.command, Command::Allow(_)) {
                "allow"
            } else {
                "deny"
            };
            let send = |verb: &str, prefixes: Vec<IpNet>| -> Result<Applied, CliError> {
                Ok(client.call(
                    Method::POST,
                    &format!("/v1/lists/{kind}/{verb}"),
                    Some(&api::PrefixesBody {
                        prefixes,
                        ttl_secs: None,
                        reason: None,
                    }),
                )?)
            };
            match &args.action {
                ListCommand::Add(AddArgs {
                    prefixes: p,
                    ttl,
                    reason,
                }) => {
                    let ttl_secs = ttl.as_deref().map(ttl_secs).transpose()?;
                    if reason
                        .as_deref()
                        .is_some_and(|r| r.len() > 200 || r.chars().any(char::is_control))
                    {
                        return Err(CliError::BadReason);
                    }
                    if ttl_secs.is_some() && kind == "allow" {
                        return Err(CliError::TtlOnAllow);
                    }
                    let prefixes = gather_prefixes(p, cli.file_size_limit)?;
                    let n = prefixes.len();
                    let a: Applied = client.call(
                        Method::POST,
                        &format!("/v1/lists/{kind}/add"),
                        Some(&api::PrefixesBody {
                            prefixes,
                            ttl_secs,
                            reason: reason.clone(),
                        }),
                    )?;
                    out.applied(&format!("{kind} add: {n} prefix(es)"), &a);
                }
                ListCommand::Del(p) => {
                    let prefixes = gather_prefixes(p, cli.file_size_limit)?;
                    let n = prefixes.len();
                    let a = send("del", prefixes)?;
                    out.applied(&format!("{kind} del: {n} prefix(es)"), &a);
                }
                ListCommand::Replace(p) => {
                    let prefixes = gather_prefixes(p, cli.file_size_limit)?;
                    let n = prefixes.len();
                    let a = send("replace", prefixes)?;
                    out.applied(
                        &format!(
                            "{kind} replace: {n} prefix(es), {} added, {} removed",
                            a.diff.deny_add.len() + a.diff.allow_add.len(),
                            a.diff.deny_del.len() + a.diff.allow_del.len()
                        ),
                        &a,
                    );
                }
                ListCommand::Flush => {
                    let a = send("flush", Vec::new())?;
                    out.applied(
                        &format!(
                            "{kind} flush: {} removed",
                            a.diff.deny_del.len() + a.diff.allow_del.len()
                        ),
                        &a,
                    );
                }
                ListCommand::List { covering } => {
                    if let Some(q) = covering {
                        // Checked before asking the agent.
                        policy::parse_prefix_lenient(q)?;
                    }
                    let l: api::ListBody =
                        client.call(Method::GET, &format!("/v1/lists/{kind}"), None::<&()>)?;
                    print_list(out, kind, l.entries, covering.as_deref())?;
                }
            }
        }
        Command::Rule { action } => match action {
            RuleCommand::Add { at, words } => {
                let rule = RuleSpec::parse(words)?;
                let r: api::RuleAdded = client.call(
                    Method::POST,
                    "/v1/rules",
                    Some(&api::RuleAddBody {
                        rule: rule.clone(),
                        at: *at,
                    }),
                )?;
                if out.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&r).expect("serialisable")
                    );
                } else {
                    out.applied(
                        &format!(
                            "rule {} added at position {}: {rule}",
                            r.rule_id, r.position
                        ),
                        &r.applied,
                    );
                }
            }
            RuleCommand::Del { ids } => {
                let a: Applied = client.call(
                    Method::POST,
                    "/v1/rules/delete",
                    Some(&api::RuleDelBody { ids: ids.clone() }),
                )?;
                let list: Vec<String> = ids.iter().map(u32::to_string).collect();
                out.applied(&format!("rule {} deleted", list.join(", ")), &a);
            }
            RuleCommand::List => {
                let r: api::RulesBody = client.call(Method::GET, "/v1/rules", None::<&()>)?;
                out.rules(&r.rules);
            }
        },
        Command::Audit { state } => {
            let on = *state == OnOff::On;
            let body = api::SettingsBody {
                default: None,
                malformed: None,
                audit: Some(on),
            };
            let applied: Applied = client.call(Method::PUT, "/v1/settings", Some(&body))?;
            out.applied(
                &format!("audit mode: {}", if on { "on" } else { "off" }),
                &applied,
            );
        }
        Command::Default { action } | Command::Malformed { action } => {
            let a = crate::model::policy::Action::from(Verdict::from(*action));
            let body = if matches!(cli.command, Command::Default { .. }) {
                api::SettingsBody {
                    default: Some(a),
                    malformed: None,
                    audit: None,
                }
            } else {
                api::SettingsBody {
                    default: None,
                    malformed: Some(a),
                    audit: None,
                }
            };
            let what = if body.default.is_some() {
                "default action"
            } else {
                "malformed-frame action"
            };
            let applied: Applied = client.call(Method::PUT, "/v1/settings", Some(&body))?;
            out.applied(&format!("{what}: {a}"), &applied);
        }
        Command::Agent { .. }
        | Command::Check { .. }
        | Command::Apply { .. }
        | Command::Diff { .. }
        | Command::Rollback { .. }
        | Command::History { .. }
        | Command::Upgrade { .. }
        | Command::Explain { .. }
        | Command::Capture(_)
        | Command::Flows(_)
        | Command::Top(_) => {}
    }
    Ok(())
}

fn list_command(
    root: &PinRoot,
    allow: bool,
    args: ListArgs,
    limit: u64,
    force: bool,
    out: &output::Out,
) -> Result<(), CliError> {
    let kind = if allow { "allow" } else { "deny" };
    let refuse_everything = |nets: &[IpNet]| {
        if !allow
            && !force
            && let Some(n) = nets.iter().find(|n| n.prefix_len() == 0)
        {
            return Err(CliError::DenyEverything {
                prefix: n.to_string(),
            });
        }
        Ok(())
    };
    let counts = |w: &Written| {
        if allow {
            (w.delta.allow_add.len(), w.delta.allow_del.len())
        } else {
            (w.delta.deny_add.len(), w.delta.deny_del.len())
        }
    };
    match args.action {
        ListCommand::Add(AddArgs {
            prefixes: p, ttl, ..
        }) => {
            if let Some(t) = &ttl {
                ttl_secs(t)?;
                if allow {
                    return Err(CliError::TtlOnAllow);
                }
                return Err(CliError::TtlNeedsAgent);
            }
            let nets = gather_prefixes(&p, limit)?;
            refuse_everything(&nets)?;
            let asked = nets.iter().collect::<std::collections::BTreeSet<_>>().len();
            let w = Pinned::open(root)?.apply(&[Op::ListAdd {
                allow,
                prefixes: nets,
            }])?;
            let (added, _) = counts(&w);
            out.done(
                &format!(
                    "{kind} list: {added} added, {} already present",
                    asked - added
                ),
                &w.report,
            );
        }
        ListCommand::Del(p) => {
            let nets = gather_prefixes(&p, limit)?;
            let w = Pinned::open(root)?.apply(&[Op::ListDel {
                allow,
                prefixes: nets,
            }])?;
            let (_, deleted) = counts(&w);
            out.done(&format!("{kind} list: {deleted} removed"), &w.report);
        }
        ListCommand::Replace(_) | ListCommand::Flush => {
            let new: std::collections::BTreeSet<IpNet> = match &args.action {
                ListCommand::Replace(p) => gather_prefixes(p, limit)?.into_iter().collect(),
                _ => std::collections::BTreeSet::new(),
            };
            refuse_everything(&new.iter().copied().collect::<Vec<_>>())?;
            let pinned = Pinned::open(root)?;
            let current = if allow {
                &pinned.policy.allow
            } else {
                &pinned.policy.deny
            };
            let kept = current.intersection(&new).count();
            let ops = Op::list_edit(
                allow,
                current.difference(&new).copied().collect(),
                new.difference(current).copied().collect(),
            );
            let w = pinned.apply(&ops)?;
            let (added, deleted) = counts(&w);
            let what = if matches!(args.action, ListCommand::Flush) {
                "flushed"
            } else {
                "replaced"
            };
            out.done(
                &format!("{kind} list {what}: {added} added, {deleted} removed, {kept} kept"),
                &w.report,
            );
        }
        ListCommand::List { covering } => {
            if let Some(q) = &covering {
                policy::parse_prefix_lenient(q)?;
            }
            let maps = PolicyMaps::open(root)?;
            let (v4, v6) = if allow {
                (ListId::AllowV4, ListId::AllowV6)
            } else {
                (ListId::DenyV4, ListId::DenyV6)
            };
            let mut entries = maps.list_entries(v4)?;
            entries.extend(maps.list_entries(v6)?);
            let entries = entries.into_iter().map(Into::into).collect();
            print_list(out, kind, entries, covering.as_deref())?;
        }
    }
    Ok(())
}

fn rule_command(root: &PinRoot, action: RuleCommand, out: &output::Out) -> Result<(), CliError> {
    match action {
        RuleCommand::Add { at, words } => {
            let spec = RuleSpec::parse(&words)?;
            let pinned = Pinned::open(root)?;
            let pos = at.unwrap_or(pinned.policy.rules.len());
            if pos > pinned.policy.rules.len() {
                return Err(dataplane::DataplaneError::BadPosition {
                    at: pos,
                    len: pinned.policy.rules.len(),
                }
                .into());
            }
            let w = pinned.apply(&[Op::RuleAdd {
                at,
                rule: spec.clone(),
            }])?;
            let id = w.report.new_rule_ids.first().copied().unwrap_or(0);
            out.done(
                &format!("rule {id} added at position {pos}: {spec}"),
                &w.report,
            );
        }
        RuleCommand::Del { ids } => {
            let pinned = Pinned::open(root)?;
            let mut ops = Vec::new();
            for id in &ids {
                let Some(r) = pinned.rules.iter().find(|r| r.rule.id == *id) else {
                    return Err(dataplane::DataplaneError::NoSuchRule { id: *id }.into());
                };
                ops.push(Op::RuleDel {
                    rule: RuleSpec::from_rule(&r.rule),
                });
            }
            let w = pinned.apply(&ops)?;
            let list: Vec<String> = ids.iter().map(u32::to_string).collect();
            out.done(&format!("rule {} deleted", list.join(", ")), &w.report);
        }
        RuleCommand::List => {
            let maps = PolicyMaps::open(root)?;
            out.rules(
                &maps
                    .rules()?
                    .iter()
                    .map(crate::engine::policy::rule_row)
                    .collect::<Vec<_>>(),
            );
        }
    }
    Ok(())
}
