//! The socket layer's workload policy (cgroup v2 connect/sendmsg/bind hooks)
//! end to end: the real agent keeps workloads on test cgroups, and real
//! syscalls from processes in them are the judge.
//!
//! Each test has a [`Lab`] (client namespace A, server namespace B, a veth
//! pair between them), a [`Cgroup`], an [`AgentEnv`] and its agent. Clients
//! are small Python workers started inside the cgroup and then in A (`sh`
//! joins the cgroup, then execs `ip netns exec A python3`); they take one
//! JSON request per line (connect, sendto, bind) and answer with the result
//! and errno. Servers are threads of the test process in B. That no packet
//! left for a denied call is judged by A's own counters (`Tcp: OutSegs`,
//! `Udp: OutDatagrams`, `Udp6OutDatagrams`): nothing else in A sends TCP or
//! UDP while a test looks.
//!
//! Field names of `workload list --json`, `status --json` and the metrics
//! are known only by the lookups in "JSON lookups" below.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::{ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::support::{
    agent::{AgentEnv, AgentProc, scrape, stderr, stdout},
    cgroup::{Cgroup, command_in, rel_of},
    cli::expect_one_line_error,
    netns::{Child, Lab, Netns, eventually},
};

/// The port every test denies, and one it allows.
const DENIED: u16 = 7000;
const ALLOWED: u16 = 7001;
/// A denied call must fail at once: well under any retransmission timer.
const AT_ONCE_MS: f64 = 500.0;
/// The longest a worker may take for one request (its sockets time out after 2 s).
const WORKER_LIMIT: Duration = Duration::from_secs(10);
/// Hard limit for any server thread.
const SERVER_LIMIT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------
// Workload config
// ---------------------------------------------------------------------------

/// One `[[workload]]` table.
#[derive(Clone, Debug)]
struct Wl {
    name: String,
    cgroup: String,
    audit: bool,
    connect_default: &'static str,
    bind_default: &'static str,
    connect: Vec<String>,
    bind: Vec<String>,
}

impl Wl {
    fn new(name: &str, cgroup: impl Into<String>) -> Wl {
        Wl {
            name: name.to_owned(),
            cgroup: cgroup.into(),
            audit: false,
            connect_default: "allow",
            bind_default: "allow",
            connect: Vec::new(),
            bind: Vec::new(),
        }
    }

    fn connect(mut self, rule: impl Into<String>) -> Wl {
        self.connect.push(rule.into());
        self
    }

    fn bind(mut self, rule: impl Into<String>) -> Wl {
        self.bind.push(rule.into());
        self
    }

    fn connect_default(mut self, d: &'static str) -> Wl {
        self.connect_default = d;
        self
    }

    fn bind_default(mut self, d: &'static str) -> Wl {
        self.bind_default = d;
        self
    }

    fn audit(mut self) -> Wl {
        self.audit = true;
        self
    }

    fn toml(&self) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|r| format!("\"{r}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "[[workload]]\nname = \"{}\"\ncgroup = \"{}\"\naudit = {}\nconnect_default = \"{}\"\nconnect = [{}]\nbind_default = \"{}\"\nbind = [{}]\n\n",
            self.name,
            self.cgroup,
            self.audit,
            self.connect_default,
            list(&self.connect),
            self.bind_default,
            list(&self.bind)
        )
    }
}

fn config_body(wls: &[Wl]) -> String {
    wls.iter().map(Wl::toml).collect()
}

/// Writes the agent's config with these workloads and starts it.
fn start_agent(env: &AgentEnv, wls: &[Wl]) -> AgentProc {
    env.write_config(&config_body(wls));
    AgentProc::start(env, &[])
}

/// `deny|allow tcp to HOST/32|128 port PORT`.
fn tcp_rule(action: &str, host: IpAddr, port: u16) -> String {
    let len = if host.is_ipv4() { 32 } else { 128 };
    format!("{action} tcp to {host}/{len} port {port}")
}

// ---------------------------------------------------------------------------
// JSON lookups (the only place that knows the field names)
// ---------------------------------------------------------------------------

/// `workload list --json` → the workload objects.
fn workload_list(env: &AgentEnv) -> Vec<Value> {
    let v = env.cli_json(&["workload", "list", "--json"]);
    v.as_array()
        .unwrap_or_else(|| panic!("workload list --json is not an array: {v}"))
        .clone()
}

/// `workload list --json` → the object of workload `name`.
fn workload_entry(env: &AgentEnv, name: &str) -> Value {
    let list = workload_list(env);
    list.iter()
        .find(|w| w["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("workload list --json has no {name}: {list:?}"))
}

/// The list without the counters (what a refused change must leave alone).
fn workload_list_without_counts(env: &AgentEnv) -> Vec<Value> {
    workload_list(env)
        .into_iter()
        .map(|mut w| {
            if let Some(o) = w.as_object_mut() {
                o.remove("counts");
            }
            w
        })
        .collect()
}

/// A workload object's counter for (hook, verdict, reason); 0 when absent.
fn calls(w: &Value, hook: &str, verdict: &str, reason: &str) -> u64 {
    w["counts"]
        .as_array()
        .unwrap_or_else(|| panic!("workload without a counts array: {w}"))
        .iter()
        .filter(|c| c["hook"] == hook && c["verdict"] == verdict && c["reason"] == reason)
        .map(|c| {
            c["calls"]
                .as_u64()
                .unwrap_or_else(|| panic!("count without numeric calls: {c}"))
        })
        .sum()
}

/// The (hook, verdict, reason) → calls of every nonzero counter, sorted.
fn all_counts(w: &Value) -> Vec<(String, String, String, u64)> {
    let mut v: Vec<_> = w["counts"]
        .as_array()
        .unwrap_or_else(|| panic!("workload without a counts array: {w}"))
        .iter()
        .map(|c| {
            (
                c["hook"].as_str().unwrap_or_default().to_owned(),
                c["verdict"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
                c["calls"].as_u64().unwrap_or_default(),
            )
        })
        .filter(|c| c.3 != 0)
        .collect();
    v.sort();
    v
}

/// Checks the shape of a workload object against what was configured.
fn assert_workload_shape(w: &Value, name: &str, cg: &Path, connect: &[String], bind: &[String]) {
    assert_eq!(w["name"], name, "{w}");
    assert_eq!(
        w["cgroup"],
        rel_of(cg).as_str(),
        "cgroup as configured: {w}"
    );
    assert_eq!(
        w["path"],
        cg.to_string_lossy().as_ref(),
        "absolute path: {w}"
    );
    assert_eq!(
        w["cgroup_id"].as_u64(),
        Some(crate::support::cgroup::cgroup_id(cg)),
        "cgroup id (the directory's inode): {w}"
    );
    assert_eq!(w["attached"], true, "{w}");
    assert_eq!(w["connect"], json!(connect), "{w}");
    assert_eq!(w["bind"], json!(bind), "{w}");
}

/// `status --json` → the `cgroups` array: the cgroups the socket programs
/// are linked to, `{"cgroup_id", "path", "hooks"}` each (absent or null: none).
fn status_cgroups(env: &AgentEnv) -> Vec<Value> {
    let s = env.cli_json(&["status", "--json"]);
    match &s["cgroups"] {
        Value::Null => Vec::new(),
        Value::Array(a) => a.clone(),
        other => panic!("status --json: cgroups is not an array: {other}\n{s}"),
    }
}

/// The entries of `status --json` for cgroup `cg` (by its id).
fn status_entries_for(env: &AgentEnv, cg: &Path) -> Vec<Value> {
    let id = crate::support::cgroup::cgroup_id(cg);
    let entries: Vec<Value> = status_cgroups(env)
        .into_iter()
        .filter(|c| c["cgroup_id"].as_u64() == Some(id))
        .collect();
    for e in &entries {
        assert_eq!(
            e["path"],
            cg.to_string_lossy().as_ref(),
            "status --json names the cgroup by its absolute path: {e}"
        );
    }
    entries
}

/// A status entry's hooks, when it lists them (`hooks`: strings or objects).
fn status_hooks(entry: &Value) -> Option<Vec<String>> {
    let hooks = entry["hooks"].as_array()?;
    Some(
        hooks
            .iter()
            .map(|h| match h {
                Value::String(s) => s.clone(),
                other => other["hook"]
                    .as_str()
                    .or_else(|| other["attach_type"].as_str())
                    .unwrap_or_default()
                    .to_owned(),
            })
            .collect(),
    )
}

/// `sluice_sock_decisions_total{...labels...} N`: N, from a scrape.
fn sock_metric(metrics: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with("sluice_sock_decisions_total{"))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

// ---------------------------------------------------------------------------
// Workers: the processes whose syscalls are judged
// ---------------------------------------------------------------------------

/// The worker: one JSON request per stdin line, one JSON answer per stdout
/// line. A fresh socket per request, closed after it.
const WORKER: &str = r#"
import json, socket, sys, time

def run(r):
    op = r["op"]
    if op == "cgroup":
        with open("/proc/self/cgroup") as f:
            return {"ok": True, "cgroup": f.read()}
    fam = socket.AF_INET6 if r["family"] == 6 else socket.AF_INET
    tcp = r["proto"] == "tcp"
    s = socket.socket(fam, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        s.settimeout(2.0)
        dst = (r["addr"], r["port"], 0, 0) if fam == socket.AF_INET6 else (r["addr"], r["port"])
        payload = r.get("payload", "").encode()
        if op == "bind":
            s.bind(dst)
            return {"ok": True}
        if op == "sendto":
            s.sendto(payload, dst)
            return {"ok": True}
        s.connect(dst)
        if not payload:
            return {"ok": True}
        s.sendall(payload)
        if not tcp:
            return {"ok": True}
        got = b""
        while len(got) < r.get("expect", 0):
            c = s.recv(64)
            if not c:
                break
            got += c
        return {"ok": True, "reply": got.decode("latin-1")}
    finally:
        s.close()

for line in sys.stdin:
    r = json.loads(line)
    t = time.monotonic()
    try:
        out = run(r)
    except socket.timeout:
        out = {"error": "timeout"}
    except OSError as e:
        out = {"errno": e.errno, "error": str(e)}
    out["ms"] = (time.monotonic() - t) * 1000.0
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"#;

fn python() -> &'static str {
    // The system interpreter: a version manager's shim would add a shell
    // and a second to every start.
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// What one syscall did.
#[derive(Debug, Clone)]
struct Outcome {
    ok: bool,
    errno: Option<i64>,
    reply: String,
    ms: f64,
    raw: Value,
}

impl Outcome {
    fn from(raw: Value) -> Outcome {
        Outcome {
            ok: raw["ok"] == true,
            errno: raw["errno"].as_i64(),
            reply: raw["reply"].as_str().unwrap_or_default().to_owned(),
            ms: raw["ms"].as_f64().unwrap_or(f64::MAX),
            raw,
        }
    }

    fn eperm(&self) -> bool {
        self.errno == Some(i64::from(libc::EPERM))
    }
}

#[track_caller]
fn assert_eperm(what: &str, o: &Outcome) {
    assert!(
        o.eperm() && o.ms < AT_ONCE_MS,
        "{what}: expected EPERM at once, got {}",
        o.raw
    );
}

#[track_caller]
fn assert_allowed(what: &str, o: &Outcome) {
    assert!(o.ok, "{what}: expected success, got {}", o.raw);
}

#[track_caller]
fn assert_pong(what: &str, o: &Outcome) {
    assert!(
        o.ok && o.reply == "pong",
        "{what}: expected a connection that carries ping/pong, got {}",
        o.raw
    );
}

/// A Python worker in namespace `ns`, inside cgroup `cgroup` (or where the
/// test process is). Killed on drop.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Worker {
    fn spawn(ns: &Netns, cgroup: Option<&Path>, what: &str) -> Worker {
        let mut cmd = match cgroup {
            Some(dir) => command_in(dir, "ip"),
            None => Command::new("ip"),
        };
        cmd.args(["netns", "exec", ns.name(), python(), "-u", "-c", WORKER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = Child::spawn(&mut cmd);
        let stdin = child.stdin.take().expect("piped stdin");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut w = Worker {
            child,
            stdin,
            lines,
            what: what.to_owned(),
        };
        // The worker is where the test thinks it is: its cgroup v2 line.
        let want = match cgroup {
            Some(dir) => format!("0::/{}", rel_of(dir)),
            None => own_cgroup2_line(),
        };
        let got = w.call(&json!({"op": "cgroup"}));
        let line = got["cgroup"]
            .as_str()
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("0::"))
            .unwrap_or_default()
            .to_owned();
        assert_eq!(line, want, "worker {what} is not in the expected cgroup");
        w
    }

    fn call(&mut self, req: &Value) -> Value {
        if let Err(e) = writeln!(self.stdin, "{req}").and_then(|()| self.stdin.flush()) {
            self.fail(&format!("cannot send {req}: {e}"));
        }
        match self.lines.recv_timeout(WORKER_LIMIT) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("worker {}: not JSON ({e}): {line}", self.what)),
            Err(e) => self.fail(&format!("no answer to {req} within {WORKER_LIMIT:?}: {e}")),
        }
    }

    fn fail(&mut self, msg: &str) -> ! {
        let _ = self.child.kill_and_wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!("worker {}: {msg}; its stderr:\n{err}", self.what);
    }

    fn op(
        &mut self,
        op: &str,
        proto: &str,
        dst: SocketAddr,
        payload: &str,
        expect: usize,
    ) -> Outcome {
        let family = if dst.is_ipv4() { 4 } else { 6 };
        Outcome::from(self.call(&json!({
            "op": op,
            "proto": proto,
            "family": family,
            "addr": dst.ip().to_string(),
            "port": dst.port(),
            "payload": payload,
            "expect": expect,
        })))
    }

    /// TCP connect(); on success sends `ping` and waits for `pong`.
    fn tcp_ping(&mut self, dst: SocketAddr) -> Outcome {
        self.op("connect", "tcp", dst, "ping", 4)
    }

    /// TCP connect() and close, nothing sent.
    fn tcp_connect(&mut self, dst: SocketAddr) -> Outcome {
        self.op("connect", "tcp", dst, "", 0)
    }

    /// sendto() of `payload` on an unconnected UDP socket.
    fn udp_sendto(&mut self, dst: SocketAddr, payload: &str) -> Outcome {
        self.op("sendto", "udp", dst, payload, 0)
    }

    /// connect() of a UDP socket, then send() of `payload`.
    fn udp_connect_send(&mut self, dst: SocketAddr, payload: &str) -> Outcome {
        self.op("connect", "udp", dst, payload, 0)
    }

    fn bind(&mut self, proto: &str, at: SocketAddr) -> Outcome {
        self.op("bind", proto, at, "", 0)
    }
}

/// The test process's own `0::...` line of /proc/self/cgroup.
fn own_cgroup2_line() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("0::"))
        .unwrap_or_default()
        .to_owned()
}

// ---------------------------------------------------------------------------
// Servers (threads of the test process in the server namespace)
// ---------------------------------------------------------------------------

/// TCP listeners on `[::]:port` (both families) answering `ping` with
/// `pong`. Stopped on drop.
struct TcpServer {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl TcpServer {
    fn start(ns: &Netns, ports: &[u16]) -> TcpServer {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let ports = ports.to_vec();
        let (stop2, accepted2) = (stop.clone(), accepted.clone());
        let handle = ns.spawn(move || {
            let mut listeners = Vec::new();
            for p in &ports {
                match TcpListener::bind((Ipv6Addr::UNSPECIFIED, *p)) {
                    Ok(l) => {
                        l.set_nonblocking(true).expect("nonblocking listener");
                        listeners.push(l);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("listen on {p}: {e}")));
                        return;
                    }
                }
            }
            let _ = tx.send(Ok(()));
            let start = Instant::now();
            while !stop2.load(Ordering::Relaxed) && start.elapsed() < SERVER_LIMIT {
                let mut any = false;
                for l in &listeners {
                    while let Ok((s, _)) = l.accept() {
                        any = true;
                        accepted2.fetch_add(1, Ordering::Relaxed);
                        serve_ping(s);
                    }
                }
                if !any {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("TCP server in {}: {e}", ns.name()),
            Err(e) => panic!("TCP server in {} not ready: {e}", ns.name()),
        }
        TcpServer {
            stop,
            accepted,
            handle: Some(handle),
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

fn serve_ping(mut s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 4];
    if s.read_exact(&mut buf).is_ok() && &buf == b"ping" {
        let _ = s.write_all(b"pong");
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A UDP socket on `[::]:port` (both families) keeping every payload it
/// receives. Stopped on drop.
struct UdpServer {
    stop: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<String>>>,
    handle: Option<JoinHandle<()>>,
}

impl UdpServer {
    fn start(ns: &Netns, port: u16) -> UdpServer {
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let (stop2, got2) = (stop.clone(), got.clone());
        let handle = ns.spawn(move || {
            let sock = match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(format!("bind UDP {port}: {e}")));
                    return;
                }
            };
            sock.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("read timeout");
            let _ = tx.send(Ok(()));
            let start = Instant::now();
            let mut buf = [0u8; 256];
            while !stop2.load(Ordering::Relaxed) && start.elapsed() < SERVER_LIMIT {
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    got2.lock()
                        .expect("lock")
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("UDP server in {}: {e}", ns.name()),
            Err(e) => panic!("UDP server in {} not ready: {e}", ns.name()),
        }
        UdpServer {
            stop,
            got,
            handle: Some(handle),
        }
    }

    fn has(&self, payload: &str) -> bool {
        self.got.lock().expect("lock").iter().any(|p| p == payload)
    }

    /// Whether `payload` arrives within `timeout`.
    fn wait_for(&self, payload: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.has(payload) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The packet judge: the client namespace's own counters
// ---------------------------------------------------------------------------

/// TCP segments and UDP datagrams a namespace has sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    tcp_segs: u64,
    udp4: u64,
    udp6: u64,
}

fn sent(ns: &Netns) -> Sent {
    let out = ns.exec_ok(["cat", "/proc/net/snmp", "/proc/net/snmp6"]);
    let text = String::from_utf8_lossy(&out.stdout);
    // /proc/net/snmp: per group a line of names, then a line of values.
    let group = |g: &str, name: &str| -> u64 {
        let prefix = format!("{g}:");
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
        lines
            .chunks(2)
            .find_map(|pair| {
                let [names, values] = pair else { return None };
                names
                    .split_whitespace()
                    .zip(values.split_whitespace())
                    .find(|(n, _)| *n == name)
                    .and_then(|(_, v)| v.parse().ok())
            })
            .unwrap_or_else(|| panic!("no {g} {name} in /proc/net/snmp of {}", ns.name()))
    };
    // /proc/net/snmp6: `Name value` per line.
    let udp6 = text
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("Udp6OutDatagrams")).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Udp6OutDatagrams in /proc/net/snmp6 of {}", ns.name()));
    Sent {
        tcp_segs: group("Tcp", "OutSegs"),
        udp4: group("Udp", "OutDatagrams"),
        udp6,
    }
}

/// The counters once they stand still (the last allowed connection's close
/// may still be under way).
fn sent_quiet(ns: &Netns) -> Sent {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = sent(ns);
    loop {
        thread::sleep(Duration::from_millis(100));
        let now = sent(ns);
        if now == last {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "TCP/UDP counters of {} keep moving: {last:?} -> {now:?}",
            ns.name()
        );
        last = now;
    }
}

/// Runs `f` and asserts that `ns` sent no TCP segment and no UDP datagram meanwhile.
#[track_caller]
fn without_packets<T>(ns: &Netns, what: &str, f: impl FnOnce() -> T) -> T {
    let before = sent_quiet(ns);
    let r = f();
    let after = sent(ns);
    assert_eq!(before, after, "{what}: packets left {}", ns.name());
    r
}

/// Runs `f` and asserts that `ns` sent TCP segments or UDP datagrams meanwhile.
#[track_caller]
fn with_packets<T>(ns: &Netns, what: &str, f: impl FnOnce() -> T) -> T {
    let before = sent_quiet(ns);
    let r = f();
    let after = sent(ns);
    assert!(
        after.tcp_segs > before.tcp_segs || after.udp4 > before.udp4 || after.udp6 > before.udp6,
        "{what}: no packet left {} ({before:?} -> {after:?})",
        ns.name()
    );
    r
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// B's addresses as the three kinds of destination: IPv4, IPv6, and IPv4
/// through an AF_INET6 socket (`::ffff:a.b.c.d`).
fn destinations(lab: &Lab) -> [(&'static str, IpAddr); 3] {
    [
        ("IPv4", lab.b_v4.into()),
        ("IPv6", lab.b_v6.into()),
        ("IPv4-mapped", lab.b_v4.to_ipv6_mapped().into()),
    ]
}

// ---------------------------------------------------------------------------
// connect()
// ---------------------------------------------------------------------------

/// A denied TCP connect() fails with EPERM at once and nothing leaves the
/// namespace; an allowed one connects and carries bytes. IPv4, IPv6, and an
/// AF_INET6 socket to `::ffff:B` judged by the IPv4 rule.
#[test]
fn sock_connect_denied_is_eperm_before_any_packet() {
    let cg = Cgroup::new("conn");
    let lab = Lab::new("sconn");
    let env = AgentEnv::new("sconn");
    let rules = vec![
        tcp_rule("deny", lab.b_v4.into(), DENIED),
        tcp_rule("deny", lab.b_v6.into(), DENIED),
    ];
    let wl = rules
        .iter()
        .fold(Wl::new("web", cg.rel()), |w, r| w.connect(r.clone()));
    let _agent = start_agent(&env, &[wl]);
    let _srv = TcpServer::start(&lab.b, &[DENIED, ALLOWED]);
    let mut w = Worker::spawn(&lab.a, Some(cg.path()), "web");

    for (kind, ip) in destinations(&lab) {
        let o = without_packets(&lab.a, &format!("{kind} denied connect"), || {
            w.tcp_ping(sa(ip, DENIED))
        });
        assert_eperm(&format!("{kind} connect to {ip}:{DENIED}"), &o);
        let o = with_packets(&lab.a, &format!("{kind} allowed connect"), || {
            w.tcp_ping(sa(ip, ALLOWED))
        });
        assert_pong(&format!("{kind} connect to {ip}:{ALLOWED}"), &o);
    }

    let entry = workload_entry(&env, "web");
    assert_workload_shape(&entry, "web", cg.path(), &rules, &[]);
    assert_eq!(entry["connect_default"], "allow", "{entry}");
    assert_eq!(entry["bind_default"], "allow", "{entry}");
    assert_eq!(entry["audit"], false, "{entry}");
    // Three denials by a rule, three allowed by the default.
    assert!(
        eventually(|| {
            let e = workload_entry(&env, "web");
            calls(&e, "connect", "deny", "rule") == 3
                && calls(&e, "connect", "allow", "default") == 3
        }),
        "counts: {:?}",
        all_counts(&workload_entry(&env, "web"))
    );
}

// ---------------------------------------------------------------------------
// UDP sendmsg()
// ---------------------------------------------------------------------------

/// UDP sendto() (and connect()) to a denied destination fails with EPERM and
/// sends nothing; to an allowed one the datagram arrives. A UDP rule leaves
/// TCP to the same port alone.
#[test]
fn sock_udp_sendto_denied_is_eperm_allowed_arrives() {
    const UDP_DENIED: u16 = 5000;
    const UDP_ALLOWED: u16 = 5001;
    let cg = Cgroup::new("udp");
    let lab = Lab::new("sudp");
    let env = AgentEnv::new("sudp");
    let wl = Wl::new("dns", cg.rel())
        .connect(format!("deny udp to {}/32 port {UDP_DENIED}", lab.b_v4))
        .connect(format!("deny udp to {}/128 port {UDP_DENIED}", lab.b_v6));
    let _agent = start_agent(&env, &[wl]);
    let denied_srv = UdpServer::start(&lab.b, UDP_DENIED);
    let allowed_srv = UdpServer::start(&lab.b, UDP_ALLOWED);
    let _tcp = TcpServer::start(&lab.b, &[UDP_DENIED]);
    let mut w = Worker::spawn(&lab.a, Some(cg.path()), "dns");

    for (kind, ip) in destinations(&lab) {
        let p = format!("denied-sendto-{kind}");
        let o = without_packets(&lab.a, &format!("{kind} denied sendto"), || {
            w.udp_sendto(sa(ip, UDP_DENIED), &p)
        });
        assert_eperm(&format!("{kind} sendto {ip}:{UDP_DENIED}"), &o);

        let p2 = format!("denied-connect-{kind}");
        let o = without_packets(&lab.a, &format!("{kind} denied UDP connect"), || {
            w.udp_connect_send(sa(ip, UDP_DENIED), &p2)
        });
        assert_eperm(&format!("{kind} UDP connect {ip}:{UDP_DENIED}"), &o);

        let ok = format!("allowed-sendto-{kind}");
        let o = with_packets(&lab.a, &format!("{kind} allowed sendto"), || {
            w.udp_sendto(sa(ip, UDP_ALLOWED), &ok)
        });
        assert_allowed(&format!("{kind} sendto {ip}:{UDP_ALLOWED}"), &o);
        assert!(
            allowed_srv.wait_for(&ok, Duration::from_secs(2)),
            "{kind}: the allowed datagram did not arrive"
        );

        // The rule names UDP: TCP to the same port is not its business.
        let o = w.tcp_ping(sa(ip, UDP_DENIED));
        assert_pong(&format!("{kind} TCP connect to {ip}:{UDP_DENIED}"), &o);
    }
    thread::sleep(Duration::from_millis(200));
    let leaked: Vec<String> = denied_srv.got.lock().expect("lock").clone();
    assert!(leaked.is_empty(), "denied datagrams arrived: {leaked:?}");

    let e = workload_entry(&env, "dns");
    assert!(
        eventually(|| {
            let e = workload_entry(&env, "dns");
            calls(&e, "sendmsg", "deny", "rule") == 3
                && calls(&e, "connect", "deny", "rule") == 3
                && calls(&e, "sendmsg", "allow", "default") == 3
        }),
        "counts: {:?}",
        all_counts(&e)
    );
}

// ---------------------------------------------------------------------------
// bind()
// ---------------------------------------------------------------------------

/// `deny port 1-1023`: binds below 1024 fail with EPERM, 8080 works; a
/// workload with `bind_default = "deny"` may bind only what its one rule
/// allows (protocol, address and port).
#[test]
fn sock_bind_rules_and_default() {
    let cg = Cgroup::new("bind");
    let open_dir = cg.child("open");
    let strict_dir = cg.child("strict");
    let lab = Lab::new("sbind");
    let env = AgentEnv::new("sbind");
    let strict_rule = format!("allow tcp at {}/32 port 8080-8090", lab.a_v4);
    let _agent = start_agent(
        &env,
        &[
            Wl::new("open", rel_of(&open_dir)).bind("deny port 1-1023"),
            Wl::new("strict", rel_of(&strict_dir))
                .bind_default("deny")
                .bind(strict_rule.clone()),
        ],
    );
    let mut open = Worker::spawn(&lab.a, Some(&open_dir), "open");
    let mut strict = Worker::spawn(&lab.a, Some(&strict_dir), "strict");
    let (a4, a6): (IpAddr, IpAddr) = (lab.a_v4.into(), lab.a_v6.into());
    let any4: IpAddr = std::net::Ipv4Addr::UNSPECIFIED.into();
    let any6: IpAddr = Ipv6Addr::UNSPECIFIED.into();

    for (proto, at, denied) in [
        ("tcp", sa(a4, 80), true),
        ("udp", sa(any4, 53), true),
        ("tcp", sa(a6, 443), true),
        ("udp", sa(any6, 1023), true),
        ("tcp", sa(a4, 8080), false),
        ("udp", sa(any4, 1024), false),
        ("tcp", sa(any6, 8080), false),
    ] {
        let o = open.bind(proto, at);
        let what = format!("open: bind {proto} {at}");
        if denied {
            assert_eperm(&what, &o);
        } else {
            assert_allowed(&what, &o);
        }
    }

    for (proto, at, denied) in [
        ("tcp", sa(a4, 8080), false),
        ("tcp", sa(a4, 8090), false),
        ("tcp", sa(a4, 8091), true),
        ("tcp", sa(a4, 80), true),
        ("udp", sa(a4, 8080), true),
        ("tcp", sa(any4, 8080), true),
        ("tcp", sa(a6, 8080), true),
        // An AF_INET6 socket bound to ::ffff:A is judged by the IPv4 rule.
        ("tcp", sa(lab.a_v4.to_ipv6_mapped(), 8085), false),
        ("tcp", sa(lab.a_v4.to_ipv6_mapped(), 8091), true),
    ] {
        let o = strict.bind(proto, at);
        let what = format!("strict: bind {proto} {at}");
        if denied {
            assert_eperm(&what, &o);
        } else {
            assert_allowed(&what, &o);
        }
    }

    let e = workload_entry(&env, "strict");
    assert_eq!(e["bind_default"], "deny", "{e}");
    assert_eq!(e["bind"], json!([strict_rule]), "{e}");
    assert!(
        eventually(|| {
            let s = workload_entry(&env, "strict");
            let o = workload_entry(&env, "open");
            calls(&s, "bind", "allow", "rule") == 3
                && calls(&s, "bind", "deny", "default") == 6
                && calls(&o, "bind", "deny", "rule") == 4
                && calls(&o, "bind", "allow", "default") == 3
        }),
        "counts: strict {:?}, open {:?}",
        all_counts(&workload_entry(&env, "strict")),
        all_counts(&workload_entry(&env, "open"))
    );
}

// ---------------------------------------------------------------------------
// Who is covered
// ---------------------------------------------------------------------------

/// The workload covers its cgroup and every cgroup below it; a process
/// elsewhere in the same namespace reaches the same denied destination.
#[test]
fn sock_process_outside_the_workload_is_unaffected() {
    let cg = Cgroup::new("outside");
    let sub = cg.child("sub/deeper");
    let lab = Lab::new("sout");
    let env = AgentEnv::new("sout");
    let _agent = start_agent(
        &env,
        &[Wl::new("web", cg.rel()).connect(tcp_rule("deny", lab.b_v4.into(), DENIED))],
    );
    let srv = TcpServer::start(&lab.b, &[DENIED]);
    let dst = sa(lab.b_v4, DENIED);

    let mut inside = Worker::spawn(&lab.a, Some(cg.path()), "inside");
    let o = without_packets(&lab.a, "inside", || inside.tcp_ping(dst));
    assert_eperm("in the workload's cgroup", &o);

    let mut below = Worker::spawn(&lab.a, Some(&sub), "below");
    let o = without_packets(&lab.a, "below", || below.tcp_ping(dst));
    assert_eperm("in a cgroup two levels below the workload's", &o);

    let before = srv.accepted();
    let mut outside = Worker::spawn(&lab.a, None, "outside");
    let o = with_packets(&lab.a, "outside", || outside.tcp_ping(dst));
    assert_pong("outside the workload, same namespace", &o);
    assert_eq!(
        srv.accepted(),
        before + 1,
        "the server saw the outsider only"
    );
}

// ---------------------------------------------------------------------------
// Audit and counters
// ---------------------------------------------------------------------------

/// Audit mode lets a would-be denial through and counts it as `audit`; an
/// enforcing workload with the same rules counts `deny`, by `rule` or by
/// `default`, in `workload list --json`.
#[test]
fn sock_audit_and_counts_by_verdict_and_reason() {
    const DEFAULT_PORT: u16 = 7002;
    let cg = Cgroup::new("audit");
    let aud_dir = cg.child("aud");
    let enf_dir = cg.child("enf");
    let lab = Lab::new("saud");
    let env = AgentEnv::new("saud");
    let rules = |w: Wl| {
        w.connect_default("deny")
            .connect(tcp_rule("deny", lab.b_v4.into(), DENIED))
            .connect(tcp_rule("allow", lab.b_v4.into(), ALLOWED))
    };
    env.write_config(&config_body(&[
        rules(Wl::new("aud", rel_of(&aud_dir)).audit()),
        rules(Wl::new("enf", rel_of(&enf_dir))),
    ]));
    let _agent = AgentProc::start(&env, &[]);
    let _srv = TcpServer::start(&lab.b, &[DENIED, ALLOWED, DEFAULT_PORT]);
    let mut aud = Worker::spawn(&lab.a, Some(&aud_dir), "aud");
    let mut enf = Worker::spawn(&lab.a, Some(&enf_dir), "enf");
    let b4 = lab.b_v4;

    // Audit: everything connects, and packets leave.
    for p in [DENIED, DEFAULT_PORT, ALLOWED] {
        let o = with_packets(&lab.a, &format!("audit {p}"), || aud.tcp_ping(sa(b4, p)));
        assert_pong(&format!("audit: connect to {b4}:{p}"), &o);
    }
    // Enforcing: the rule's and the default's denials.
    for p in [DENIED, DEFAULT_PORT] {
        let o = without_packets(&lab.a, &format!("enforce {p}"), || enf.tcp_ping(sa(b4, p)));
        assert_eperm(&format!("enforcing: connect to {b4}:{p}"), &o);
    }
    let o = enf.tcp_ping(sa(b4, ALLOWED));
    assert_pong(&format!("enforcing: connect to {b4}:{ALLOWED}"), &o);

    let counts = |name: &str| all_counts(&workload_entry(&env, name));
    let c = |h: &str, v: &str, r: &str| (h.to_owned(), v.to_owned(), r.to_owned(), 1u64);
    let want_aud = vec![
        c("connect", "allow", "rule"),
        c("connect", "audit", "default"),
        c("connect", "audit", "rule"),
    ];
    let want_enf = vec![
        c("connect", "allow", "rule"),
        c("connect", "deny", "default"),
        c("connect", "deny", "rule"),
    ];
    assert!(
        eventually(|| counts("aud") == want_aud && counts("enf") == want_enf),
        "counts: aud {:?} (want {want_aud:?}), enf {:?} (want {want_enf:?})",
        counts("aud"),
        counts("enf")
    );
    assert_eq!(workload_entry(&env, "aud")["audit"], true);
    assert_eq!(workload_entry(&env, "enf")["audit"], false);
    assert_eq!(workload_entry(&env, "enf")["connect_default"], "deny");
}

/// `sluice_sock_decisions_total` counts each decision once, by workload,
/// hook, verdict and reason.
#[test]
fn sock_decisions_in_metrics() {
    const DEFAULT_PORT: u16 = 7002;
    let cg = Cgroup::new("metrics");
    let lab = Lab::new("smet");
    let env = AgentEnv::new("smet");
    let b4 = lab.b_v4;
    env.write_config(&config_body(&[Wl::new("web", cg.rel())
        .connect_default("deny")
        .connect(tcp_rule("deny", b4.into(), DENIED))
        .connect(tcp_rule("allow", b4.into(), ALLOWED))]));
    let port = env.serve_metrics();
    let _agent = AgentProc::start(&env, &[]);
    let _srv = TcpServer::start(&lab.b, &[ALLOWED]);
    let mut w = Worker::spawn(&lab.a, Some(cg.path()), "web");
    assert_eperm("rule", &w.tcp_ping(sa(b4, DENIED)));
    assert_eperm("default", &w.tcp_ping(sa(b4, DEFAULT_PORT)));
    assert_pong("allowed", &w.tcp_ping(sa(b4, ALLOWED)));

    let m = scrape(port);
    for (verdict, reason) in [("deny", "rule"), ("deny", "default"), ("allow", "rule")] {
        let labels = [
            ("workload", "web"),
            ("hook", "connect"),
            ("verdict", verdict),
            ("reason", reason),
        ];
        assert_eq!(
            sock_metric(&m, &labels),
            Some(1.0),
            "metric {labels:?}; the sock lines of the scrape:\n{}",
            m.lines()
                .filter(|l| l.contains("sock"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// Atomic policy change under load
// ---------------------------------------------------------------------------

/// A client in the workload makes 1,000 TCP connect() calls to one
/// destination while the test flips the workload's policy for it between
/// deny (a rule, default allow) and allow (a rule, default deny) through
/// `sluice apply`. Every call succeeds or fails with EPERM, none hangs, and
/// every call made wholly after a flip completed and before the next began
/// gets the new policy's verdict.
#[test]
fn sock_policy_flip_under_load_is_atomic() {
    const CALLS: u32 = 1000;
    const FLIPS: u32 = 6;
    /// Calls in force between a flip's end and the next flip's start.
    const STABLE_MIN: u32 = 20;
    const LIMIT: Duration = Duration::from_secs(120);

    let cg = Cgroup::new("flip");
    let lab = Lab::new("sflip");
    let env = AgentEnv::new("sflip");
    let b4: IpAddr = lab.b_v4.into();
    let deny = [Wl::new("web", cg.rel()).connect(tcp_rule("deny", b4, DENIED))];
    let allow = [Wl::new("web", cg.rel())
        .connect_default("deny")
        .connect(tcp_rule("allow", b4, DENIED))];
    let _agent = start_agent(&env, &deny);
    let files = [
        env.file("deny.toml", &env.config_text(&config_body(&deny))),
        env.file("allow.toml", &env.config_text(&config_body(&allow))),
    ];
    let _srv = TcpServer::start(&lab.b, &[DENIED]);
    let mut w = Worker::spawn(&lab.a, Some(cg.path()), "web");
    let dst = sa(b4, DENIED);
    assert_eperm("before the flips", &w.tcp_connect(dst));

    // Flip k is due once k/(FLIPS+1) of the calls are made.
    let due = |calls: u32| (calls * (FLIPS + 1) / CALLS).min(FLIPS);
    // Odd while a flip is under way.
    let epoch = AtomicU32::new(0);
    let started = AtomicU32::new(0);
    let allowed_now = AtomicBool::new(false);
    let completed_at = AtomicU32::new(0);
    let calls_done = AtomicU32::new(0);
    let done = AtomicBool::new(false);
    let abort = AtomicBool::new(false);
    let deadline = Instant::now() + LIMIT;

    struct Call {
        i: u32,
        e1: u32,
        e2: u32,
        allow: bool,
        o: Outcome,
    }

    let (results, flipper) = thread::scope(|s| {
        let flipper = s.spawn(|| -> Result<u32, String> {
            let mut flips = 0;
            for k in 1..=FLIPS {
                loop {
                    let n = calls_done.load(Ordering::SeqCst);
                    if done.load(Ordering::SeqCst) {
                        return Ok(flips);
                    }
                    if due(n) >= k && n >= completed_at.load(Ordering::SeqCst) + STABLE_MIN {
                        break;
                    }
                    if Instant::now() > deadline {
                        abort.store(true, Ordering::SeqCst);
                        return Err(format!("flip {k} never became due"));
                    }
                    thread::sleep(Duration::from_micros(200));
                }
                let to_allow = k % 2 == 1;
                epoch.fetch_add(1, Ordering::SeqCst);
                started.store(k, Ordering::SeqCst);
                let file = &files[usize::from(to_allow)];
                let out = env.cli(&["apply", file.to_str().expect("utf-8 path")]);
                if !out.status.success() {
                    abort.store(true, Ordering::SeqCst);
                    return Err(format!(
                        "flip {k}: apply failed ({}): {}{}",
                        out.status,
                        stdout(&out),
                        stderr(&out)
                    ));
                }
                allowed_now.store(to_allow, Ordering::SeqCst);
                completed_at.store(calls_done.load(Ordering::SeqCst), Ordering::SeqCst);
                epoch.fetch_add(1, Ordering::SeqCst);
                flips += 1;
            }
            Ok(flips)
        });

        // However the load ends (a failed assert too), the flipper stops.
        struct SetOnDrop<'a>(&'a AtomicBool);
        impl Drop for SetOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop_flipper = SetOnDrop(&done);
        let mut results = Vec::with_capacity(CALLS as usize);
        for i in 0..CALLS {
            // Keep to the schedule: wait for a due flip to start, unless
            // the stable window since the last flip is not full yet.
            loop {
                if abort.load(Ordering::SeqCst) || started.load(Ordering::SeqCst) >= due(i) {
                    break;
                }
                let e = epoch.load(Ordering::SeqCst);
                if e.is_multiple_of(2) && i < completed_at.load(Ordering::SeqCst) + STABLE_MIN {
                    break;
                }
                assert!(Instant::now() < deadline, "call {i}: flips stalled");
                thread::sleep(Duration::from_micros(200));
            }
            if abort.load(Ordering::SeqCst) {
                break;
            }
            assert!(Instant::now() < deadline, "1,000 calls took over {LIMIT:?}");
            let e1 = epoch.load(Ordering::SeqCst);
            let allow = allowed_now.load(Ordering::SeqCst);
            let o = w.tcp_connect(dst);
            let e2 = epoch.load(Ordering::SeqCst);
            calls_done.fetch_add(1, Ordering::SeqCst);
            results.push(Call {
                i,
                e1,
                e2,
                allow,
                o,
            });
        }
        done.store(true, Ordering::SeqCst);
        (results, flipper.join().expect("flip thread"))
    });

    let flips = flipper.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(results.len(), CALLS as usize, "all calls made");
    assert_eq!(flips, FLIPS, "all flips made during the load");

    let odd: Vec<String> = results
        .iter()
        .filter(|c| !(c.o.ok || c.o.eperm()) || c.o.ms > 1000.0)
        .map(|c| format!("call {}: {}", c.i, c.o.raw))
        .collect();
    assert!(
        odd.is_empty(),
        "{} calls neither succeeded nor failed with EPERM at once:\n{}",
        odd.len(),
        odd.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );

    let strict: Vec<&Call> = results
        .iter()
        .filter(|c| c.e1 == c.e2 && c.e1.is_multiple_of(2))
        .collect();
    let wrong: Vec<String> = strict
        .iter()
        .filter(|c| c.o.ok != c.allow)
        .map(|c| {
            format!(
                "call {} after flip {} ({}): {}",
                c.i,
                c.e1 / 2,
                if c.allow { "allow" } else { "deny" },
                c.o.raw
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} calls made between flips got the old verdict:\n{}",
        wrong.len(),
        strict.len(),
        wrong
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let strict_allowed = strict.iter().filter(|c| c.allow).count();
    let strict_denied = strict.len() - strict_allowed;
    assert!(
        strict_allowed >= STABLE_MIN as usize && strict_denied >= STABLE_MIN as usize,
        "too few calls between flips to judge: {strict_allowed} under allow, {strict_denied} under deny"
    );
    // A torn policy (one generation's rules with the other's default, or
    // no rules) would send a call to the default: both policies judge this
    // destination by a rule.
    let e = workload_entry(&env, "web");
    let by_default: u64 = ["allow", "deny"]
        .iter()
        .map(|v| calls(&e, "connect", v, "default"))
        .sum();
    assert_eq!(
        by_default,
        0,
        "calls judged by a default during the flips: {:?}",
        all_counts(&e)
    );
    let in_flight = results.len() - strict.len();
    eprintln!(
        "flip under load: {} calls, {FLIPS} flips, {in_flight} during a flip, {strict_allowed} judged under allow, {strict_denied} under deny; counters {:?}",
        results.len(),
        all_counts(&e)
    );
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

/// Every bad `workload add` (and `del`, and a bad `apply`) exits nonzero with
/// one line naming the problem, and changes nothing: the list is the same
/// and the workload's denial still holds. Without an agent, `workload add`
/// fails with one line too.
#[test]
fn sock_bad_input_changes_nothing() {
    let cg = Cgroup::new("bad");
    let web = cg.child("web");
    let inner = cg.child("web/inner");
    let other = cg.child("other");
    let lab = Lab::new("sbad");
    let env = AgentEnv::new("sbad");
    let (rel, web_rel, inner_rel, other_rel) =
        (cg.rel(), rel_of(&web), rel_of(&inner), rel_of(&other));

    // No agent yet.
    let out = env.cli(&["workload", "add", "web", "--cgroup", &web_rel]);
    let line = expect_one_line_error("workload add without an agent", &out);
    eprintln!("without an agent: {line}");

    let _agent = start_agent(
        &env,
        &[Wl::new("web", web_rel.as_str()).connect(tcp_rule("deny", lab.b_v4.into(), DENIED))],
    );
    let _srv = TcpServer::start(&lab.b, &[DENIED]);
    let mut w = Worker::spawn(&lab.a, Some(&web), "web");
    let dst = sa(lab.b_v4, DENIED);
    assert_eperm("before the bad input", &w.tcp_ping(dst));
    let before = workload_list_without_counts(&env);
    assert_eq!(before.len(), 1, "{before:?}");

    let dotdot = format!("{other_rel}/../other");
    let missing = format!("{rel}/missing");
    let long_name = "a".repeat(33);
    let too_many: Vec<String> = (0..65)
        .flat_map(|p| {
            [
                "--connect".to_owned(),
                format!("deny tcp port {}", 10_000 + p),
            ]
        })
        .collect();
    let mut cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "a cgroup that does not exist",
            vec!["x1".into(), "--cgroup".into(), missing.clone()],
            vec!["missing"],
        ),
        (
            "a path with ..",
            vec!["x2".into(), "--cgroup".into(), dotdot.clone()],
            vec![".."],
        ),
        (
            "the root (/)",
            vec!["x3".into(), "--cgroup".into(), "/".into()],
            vec!["root"],
        ),
        (
            "the root (.)",
            vec!["x4".into(), "--cgroup".into(), ".".into()],
            vec!["root", "`.`"],
        ),
        (
            "a cgroup below a workload's",
            vec!["x5".into(), "--cgroup".into(), inner_rel.clone()],
            vec!["nest", "web"],
        ),
        (
            "a cgroup above a workload's",
            vec!["x6".into(), "--cgroup".into(), rel.clone()],
            vec!["nest", "web"],
        ),
        (
            "a bad prefix",
            vec![
                "x7".into(),
                "--cgroup".into(),
                other_rel.clone(),
                "--connect".into(),
                "deny tcp to 198.18.0.0/33".into(),
            ],
            vec!["198.18.0.0/33"],
        ),
        (
            "a bad action",
            vec![
                "x8".into(),
                "--cgroup".into(),
                other_rel.clone(),
                "--bind".into(),
                "drop port 80".into(),
            ],
            vec!["drop"],
        ),
        (
            "`to` in a bind rule",
            vec![
                "x9".into(),
                "--cgroup".into(),
                other_rel.clone(),
                "--bind".into(),
                "deny to 198.18.0.0/24".into(),
            ],
            vec!["to"],
        ),
        (
            "a duplicate name",
            vec!["web".into(), "--cgroup".into(), other_rel.clone()],
            vec!["web"],
        ),
        (
            "an upper-case name",
            vec!["Web".into(), "--cgroup".into(), other_rel.clone()],
            vec!["Web"],
        ),
        (
            "a 33-character name",
            vec![long_name.clone(), "--cgroup".into(), other_rel.clone()],
            vec![long_name.as_str()],
        ),
    ];
    let mut many = vec!["x10".to_owned(), "--cgroup".into(), other_rel.clone()];
    many.extend(too_many);
    cases.push(("65 rules", many, vec!["64"]));

    let mut report = Vec::new();
    for (what, args, needles) in &cases {
        let mut argv = vec!["workload", "add"];
        argv.extend(args.iter().map(String::as_str));
        let out = env.cli(&argv);
        let line = expect_one_line_error(&format!("workload add with {what}"), &out);
        assert!(
            needles
                .iter()
                .any(|n| line.to_lowercase().contains(&n.to_lowercase())),
            "workload add with {what}: the error does not name the problem (any of {needles:?}): {line}"
        );
        report.push(format!("{what}: {line}"));
        assert_eq!(
            workload_list_without_counts(&env),
            before,
            "workload add with {what} changed the list"
        );
        assert_eperm(&format!("after workload add with {what}"), &w.tcp_ping(dst));
    }

    let out = env.cli(&["workload", "del", "nosuch"]);
    let line = expect_one_line_error("workload del of an unknown name", &out);
    assert!(line.contains("nosuch"), "{line}");
    report.push(format!("del nosuch: {line}"));

    // A file with nested workloads: refused whole.
    let bad = env.file(
        "nested.toml",
        &env.config_text(&config_body(&[
            Wl::new("web", web_rel.as_str()),
            Wl::new("inner", inner_rel.as_str()),
        ])),
    );
    let out = env.cli(&["apply", bad.to_str().expect("utf-8 path")]);
    assert!(
        !out.status.success(),
        "apply of nested workloads should fail:\n{}",
        stdout(&out)
    );
    report.push(format!("apply nested: {}", stderr(&out).trim()));
    assert_eq!(
        workload_list_without_counts(&env),
        before,
        "a bad apply changed the list"
    );
    assert_eperm("after the bad apply", &w.tcp_ping(dst));

    // One workload more than the limit (64): refused whole.
    let many: Vec<Wl> = (0..65)
        .map(|i| Wl::new(&format!("w{i}"), rel_of(&cg.child(&format!("many/w{i}")))))
        .collect();
    let bad = env.file("many.toml", &env.config_text(&config_body(&many)));
    let out = env.cli(&["apply", bad.to_str().expect("utf-8 path")]);
    assert!(
        !out.status.success() && stderr(&out).contains("64"),
        "apply of 65 workloads should fail naming the limit of 64:\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    report.push(format!("apply 65 workloads: {}", stderr(&out).trim()));
    assert_eq!(
        workload_list_without_counts(&env),
        before,
        "a bad apply changed the list"
    );
    assert_eperm("after the apply of 65 workloads", &w.tcp_ping(dst));

    eprintln!("errors:\n{}", report.join("\n"));
}

// ---------------------------------------------------------------------------
// Removal and restart
// ---------------------------------------------------------------------------

/// `workload add` attaches (list and status say so, the connect is denied);
/// `workload del` detaches: the connect succeeds and status shows no
/// attachment left on the cgroup.
#[test]
fn sock_workload_del_detaches() {
    let cg = Cgroup::new("del");
    let lab = Lab::new("sdel");
    let env = AgentEnv::new("sdel");
    let _agent = start_agent(&env, &[]);
    let _srv = TcpServer::start(&lab.b, &[DENIED]);
    let mut w = Worker::spawn(&lab.a, Some(cg.path()), "web");
    let dst = sa(lab.b_v4, DENIED);
    assert_pong("before any workload", &w.tcp_ping(dst));
    assert!(status_entries_for(&env, cg.path()).is_empty());

    let rule = tcp_rule("deny", lab.b_v4.into(), DENIED);
    let rel = cg.rel();
    env.cli_ok(&[
        "workload",
        "add",
        "web",
        "--cgroup",
        &rel,
        "--connect",
        &rule,
    ]);
    let e = workload_entry(&env, "web");
    assert_workload_shape(&e, "web", cg.path(), std::slice::from_ref(&rule), &[]);
    let entries = status_entries_for(&env, cg.path());
    assert_eq!(entries.len(), 1, "status --json after add: {entries:?}");
    if let Some(hooks) = status_hooks(&entries[0]) {
        assert_eq!(hooks.len(), 6, "six hooks: {hooks:?}");
    }
    let text = stdout(&env.cli_ok(&["status"]));
    let abs = cg.path().to_string_lossy().into_owned();
    assert!(
        text.lines().any(|l| l.contains(abs.as_str())),
        "status names the workload's cgroup {}:\n{text}",
        cg.path().display()
    );
    let o = without_packets(&lab.a, "after add", || w.tcp_ping(dst));
    assert_eperm("after workload add", &o);

    env.cli_ok(&["workload", "del", "web"]);
    let o = with_packets(&lab.a, "after del", || w.tcp_ping(dst));
    assert_pong("after workload del", &o);
    assert!(workload_list(&env).is_empty(), "{:?}", workload_list(&env));
    let entries = status_entries_for(&env, cg.path());
    assert!(entries.is_empty(), "status --json after del: {entries:?}");
    assert!(
        status_cgroups(&env).is_empty(),
        "no cgroup attachment at all: {:?}",
        status_cgroups(&env)
    );
}

/// The links are pinned: with the agent killed (SIGKILL) the denial holds;
/// the restarted agent adopts them (one set of links: one call counts once).
#[test]
fn sock_links_survive_agent_restart() {
    let cg = Cgroup::new("restart");
    let lab = Lab::new("srst");
    let env = AgentEnv::new("srst");
    let mut agent = start_agent(
        &env,
        &[Wl::new("web", cg.rel()).connect(tcp_rule("deny", lab.b_v4.into(), DENIED))],
    );
    let _srv = TcpServer::start(&lab.b, &[DENIED, ALLOWED]);
    let mut w = Worker::spawn(&lab.a, Some(cg.path()), "web");
    let (dst, ok_dst) = (sa(lab.b_v4, DENIED), sa(lab.b_v4, ALLOWED));
    assert_eperm("with the agent", &w.tcp_ping(dst));

    agent.kill9();
    let o = without_packets(&lab.a, "agent killed", || w.tcp_ping(dst));
    assert_eperm("with the agent killed", &o);
    assert_pong("allowed, agent killed", &w.tcp_ping(ok_dst));

    agent = AgentProc::start(&env, &[]);
    assert_eperm("after the restart", &w.tcp_ping(dst));
    let list = workload_list(&env);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["attached"], true, "{list:?}");
    let entries = status_entries_for(&env, cg.path());
    assert_eq!(
        entries.len(),
        1,
        "one attachment after the restart: {entries:?}"
    );
    if let Some(hooks) = status_hooks(&entries[0]) {
        let mut uniq = hooks.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(
            (hooks.len(), uniq.len()),
            (6, 6),
            "six hooks, once each: {hooks:?}"
        );
    }

    // One call, one count: a second set of links would count it twice.
    let n0 = calls(&workload_entry(&env, "web"), "connect", "deny", "rule");
    assert_eperm("counted", &w.tcp_ping(dst));
    assert!(
        eventually(|| calls(&workload_entry(&env, "web"), "connect", "deny", "rule") > n0),
        "the denial was not counted"
    );
    thread::sleep(Duration::from_millis(200));
    let n1 = calls(&workload_entry(&env, "web"), "connect", "deny", "rule");
    assert_eq!(n1, n0 + 1, "one denied call counted {} times", n1 - n0);
    // Four denied calls in all, one while no agent ran: the counters are
    // pinned with the links and count on.
    assert_eq!(n1, 4, "denied calls counted across the restart");
    drop(agent);
}

// ---------------------------------------------------------------------------
// Flow records
// ---------------------------------------------------------------------------

/// Denied and audited calls are flow records (`sluice flows`) naming the
/// workload, the call, the process (pid and comm, taken in the hook) and
/// its own cgroup; allowed calls make none.
#[test]
fn sock_denials_are_flow_records_with_the_process() {
    let cg = Cgroup::new("flows");
    let leaf = cg.child("job");
    let lab = Lab::new("sflow");
    let env = AgentEnv::new("sflow");
    let wl = Wl::new("web", cg.rel())
        .connect(tcp_rule("deny", lab.b_v4.into(), DENIED))
        .bind("deny port 1-1023");
    let _agent = start_agent(&env, &[wl]);
    let _srv = TcpServer::start(&lab.b, &[DENIED, ALLOWED]);
    let mut w = Worker::spawn(&lab.a, Some(&leaf), "web/job");
    let pid = w.child.0.id();
    assert_eperm("connect", &w.tcp_ping(sa(lab.b_v4, DENIED)));
    assert_pong("allowed connect", &w.tcp_ping(sa(lab.b_v4, ALLOWED)));
    assert_eperm("bind 80", &w.bind("tcp", sa(lab.a_v4, 80)));

    let records = || -> Vec<Value> {
        let out = env.cli_ok(&["flows", "--json"]);
        stdout(&out)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r.get("hook").is_some())
            .collect()
    };
    assert!(
        eventually(|| records().len() >= 2),
        "socket records: {:?}",
        records()
    );
    let got = records();
    assert_eq!(got.len(), 2, "only the two denials are records: {got:?}");
    let leaf_path = leaf.to_string_lossy().into_owned();
    for (r, hook, addr, port) in [
        (&got[0], "connect", lab.b_v4.to_string(), DENIED),
        (&got[1], "bind", lab.a_v4.to_string(), 80),
    ] {
        assert_eq!(r["workload"], "web", "{r}");
        assert_eq!(r["hook"], hook, "{r}");
        assert_eq!(r["pid"].as_u64(), Some(u64::from(pid)), "{r}");
        assert!(
            r["comm"].as_str().is_some_and(|c| c.starts_with("python")),
            "{r}"
        );
        assert_eq!(
            r["cgroup"],
            leaf_path.as_str(),
            "the process's own cgroup: {r}"
        );
        assert_eq!(r["dst"], addr.as_str(), "{r}");
        assert_eq!(r["dport"].as_u64(), Some(u64::from(port)), "{r}");
        assert_eq!(r["verdict"], "drop", "{r}");
        assert_eq!(r["reason"], "rule", "{r}");
        assert_eq!(r["rule"].as_u64(), Some(1), "{r}");
        assert!(r.get("src").is_none() && r.get("sport").is_none(), "{r}");
    }
    let text = stdout(&env.cli_ok(&["flows"]));
    assert!(
        text.contains(&format!("workload web  pid {pid} (python"))
            && text.contains(&format!("connect {}:{DENIED}", lab.b_v4)),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// Pins
// ---------------------------------------------------------------------------

/// Socket-layer map pins replaced by unrelated maps (what a careless loader
/// leaves) are put back to the programs' own maps before a change is
/// written, so the change reaches what connect() is judged by.
#[test]
fn sock_replaced_map_pins_are_repaired_before_a_change() {
    let cg = Cgroup::new("pins");
    let lab = Lab::new("spins");
    let env = AgentEnv::new("spins");
    let deny = Wl::new("web", cg.rel()).connect(tcp_rule("deny", lab.b_v4.into(), DENIED));
    let agent = start_agent(&env, &[deny]);
    let _srv = TcpServer::start(&lab.b, &[DENIED]);
    let mut w = Worker::spawn(&lab.a, Some(cg.path()), "web");
    assert_eperm("before the change", &w.tcp_ping(sa(lab.b_v4, DENIED)));
    let sock_root = env.pin_root().join("sock");
    for map in ["SOCK_POLICY", "SOCK_RULES", "SOCK_GENERATION"] {
        crate::trust::replace_pin(&sock_root, map);
    }
    // The change: the rule goes, the default (allow) decides.
    let file = env.file(
        "allow.toml",
        &env.config_text(&config_body(&[Wl::new("web", cg.rel())])),
    );
    env.cli_ok(&["apply", file.to_str().expect("utf-8 path")]);
    assert_pong("after the change", &w.tcp_ping(sa(lab.b_v4, DENIED)));
    assert!(
        agent.wait_for_log("pinned the programs' own map again", Duration::from_secs(5)),
        "{}",
        agent.log()
    );
}

// ---------------------------------------------------------------------------
// Cgroups that come and go, links detached behind sluice's back
// ---------------------------------------------------------------------------

/// At start a workload's cgroup may not exist yet (a systemd unit that has
/// not started): the agent starts, the workload is not in force, and the
/// drift check links the cgroup once it exists. A link detached behind
/// sluice's back is not counted as attached and is made again.
#[test]
fn sock_missing_cgroups_and_detached_links_are_taken_up_by_the_drift_check() {
    let cg = Cgroup::new("later");
    let unit = cg.path().join("unit");
    let lab = Lab::new("slate");
    let env = AgentEnv::new("slate");
    let wl = Wl::new("unit", rel_of(&unit)).connect(tcp_rule("deny", lab.b_v4.into(), DENIED));
    env.write_config(&config_body(&[wl]));
    let agent = AgentProc::start(&env, &["--drift-interval", "1"]);
    let e = workload_entry(&env, "unit");
    assert_eq!(e["attached"], false, "{e}");
    assert!(
        e["problem"]
            .as_str()
            .is_some_and(|p| p.contains("does not exist")),
        "{e}"
    );
    assert!(
        agent.wait_for_log("not in force until they exist", Duration::from_secs(5)),
        "{}",
        agent.log()
    );
    // The unit starts: its cgroup appears; the next drift check links it.
    let unit = cg.child("unit");
    assert!(
        eventually(|| workload_entry(&env, "unit")["attached"] == true),
        "{}",
        workload_entry(&env, "unit")
    );
    let _srv = TcpServer::start(&lab.b, &[DENIED]);
    let mut w = Worker::spawn(&lab.a, Some(&unit), "unit");
    assert_eperm(
        "after the drift check linked it",
        &w.tcp_ping(sa(lab.b_v4, DENIED)),
    );

    // Someone detaches one link (bpftool link detach): not attached any
    // more, and the drift check makes it again.
    let id = crate::support::cgroup::cgroup_id(&unit);
    let pin = env
        .pin_root()
        .join("sock/links")
        .join(format!("{id}:connect4"));
    let out = crate::support::netns::run_ok([
        "bpftool",
        "-j",
        "link",
        "show",
        "pinned",
        pin.to_str().expect("utf-8 path"),
    ]);
    let link: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let link_id = link["id"].to_string();
    crate::support::netns::run_ok(["bpftool", "link", "detach", "id", &link_id]);
    assert_allowed(
        "connect4 detached behind sluice's back",
        &w.tcp_ping(sa(lab.b_v4, DENIED)),
    );
    assert!(
        eventually(|| {
            let e = workload_entry(&env, "unit");
            e["attached"] == true && w.tcp_ping(sa(lab.b_v4, DENIED)).eperm()
        }),
        "the drift check did not link connect4 again: {}",
        workload_entry(&env, "unit")
    );
    drop(agent);
}

/// Workloads added at run time and a file applied later must fit together:
/// a file whose workload would nest with a runtime one is refused whole.
#[test]
fn sock_a_file_that_nests_with_a_runtime_workload_is_refused() {
    let cg = Cgroup::new("nest");
    let inner = cg.child("inner");
    let env = AgentEnv::new("snest");
    env.write_config("");
    let _agent = AgentProc::start(&env, &[]);
    env.cli_ok(&["workload", "add", "inner", "--cgroup", &rel_of(&inner)]);
    let file = env.file(
        "outer.toml",
        &env.config_text(&config_body(&[Wl::new("outer", cg.rel())])),
    );
    let out = env.cli(&["apply", file.to_str().expect("utf-8 path")]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("nested") && err.contains("run time"), "{err}");
    let names: Vec<Value> = workload_list(&env)
        .iter()
        .map(|w| w["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("inner")]);
}

/// `sluice upgrade` swaps this build's socket programs in on every cgroup
/// link (forced here: the same build), keeping the maps: the workload's
/// denial and its counters carry over, and the links run new programs.
#[test]
fn sock_upgrade_swaps_the_programs_on_the_links_and_keeps_the_policy() {
    let cg = Cgroup::new("upg");
    let lab = Lab::new("supg");
    let env = AgentEnv::new("supg");
    let wl = Wl::new("web", cg.rel()).connect(tcp_rule("deny", lab.b_v4.into(), DENIED));
    let _agent = start_agent(&env, &[wl]);
    let _srv = TcpServer::start(&lab.b, &[DENIED]);
    let mut w = Worker::spawn(&lab.a, Some(cg.path()), "web");
    assert_eperm("before the upgrade", &w.tcp_ping(sa(lab.b_v4, DENIED)));
    let pin = env.pin_root().join("sock/links").join(format!(
        "{}:connect4",
        crate::support::cgroup::cgroup_id(cg.path())
    ));
    let prog_id = || {
        let out = crate::support::netns::run_ok([
            "bpftool",
            "-j",
            "link",
            "show",
            "pinned",
            pin.to_str().expect("utf-8 path"),
        ]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        v["prog_id"].as_u64().expect("prog_id")
    };
    let before = prog_id();
    let out = env.cli_ok(&["upgrade", "--force"]);
    let text = stdout(&out);
    assert!(
        text.contains("socket programs: 16 replaced on 6 cgroup link(s); maps kept"),
        "{text}"
    );
    assert_ne!(prog_id(), before, "the link runs a new program");
    assert_eperm("after the upgrade", &w.tcp_ping(sa(lab.b_v4, DENIED)));
    let e = workload_entry(&env, "web");
    assert_eq!(
        calls(&e, "connect", "deny", "rule"),
        2,
        "counters carried over: {e}"
    );
    assert_eq!(e["attached"], true, "{e}");
}

/// Every program and map pin of the socket layer removed while its links
/// live on: the next change pins the links' own maps again before loading
/// programs, so it reaches what connect() is judged by.
#[test]
fn sock_removed_program_and_map_pins_are_rebuilt_from_the_live_links() {
    let cg = Cgroup::new("gone");
    let lab = Lab::new("sgone");
    let env = AgentEnv::new("sgone");
    let deny = Wl::new("web", cg.rel()).connect(tcp_rule("deny", lab.b_v4.into(), DENIED));
    let _agent = start_agent(&env, &[deny]);
    let _srv = TcpServer::start(&lab.b, &[DENIED]);
    let mut w = Worker::spawn(&lab.a, Some(cg.path()), "web");
    assert_eperm("before", &w.tcp_ping(sa(lab.b_v4, DENIED)));
    for dir in ["sock/prog", "sock/maps"] {
        let dir = env.pin_root().join(dir);
        for e in std::fs::read_dir(&dir).expect("pin dir") {
            std::fs::remove_file(e.expect("entry").path()).expect("remove pin");
        }
    }
    assert_eperm(
        "the links still judge with the pins gone",
        &w.tcp_ping(sa(lab.b_v4, DENIED)),
    );
    let file = env.file(
        "allow.toml",
        &env.config_text(&config_body(&[Wl::new("web", cg.rel())])),
    );
    env.cli_ok(&["apply", file.to_str().expect("utf-8 path")]);
    assert_pong("after the change", &w.tcp_ping(sa(lab.b_v4, DENIED)));
    assert_eq!(workload_entry(&env, "web")["attached"], true);
}

// ---------------------------------------------------------------------------
// Clients every kernel tier has (busybox): the Linux 6.1 guest runs these
// ---------------------------------------------------------------------------

/// Runs busybox `args` inside cgroup `dir` (or outside any workload) in
/// namespace `ns`, bounded by `timeout` seconds; its exit status and output.
fn busybox_in(dir: Option<&Path>, ns: &Netns, secs: u32, args: &[&str]) -> (Option<i32>, String) {
    // By its path: busybox's shell (the 6.1 guest's) would run its own
    // `ip` applet for a bare name.
    let ip = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("ip"))
                .find(|f| f.is_file())
        })
        .expect("ip on PATH");
    let mut cmd = match dir {
        Some(d) => command_in(d, &ip),
        None => Command::new(&ip),
    };
    cmd.args([
        "netns",
        "exec",
        ns.name(),
        "timeout",
        &secs.to_string(),
        "busybox",
    ])
    .args(args)
    .stdin(Stdio::null());
    let out = cmd.output().expect("run busybox");
    (
        out.status.code(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

/// A workload's denials and allowances with busybox clients (no Python),
/// so that every kernel tier runs them: denied TCP connects (IPv4, IPv6)
/// fail with EPERM, an allowed one and one from outside the cgroup get
/// through, a bind below 1024 fails, and the counters say so.
#[test]
fn sock_busybox_clients_are_judged() {
    let cg = Cgroup::new("bb");
    let lab = Lab::new("sbb");
    let env = AgentEnv::new("sbb");
    let wl = Wl::new("web", cg.rel())
        .connect(tcp_rule("deny", lab.b_v4.into(), DENIED))
        .connect(tcp_rule("deny", lab.b_v6.into(), DENIED))
        .bind("deny port 1-1023");
    let _agent = start_agent(&env, &[wl]);
    let _srv = TcpServer::start(&lab.b, &[DENIED, ALLOWED]);
    let inside = Some(cg.path());
    for ip in [lab.b_v4.to_string(), lab.b_v6.to_string()] {
        let (rc, out) = busybox_in(
            inside,
            &lab.a,
            5,
            &["nc", "-w", "2", &ip, &DENIED.to_string()],
        );
        assert!(
            rc != Some(0) && out.contains("Operation not permitted"),
            "denied connect to {ip}:{DENIED}: {rc:?} {out}"
        );
        // Connected and closed by the timeout (the server waits for a ping).
        let (rc, out) = busybox_in(
            inside,
            &lab.a,
            1,
            &["nc", "-w", "2", &ip, &ALLOWED.to_string()],
        );
        assert!(
            !out.contains("can't connect"),
            "allowed connect to {ip}:{ALLOWED}: {rc:?} {out}"
        );
    }
    let (rc, out) = busybox_in(
        None,
        &lab.a,
        1,
        &["nc", "-w", "2", &lab.b_v4.to_string(), &DENIED.to_string()],
    );
    assert!(
        !out.contains("can't connect"),
        "outside the workload: {rc:?} {out}"
    );
    let (rc, out) = busybox_in(inside, &lab.a, 2, &["nc", "-l", "-p", "80"]);
    assert!(
        rc != Some(0) && out.contains("Operation not permitted"),
        "bind 80: {rc:?} {out}"
    );
    // Listening on 8080 is allowed: it runs until the timeout stops it.
    let (rc, out) = busybox_in(inside, &lab.a, 1, &["nc", "-l", "-p", "8080"]);
    assert!(!out.contains("not permitted"), "bind 8080: {rc:?} {out}");
    assert!(
        eventually(|| {
            let e = workload_entry(&env, "web");
            calls(&e, "connect", "deny", "rule") == 2 && calls(&e, "bind", "deny", "rule") == 1
        }),
        "counts: {:?}",
        all_counts(&workload_entry(&env, "web"))
    );
}
