//! RAII plumbing for end-to-end tests in network namespaces.
//!
//! Every resource a test makes here is a guard that removes it on drop (also
//! when the test panics): [`Netns`] (a named network namespace), [`Lab`] (two
//! namespaces joined by a veth pair, with IPv4 and IPv6 addresses), [`PinRoot`]
//! (a bpffs pin directory) and [`Child`] (a spawned process).
//!
//! Names carry the test process's pid and a per-process counter, so tests in
//! one binary and test binaries running side by side never collide. Guards
//! left behind by a test process that was killed (no drop ran) are swept by the
//! next test process that makes a namespace or a pin root.
//!
//! Test hosts use only 198.18.0.0/15 and 2001:2::/48, inside the namespaces a
//! test creates. Lab `X` (1..=199) uses 198.18.X.0/24 and 2001:2:0:X::/64;
//! 198.18.200.0–198.18.255.255, 198.19.0.0/16 and 2001:2:0:ff00::/56 are never
//! given to a lab, so tests may use them for list entries that must match no
//! host.
//!
//! Traffic helpers ([`ping`], [`udp_probe`], [`tcp_connect`]) are bounded: a
//! fixed number of packets and a short timeout each.

use std::{
    ffi::OsStr,
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::{
        Mutex, Once,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

/// One counter for every name this process makes (namespaces, labs, pin roots).
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Prefix of every namespace name the tests make.
pub const NETNS_PREFIX: &str = "slt-";
/// Directory under which pin roots are made.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Prefix of every pin root directory name the tests make.
pub const PIN_PREFIX: &str = "sluice-test-";

// ---------------------------------------------------------------------------
// Running commands with a deadline
// ---------------------------------------------------------------------------

/// Runs `cmd` (stdin closed, stdout and stderr captured) and kills it if it is
/// still running after `timeout`. Panics if it cannot be started.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    // Read both pipes on their own threads so a chatty child cannot block on a
    // full pipe while we wait for it.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let status = child.wait().expect("wait for killed child");
                let stderr =
                    String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
                panic!(
                    "{desc} still running after {timeout:?}, killed ({status}); stderr: {stderr}"
                );
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for {desc}: {e}"),
        }
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Runs a command (program and arguments) with a 30 s limit and panics, with
/// its stderr, unless it succeeds.
pub fn run_ok<I, S>(argv: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let argv: Vec<_> = argv.into_iter().map(|s| s.as_ref().to_owned()).collect();
    let out = output_with_timeout(
        Command::new(&argv[0]).args(&argv[1..]),
        Duration::from_secs(30),
    );
    assert_success(&argv, &out);
    out
}

fn assert_success(argv: &[impl AsRef<OsStr>], out: &Output) {
    assert!(
        out.status.success(),
        "{:?} failed ({}):\nstdout: {}\nstderr: {}",
        argv.iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a name `{prefix}{pid}-...`, if it has one.
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

/// Once per process: delete namespaces and pin roots left by test processes
/// that no longer exist (killed before their guards could drop).
fn sweep_stale() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        if let Ok(dir) = std::fs::read_dir("/run/netns") {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if owner_pid(&name, NETNS_PREFIX).is_some_and(|p| !pid_alive(p)) {
                    let _ = Command::new("ip")
                        .args(["netns", "del", &name])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        if let Ok(dir) = std::fs::read_dir(BPFFS) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if owner_pid(&name, PIN_PREFIX).is_some_and(|p| !pid_alive(p)) {
                    remove_tree(&e.path());
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Netns
// ---------------------------------------------------------------------------

/// A named network namespace (`ip netns add`), deleted on drop. Its loopback
/// interface is up.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `slt-{pid}-{n}-{tag}`. `tag` (a few letters, no spaces) only
    /// helps a reader tell namespaces apart in `ip netns list`.
    pub fn new(tag: &str) -> Netns {
        sweep_stale();
        let name = format!("{NETNS_PREFIX}{}-{}-{tag}", std::process::id(), next_id());
        run_ok(["ip", "netns", "add", &name]);
        // From here on the guard exists, so a failure below still deletes it.
        let ns = Netns { name };
        ns.exec_ok(["ip", "link", "set", "dev", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the file that holds the namespace.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip netns exec NAME args...` (30 s limit) and returns its output,
    /// whatever its exit status.
    pub fn exec<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.exec_timeout(args, Duration::from_secs(30))
    }

    /// Like [`Netns::exec`] with a chosen time limit (the command is killed
    /// and the call panics past it).
    pub fn exec_timeout<I, S>(&self, args: I, timeout: Duration) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        output_with_timeout(&mut cmd, timeout)
    }

    /// Like [`Netns::exec`], and panics (with stderr) unless it succeeds.
    pub fn exec_ok<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|s| s.as_ref().to_owned()).collect();
        let out = self.exec(&args);
        let mut argv: Vec<std::ffi::OsString> = vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone().into(),
        ];
        argv.extend(args);
        assert_success(&argv, &out);
        out
    }

    /// Starts `f` on a new thread that has entered this namespace (setns on
    /// `/run/netns/NAME`; only that thread moves). Sockets it creates belong
    /// to this namespace for their whole life, wherever they are used later.
    pub fn spawn<F, T>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = self.path();
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
                drop(file);
                f()
            })
            .expect("spawn thread")
    }

    /// Runs `f` inside this namespace on a fresh thread and returns its result
    /// (a panic in `f` is re-raised here).
    pub fn run<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Whether `ip netns list` (well, `/run/netns`) still has `name`.
    pub fn exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // `ip netns del` can fail with EBUSY for a moment while a command that
        // entered the namespace is exiting; retry briefly.
        for _ in 0..20 {
            let ok = Command::new("ip")
                .args(["netns", "del", &self.name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok || !Netns::exists(&self.name) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: could not delete network namespace {}", self.name);
    }
}

// ---------------------------------------------------------------------------
// Lab: two namespaces and a veth pair
// ---------------------------------------------------------------------------

/// Two namespaces, `a` and `b`, joined by a veth pair: `a_if` (in `a`,
/// 198.18.X.1/24 and 2001:2:0:X::1/64) and `b_if` (in `b`, 198.18.X.2/24 and
/// 2001:2:0:X::2/64). Dropping the lab deletes the namespaces, which removes
/// the veth pair.
#[derive(Debug)]
pub struct Lab {
    pub a: Netns,
    pub b: Netns,
    /// Veth end in `a`.
    pub a_if: String,
    /// Veth end in `b` (where sluice attaches in the e2e tests).
    pub b_if: String,
    /// The lab's subnet number X, 1..=199.
    pub x: u8,
    pub a_v4: Ipv4Addr,
    pub b_v4: Ipv4Addr,
    pub a_v6: Ipv6Addr,
    pub b_v6: Ipv6Addr,
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        let a = Netns::new(&format!("{tag}-a"));
        let b = Netns::new(&format!("{tag}-b"));
        let n = next_id();
        let pid = std::process::id();
        // X differs between labs of one process (counter) and is spread by pid
        // across processes; labs never overlap anyway, since every lab's
        // addresses live only in its own namespaces.
        let x = u8::try_from(1 + (pid.wrapping_mul(37).wrapping_add(n)) % 199).expect("1..=199");
        let a_if = format!("v{:05}{n}a", pid % 100_000);
        let b_if = format!("v{:05}{n}b", pid % 100_000);
        assert!(a_if.len() <= 15, "interface name {a_if} too long");
        let a_v4 = Ipv4Addr::new(198, 18, x, 1);
        let b_v4 = Ipv4Addr::new(198, 18, x, 2);
        let a_v6 = Ipv6Addr::new(0x2001, 2, 0, u16::from(x), 0, 0, 0, 1);
        let b_v6 = Ipv6Addr::new(0x2001, 2, 0, u16::from(x), 0, 0, 0, 2);
        let lab = Lab {
            a,
            b,
            a_if,
            b_if,
            x,
            a_v4,
            b_v4,
            a_v6,
            b_v6,
        };

        // Made inside `a`, the peer sent straight to `b`: the names never
        // appear in the root namespace.
        lab.a.exec_ok([
            "ip",
            "link",
            "add",
            &lab.a_if,
            "type",
            "veth",
            "peer",
            "name",
            &lab.b_if,
            "netns",
            lab.b.name(),
        ]);
        for (ns, ifname, v4, v6) in [
            (&lab.a, &lab.a_if, lab.a_v4, lab.a_v6),
            (&lab.b, &lab.b_if, lab.b_v4, lab.b_v6),
        ] {
            ns.exec_ok(["ip", "addr", "add", &format!("{v4}/24"), "dev", ifname]);
            ns.exec_ok([
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifname,
                "nodad",
            ]);
            ns.exec_ok(["ip", "link", "set", "dev", ifname, "up"]);
        }
        lab.wait_ready();
        lab
    }

    fn wait_ready(&self) {
        wait_links_ready(&[(&self.a, &self.a_if), (&self.b, &self.b_if)]);
    }

    pub fn a_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.a_v6.into()
        } else {
            self.a_v4.into()
        }
    }

    pub fn b_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.b_v6.into()
        } else {
            self.b_v4.into()
        }
    }
}

/// Waits (at most 5 s) until each `(namespace, interface)` has carrier, a
/// global IPv6 address and no tentative one. The link-local address stays
/// tentative for a second or two after the link comes up (duplicate address
/// detection), and until then the kernel sends no neighbour solicitation
/// for packets it forwards out of that link.
pub fn wait_links_ready(links: &[(&Netns, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = links.iter().all(|(ns, ifname)| {
            let link = ns.exec(["ip", "link", "show", "dev", ifname]);
            let addr = ns.exec(["ip", "-6", "addr", "show", "dev", ifname]);
            let link = String::from_utf8_lossy(&link.stdout);
            let addr = String::from_utf8_lossy(&addr.stdout);
            link.contains("LOWER_UP")
                && addr.contains("scope global")
                && !addr.contains("tentative")
        });
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "links {:?} not ready after 5 s",
            links
                .iter()
                .map(|(ns, i)| (ns.name(), *i))
                .collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// PinRoot
// ---------------------------------------------------------------------------

/// A unique pin directory path `/sys/fs/bpf/sluice-test-{pid}-{n}` (bpffs is
/// mounted at /sys/fs/bpf first if it is not). The directory is not created:
/// sluice makes it. On drop, whatever is left under it is removed.
#[derive(Debug)]
pub struct PinRoot {
    path: PathBuf,
}

impl PinRoot {
    pub fn new() -> PinRoot {
        ensure_bpffs();
        sweep_stale();
        let path =
            Path::new(BPFFS).join(format!("{PIN_PREFIX}{}-{}", std::process::id(), next_id()));
        if path.exists() {
            remove_tree(&path);
        }
        PinRoot { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every file (pin) under the pin root, recursively; empty when the
    /// directory is gone.
    pub fn pins(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.path, &mut out);
        out
    }
}

impl Default for PinRoot {
    fn default() -> Self {
        PinRoot::new()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Mounts bpffs at /sys/fs/bpf unless something is mounted there already.
pub fn ensure_bpffs() {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mounted = Command::new("mountpoint")
        .args(["-q", BPFFS])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        run_ok(["mount", "-t", "bpf", "bpf", BPFFS]);
    }
}

/// Removes `path` and everything under it (bpffs pins are plain files to
/// unlink). Errors are ignored; a missing path is fine.
pub fn remove_tree(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                remove_tree(&e.path());
            }
        }
        let _ = std::fs::remove_dir(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

// ---------------------------------------------------------------------------
// Child
// ---------------------------------------------------------------------------

/// A spawned process that is killed (SIGKILL) and reaped on drop. Derefs to
/// [`std::process::Child`].
#[derive(Debug)]
pub struct Child(pub std::process::Child);

impl Child {
    pub fn spawn(cmd: &mut Command) -> Child {
        Child(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
        )
    }

    /// Sends SIGKILL (if still running) and reaps it.
    pub fn kill_and_wait(&mut self) -> ExitStatus {
        let _ = self.0.kill();
        self.0.wait().expect("wait for child")
    }

    /// Waits at most `timeout` for it to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Child {
    /// Waits at most `timeout` (then kills it) and collects its piped
    /// stdout and stderr (small outputs: nothing reads them meanwhile).
    pub fn wait_with_output_timeout(mut self, timeout: Duration) -> std::process::Output {
        use std::io::Read as _;
        let status = self
            .wait_timeout(timeout)
            .unwrap_or_else(|| self.kill_and_wait());
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let Some(mut o) = self.0.stdout.take() {
            let _ = o.read_to_end(&mut stdout);
        }
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_end(&mut stderr);
        }
        std::process::Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Deref for Child {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Child {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------

/// `ping -c count -i 0.2 -W 1 -q addr` from `ns` (IPv4 or IPv6); returns how
/// many replies came back. Takes about `count × 0.2 s` (+1 s when replies are
/// missing).
pub fn ping(ns: &Netns, addr: IpAddr, count: u32) -> u32 {
    let out = ns.exec_timeout(
        [
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            "-q",
            &addr.to_string(),
        ],
        Duration::from_secs(u64::from(count) + 10),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // "3 packets transmitted, 3 received, 0% packet loss, time 404ms"
    let received = stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| {
            l.split(',')
                .map(str::trim)
                .find_map(|part| part.strip_suffix(" received")?.trim().parse().ok())
        });
    received.unwrap_or_else(|| {
        panic!(
            "cannot read ping's summary ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn unspecified(addr: IpAddr) -> SocketAddr {
    match addr {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// The unspecified address of `addr`'s family with `port`: servers listen on
/// every address of their namespace (which is theirs alone), so they still
/// start when the interface is down and its IPv6 addresses are gone.
fn any_port(addr: IpAddr, port: u16) -> SocketAddr {
    let mut a = unspecified(addr);
    a.set_port(port);
    a
}

/// How long a receiver keeps waiting after the sender is done.
const LINGER: Duration = Duration::from_secs(1);
/// Hard limit for any server thread.
const SERVER_LIMIT: Duration = Duration::from_secs(10);

/// Sends `count` UDP datagrams from `from` to `addr:port` (an address in `to`)
/// and returns how many a socket bound to `port` in `to` received within
/// about 1 s after the last one was sent.
pub fn udp_probe(from: &Netns, to: &Netns, addr: IpAddr, port: u16, count: u32) -> u32 {
    let target = SocketAddr::new(addr, port);
    let tag: u64 = (u64::from(std::process::id()) << 32) | u64::from(next_id());
    let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let server = to.spawn(move || -> u32 {
        let sock = match UdpSocket::bind(any_port(addr, port)) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return 0;
            }
        };
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set_read_timeout");
        let _ = ready_tx.send(Ok(()));
        let start = Instant::now();
        let mut done_at: Option<Instant> = None;
        let mut seen = std::collections::HashSet::new();
        let mut buf = [0u8; 64];
        while (seen.len() as u32) < count && start.elapsed() < SERVER_LIMIT {
            if done_at.is_none() && done_rx.try_recv().is_ok() {
                done_at = Some(Instant::now());
            }
            if done_at.is_some_and(|t| t.elapsed() >= LINGER) {
                break;
            }
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                // Payload: tag (8 bytes) then sequence number (4 bytes).
                if n == 12 && buf[..8] == tag.to_be_bytes() {
                    seen.insert(u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes")));
                }
            }
        }
        seen.len() as u32
    });
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("udp_probe: cannot bind port {port} in {}: {e}", to.name()),
        Err(e) => panic!("udp_probe: server in {} not ready: {e}", to.name()),
    }
    from.run(move || {
        let sock = UdpSocket::bind(unspecified(addr)).expect("bind UDP client");
        for seq in 0..count {
            let mut msg = [0u8; 12];
            msg[..8].copy_from_slice(&tag.to_be_bytes());
            msg[8..].copy_from_slice(&seq.to_be_bytes());
            // Errors (e.g. no route) just mean the datagram did not go out.
            let _ = sock.send_to(&msg, target);
            thread::sleep(Duration::from_millis(2));
        }
    });
    let _ = done_tx.send(());
    match server.join() {
        Ok(n) => n,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Whether a TCP connection from `from` to `addr:port` (an address in `to`,
/// where a listener on `port` is started first) is established within 1 s and carries
/// a few bytes both ways.
pub fn tcp_connect(from: &Netns, to: &Netns, addr: IpAddr, port: u16) -> bool {
    let target = SocketAddr::new(addr, port);
    let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let server = to.spawn(move || {
        // The previous probe of this port may still hold it briefly (a
        // closing connection); retry a busy port for up to 2 s.
        let bind_start = Instant::now();
        let listener = loop {
            match TcpListener::bind(any_port(addr, port)) {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && bind_start.elapsed() < Duration::from_secs(2) =>
                {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            }
        };
        listener.set_nonblocking(true).expect("set_nonblocking");
        let _ = ready_tx.send(Ok(()));
        let start = Instant::now();
        while start.elapsed() < SERVER_LIMIT && done_rx.try_recv().is_err() {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut buf = [0u8; 4];
                    if s.read_exact(&mut buf).is_ok() && &buf == b"ping" {
                        let _ = s.write_all(b"pong");
                    }
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!(
            "tcp_connect: cannot listen on port {port} in {}: {e}",
            to.name()
        ),
        Err(e) => panic!("tcp_connect: server in {} not ready: {e}", to.name()),
    }
    let ok = from.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"pong"
    });
    let _ = done_tx.send(());
    if let Err(p) = server.join() {
        std::panic::resume_unwind(p);
    }
    ok
}

// ---------------------------------------------------------------------------
// Link and stack facts
// ---------------------------------------------------------------------------

/// The MAC address of `ifname` in `ns` (`ip -o link show`).
pub fn link_mac(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = ns.exec_ok(["ip", "-o", "link", "show", "dev", ifname]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no link/ether address for {ifname}: {text}"));
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap_or_else(|e| panic!("MAC {mac}: {e}")))
        .collect();
    bytes
        .try_into()
        .unwrap_or_else(|_| panic!("MAC {mac} is not 6 bytes"))
}

/// One counter of `ns`'s network stack from `/proc/net/netstat` or
/// `/proc/net/snmp`, e.g. `("TcpExt", "ListenDrops")` or `("Tcp", "InSegs")`.
pub fn stack_counter(ns: &Netns, group: &str, name: &str) -> u64 {
    let out = ns.exec_ok(["cat", "/proc/net/netstat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{group}:");
    // Each group is two lines: the names, then the values.
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let names = names.split_whitespace().skip(1);
        if let Some((_, v)) = names
            .zip(values.split_whitespace().skip(1))
            .find(|(n, _)| *n == name)
        {
            return v
                .parse()
                .unwrap_or_else(|e| panic!("{group} {name} = {v:?}: {e}"));
        }
    }
    panic!(
        "no {group} {name} in /proc/net/netstat or /proc/net/snmp of {}",
        ns.name()
    )
}

// ---------------------------------------------------------------------------
// Raw frames
// ---------------------------------------------------------------------------

/// A frame a [`PacketSocket`] saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Sent by this namespace (`PACKET_OUTGOING`) rather than received.
    pub outgoing: bool,
    pub frame: Vec<u8>,
}

/// An `AF_PACKET` socket bound to one interface of the namespace of the
/// thread that opened it: writes whole Ethernet frames out of it and, when
/// opened to receive, sees every frame the interface sends and every frame
/// it receives after XDP (a frame XDP dropped or sent back never reaches
/// it), whatever its destination MAC. Closed on drop.
#[derive(Debug)]
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens it on `ifname`; `receive` false makes a send-only socket
    /// (protocol 0: nothing is queued for it).
    pub fn open(ifname: &str, receive: bool) -> PacketSocket {
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        let name = std::ffi::CString::new(ifname).expect("interface name");
        let proto = if receive {
            (libc::ETH_P_ALL as u16).to_be()
        } else {
            0
        };
        // SAFETY: plain libc calls on values owned here; the fd is owned right away.
        unsafe {
            let index = libc::if_nametoindex(name.as_ptr());
            assert!(index != 0, "no interface {ifname}");
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            );
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = i32::try_from(index).expect("ifindex");
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert!(
                rc == 0,
                "bind to {ifname}: {}",
                std::io::Error::last_os_error()
            );
            PacketSocket {
                fd,
                ifindex: sll.sll_ifindex,
            }
        }
    }

    /// Sets `SO_PRIORITY` for the frames it sends.
    pub fn set_priority(&self, prio: i32) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setsockopt with a pointer to a live c_int.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PRIORITY,
                (&raw const prio).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert!(rc == 0, "SO_PRIORITY: {}", std::io::Error::last_os_error());
    }

    /// Writes one frame; false if the kernel refused it (a full queue).
    pub fn send(&self, frame: &[u8]) -> bool {
        use std::os::fd::AsRawFd as _;
        // SAFETY: sends the bytes of a live buffer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        n > 0
    }

    /// The next frame seen on the interface, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Seen> {
        use std::os::fd::AsRawFd as _;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: poll on one live pollfd.
            if unsafe { libc::poll(&raw mut pfd, 1, ms) } <= 0 {
                return None;
            }
            let mut buf = vec![0u8; 2048];
            // SAFETY: an all-zero sockaddr_ll is valid; recvfrom writes at
            // most the lengths given into live buffers.
            let (n, sll) = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                let n = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut sll).cast(),
                    &raw mut len,
                );
                (n, sll)
            };
            // A frame from another interface, queued before bind took effect.
            if let Ok(n) = usize::try_from(n)
                && sll.sll_ifindex == self.ifindex
            {
                buf.truncate(n);
                return Some(Seen {
                    outgoing: sll.sll_pkttype == libc::PACKET_OUTGOING,
                    frame: buf,
                });
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }
}

/// Polls `f` every 100 ms for at most 5 s until it holds; then returns
/// whether it did.
pub fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
