//! Section 4: control plane. How long a policy change takes to be in force:
//! a one-entry change and a whole-policy swap through PolicyMaps::commit
//! (the generation protocol the CLI uses), and one `sluice deny add` run
//! end to end as a process.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use ipnet::{IpNet, Ipv4Net};

use sluice::{
    dataplane::{Change, PolicyMaps, sandbox::Sandbox},
    model::policy::RuleSpec,
};
use sluice_common::{ListId, Verdict};

use crate::{
    Plan,
    prefixes::{self, DenyList},
    stats::{Measurement, Section, percentile},
    util,
};

pub fn method(plan: &Plan) -> String {
    format!(
        "A sluice Sandbox (the real program and maps, private pins) holds a policy of {n} IPv4 + {n} IPv6 deny prefixes and \
         {r} L4 rules. One-entry change: PolicyMaps::commit adding one /32 (then removing it), timed from the call to its \
         return, i.e. until the generation flip made it visible to packets and both generations agree again; {k} adds and {k} \
         removes per run. Whole-policy swap: one commit replacing every prefix ({n}+{n} removed, {n}+{n} others added), all \
         rules and the default action, {s} swaps per run (alternating between two policies). CLI: `sluice --pin-root ROOT [--no-agent] \
         deny add PREFIX` (and `deny del`) run as a process on the same pins, {c} pairs per run: process start, opening the pinned \
         maps, the commit, exit. p50/p99 are computed within each run; the table shows their median over {runs} runs with \
         min/max over runs.",
        n = plan.cp_list,
        r = RULES.len(),
        k = plan.cp_one_samples,
        s = plan.cp_swap_samples,
        c = plan.cp_cli_samples,
        runs = plan.runs,
    )
}

const RULES: [&str; 8] = [
    "drop tcp dport 23",
    "drop tcp dport 135-139",
    "drop udp dport 1900",
    "drop tcp dport 445 src 198.18.64.0/18",
    "pass tcp dport 22 src 198.18.1.0/24",
    "drop udp dport 11211",
    "drop tcp dport 3389",
    "drop icmp dst 198.19.9.0/24",
];

fn rules(offset: usize) -> Result<Vec<sluice_common::Rule>> {
    RULES
        .iter()
        .cycle()
        .skip(offset)
        .take(RULES.len())
        .map(|r| {
            let words: Vec<String> = r.split_whitespace().map(String::from).collect();
            let mut rule = RuleSpec::parse(&words)
                .map_err(|e| anyhow!("rule {r}: {e}"))?
                .to_rule();
            rule.stats_slot = sluice_common::UNASSIGNED_SLOT;
            Ok(rule)
        })
        .collect()
}

/// A second policy: other filler, other rule order, default drop.
fn other_list(n: usize) -> DenyList {
    let mut v4 = vec![prefixes::hit_v4()];
    v4.extend(prefixes::filler_v4(n.saturating_sub(1), 0xb0b0_0004, &[]));
    let mut v6 = vec![prefixes::hit_v6()];
    v6.extend(prefixes::filler_v6(n.saturating_sub(1), 0xb0b0_0006));
    DenyList { v4, v6 }
}

/// The i-th prefix added one at a time: inside [`prefixes::extra_space`].
fn one(i: usize) -> IpNet {
    let i = i as u32;
    IpNet::V4(
        Ipv4Net::new(
            std::net::Ipv4Addr::new(198, 19, 128 + ((i >> 8) & 0x7f) as u8, (i & 0xff) as u8),
            32,
        )
        .expect("valid"),
    )
}

fn timed(maps: &mut PolicyMaps, change: Change) -> Result<f64> {
    let t0 = Instant::now();
    maps.commit(change).map_err(|e| anyhow!("commit: {e}"))?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// The `sluice` CLI built with this binary (same target directory).
fn sluice_cli() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("sluice"), dir.join("../sluice")]
        .into_iter()
        .find(|p| p.is_file())
}

#[derive(Default)]
struct PerRun {
    p50: Vec<f64>,
    p99: Vec<f64>,
    all: Vec<f64>,
}

impl PerRun {
    fn add(&mut self, samples: &[f64]) {
        if samples.is_empty() {
            return;
        }
        self.p50.push(percentile(samples, 50.0));
        self.p99.push(percentile(samples, 99.0));
        self.all.extend_from_slice(samples);
    }
}

pub fn run(plan: &Plan) -> Result<Section> {
    let mut sec = Section::new("control", "4. Control plane", &method(plan));
    let sandbox = Sandbox::new().map_err(|e| anyhow!("sluice sandbox: {e}"))?;
    let a = DenyList::new(plan.cp_list);
    let b = other_list(plan.cp_list);
    let (a_entries, b_entries) = (a.entries(), b.entries());
    let common: std::collections::HashSet<IpNet> = {
        let in_a: std::collections::HashSet<IpNet> = a_entries.iter().map(|e| e.1).collect();
        b_entries
            .iter()
            .map(|e| e.1)
            .filter(|p| in_a.contains(p))
            .collect()
    };
    let mut maps = sandbox.policy().map_err(|e| anyhow!("policy maps: {e}"))?;
    maps.commit(Change {
        add: a_entries.clone(),
        rules: Some(rules(0)?),
        ..Change::default()
    })
    .map_err(|e| anyhow!("initial policy: {e}"))?;
    let mut add = PerRun::default();
    let mut del = PerRun::default();
    let mut swap = PerRun::default();
    let mut cli = PerRun::default();
    let cli_path = sluice_cli();
    let mut cli_note = None;
    let mut on_a = true;
    for _run in 0..plan.runs {
        util::check_stop()?;
        let (mut adds, mut dels) = (Vec::new(), Vec::new());
        for i in 0..plan.cp_one_samples {
            let p = one(i);
            let l = ListId::DenyV4;
            adds.push(timed(
                &mut maps,
                Change {
                    add: vec![(l, p)],
                    ..Change::default()
                },
            )?);
            dels.push(timed(
                &mut maps,
                Change {
                    del: vec![(l, p)],
                    ..Change::default()
                },
            )?);
        }
        add.add(&adds);
        del.add(&dels);
        let mut swaps = Vec::new();
        for _ in 0..plan.cp_swap_samples {
            util::check_stop()?;
            let (from, to, rules_off, default) = if on_a {
                (&a_entries, &b_entries, 3, Verdict::Drop)
            } else {
                (&b_entries, &a_entries, 0, Verdict::Pass)
            };
            // Prefixes both policies hold stay (removing and adding one in
            // the same change would remove it).
            let change = Change {
                del: from
                    .iter()
                    .filter(|(_, p)| !common.contains(p))
                    .copied()
                    .collect(),
                add: to
                    .iter()
                    .filter(|(_, p)| !common.contains(p))
                    .copied()
                    .collect(),
                rules: Some(rules(rules_off)?),
                default_action: Some(default),
                ..Change::default()
            };
            swaps.push(timed(&mut maps, change)?);
            on_a = !on_a;
        }
        swap.add(&swaps);
        // The CLI takes the root's lock itself: release ours meanwhile.
        drop(maps);
        if let Some(path) = &cli_path {
            let root = sandbox.root().root.to_string_lossy().into_owned();
            // Straight to the pins even if some agent serves the default socket.
            let no_agent = util::run_timed(
                &[path.as_os_str(), "--help".as_ref()],
                None,
                Duration::from_secs(10),
            )
            .is_ok_and(|f| f.stdout().contains("--no-agent"));
            let mut times = Vec::new();
            for i in 0..plan.cp_cli_samples {
                util::check_stop()?;
                let p = one(1000 + i).to_string();
                for verb in ["add", "del"] {
                    let mut argv = vec![path.to_string_lossy().into_owned()];
                    argv.extend(["--pin-root".into(), root.clone()]);
                    if no_agent {
                        argv.push("--no-agent".into());
                    }
                    argv.extend(["deny".into(), verb.into(), p.clone()]);
                    let f = util::run_timed(&argv, None, Duration::from_secs(30))?;
                    if !f.ok() {
                        cli_note = Some(format!(
                            "`sluice deny {verb}` failed: {}",
                            f.stderr().trim()
                        ));
                        break;
                    }
                    if verb == "add" {
                        times.push(f.elapsed.as_secs_f64() * 1e3);
                    }
                }
                if cli_note.is_some() {
                    break;
                }
            }
            cli.add(&times);
        }
        maps = sandbox.policy().map_err(|e| anyhow!("policy maps: {e}"))?;
    }
    drop(maps);

    let mut push = |id: &str, label: &str, samples: Vec<f64>, how: &str| {
        let m = Measurement::from_samples(id, label, "ms", samples, how)
            .param("list_size", plan.cp_list);
        sec.push(m);
    };
    let lib = "PolicyMaps::commit, in process";
    push(
        "one-entry-add/p50",
        "one-entry change (add), p50",
        add.p50,
        lib,
    );
    push(
        "one-entry-add/p99",
        "one-entry change (add), p99",
        add.p99,
        lib,
    );
    push(
        "one-entry-del/p50",
        "one-entry change (remove), p50",
        del.p50,
        lib,
    );
    push(
        "one-entry-del/p99",
        "one-entry change (remove), p99",
        del.p99,
        lib,
    );
    push("swap/p50", "whole-policy swap, p50", swap.p50, lib);
    push("swap/p99", "whole-policy swap, p99", swap.p99, lib);
    let cli_how = "`sluice --pin-root ROOT deny add PREFIX` as a process, wall time";
    match (&cli_path, &cli_note) {
        (Some(_), None) => {
            push(
                "cli-one-entry/p50",
                "CLI `sluice deny add`, p50",
                cli.p50,
                cli_how,
            );
            push(
                "cli-one-entry/p99",
                "CLI `sluice deny add`, p99",
                cli.p99,
                cli_how,
            );
        }
        (None, _) => {
            for (id, label) in [
                ("cli-one-entry/p50", "CLI `sluice deny add`, p50"),
                ("cli-one-entry/p99", "CLI `sluice deny add`, p99"),
            ] {
                sec.push(Measurement::not_measured(
                    id,
                    label,
                    "ms",
                    "the sluice binary is not next to sluice-bench (build the workspace)",
                    cli_how,
                ));
            }
        }
        (Some(_), Some(e)) => {
            for (id, label) in [
                ("cli-one-entry/p50", "CLI `sluice deny add`, p50"),
                ("cli-one-entry/p99", "CLI `sluice deny add`, p99"),
            ] {
                sec.push(Measurement::error(id, label, "ms", e, cli_how));
            }
        }
    }
    agent_rows(plan, &mut sec, cli_path.as_deref());
    Ok(sec)
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `sluice agent`, stopped (SIGTERM, then SIGKILL) on drop.
struct Agent {
    child: std::process::Child,
    log: PathBuf,
}

impl Agent {
    fn start(bin: &Path, config: &Path, log: &Path) -> Result<Self> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(bin)
            .args(["agent", "--config"])
            .arg(config)
            .env("SLUICE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    /// Waits until the log has a new `agent ready` line (after `from` bytes).
    fn wait_ready(&mut self, from: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.get(from..).is_some_and(|t| t.contains("agent ready")) {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "the agent exited ({st}) before it was ready: {}",
                    text.get(from..)
                        .unwrap_or("")
                        .lines()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
            if Instant::now() > deadline {
                bail!("the agent was not ready within {} s", timeout.as_secs());
            }
            util::check_stop()?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// (VmRSS, VmHWM) in KiB.
    fn memory_kib(&self) -> Result<(u64, u64)> {
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    fn stop(&mut self, timeout: Duration) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "the agent did not stop within {} s of SIGTERM",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(20));
    }
}

const AGENT_RSS: (&str, &str, &str) = (
    "agent-rss",
    "agent resident memory (VmRSS) with the list loaded",
    "MiB",
);
const AGENT_START: (&str, &str, &str) = (
    "agent-first-start",
    "agent first start: config read, list loaded, ready",
    "ms",
);
const AGENT_READOPT: (&str, &str, &str) = (
    "agent-readopt",
    "agent re-adopt: restart with the pins in place until ready",
    "ms",
);

const AGENT_CHANGE: (&str, &str, &str) = (
    "agent-change",
    "one-entry change through the agent (CLI process, API, journal, kernel, read-back)",
    "ms",
);
const AGENT_CHANGE_RSS: (&str, &str, &str) = (
    "agent-change-rss-growth",
    "agent resident memory growth over the one-entry changes",
    "MiB",
);
const AGENT_CHANGE_STORE: (&str, &str, &str) = (
    "agent-change-store-bytes",
    "state directory growth per one-entry change",
    "B",
);
/// One-entry changes made through a loaded agent.
const AGENT_CHANGES: usize = 100;

fn agent_method(n: usize, runs: usize) -> String {
    format!(
        "`sluice agent --config FILE` (the sluice binary built with this suite) with a private state dir, socket and pin \
         root, one veth in a private namespace (native mode) and a deny list file of {n} IPv4 prefixes. First start: from \
         spawning the process until it logs `agent ready`. Memory: VmRSS of the agent after it is ready (median over the \
         first start and each restart; VmHWM, the peak, as an extra). Re-adopt: SIGTERM (the dataplane stays pinned), \
         start again, time until `agent ready` (state loaded, pinned program and links re-adopted, maps compared with \
         desired state); {runs} restarts. Changes: with the list loaded, {AGENT_CHANGES} one-entry changes \
         (`sluice --socket SOCK --pin-root ROOT deny add|del PREFIX`, alternating), each timed as a whole process \
         (start, API call, the agent's journal fsyncs, kernel write and read-back, exit); p50 and p99 of those; the \
         agent's VmRSS after them minus before; the state directory's size after them minus before, per change."
    )
}

fn agent_rows(plan: &Plan, sec: &mut Section, cli: Option<&Path>) {
    let n = plan.agent_list;
    let runs = plan.runs.min(3);
    let method = agent_method(n, runs);
    let rows = |status: &str| {
        [
            AGENT_RSS,
            AGENT_START,
            AGENT_READOPT,
            AGENT_CHANGE,
            AGENT_CHANGE_RSS,
            AGENT_CHANGE_STORE,
        ]
        .map(|(id, label, unit)| {
            let m = if let Some(why) = status.strip_prefix("not measured: ") {
                Measurement::not_measured(id, label, unit, why, &method)
            } else {
                Measurement::error(id, label, unit, status, &method)
            };
            m.param("list_size", n)
        })
    };
    let Some(bin) = cli else {
        for m in rows("not measured: the sluice binary is not next to sluice-bench") {
            sec.push(m);
        }
        return;
    };
    let has_agent = util::run_timed(
        &[bin.as_os_str(), "agent".as_ref(), "--help".as_ref()],
        None,
        Duration::from_secs(10),
    )
    .is_ok_and(|f| f.ok());
    if !has_agent {
        for m in rows("not measured: this sluice has no `agent` command") {
            sec.push(m);
        }
        return;
    }
    match measure_agent(plan, bin, n, runs) {
        Ok(((rss, hwm, first, readopt), changes)) => {
            let p99 = percentile(&changes.millis, 99.0);
            sec.push(
                Measurement::from_samples(
                    AGENT_CHANGE.0,
                    AGENT_CHANGE.1,
                    AGENT_CHANGE.2,
                    changes.millis,
                    &method,
                )
                .with_extra("p99_ms", p99)
                .with_extra("target_ms", 50.0)
                .param("list_size", n)
                .param("changes", AGENT_CHANGES),
            );
            sec.push(
                Measurement::from_samples(
                    AGENT_CHANGE_RSS.0,
                    AGENT_CHANGE_RSS.1,
                    AGENT_CHANGE_RSS.2,
                    vec![changes.rss_growth_mib],
                    &method,
                )
                .with_extra("rss_before_mib", changes.rss_before_mib)
                .param("list_size", n)
                .param("changes", AGENT_CHANGES),
            );
            sec.push(
                Measurement::from_samples(
                    AGENT_CHANGE_STORE.0,
                    AGENT_CHANGE_STORE.1,
                    AGENT_CHANGE_STORE.2,
                    vec![changes.store_bytes_per_change],
                    &method,
                )
                .param("list_size", n)
                .param("changes", AGENT_CHANGES),
            );
            let rss =
                Measurement::from_samples(AGENT_RSS.0, AGENT_RSS.1, AGENT_RSS.2, rss, &method)
                    .with_extra("peak_mib", percentile(&hwm, 50.0))
                    .param("list_size", n);
            sec.push(rss);
            sec.push(
                Measurement::from_samples(
                    AGENT_START.0,
                    AGENT_START.1,
                    AGENT_START.2,
                    first,
                    &method,
                )
                .param("list_size", n),
            );
            sec.push(
                Measurement::from_samples(
                    AGENT_READOPT.0,
                    AGENT_READOPT.1,
                    AGENT_READOPT.2,
                    readopt,
                    &method,
                )
                .param("list_size", n),
            );
        }
        Err(e) => {
            eprintln!("    agent: {e:#}");
            for m in rows(&format!("{e:#}")) {
                sec.push(m);
            }
        }
    }
}

type AgentSamples = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// One-entry changes through a loaded agent.
struct ChangeSamples {
    millis: Vec<f64>,
    rss_before_mib: f64,
    rss_growth_mib: f64,
    store_bytes_per_change: f64,
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `AGENT_CHANGES` one-entry changes through the agent, each a whole CLI
/// process, alternating add and delete of one prefix outside the list.
fn agent_changes(
    bin: &Path,
    agent: &Agent,
    sock: &Path,
    pins: &Path,
    state: &Path,
) -> Result<ChangeSamples> {
    let kib_to_mib = |k: u64| k as f64 / 1024.0;
    let (rss0, _) = agent.memory_kib()?;
    let store0 = dir_bytes(state);
    let mut millis = Vec::with_capacity(AGENT_CHANGES);
    for i in 0..AGENT_CHANGES {
        let verb = if i % 2 == 0 { "add" } else { "del" };
        let t0 = Instant::now();
        let out = Command::new(bin)
            .arg("--socket")
            .arg(sock)
            .arg("--pin-root")
            .arg(pins)
            .args(["deny", verb, "2001:2:ffff::1/128"])
            .stdin(Stdio::null())
            .output()?;
        millis.push(t0.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            bail!(
                "deny {verb} through the agent failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let (rss1, _) = agent.memory_kib()?;
    let store1 = dir_bytes(state);
    Ok(ChangeSamples {
        millis,
        rss_before_mib: kib_to_mib(rss0),
        rss_growth_mib: kib_to_mib(rss1) - kib_to_mib(rss0),
        store_bytes_per_change: (store1 as f64 - store0 as f64) / AGENT_CHANGES as f64,
    })
}

fn measure_agent(
    plan: &Plan,
    bin: &Path,
    n: usize,
    runs: usize,
) -> Result<(AgentSamples, ChangeSamples)> {
    let ns = crate::netns::Netns::new("ag")?;
    ns.exec_ok(&[
        "ip", "link", "add", "sba0", "type", "veth", "peer", "name", "sba1",
    ])?;
    ns.exec_ok(&["ip", "link", "set", "dev", "sba0", "up"])?;
    ns.exec_ok(&["ip", "link", "set", "dev", "sba1", "up"])?;
    let pins = crate::netns::PinDir::new();
    let dir = TempDir(std::env::temp_dir().join(util::unique_name("agent")));
    std::fs::create_dir_all(dir.0.join("state"))?;
    let mut list = String::with_capacity(n * 20);
    for p in crate::s2_live::rules_for(n) {
        list.push_str(&p.to_string());
        list.push('\n');
    }
    std::fs::write(dir.0.join("deny.txt"), list)?;
    let config = dir.0.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{state}\"\nsocket = \"{sock}\"\npin_root = \"{pins}\"\n\n\
             [[interface]]\nname = \"sba0\"\nnetns = \"{ns}\"\nmode = \"native\"\n\n\
             [policy]\ndefault = \"pass\"\n\n[deny]\nfiles = [\"deny.txt\"]\n",
            state = dir.0.join("state").display(),
            sock = dir.0.join("sluice.sock").display(),
            pins = pins.root.root.display(),
            ns = ns.name(),
        ),
    )?;
    let log = dir.0.join("agent.log");
    let (mut rss, mut hwm, mut first, mut readopt) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let kib_to_mib = |k: u64| k as f64 / 1024.0;
    eprintln!("  control: agent first start with {n} prefixes");
    let t0 = Instant::now();
    let mut agent = Agent::start(bin, &config, &log)?;
    agent.wait_ready(0, plan.agent_timeout)?;
    first.push(t0.elapsed().as_secs_f64() * 1e3);
    let (r, h) = agent.memory_kib()?;
    rss.push(kib_to_mib(r));
    hwm.push(kib_to_mib(h));
    eprintln!("  control: {AGENT_CHANGES} one-entry changes through the agent");
    let changes = agent_changes(
        bin,
        &agent,
        &dir.0.join("sluice.sock"),
        &pins.root.root,
        &dir.0.join("state"),
    )?;
    for i in 0..runs {
        eprintln!("  control: agent restart {}", i + 1);
        agent.stop(Duration::from_secs(60))?;
        drop(agent);
        let from = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let t0 = Instant::now();
        agent = Agent::start(bin, &config, &log)?;
        agent.wait_ready(from, plan.agent_timeout)?;
        readopt.push(t0.elapsed().as_secs_f64() * 1e3);
        let (r, h) = agent.memory_kib()?;
        rss.push(kib_to_mib(r));
        hwm.push(kib_to_mib(h));
    }
    agent.stop(Duration::from_secs(60))?;
    drop(agent);
    // Detach and remove the pins the agent left (it keeps the dataplane on exit).
    let _ = util::run_timed(
        &[
            bin.to_string_lossy().as_ref(),
            "--pin-root",
            &pins.root.root.to_string_lossy(),
            "--no-agent",
            "-n",
            ns.name(),
            "detach",
            "sba0",
        ],
        None,
        Duration::from_secs(60),
    );
    drop(pins);
    drop(ns);
    Ok(((rss, hwm, first, readopt), changes))
}
