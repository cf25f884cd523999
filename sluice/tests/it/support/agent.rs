//! Running the `sluice agent` from tests: a per-test environment (its own
//! state directory, API socket, pin root and config file, removed on drop),
//! an [`AgentProc`] guard for the agent process, and the CLI pointed at that
//! agent with `--socket SOCK --pin-root ROOT`.
//!
//! The agent's log and the CLI's JSON are read only through the helpers here
//! and in the test file, so a change of wording or field names touches few
//! places.

use std::{
    ffi::OsStr,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{
    cli::{CLI_TIMEOUT, SLUICE, parse_json},
    netns::{Child, Netns, PinRoot, output_with_timeout},
};

/// How long an agent may take to serve its API after it was started (the
/// verifier takes seconds for the XDP program, more when other tests load
/// the CPU).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait for the agent to serve: [`READY_TIMEOUT`], times six
/// inside the emulated guest of the kernel tier (`SLUICE_GUEST`), where
/// loading and verifying the programs alone takes about ten seconds.
fn ready_timeout() -> Duration {
    if std::env::var_os("SLUICE_GUEST").is_some() {
        READY_TIMEOUT * 6
    } else {
        READY_TIMEOUT
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------
// AgentEnv: one agent's files
// ---------------------------------------------------------------------------

/// Everything one agent owns: a temp directory (config, state, socket, logs)
/// and a pin root. Both are removed on drop (drop the [`AgentProc`] first:
/// declare it after the env).
pub struct AgentEnv {
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// The agent's config file (`sluice agent --config`).
    pub config: PathBuf,
    pub pin: PinRoot,
    logs: AtomicU32,
}

impl AgentEnv {
    /// A fresh environment; nothing exists yet but the directory (and the
    /// pin root is only a path until the agent makes it).
    pub fn new(tag: &str) -> AgentEnv {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("sluice-agent-{}-{n}-{tag}", std::process::id()));
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir_all(&dir).expect("create the test's temp dir");
        AgentEnv {
            state_dir: dir.join("state"),
            socket: dir.join("api.sock"),
            config: dir.join("sluice.toml"),
            dir,
            pin: PinRoot::new(),
            logs: AtomicU32::new(0),
        }
    }

    pub fn pin_root(&self) -> &Path {
        self.pin.path()
    }

    /// The `[agent]` table that points the agent at this environment.
    pub fn agent_table(&self) -> String {
        format!(
            "[agent]\nstate_dir = \"{}\"\nsocket = \"{}\"\npin_root = \"{}\"\n\n",
            self.state_dir.display(),
            self.socket.display(),
            self.pin.path().display()
        )
    }

    /// The agent table followed by `body`: a whole config file's text.
    pub fn config_text(&self, body: &str) -> String {
        format!("{}{body}", self.agent_table())
    }

    /// (Re)writes the agent's config file atomically (temp file + rename),
    /// as an editor or config management would.
    pub fn write_config(&self, body: &str) {
        self.write_atomically(&self.config, &self.config_text(body));
    }

    /// Turns the metrics endpoint on in the written config (on a free
    /// loopback port); returns the port.
    pub fn serve_metrics(&self) -> u16 {
        let port = free_port();
        let text = std::fs::read_to_string(&self.config)
            .expect("config")
            .replace(
                "[agent]\n",
                &format!("[agent]\nmetrics = \"127.0.0.1:{port}\"\n"),
            );
        self.write_atomically(&self.config, &text);
        port
    }

    /// Writes `text` to `path` atomically (temp file in the same directory + rename).
    pub fn write_atomically(&self, path: &Path, text: &str) {
        let tmp = path.with_extension(format!("tmp{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&tmp, text).expect("write temp config");
        std::fs::rename(&tmp, path).expect("rename config into place");
    }

    /// Another file in this environment's directory; returns its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write test file");
        path
    }

    fn next_log(&self) -> PathBuf {
        let k = self.logs.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("agent-{k}.log"))
    }

    /// `sluice --socket SOCK --pin-root ROOT [-n NS] args...`, not started.
    pub fn cli_cmd(&self, ns: Option<&Netns>, args: &[&str]) -> Command {
        let mut cmd = Command::new(SLUICE);
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--pin-root")
            .arg(self.pin.path());
        if let Some(ns) = ns {
            cmd.arg("-n").arg(ns.name());
        }
        // Hermetic: the flags above, not the caller's environment, pick the
        // agent; and the test runner's own SSH session (the CLI reports it so
        // the agent can refuse a policy that would cut it off) has nothing to
        // do with the lab's traffic.
        cmd.args(args)
            .env_remove("SLUICE_SOCKET")
            .env_remove("SLUICE_PIN_ROOT")
            .env_remove("SSH_CONNECTION");
        cmd
    }

    /// Runs the CLI against this agent; returns its output whatever the exit status.
    pub fn cli(&self, args: &[&str]) -> Output {
        output_with_timeout(&mut self.cli_cmd(None, args), CLI_TIMEOUT)
    }

    /// Like [`AgentEnv::cli`], and asserts success. After a change through
    /// the agent, checks that the agent's desired policy is exactly what the
    /// maps the attached program reads hold ([`assert_agent_matches_kernel`]).
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli_ok_unchecked(args);
        if changes_policy(args) && !args.contains(&"--no-agent") && serving(&self.socket) {
            assert_agent_matches_kernel(self);
        }
        out
    }

    /// [`AgentEnv::cli_ok`] without the read-back (for policies of a million
    /// entries, where each read-back takes seconds).
    pub fn cli_ok_unchecked(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert_ok(&format!("sluice {args:?}"), &out);
        out
    }

    /// Like [`AgentEnv::cli_ok`] with `-n NS`.
    pub fn cli_ok_in(&self, ns: &Netns, args: &[&str]) -> Output {
        let out = output_with_timeout(&mut self.cli_cmd(Some(ns), args), CLI_TIMEOUT);
        assert_ok(&format!("sluice -n {} {args:?}", ns.name()), &out);
        out
    }

    /// A successful command's stdout as JSON.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        parse_json(&format!("sluice {args:?}"), &self.cli_ok(args))
    }

    /// The CLI as nobody:nogroup with no capabilities (`setpriv`), pointed at
    /// this agent. No `-n`: entering a namespace needs privileges of its own.
    pub fn cli_unprivileged(&self, args: &[&str]) -> Output {
        let mut cmd = unprivileged(SLUICE);
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--pin-root")
            .arg(self.pin.path())
            .args(args);
        output_with_timeout(&mut cmd, CLI_TIMEOUT)
    }
}

impl Drop for AgentEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // An agent killed with SIGKILL leaves its (unlocked, stale) owner
        // lock file behind; the next owner would take it over, but no test
        // leaves files behind. Only when nobody holds it.
        let lock = sluice::dataplane::lockfile::owner_path(self.pin.path());
        if matches!(
            sluice::dataplane::lockfile::LockFile::holder(&lock),
            Ok(None)
        ) {
            let _ = std::fs::remove_file(&lock);
        }
    }
}

/// `setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all PROGRAM`, not started.
pub fn unprivileged(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(program);
    cmd
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// The note the CLI prints on stderr when the agent carried out a command.
pub fn through_agent_note(env: &AgentEnv) -> String {
    format!("(through the agent at {})", env.socket.display())
}

/// Asserts that a (non-JSON) command went through the agent.
pub fn assert_through_agent(env: &AgentEnv, what: &str, out: &Output) {
    assert!(
        stderr(out).contains(&through_agent_note(env)),
        "{what} should have gone through the agent at {}; stderr: {}",
        env.socket.display(),
        stderr(out)
    );
}

// ---------------------------------------------------------------------------
// Config snippets
// ---------------------------------------------------------------------------

/// An `[[interface]]` table for `iface` in namespace `ns`, native mode.
pub fn interface_toml(ns: &Netns, iface: &str) -> String {
    format!(
        "[[interface]]\nname = \"{iface}\"\nnetns = \"{}\"\nmode = \"native\"\n\n",
        ns.name()
    )
}

/// `[policy]` and `[deny]` tables.
pub fn policy_toml(default: &str, rules: &[&str], deny: &[&str]) -> String {
    let quoted = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[policy]\ndefault = \"{default}\"\nrules = [{}]\n\n[deny]\nprefixes = [{}]\n",
        quoted(rules),
        quoted(deny)
    )
}

// ---------------------------------------------------------------------------
// The API socket, by hand
// ---------------------------------------------------------------------------

/// `GET path` over the unix socket (HTTP/1.1, one request per connection):
/// the status code and body, or `None` when nothing answers.
pub fn api_get(socket: &Path, path: &str) -> Option<(u16, String)> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let code = reply.split_whitespace().nth(1)?.parse().ok()?;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

/// Any request over the unix socket (HTTP/1.1, one request per
/// connection): the status code and body, or `None` when nothing answers.
pub fn api_request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<(u16, String)> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(60))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    // A server may answer (and close) before it has read the whole body
    // (a refused request): a failed write or a reset after the answer
    // still leaves the answer to read.
    let _ = s.write_all(req.as_bytes());
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    if reply.is_empty() {
        return None;
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let code = reply.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    // Chunked replies (axum streams large bodies): join the chunks.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            out.push_str(tail.get(..n)?);
            rest = tail.get(n + 2..)?;
        }
        out
    } else {
        body.to_owned()
    };
    Some((code, body))
}

/// CLI commands that change the policy (for [`AgentEnv::cli_ok`]'s check).
fn changes_policy(args: &[&str]) -> bool {
    let words: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| !a.starts_with('-'))
        .collect();
    matches!(
        words.as_slice(),
        ["deny" | "allow", "add" | "del", ..]
            | ["rule", "add" | "del", ..]
            | ["default" | "malformed" | "audit", ..]
            | ["apply" | "rollback" | "attach" | "detach", ..]
    )
}

/// The agent's desired policy (`GET /v1/policy`) and its version.
pub fn agent_policy(socket: &Path) -> (u64, sluice::model::policy::Policy) {
    let (code, body) = api_request(socket, "GET", "/v1/policy", &[], None).expect("agent answers");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    let policy = serde_json::from_value(v["desired"]["policy"].clone()).expect("a policy");
    (v["version"].as_u64().expect("version"), policy)
}

/// The policy the attached program judges packets by, read through the map
/// ids in the program's own map list (not through the pins).
pub fn kernel_policy(pin_root: &Path) -> sluice::model::policy::Policy {
    let root = sluice::dataplane::PinRoot::new(pin_root);
    let maps = sluice::dataplane::PolicyMaps::open_from_program(&root)
        .unwrap_or_else(|e| panic!("reading the program's maps: {e}"));
    sluice::engine::policy::pinned_policy(&maps)
        .unwrap_or_else(|e| panic!("reading the policy: {e}"))
}

/// The agent's view (lists, rules, settings) equals a read-back of the maps
/// the attached program references. Retried when a background change (an
/// escalation, an expiry) made a new version in between.
pub fn assert_agent_matches_kernel(env: &AgentEnv) {
    if !env.pin_root().join("prog").exists() {
        return;
    }
    for _ in 0..5 {
        let (v1, desired) = agent_policy(&env.socket);
        let kernel = kernel_policy(env.pin_root());
        let (v2, _) = agent_policy(&env.socket);
        if v1 != v2 {
            continue;
        }
        if desired != kernel {
            let d = sluice::model::policy::PolicyDiff::between(&kernel, &desired);
            panic!(
                "the agent reports a policy the packets do not get (version {v1}); from the kernel's to the agent's:\n{d}"
            );
        }
        return;
    }
    panic!("the agent's version kept changing; cannot compare");
}

/// Whether an agent answers `GET /v1/info` on `socket`.
pub fn serving(socket: &Path) -> bool {
    api_get(socket, "/v1/info").is_some_and(|(code, _)| code == 200)
}

// ---------------------------------------------------------------------------
// AgentProc
// ---------------------------------------------------------------------------

/// A running `sluice agent --config CONFIG ...` with stderr in a log file.
/// SIGKILLed and reaped on drop.
pub struct AgentProc {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
}

impl AgentProc {
    /// Starts the agent on `env`'s config with `extra` arguments and waits
    /// (at most [`READY_TIMEOUT`]) until it serves its API. Panics, with the
    /// agent's log, if it exits or is not serving in time.
    pub fn start(env: &AgentEnv, extra: &[&str]) -> AgentProc {
        Self::start_within(env, extra, ready_timeout())
    }

    /// [`AgentProc::start`] with another limit (a million-entry policy
    /// takes seconds to load).
    pub fn start_within(env: &AgentEnv, extra: &[&str], timeout: Duration) -> AgentProc {
        let mut agent = AgentProc::spawn(env, extra);
        agent.wait_ready_within(timeout);
        agent
    }

    /// Starts the agent without waiting for it.
    pub fn spawn(env: &AgentEnv, extra: &[&str]) -> AgentProc {
        AgentProc::spawn_wrapped(env, &[], extra)
    }

    /// Like [`AgentProc::start`], run through `wrapper` (e.g. `setpriv ...`).
    pub fn start_wrapped(env: &AgentEnv, wrapper: &[&str], extra: &[&str]) -> AgentProc {
        let mut agent = AgentProc::spawn_wrapped(env, wrapper, extra);
        agent.wait_ready_within(ready_timeout());
        agent
    }

    fn spawn_wrapped(env: &AgentEnv, wrapper: &[&str], extra: &[&str]) -> AgentProc {
        let log = env.next_log();
        let file = std::fs::File::create(&log).expect("create agent log");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(SLUICE);
                c
            }
            None => Command::new(SLUICE),
        };
        cmd.arg("agent")
            .arg("--config")
            .arg(&env.config)
            .args(extra)
            .env("SLUICE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        AgentProc {
            child: Child::spawn(&mut cmd),
            log,
            socket: env.socket.clone(),
        }
    }

    fn wait_ready_within(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait agent") {
                panic!(
                    "the agent exited ({status}) before serving; its log:\n{}",
                    self.log()
                );
            }
            if serving(&self.socket) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent is not serving {} after {timeout:?}; its log:\n{}",
                self.socket.display(),
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far (stderr), ANSI colours removed.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Polls (every 50 ms, at most `timeout`) until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the agent.
    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill -{sig} {pid}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        self.child.kill_and_wait()
    }

    /// Waits at most `timeout` for the agent to exit; panics (with its log) if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.child.wait_timeout(timeout).unwrap_or_else(|| {
            panic!(
                "the agent still runs after {timeout:?}; its log:\n{}",
                self.log()
            )
        })
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The JSON log lines (`--log-format json`) whose message is `message`.
pub fn json_log_events(log: &str, message: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

// ---------------------------------------------------------------------------
// The metrics endpoint
// ---------------------------------------------------------------------------

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// GET /metrics from the agent's endpoint on 127.0.0.1:`port` (status line,
/// headers and body); fails unless the status is 200.
pub fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: sluice\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    body
}

/// The value of the first sample line starting with `prefix`.
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
