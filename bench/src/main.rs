//! sluice-bench: sluice's benchmark suite (`make bench`).
//!
//! Sections: 1. per-packet cost of sluice's XDP program against a minimal
//! reference lookup (BPF_PROG_TEST_RUN); 2. live drop rate against iptables,
//! ipset and nftables; 3. rule scale and update time; 4. control-plane
//! latency and the agent; 5. per-packet cost of the DDoS stage; 6. the load
//! balancer (per-packet cost, live forwarding, Maglev table updates); 7. what
//! a workload's socket programs cost a connect().
//!
//! Prints a table per section, writes OUT/results.json, and on a full run
//! docs/benchmarks.md. Needs root. Everything it creates (network
//! namespaces, veth pairs, firewall state inside them, bpffs pins) is
//! removed on exit, on error, on panic and on SIGINT/SIGTERM.

mod ethtool;
mod frames;
mod live;
mod machine;
mod netns;
mod pktgen;
mod prefixes;
mod progs;
mod receivers;
mod report;
mod s1_per_packet;
mod s2_live;
mod s3_scale;
mod s4_control;
mod s5_ddos;
mod s6_lb;
mod s6_lb_live;
mod s7_sock;
mod s8_socklb;
mod stats;
mod util;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    /// 1. per-packet cost (BPF_PROG_TEST_RUN)
    PerPacket,
    /// 2. live drop rate
    Live,
    /// 3. rule scale and update time
    Scale,
    /// 4. control plane
    Control,
    /// 5. DDoS stage cost
    Ddos,
    /// 6. load balancer
    Lb,
    /// 7. socket layer (connect() cost)
    Sock,
    /// 8. socket LB (connect() through the socket LB, the packet LB, directly)
    Socklb,
}

/// sluice's benchmarks: per-packet cost, live drop rate, rule scale,
/// control plane. Needs root.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Tiny sizes and short runs (seconds): checks the suite works; never
    /// writes docs/benchmarks.md.
    #[arg(long)]
    smoke: bool,
    /// Where results.json goes.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Runs per measurement (medians and spread are over these). Default 5,
    /// 1 with --smoke.
    #[arg(long)]
    runs: Option<usize>,
    /// Run one section only (does not write docs/benchmarks.md).
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Only the live/scale receivers whose name contains this (e.g.
    /// `sluice`, `iptables-nft`); for investigating one tool.
    #[arg(long)]
    filter: Option<String>,
    /// List sizes of the rule-scale section (comma-separated).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Generator threads per CPU for the live floods.
    #[arg(long, default_value_t = 2)]
    gen_per_cpu: usize,
    /// Measure nothing: print the tables of an earlier results.json and
    /// write its Markdown page (to --docs).
    #[arg(long, value_name = "RESULTS_JSON")]
    render: Option<PathBuf>,
    /// Where a full run writes the Markdown page.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/benchmarks.md"))]
    docs: PathBuf,
}

/// Sizes, durations and counts of one invocation.
pub struct Plan {
    pub smoke: bool,
    pub runs: usize,
    pub pp_sizes: Vec<usize>,
    pub pp_repeat: u32,
    pub gen_threads: usize,
    pub queues: u32,
    pub live_warmup: Duration,
    pub live_window: Duration,
    pub live_drain: Duration,
    pub ipt_many: usize,
    pub scale_sizes: Vec<usize>,
    /// Runs for lists of 1,000,000 and more (capped; each load takes seconds).
    pub big_runs: usize,
    pub restore_timeout: Duration,
    /// Longest a rule-counter listing may take (huge iptables/nft sets).
    pub counter_timeout: Duration,
    /// Longest one incremental change may take.
    pub change_timeout: Duration,
    pub incr_samples: usize,
    pub incr_budget: Duration,
    pub cp_list: usize,
    pub cp_one_samples: usize,
    pub cp_swap_samples: usize,
    pub cp_cli_samples: usize,
    /// Prefixes in the agent's deny list for its memory and re-adopt rows.
    pub agent_list: usize,
    pub agent_timeout: Duration,
    pub filter: Option<String>,
}

impl Plan {
    /// Whether a receiver is selected by `--filter`.
    pub fn wants(&self, key: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| key.contains(f.as_str()))
    }

    fn new(smoke: bool, runs: Option<usize>, filter: Option<String>, gen_per_cpu: usize) -> Self {
        let cpus = live::available_cpus().len().max(1);
        let base = Self {
            smoke,
            runs: runs.unwrap_or(if smoke { 1 } else { 5 }).max(1),
            pp_sizes: vec![1, 10_000, 1_000_000],
            pp_repeat: 1_000_000,
            // Two per CPU: while one sits in a call's set-up, the other sends.
            gen_threads: gen_per_cpu.max(1) * cpus,
            queues: cpus as u32,
            live_warmup: Duration::from_millis(200),
            live_window: Duration::from_secs(1),
            live_drain: Duration::from_secs(10),
            ipt_many: 10_000,
            scale_sizes: vec![1_000, 100_000, 1_000_000],
            big_runs: 2,
            restore_timeout: Duration::from_secs(60),
            counter_timeout: Duration::from_secs(10),
            change_timeout: Duration::from_secs(30),
            incr_samples: 10,
            incr_budget: Duration::from_secs(10),
            cp_list: 10_000,
            cp_one_samples: 200,
            cp_swap_samples: 10,
            cp_cli_samples: 20,
            agent_list: 1_000_000,
            agent_timeout: Duration::from_secs(180),
            filter,
        };
        if !smoke {
            return base;
        }
        Self {
            pp_sizes: vec![1, 100],
            pp_repeat: 10_000,
            live_warmup: Duration::from_millis(50),
            live_window: Duration::from_millis(300),
            live_drain: Duration::from_secs(3),
            ipt_many: 10,
            scale_sizes: vec![100],
            restore_timeout: Duration::from_secs(20),
            change_timeout: Duration::from_secs(20),
            incr_samples: 2,
            incr_budget: Duration::from_secs(2),
            cp_list: 100,
            cp_one_samples: 20,
            cp_swap_samples: 2,
            cp_cli_samples: 2,
            agent_list: 100,
            agent_timeout: Duration::from_secs(30),
            ..base
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sluice-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    if let Some(path) = &args.render {
        let text = std::fs::read_to_string(path)?;
        let results: report::Results = serde_json::from_str(&text)?;
        for sec in &results.sections {
            report::print_section(sec);
        }
        std::fs::write(&args.docs, report::markdown(&results))?;
        println!("wrote {}", args.docs.display());
        return Ok(true);
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("needs root (network namespaces, XDP, bpffs)");
    }
    util::install_signal_handlers();
    netns::sweep_stale();
    let mut plan = Plan::new(args.smoke, args.runs, args.filter.clone(), args.gen_per_cpu);
    if let Some(sizes) = &args.sizes {
        plan.scale_sizes.clone_from(sizes);
    }
    let started = Instant::now();
    let mut machine = machine::Machine::collect();
    println!(
        "sluice-bench{}: {} runs per measurement, {} ({} cores), kernel {}, load {}",
        if plan.smoke { " --smoke" } else { "" },
        plan.runs,
        machine.cpu_model,
        machine.cores,
        machine.kernel,
        machine.loadavg_start
    );
    type SectionFn = fn(&Plan) -> Result<stats::Section>;
    let sections: [(Only, &str, SectionFn); 8] = [
        (Only::PerPacket, "per-packet cost", s1_per_packet::run),
        (Only::Live, "live drop rate", s2_live::run),
        (Only::Scale, "rule scale and update time", s3_scale::run),
        (Only::Control, "control plane", s4_control::run),
        (Only::Ddos, "DDoS stage cost", s5_ddos::run),
        (Only::Lb, "load balancer", s6_lb_live::lb_section),
        (Only::Sock, "socket layer", s7_sock::run),
        (Only::Socklb, "socket LB", s8_socklb::run),
    ];
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for (which, name, f) in sections {
        if args.only.is_some_and(|o| o != which) {
            continue;
        }
        if util::stopping() {
            errors.push(format!("{name}: interrupted"));
            break;
        }
        eprintln!("== {name}");
        let t0 = Instant::now();
        // A panic in a section unwinds through its guards (cleanup) and is
        // reported like an error.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&plan))) {
            Ok(Ok(mut sec)) => {
                sec.seconds = t0.elapsed().as_secs_f64();
                report::print_section(&sec);
                done.push(sec);
            }
            Ok(Err(e)) => {
                eprintln!("{name}: {e:#}");
                errors.push(format!("{name}: {e:#}"));
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                eprintln!("{name}: panicked: {msg}");
                errors.push(format!("{name}: panicked: {msg}"));
            }
        }
    }
    machine.finish();
    let results = report::Results {
        suite: "sluice-bench".into(),
        smoke: plan.smoke,
        runs: plan.runs,
        machine,
        sections: done,
        errors,
        seconds: started.elapsed().as_secs_f64(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    report::write_json(&results, &args.out)?;
    println!("\nwrote {}", args.out.join("results.json").display());
    if !plan.smoke
        && args.only.is_none()
        && args.filter.is_none()
        && args.sizes.is_none()
        && !util::stopping()
    {
        std::fs::write(&args.docs, report::markdown(&results))?;
        println!("wrote {}", args.docs.display());
    }
    let measured_errors = results
        .sections
        .iter()
        .flat_map(|s| &s.measurements)
        .filter(|m| m.status.starts_with("error"))
        .count();
    println!("done in {:.0} s", results.seconds);
    Ok(results.errors.is_empty() && measured_errors == 0)
}
