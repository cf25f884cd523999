//! Section 7: what a workload's policy costs a `connect()` (the socket
//! layer's cgroup programs), against the same `connect()` from a cgroup
//! with no workload, same run: TCP connects to a listener on the loopback
//! of a namespace the bench made, from the bench process moved into a
//! cgroup the bench made.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use sluice::{
    dataplane::sock::cgroup2_mount,
    model::sock::{RuleKind, SockAction, SockRuleSpec, Workload},
};

use crate::{
    Plan,
    netns::{Netns, PinDir},
    stats::{Measurement, Section},
    util,
};

struct Case {
    name: &'static str,
    /// `None`: the cgroup is no workload (the baseline).
    workload: Option<fn(&str) -> Workload>,
    /// The connects are denied (EPERM).
    denied: bool,
}

fn workload(cgroup: &str, default: SockAction, rules: usize) -> Workload {
    // Rules that never match the loopback destination: the scan runs them all.
    let connect = (0..rules)
        .map(|i| {
            SockRuleSpec::parse(
                &format!("deny tcp to 198.18.{}.0/24 port 1-1023", i % 250),
                RuleKind::Connect,
            )
            .expect("a valid rule")
        })
        .collect();
    Workload {
        name: "bench".into(),
        cgroup: cgroup.into(),
        audit: false,
        connect_default: default,
        bind_default: SockAction::Allow,
        connect,
        bind: Vec::new(),
    }
}

const CASES: &[Case] = &[
    Case {
        name: "no workload (baseline)",
        workload: None,
        denied: false,
    },
    Case {
        name: "workload, no rules, allowed by default",
        workload: Some(|c| workload(c, SockAction::Allow, 0)),
        denied: false,
    },
    Case {
        name: "workload, 63 rules that do not match, allowed by default",
        workload: Some(|c| workload(c, SockAction::Allow, 63)),
        denied: false,
    },
    Case {
        name: "workload, denied by default (EPERM, no packet)",
        workload: Some(|c| workload(c, SockAction::Deny, 0)),
        denied: true,
    },
];

/// A cgroup for the bench process: made under the cgroup v2 mount, the
/// process moved in; on drop moved back to where it was and removed.
struct CgroupHome {
    dir: PathBuf,
    rel: String,
    back: PathBuf,
}

impl CgroupHome {
    fn new() -> Result<Self> {
        let mount = cgroup2_mount().context("finding the cgroup v2 mount")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let line = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let back = mount.join(line.trim_start_matches('/'));
        let rel = util::unique_name("sock");
        let dir = mount.join(&rel);
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let home = Self { dir, rel, back };
        home.enter(&home.dir)?;
        Ok(home)
    }

    fn enter(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("moving into {}", dir.display()))
    }
}

impl Drop for CgroupHome {
    fn drop(&mut self) {
        let _ = self.enter(&self.back.clone());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

pub fn run(plan: &Plan) -> Result<Section> {
    let mut sec = Section::new(
        "sock",
        "socket layer: connect() cost",
        "TCP connect() to a listener on the loopback of a bench namespace, closed with RST, \
         from the bench process in a cgroup it made: with no workload on that cgroup (the \
         baseline), and with a workload's cgroup programs judging every connect (no rules, \
         63 rules that do not match, and denied by default: EPERM before any packet). \
         Mean ns per connect() over the batch, median over runs; over_baseline_ns is the \
         cost of the socket layer's programs.",
    );
    let connects: usize = if plan.smoke { 200 } else { 20_000 };
    let ns = Netns::new("sk")?;
    let pins = PinDir::new();
    let home = CgroupHome::new()?;
    // The listener accepts (and drops) every connection until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let listener = ns.run(|| {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        // A deep backlog: a full one drops SYNs, and the batch would time
        // retransmissions instead of connects.
        // SAFETY: listen() again on a listening socket only resizes its backlog.
        if unsafe { libc::listen(l.as_raw_fd(), 4096) } != 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        Ok(l)
    })?;
    let addr: SocketAddr = listener.local_addr()?;
    // Blocking accepts keep the backlog empty (a full one would drop SYNs
    // and time retransmissions instead of connects); a last connect after
    // `stop` wakes it.
    let accept = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while let Ok((s, _)) = listener.accept() {
                drop(s);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        })
    };
    let result = (|| -> Result<()> {
        let mut baseline = None;
        for c in CASES {
            let workloads: Vec<Workload> = c.workload.map(|f| f(&home.rel)).into_iter().collect();
            sluice::engine::sock::apply(&pins.root, &workloads, &|_| true)
                .map_err(|e| anyhow::anyhow!("sluice workload apply: {e}"))?;
            let mut samples = Vec::with_capacity(plan.runs);
            for _ in 0..plan.runs {
                util::check_stop()?;
                let denied = c.denied;
                let took = ns.run(move || {
                    let t = Instant::now();
                    for _ in 0..connects {
                        match TcpStream::connect(addr) {
                            Ok(s) if !denied => util::close_now(s),
                            Err(e) if denied && e.raw_os_error() == Some(libc::EPERM) => {}
                            Ok(_) => bail!("a connect the workload denies succeeded"),
                            Err(e) => bail!("connect: {e}"),
                        }
                    }
                    Ok(t.elapsed())
                })?;
                samples.push(took.as_nanos() as f64 / connects as f64);
            }
            let mut m = Measurement::from_samples(
                &format!("sock/{}", c.name),
                c.name,
                "ns/connect",
                samples,
                "mean ns per TCP connect() (+ RST close) over the batch, median over runs",
            )
            .param("connects", connects);
            match (baseline, m.median) {
                (None, Some(b)) if c.workload.is_none() => baseline = Some(b),
                (Some(b), Some(x)) => m = m.with_extra("over_baseline_ns", x - b),
                _ => {}
            }
            sec.push(m);
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    // Wakes the accept loop (from outside the cgroup's workload: none is left
    // below, and a denied connect would not arrive).
    let _ = sluice::engine::sock::apply(&pins.root, &[], &|_| false);
    let _ = ns.run(move || {
        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
        Ok(())
    });
    let _ = accept.join();
    // The workload goes before the cgroup (its links first).
    let _ = sluice::engine::sock::apply(&pins.root, &[], &|_| false);
    drop(home);
    result?;
    Ok(sec)
}
