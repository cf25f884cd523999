//! Network namespaces and veth pairs as RAII guards: whatever a benchmark
//! makes is deleted when its guard drops, also on panic or on an error
//! return. All firewall state (iptables, nftables, ipset) lives inside these
//! namespaces, so deleting them removes it; the host is never touched.

use std::{
    ffi::CString,
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

use crate::util::{self, Finished, PREFIX};

/// Deletes namespaces and pin roots left by benchmark processes that no
/// longer exist (killed before their guards could drop).
pub fn sweep_stale() {
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if util::owner_pid(&name).is_some_and(|p| !util::pid_alive(p)) {
                let _ = Command::new("ip")
                    .args(["netns", "del", &name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if util::owner_pid(&name).is_some_and(|p| !util::pid_alive(p)) {
                let _ = sluice::dataplane::pins::remove_tree(&e.path());
            }
        }
    }
}

/// A named network namespace with loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = util::unique_name(tag);
        util::run_ok(&["ip", "netns", "add", &name])?;
        let ns = Self { name };
        ns.exec_ok(&["ip", "link", "set", "dev", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip netns exec NAME argv...` with a time limit and optional stdin.
    pub fn exec_timed(
        &self,
        argv: &[&str],
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Finished> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        util::run_timed(&full, input, timeout)
    }

    /// Like [`Netns::exec_timed`] (30 s), failing with stderr unless it succeeds.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        let f = self.exec_timed(argv, None, Duration::from_secs(30))?;
        if !f.ok() {
            bail!(
                "in {}: `{}` failed ({}): {}",
                self.name,
                argv.join(" "),
                f.output.status,
                f.stderr().trim()
            );
        }
        Ok(f.stdout())
    }

    /// Starts `f` on a new thread that entered this namespace (only that
    /// thread moves; bpffs and the rest of the process stay as they are).
    pub fn spawn<F, T>(&self, f: F) -> Result<JoinHandle<Result<T>>>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let path = self.path();
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns {}", path.display()))?;
                drop(file);
                f()
            })?)
    }

    /// Runs `f` inside this namespace and returns its result.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        match self.spawn(f)?.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// The index of `iface` in this namespace.
    pub fn ifindex(&self, iface: &str) -> Result<u32> {
        let iface = iface.to_string();
        self.run(move || ifindex_here(&iface))
    }
}

/// `if_nametoindex` in the calling thread's namespace.
pub fn ifindex_here(iface: &str) -> Result<u32> {
    let c = CString::new(iface)?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no interface {iface} here");
    }
    Ok(idx)
}

impl Drop for Netns {
    fn drop(&mut self) {
        for _ in 0..40 {
            let ok = Command::new("ip")
                .args(["netns", "del", &self.name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok || !self.path().exists() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: could not delete network namespace {}", self.name);
    }
}

/// Addresses of the traffic lab: the veth ends are 198.19.255.1 (generator)
/// and 198.19.255.2 (receiver); generated frames come from 198.18.0.0/16
/// (low 16 bits varied) and go to the receiver.
pub const RX_V4: [u8; 4] = [198, 19, 255, 2];
pub const TX_V4: [u8; 4] = [198, 19, 255, 1];

/// Two namespaces joined by a veth pair: `tx` (generator side) and `rx`
/// (the firewall under test). Dropping it deletes both namespaces, which
/// removes the pair and every firewall rule made inside them.
pub struct Lab {
    // Field order: the receiver goes first (its XDP link and rules with it).
    pub rx: Netns,
    pub tx: Netns,
    pub rx_if: String,
    pub tx_if: String,
    pub rx_mac: [u8; 6],
    pub tx_mac: [u8; 6],
    pub tx_ifindex: u32,
    /// `ethtool -S` of the receiving end, read by ioctl.
    pub rx_stats: crate::ethtool::Stats,
}

impl Lab {
    /// `queues`: rx/tx queues of each veth end (one per CPU, so
    /// every CPU feeds its own ring).
    pub fn new(queues: u32) -> Result<Self> {
        let tx = Netns::new("tx")?;
        let rx = Netns::new("rx")?;
        let pid = std::process::id() % 100_000;
        let n = crate::util::unique_name("")
            .rsplit('-')
            .next()
            .unwrap_or("0")
            .to_string();
        let tx_if = format!("sbt{pid}x{n}");
        let rx_if = format!("sbr{pid}x{n}");
        if tx_if.len() > 15 {
            bail!("interface name {tx_if} too long");
        }
        let q = queues.to_string();
        tx.exec_ok(&[
            "ip",
            "link",
            "add",
            &tx_if,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            &rx_if,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            rx.name(),
        ])?;
        let v4 = |a: [u8; 4]| format!("{}.{}.{}.{}/24", a[0], a[1], a[2], a[3]);
        for (ns, ifname, a4) in [(&tx, &tx_if, TX_V4), (&rx, &rx_if, RX_V4)] {
            // IPv4 only: no IPv6 means no neighbour discovery or MLD chatter
            // mixed into the counts.
            ns.exec_ok(&[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv6.conf.{ifname}.disable_ipv6=1"),
            ])?;
            ns.exec_ok(&["ip", "addr", "add", &v4(a4), "dev", ifname])?;
            ns.exec_ok(&["ip", "link", "set", "dev", ifname, "up"])?;
        }
        // A veth end without an XDP program takes frames sent to it with
        // XDP_TX/ndo_xdp_xmit only when its NAPI is on, which GRO turns on.
        rx.exec_ok(&["ethtool", "-K", &rx_if, "gro", "on"])?;
        // Frames a socket sends (the fallback generator, crate::pktgen)
        // take the receiver's NAPI too only when the sending veth offers no
        // TSO (veth_skb_is_eligible_for_gro); else they skip its rings.
        tx.exec_ok(&["ethtool", "-K", &tx_if, "tso", "off"])?;
        let rx_mac = mac_of(&rx, &rx_if)?;
        let tx_mac = mac_of(&tx, &tx_if)?;
        let tx_ifindex = tx.ifindex(&tx_if)?;
        let rx_stats = {
            let i = rx_if.clone();
            rx.run(move || crate::ethtool::Stats::open_here(&i))?
        };
        let lab = Self {
            rx_stats,
            rx,
            tx,
            rx_if,
            tx_if,
            rx_mac,
            tx_mac,
            tx_ifindex,
        };
        lab.wait_up()?;
        Ok(lab)
    }

    fn wait_up(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let a = self
                .tx
                .exec_ok(&["ip", "link", "show", "dev", &self.tx_if])?;
            let b = self
                .rx
                .exec_ok(&["ip", "link", "show", "dev", &self.rx_if])?;
            if a.contains("LOWER_UP") && b.contains("LOWER_UP") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("veth {}/{} not up after 5 s", self.tx_if, self.rx_if);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn mac_of(ns: &Netns, iface: &str) -> Result<[u8; 6]> {
    let out = ns.exec_ok(&["cat", &format!("/sys/class/net/{iface}/address")])?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = out.trim().split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC address {out:?} for {iface}");
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}

/// A bpffs pin root for sluice (`/sys/fs/bpf/sluice-bench-<pid>-<n>`),
/// removed on drop.
pub struct PinDir {
    pub root: sluice::dataplane::PinRoot,
}

impl PinDir {
    pub fn new() -> Self {
        Self {
            root: sluice::dataplane::PinRoot::new(format!("/sys/fs/bpf/{}", util::unique_name(""))),
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = sluice::dataplane::pins::remove_tree(&self.root.root);
    }
}

/// Name check so a typo never sends a stale sweep somewhere else.
const _: () = assert!(PREFIX.len() > 8);
