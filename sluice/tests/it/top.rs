//! `sluice top` end to end: an agent keeps sluice attached in a lab with the
//! other end's address on the deny list, bounded UDP traffic flows from that
//! end, and `top` (JSON, plain text, streamed, and the terminal view on a
//! pseudo-terminal) shows drops by reason deny-list and the sender as the top
//! source. Needs root and bpffs; every namespace, pin root, agent and
//! process is a guard removed on failure too.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::{
    agent::{AgentEnv, AgentProc, api_get, interface_toml, policy_toml, stderr, stdout},
    cli::{SLUICE, expect_one_line_error},
    netns::{Child, Lab, output_with_timeout},
};

/// The longest any sender in these tests runs.
const SEND_LIMIT: Duration = Duration::from_secs(30);

/// Polls `f` every 50 ms until it holds; panics with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// UDP datagrams from the lab's `a` end to `b`, one every 2 ms, until
/// dropped (or [`SEND_LIMIT`]).
struct Sender {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Sender {
    fn start(lab: &Lab) -> Sender {
        Self::start_to(lab, SocketAddr::new(IpAddr::V4(lab.b_v4), 40_000))
    }

    fn start_to(lab: &Lab, target: SocketAddr) -> Sender {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = lab.a.spawn(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind UDP sender");
            let start = Instant::now();
            let mut sent = 0;
            while !flag.load(Ordering::Relaxed) && start.elapsed() < SEND_LIMIT {
                if sock.send_to(b"sluice top test", target).is_ok() {
                    sent += 1;
                }
                thread::sleep(Duration::from_millis(2));
            }
            sent
        });
        Sender {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An agent attached on the lab's `b` end, denying the `a` end's IPv4 address.
fn agent_denying_a(tag: &str) -> (Lab, AgentEnv, AgentProc) {
    let lab = Lab::new(tag);
    let env = AgentEnv::new(tag);
    env.write_config(&format!(
        "{}{}",
        interface_toml(&lab.b, &lab.b_if),
        policy_toml("pass", &[], &[&format!("{}/32", lab.a_v4)])
    ));
    let agent = AgentProc::start(&env, &[]);
    (lab, env, agent)
}

/// Waits until the agent's flow aggregation names `addr` as a source, so
/// that `top` finds it from its first reading on.
fn wait_for_source(env: &AgentEnv, addr: IpAddr) {
    wait_until(
        &format!("the agent's top sources include {addr}"),
        Duration::from_secs(15),
        || {
            api_get(&env.socket, "/v1/flows/top").is_some_and(|(code, body)| {
                code == 200
                    && serde_json::from_str::<Value>(&body).is_ok_and(|v| {
                        v["sources"]
                            .as_array()
                            .is_some_and(|s| s.iter().any(|x| x["addr"] == addr.to_string()))
                    })
            })
        },
    );
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

/// Checks one `top --json` snapshot: drops by deny-list at a rate, and `src`
/// the top source.
fn assert_snapshot(snap: &Value, src: IpAddr, dst: IpAddr) {
    assert!(num(&snap["interval_secs"], "interval_secs") > 0.0, "{snap}");
    let drop = snap["verdicts"]
        .as_array()
        .and_then(|v| v.iter().find(|t| t["name"] == "drop"))
        .unwrap_or_else(|| panic!("no drop verdict: {snap}"));
    assert!(num(&drop["pps"], "drop pps") > 0.0, "{snap}");
    assert!(num(&drop["bps"], "drop bps") > 0.0, "{snap}");
    let deny = snap["reasons"]
        .as_array()
        .and_then(|v| {
            v.iter()
                .find(|r| r["verdict"] == "drop" && r["reason"] == "deny-list")
        })
        .unwrap_or_else(|| panic!("no drop/deny-list row: {snap}"));
    assert!(num(&deny["pps"], "deny-list pps") > 0.0, "{snap}");
    assert_eq!(snap["top_by"], "packets");
    let top_src = &snap["sources"][0];
    assert_eq!(top_src["addr"], src.to_string(), "{snap}");
    assert!(top_src["packets"].as_u64().unwrap_or(0) > 0, "{snap}");
    assert_eq!(snap["destinations"][0]["addr"], dst.to_string(), "{snap}");
    let deny_v4 = snap["occupancy"]
        .as_array()
        .and_then(|v| v.iter().find(|o| o["table"] == "deny ipv4"))
        .unwrap_or_else(|| panic!("no deny ipv4 occupancy: {snap}"));
    assert_eq!(deny_v4["entries"], 1, "{snap}");
    assert!(deny_v4["capacity"].as_u64().unwrap_or(0) > 0, "{snap}");
    let rules = snap["occupancy"]
        .as_array()
        .and_then(|v| v.iter().find(|o| o["table"] == "rules"))
        .unwrap_or_else(|| panic!("no rules occupancy: {snap}"));
    assert_eq!(rules["entries"], 0, "{snap}");
    // The dataplane's event counters: every dropped packet was recorded.
    let recorded = snap["events"]
        .as_array()
        .and_then(|v| v.iter().find(|e| e["name"] == "flow_records"))
        .unwrap_or_else(|| panic!("no flow_records event counter: {snap}"));
    assert!(recorded["total"].as_u64().unwrap_or(0) > 0, "{snap}");
    let flows = &snap["flow_records"];
    assert!(flows["records_read"].as_u64().unwrap_or(0) > 0, "{snap}");
    assert!(flows["lost_ring_full"].is_u64(), "{snap}");
    assert!(snap["agent_events"]["escalated_sources"].is_u64(), "{snap}");
}

#[test]
fn top_shows_drops_by_reason_and_the_top_source() {
    let (lab, env, _agent) = agent_denying_a("top");
    let src = IpAddr::V4(lab.a_v4);
    let dst = IpAddr::V4(lab.b_v4);
    let sender = Sender::start(&lab);
    wait_for_source(&env, src);

    // --once --json: one snapshot, rates over one interval.
    let snap = env.cli_json(&["top", "--once", "--json", "--interval", "0.5"]);
    assert_snapshot(&snap, src, dst);
    assert!(
        (num(&snap["interval_secs"], "interval") - 0.5).abs() < 0.4,
        "{snap}"
    );

    // --once: the same as a plain-text block.
    let out = env.cli_ok(&["top", "--once", "--interval", "0.5"]);
    let text = stdout(&out);
    assert!(text.starts_with("=== sluice top "), "{text}");
    let deny = text
        .lines()
        .find(|l| l.starts_with("drop ") && l.contains(" deny-list "))
        .unwrap_or_else(|| panic!("no drop/deny-list row:\n{text}"));
    let pps: f64 = deny
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no PPS in {deny:?}"));
    assert!(pps > 0.0, "{text}");
    let sources = text
        .split("TOP SOURCES (by packets)")
        .nth(1)
        .unwrap_or_else(|| panic!("no top sources:\n{text}"));
    let first = sources.lines().nth(1).unwrap_or_default();
    assert!(first.starts_with(&src.to_string()), "{text}");
    assert!(text.contains("flow records: read "), "{text}");
    assert!(text.contains("syn_challenges"), "{text}");

    // Not a terminal, no --once: a block per interval; --json: a line each.
    let out = env.cli_ok(&["top", "--count", "2", "--interval", "0.3"]);
    assert_eq!(
        stdout(&out).matches("=== sluice top ").count(),
        2,
        "{}",
        stdout(&out)
    );
    let out = env.cli_ok(&[
        "top",
        "--json",
        "--count",
        "2",
        "--interval",
        "0.3",
        "--by",
        "bytes",
    ]);
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 2);
    for snap in &lines {
        assert_eq!(snap["top_by"], "bytes");
        assert_eq!(snap["sources"][0]["addr"], src.to_string(), "{snap}");
    }
    drop(sender);
}

/// A UDP service on `b` balancing to `a` itself: `top` shows the service
/// and its backend with their rates, and the LB's events both ways.
#[test]
fn top_shows_each_service_and_backend_with_rates() {
    let lab = Lab::new("toplb");
    let env = AgentEnv::new("toplb");
    env.write_config(&format!(
        "{}{}",
        interface_toml(&lab.b, &lab.b_if),
        policy_toml("pass", &[], &[])
    ));
    let _agent = AgentProc::start(&env, &[]);
    let vip = "198.19.0.40";
    lab.a.exec_ok([
        "ip",
        "route",
        "add",
        &format!("{vip}/32"),
        "via",
        &lab.b_v4.to_string(),
    ]);
    lab.b.exec_ok(["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    env.cli_ok(&[
        "lb",
        "service",
        "add",
        &format!("{vip}:40000/udp"),
        "--backend",
        &format!("{}:9", lab.a_v4),
    ]);
    let sender = Sender::start_to(&lab, SocketAddr::new(vip.parse().unwrap(), 40_000));
    let mut snap = Value::Null;
    wait_until(
        "top shows the backend's packets per second",
        Duration::from_secs(15),
        || {
            snap = env.cli_json(&["top", "--once", "--json", "--interval", "0.5"]);
            snap["services"][1]["pps"].as_f64().is_some_and(|p| p > 0.0)
        },
    );
    let rows = snap["services"].as_array().expect("services");
    assert_eq!(rows.len(), 2, "{snap}");
    assert_eq!(rows[0]["service"], format!("{vip}:40000/udp"), "{snap}");
    assert!(rows[0]["backend"].is_null(), "{snap}");
    assert_eq!(rows[0]["state"], "nat", "{snap}");
    assert_eq!(rows[1]["backend"], format!("{}:9", lab.a_v4), "{snap}");
    assert_eq!(rows[1]["state"], "active", "{snap}");
    assert!(num(&rows[0]["pps"], "service pps") > 0.0, "{snap}");
    let sent_on: f64 = snap["lb_events"]
        .as_array()
        .expect("lb_events")
        .iter()
        .filter(|e| ["tx", "redirect", "to_stack"].contains(&e["name"].as_str().unwrap_or("")))
        .map(|e| e["per_sec"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(sent_on > 0.0, "requests sent on to the backend: {snap}");
    let out = env.cli_ok(&["top", "--once", "--interval", "0.5"]);
    let text = stdout(&out);
    assert!(text.contains("SERVICE / BACKEND"), "{text}");
    assert!(text.contains(&format!("  {}:9", lab.a_v4)), "{text}");
    assert!(
        text.contains("replies back to clients (reverse NAT)"),
        "{text}"
    );
    drop(sender);
}

#[test]
fn top_without_an_agent_is_one_clear_error() {
    let dir = std::env::temp_dir().join(format!("sluice-top-noagent-{}", std::process::id()));
    let socket = dir.join("none.sock");
    let out = output_with_timeout(
        Command::new(SLUICE)
            .args(["top", "--once", "--socket"])
            .arg(&socket)
            .env_remove("SLUICE_SOCKET"),
        Duration::from_secs(30),
    );
    let line = expect_one_line_error("top without an agent", &out);
    assert!(
        line.starts_with("sluice: error: no agent is running at ") && line.contains("sluice agent"),
        "{line}"
    );
    assert_eq!(out.status.code(), Some(1));
    // Usage errors are exit 2.
    let out = output_with_timeout(
        Command::new(SLUICE).args(["top", "--interval", "0"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// Runs `sluice top` on a pseudo-terminal (`script`), waits for its first
/// screen, types `keys`, and returns everything the terminal received and
/// the shell's report of the exit status and terminal modes afterwards.
fn on_terminal(env: &AgentEnv, keys: &[u8]) -> String {
    let inner = format!(
        "stty cols 140 rows 45; TERM=xterm-256color {} --socket {} top --interval 0.2; \
         rc=$?; echo; echo \"EXIT=$rc\"; stty -a",
        SLUICE,
        env.socket.display()
    );
    let mut child = Child::spawn(
        Command::new("script")
            .args(["-q", "-e", "-c", &inner, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut out = child.0.stdout.take().expect("piped stdout");
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let reader = {
        let seen = seen.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    wait_until(
        "the first screen with a reading",
        Duration::from_secs(15),
        || text().contains("deny-list"),
    );
    // Let a few refreshes go by, so rates are on the screen.
    thread::sleep(Duration::from_millis(700));
    let mut stdin = child.0.stdin.take().expect("piped stdin");
    stdin.write_all(keys).expect("type into the terminal");
    stdin.flush().expect("flush");
    let status = child
        .wait_timeout(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("top did not quit on {keys:?}:\n{}", text()));
    drop(stdin);
    let _ = reader.join();
    assert!(status.success(), "{status}:\n{}", text());
    text()
}

#[test]
fn the_terminal_view_quits_on_keys_and_restores_the_terminal() {
    let (lab, env, _agent) = agent_denying_a("toptty");
    let sender = Sender::start(&lab);
    wait_for_source(&env, IpAddr::V4(lab.a_v4));
    for keys in [&b"q"[..], b"\x1b", b"\x03"] {
        let screen = on_terminal(&env, keys);
        // The alternate screen was entered and left again.
        let enter = screen
            .find("\x1b[?1049h")
            .unwrap_or_else(|| panic!("{screen}"));
        let leave = screen
            .rfind("\x1b[?1049l")
            .unwrap_or_else(|| panic!("{screen}"));
        assert!(enter < leave, "{screen}");
        // Only single words: the screen is drawn with cursor moves over
        // blank cells, so text with spaces does not come out in one piece.
        for want in ["Traffic", "deny-list", "Events", "Maps", "destinations"] {
            assert!(
                screen.contains(want),
                "{want:?} not on the screen:\n{screen}"
            );
        }
        assert!(screen.contains(&lab.a_v4.to_string()), "{screen}");
        // Exit status 0, and the terminal is cooked again (no raw mode).
        assert!(screen.contains("EXIT=0"), "{screen}");
        let modes = &screen[screen.rfind("EXIT=0").unwrap_or(0)..];
        let words: Vec<&str> = modes.split_whitespace().collect();
        for mode in ["icanon", "echo", "isig", "opost"] {
            assert!(words.contains(&mode), "{mode:?} not restored:\n{modes}");
        }
    }
    drop(sender);
}
