//! Integration tests for `sluice agent`: the real binary run as the agent on a
//! config file, driven through the CLI (`--socket SOCK --pin-root ROOT`), with
//! real traffic in a [`Lab`] (namespaces A and B joined by a veth pair; the
//! agent keeps sluice attached on B's end).
//!
//! Needs root, bpffs, `ping` and `setpriv` (`capsh` is used when present).
//! Every test has its own lab, state directory, API socket, config file and
//! pin root ([`AgentEnv`]); the guards kill the agent and remove the rest if a
//! test fails half-way.
//!
//! The CLI's JSON and the agent's log are read only through the small helpers
//! below and in crate::support::{agent,cli}, so a change of field names or wording
//! touches few places.

use std::{
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::support::{
    agent::{
        AgentEnv, AgentProc, assert_through_agent, interface_toml, json_log_events, policy_toml,
        serving, stderr, stdout, unprivileged,
    },
    cli::{CLI_TIMEOUT, SLUICE, list_json_entries, list_json_prefixes, parse_json, xdp_on},
    netns::{Lab, output_with_timeout, ping, udp_probe},
};

// ---------------------------------------------------------------------------
// JSON lookups (with those in crate::support::{agent,cli}, the only places that know field names)
// ---------------------------------------------------------------------------

/// `deny list --json` → the sorted prefixes.
fn deny_list(env: &AgentEnv) -> Vec<String> {
    list_json_prefixes(&env.cli_json(&["deny", "list", "--json"]))
}

/// `deny list --json` → the packet counter of `prefix`.
fn deny_packets(env: &AgentEnv, prefix: &str) -> u64 {
    let list = env.cli_json(&["deny", "list", "--json"]);
    list_json_entries(&list)
        .iter()
        .find(|e| e["prefix"] == prefix)
        .and_then(|e| e["packets"].as_u64())
        .unwrap_or_else(|| panic!("deny list --json has no {prefix} with packets: {list}"))
}

/// `rule list --json` → (id, rule text) in evaluation order.
fn rule_list(env: &AgentEnv) -> Vec<(u64, String)> {
    crate::support::cli::rule_list_fields(&env.cli_json(&["rule", "list", "--json"]), "rule")
}

fn rule_texts(env: &AgentEnv) -> Vec<String> {
    rule_list(env).into_iter().map(|(_, r)| r).collect()
}

/// `history --json` → the versions, oldest first.
fn history(env: &AgentEnv) -> Vec<Value> {
    let h = env.cli_json(&["history", "--json"]);
    h.as_array()
        .unwrap_or_else(|| panic!("history --json is not an array: {h}"))
        .clone()
}

fn history_len(env: &AgentEnv) -> usize {
    history(env).len()
}

/// One history entry's (version, author, cause).
fn version_row(v: &Value) -> (u64, String, String) {
    (
        v["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("history entry without a version: {v}")),
        v["author"].as_str().unwrap_or_default().to_owned(),
        v["cause"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The history entry marked current: its version.
fn current_version(h: &[Value]) -> u64 {
    let current: Vec<&Value> = h.iter().filter(|v| v["current"] == true).collect();
    assert_eq!(current.len(), 1, "exactly one current version: {h:?}");
    version_row(current[0]).0
}

/// `status --json` → (program id, link id) of the attachment on B's veth end.
fn attachment(env: &AgentEnv, lab: &Lab) -> (u64, u64) {
    attachment_in(&env.cli_json(&["status", "--json"]), lab)
}

fn attachment_in(status: &Value, lab: &Lab) -> (u64, u64) {
    let att = status["attachments"]
        .as_array()
        .unwrap_or_else(|| panic!("status --json has no attachments array: {status}"))
        .iter()
        .find(|a| a["interface"] == lab.b_if.as_str())
        .unwrap_or_else(|| panic!("status --json has no attachment on {}: {status}", lab.b_if));
    (
        att["program_id"].as_u64().unwrap_or_default(),
        att["link_id"].as_u64().unwrap_or_default(),
    )
}

/// `stats --json` → total packets.
fn stats_total(env: &AgentEnv) -> u64 {
    let s = env.cli_json(&["stats", "--json"]);
    s["total"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("stats --json has no total.packets: {s}"))
}

/// `rule add ...` prints `rule N added ...`: N.
fn rule_add_id(out: &std::process::Output) -> u64 {
    let text = stdout(out);
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "rule")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("rule add did not print `rule N added`: {text:?}"))
}

// ---------------------------------------------------------------------------
// Setup and traffic
// ---------------------------------------------------------------------------

fn v4_host(lab: &Lab) -> String {
    format!("{}/32", lab.a_v4)
}

fn v6_host(lab: &Lab) -> String {
    format!("{}/128", lab.a_v6)
}

/// A config body: B's veth end as the agent's interface, then `policy`.
fn with_iface(lab: &Lab, policy: &str) -> String {
    format!("{}{policy}", interface_toml(&lab.b, &lab.b_if))
}

const PINGS: u32 = 3;
const DATAGRAMS: u32 = 10;

/// Pings from A to B over both families: IPv4 gets through iff `v4_open`,
/// IPv6 iff `v6_open`.
fn expect_pings(lab: &Lab, v4_open: bool, v6_open: bool, ctx: &str) {
    for (v6, open) in [(false, v4_open), (true, v6_open)] {
        let got = ping(&lab.a, lab.b_addr(v6), PINGS);
        let want = if open { PINGS } else { 0 };
        let fam = if v6 { "IPv6" } else { "IPv4" };
        assert_eq!(got, want, "{ctx}: {fam} pings received");
    }
}

/// UDP datagrams from A to B's `port` over IPv4 or IPv6 that arrive.
fn udp(lab: &Lab, v6: bool, port: u16) -> u32 {
    udp_probe(&lab.a, &lab.b, lab.b_addr(v6), port, DATAGRAMS)
}

/// Polls `f` every 100 ms for at most `timeout`; panics with `what` (and
/// `log`, evaluated then) if it never holds.
fn wait_until(
    timeout: Duration,
    what: &str,
    log: impl Fn() -> String,
    mut f: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what}: not after {timeout:?}; agent log:\n{}",
            log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// 1. apply / diff / history / rollback, and bad files
// ---------------------------------------------------------------------------

/// A config file with five problems, and where each is reported.
const BAD_CONFIG: &str = "[agent]
history = 0

[policy]
default = \"deny\"
rules = [\"drop tcp dport 80\", \"reject udp\"]

[deny]
prefixes = [\"198.18.0.300/24\", \"nonsense\"]
";
const BAD_CONFIG_PROBLEMS: [(usize, usize, &str); 5] = [
    (2, 11, "history must be between 1 and 1000"),
    (5, 11, "expected \"pass\" or \"drop\", found \"deny\""),
    (
        6,
        31,
        "expected 'drop', 'pass', 'limit' or 'syn-guard' first",
    ),
    (9, 13, "invalid prefix '198.18.0.300/24'"),
    (9, 32, "invalid prefix 'nonsense'"),
];

fn assert_lists_every_problem(what: &str, path: &Path, out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what} should exit 1:\nstdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    let err = stderr(out);
    assert!(err.contains("5 problem(s)"), "{what}: {err}");
    for (line, col, msg) in BAD_CONFIG_PROBLEMS {
        let at = format!("{}:{line}:{col}: ", path.display());
        assert!(
            err.lines().any(|l| l.starts_with(&at) && l.contains(msg)),
            "{what}: no `{at}...{msg}` line in stderr:\n{err}"
        );
    }
}

#[test]
fn agent_apply_diff_history_rollback_round_trip() {
    let lab = Lab::new("apply");
    let env = AgentEnv::new("apply");
    let (v4, v6) = (v4_host(&lab), v6_host(&lab));
    // A: deny A's IPv4 address, drop UDP to 7100.
    let a_body = with_iface(
        &lab,
        &policy_toml("pass", &["drop udp dport 7100"], &[v4.as_str()]),
    );
    env.write_config(&a_body);
    let agent = AgentProc::start(&env, &[]);

    expect_pings(&lab, false, true, "config A");
    assert_eq!(
        udp(&lab, true, 7100),
        0,
        "config A: UDP to 7100 dropped by the rule"
    );
    assert_eq!(
        udp(&lab, true, 7200),
        DATAGRAMS,
        "config A: UDP to 7200 passes"
    );
    assert_eq!(deny_list(&env), vec![v4.clone()]);
    let h = history(&env);
    assert_eq!(h.len(), 1, "{h:?}");
    let (n, author, cause) = version_row(&h[0]);
    assert_eq!((n, author.as_str()), (1, "agent"), "{h:?}");
    assert!(
        cause.contains("config file") && cause.contains("loaded"),
        "{cause}"
    );

    // B: deny A's IPv6 address instead, drop UDP to 7200 instead.
    let b_text = env.config_text(&with_iface(
        &lab,
        &policy_toml("pass", &["drop udp dport 7200"], &[v6.as_str()]),
    ));
    let b = env.file("b.toml", &b_text);
    let b_str = b.to_str().expect("utf-8 path");

    // diff: exact lines, then the JSON form; nothing changes.
    let out = env.cli_ok(&["diff", b_str]);
    assert_eq!(
        stdout(&out),
        format!(
            "+ deny {v6}\n- deny {v4}\n~ rules (in order):\n  - drop udp dport 7100\n  + drop udp dport 7200\n"
        ),
        "diff B"
    );
    let d = env.cli_json(&["diff", "--json", b_str]);
    assert_eq!(d["deny_add"], json!([v6]), "{d}");
    assert_eq!(d["deny_del"], json!([v4]), "{d}");
    assert_eq!(d["allow_add"], json!([]), "{d}");
    assert_eq!(d["allow_del"], json!([]), "{d}");
    assert_eq!(
        d["rules"],
        json!([["drop udp dport 7100"], ["drop udp dport 7200"]]),
        "{d}"
    );
    assert_eq!(d["default"], Value::Null, "{d}");
    assert_eq!(d["malformed"], Value::Null, "{d}");
    assert_eq!(history_len(&env), 1, "diff changes nothing");
    assert_eq!(deny_list(&env), vec![v4.clone()], "diff changes nothing");

    // apply B: traffic follows.
    let out = env.cli_ok(&["apply", b_str]);
    assert!(stdout(&out).contains("(version 2,"), "{}", stdout(&out));
    assert_eq!(deny_list(&env), vec![v6.clone()]);
    assert_eq!(rule_texts(&env), vec!["drop udp dport 7200".to_owned()]);
    expect_pings(&lab, true, false, "after apply B");
    assert_eq!(
        udp(&lab, false, 7200),
        0,
        "after apply B: UDP to 7200 dropped"
    );
    assert_eq!(
        udp(&lab, false, 7100),
        DATAGRAMS,
        "after apply B: UDP to 7100 passes"
    );

    let h = history(&env);
    assert_eq!(h.len(), 2, "{h:?}");
    let (n, author, cause) = version_row(&h[1]);
    assert_eq!(n, 2);
    assert!(author.contains("(uid 0"), "author of apply: {author}");
    let canonical = std::fs::canonicalize(&b).expect("canonicalize");
    assert_eq!(cause, format!("applied {}", canonical.display()));
    assert_eq!(current_version(&h), 2);
    assert_eq!(
        (h[1]["deny"].as_u64(), h[1]["rules"].as_u64()),
        (Some(1), Some(1))
    );

    // rollback (to the previous version): A's behaviour again.
    let out = env.cli_ok(&["rollback"]);
    assert!(stdout(&out).contains("(version 3,"), "{}", stdout(&out));
    assert_eq!(deny_list(&env), vec![v4.clone()]);
    assert_eq!(rule_texts(&env), vec!["drop udp dport 7100".to_owned()]);
    expect_pings(&lab, false, true, "after rollback");
    assert_eq!(
        udp(&lab, true, 7100),
        0,
        "after rollback: UDP to 7100 dropped again"
    );

    // rollback to an explicit version: B's behaviour again.
    env.cli_ok(&["rollback", "2"]);
    assert_eq!(deny_list(&env), vec![v6.clone()]);
    assert_eq!(rule_texts(&env), vec!["drop udp dport 7200".to_owned()]);
    expect_pings(&lab, true, false, "after rollback 2");

    let h = history(&env);
    let rows: Vec<(u64, String)> = h
        .iter()
        .map(|v| {
            let (n, _, cause) = version_row(v);
            (n, cause)
        })
        .collect();
    assert_eq!(rows.len(), 4, "{h:?}");
    assert_eq!(rows[2], (3, "rollback to version 1".to_owned()));
    assert_eq!(rows[3], (4, "rollback to version 2".to_owned()));
    assert_eq!(current_version(&h), 4);
    for v in &h[1..] {
        assert!(version_row(v).1.contains("(uid 0"), "author: {v}");
    }

    // What one version changed, and how two versions differ: from the
    // deltas history keeps.
    let show = stdout(&env.cli_ok(&["history", "show", "2"]));
    assert!(show.starts_with("version 2  "), "{show}");
    assert!(
        show.contains(&format!("+ deny {v6}\n- deny {v4}\n")),
        "{show}"
    );
    let shown = env.cli_json(&["history", "show", "2", "--json"]);
    assert_eq!(shown["version"], 2, "{shown}");
    assert_eq!(shown["diff"]["deny_add"], json!([v6]), "{shown}");
    assert_eq!(shown["diff"]["deny_del"], json!([v4]), "{shown}");
    let d = env.cli_json(&["history", "diff", "1", "4", "--json"]);
    assert_eq!(d["deny_add"], json!([v6]), "{d}");
    assert_eq!(d["deny_del"], json!([v4]), "{d}");
    // Version 4 is version 2's policy again: nothing between them.
    let same = stdout(&env.cli_ok(&["history", "diff", "2"]));
    assert_eq!(same, "no changes\n");
    let out = env.cli(&["history", "show", "99"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("version 99 is not in the history"),
        "{}",
        stderr(&out)
    );

    // A version that is not kept: refused, nothing changes.
    let out = env.cli(&["rollback", "99"]);
    assert_eq!(out.status.code(), Some(1), "rollback 99: {}", stderr(&out));
    assert!(
        stderr(&out).contains("version 99 is not in the history"),
        "{}",
        stderr(&out)
    );
    assert_eq!(history_len(&env), 4);

    // A bad file: `check` lists every problem; `diff` and `apply` refuse it
    // and change nothing.
    let deny_before = deny_list(&env);
    let rules_before = rule_list(&env);
    let bad = env.file("bad.toml", BAD_CONFIG);
    let bad_str = bad.to_str().expect("utf-8 path");
    let out = output_with_timeout(Command::new(SLUICE).args(["check", bad_str]), CLI_TIMEOUT);
    assert_lists_every_problem("check bad.toml", &bad, &out);
    assert!(
        stdout(&out).is_empty(),
        "check bad.toml stdout: {}",
        stdout(&out)
    );
    assert_lists_every_problem("diff bad.toml", &bad, &env.cli(&["diff", bad_str]));
    assert_lists_every_problem("apply bad.toml", &bad, &env.cli(&["apply", bad_str]));
    assert_eq!(
        deny_list(&env),
        deny_before,
        "bad apply changed the deny list"
    );
    assert_eq!(rule_list(&env), rules_before, "bad apply changed the rules");
    assert_eq!(history_len(&env), 4, "bad apply added a version");
    expect_pings(&lab, true, false, "after the refused bad apply");
    // And `check` of a good file is fine.
    let out = output_with_timeout(Command::new(SLUICE).args(["check", b_str]), CLI_TIMEOUT);
    assert!(out.status.success(), "check b.toml: {}", stderr(&out));

    drop(agent);
}

/// `sluice apply OTHER.toml` must stay in force while the agent's own config
/// file is left alone. Today the agent's 1-second watcher compares its config
/// file with `state.base_hash`, which `apply` set to OTHER's hash, sees a
/// "change" and re-applies its own file ("agent (reload)"), undoing the apply.
#[test]
fn agent_apply_of_another_file_is_kept() {
    let env = AgentEnv::new("keep");
    env.write_config(&policy_toml("pass", &[], &["198.19.1.1/32"]));
    let agent = AgentProc::start(&env, &[]);
    let other = env.file(
        "other.toml",
        &env.config_text(&policy_toml(
            "pass",
            &[],
            &["198.19.1.1/32", "198.19.1.2/32"],
        )),
    );
    env.cli_ok(&["apply", other.to_str().expect("utf-8 path")]);
    // Several watcher ticks.
    thread::sleep(Duration::from_secs(3));
    let h = history(&env);
    assert_eq!(
        h.len(),
        2,
        "only the start and the apply should be in the history: {h:#?}\nagent log:\n{}",
        agent.log()
    );
    assert_eq!(h[1]["deny"].as_u64(), Some(2), "{h:#?}");
}

// ---------------------------------------------------------------------------
// 2. Runtime changes through the CLI survive a restart
// ---------------------------------------------------------------------------

#[test]
fn agent_runtime_changes_survive_a_restart() {
    let lab = Lab::new("restart");
    let env = AgentEnv::new("restart");
    let v4 = v4_host(&lab);
    env.write_config(&with_iface(&lab, &policy_toml("pass", &[], &[])));
    let mut agent = AgentProc::start(&env, &["--log-format", "json"]);
    expect_pings(&lab, true, true, "empty policy");

    // Three runtime changes, each through the agent.
    let out = env.cli_ok(&["deny", "add", &v4, "198.19.2.0/24"]);
    assert_through_agent(&env, "deny add", &out);
    let out = env.cli_ok(&["rule", "add", "pass", "icmpv6"]);
    assert_through_agent(&env, "rule add", &out);
    let rule_id = rule_add_id(&out);
    // -n works too: the namespace does not matter to the agent's policy.
    let out = env.cli_ok_in(&lab.b, &["default", "drop"]);
    assert_through_agent(&env, "default drop", &out);

    // Deny drops IPv4; IPv6 pings pass by the rule; other IPv6 hits the default.
    expect_pings(&lab, false, true, "runtime changes");
    assert_eq!(udp(&lab, true, 7300), 0, "IPv6 UDP dropped by default drop");

    let h = history(&env);
    let causes: Vec<String> = h.iter().map(|v| version_row(v).2).collect();
    assert_eq!(h.len(), 4, "{h:#?}");
    assert!(causes[0].contains("loaded"), "{causes:?}");
    assert_eq!(
        causes[1..],
        [
            format!("deny add {v4} 198.19.2.0/24"),
            "rule add pass icmpv6".to_owned(),
            "default drop".to_owned()
        ]
    );
    for v in &h[1..] {
        assert!(version_row(v).1.contains("(uid 0"), "author: {v}");
    }

    // A change that changes nothing makes no version, and says so.
    let out = env.cli_ok(&["deny", "add", &v4]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("(nothing to change: no new version, 4 stays)"),
        "{said}"
    );
    let v = env.cli_json(&["default", "drop", "--json"]);
    assert_eq!(
        (v["unchanged"].as_bool(), v["version"].as_u64()),
        (Some(true), Some(4)),
        "{v}"
    );
    // `rule del` of several ids is all or nothing: one unknown id refuses it
    // whole, and the known rule stays (its packets still pass).
    let out = env.cli(&["rule", "del", &rule_id.to_string(), "999"]);
    let line = crate::support::cli::expect_one_line_error("rule del with an unknown id", &out);
    assert!(line.contains("no rule with id 999"), "{line}");
    assert_eq!(rule_list(&env).len(), 1, "the known rule stays");
    assert_eq!(
        history(&env).len(),
        4,
        "no version for a no-op or a refusal"
    );
    expect_pings(&lab, false, true, "after a no-op and a refused rule del");

    let deny_before = deny_list(&env);
    let rules_before = rule_list(&env);
    let att_before = attachment(&env, &lab);
    let status_before = env.cli_json(&["status", "--json"]);
    assert_eq!(status_before["default_action"], "drop", "{status_before}");
    assert_eq!(rules_before, vec![(rule_id, "pass icmpv6".to_owned())]);
    let mut deny_sorted = vec![v4.clone(), "198.19.2.0/24".to_owned()];
    deny_sorted.sort();
    assert_eq!(deny_before, deny_sorted);

    // kill -9 and start again.
    agent.kill9();
    assert!(!serving(&env.socket), "nothing serves after kill -9");
    let agent = AgentProc::start(&env, &["--log-format", "json"]);

    assert_eq!(deny_list(&env), deny_before, "deny list after restart");
    assert_eq!(
        rule_list(&env),
        rules_before,
        "rules (and ids) after restart"
    );
    assert_eq!(
        attachment(&env, &lab),
        att_before,
        "program and link after restart"
    );
    let status_after = env.cli_json(&["status", "--json"]);
    assert_eq!(status_after["default_action"], "drop", "{status_after}");
    assert_eq!(history(&env), h, "history after restart");
    let log = agent.log();
    let loaded = json_log_events(&log, "agent state loaded");
    assert!(
        loaded
            .iter()
            .any(|e| e["resumed"] == true && e["version"] == 4),
        "restarted agent should say it resumed version 4:\n{log}"
    );
    let ready = json_log_events(&log, "agent ready");
    assert!(
        ready.iter().any(|e| e["changes"] == 0),
        "restart should change nothing in the maps:\n{log}"
    );
    expect_pings(&lab, false, true, "after restart");

    // The restarted agent carries on from version 4.
    let out = env.cli_ok(&["deny", "del", "198.19.2.0/24"]);
    assert!(stdout(&out).contains("(version 5,"), "{}", stdout(&out));
    assert_eq!(deny_list(&env), vec![v4]);
}

// ---------------------------------------------------------------------------
// 3. kill -9 under traffic
// ---------------------------------------------------------------------------

#[test]
fn agent_kill9_under_traffic_changes_no_verdict_and_keeps_counters() {
    /// Pings per family during the kill (0.2 s apart: about 8 s).
    const RUNNING: u32 = 40;
    let lab = Lab::new("kill9");
    let env = AgentEnv::new("kill9");
    let v4 = v4_host(&lab);
    env.write_config(&with_iface(&lab, &policy_toml("pass", &[], &[v4.as_str()])));
    let mut agent = AgentProc::start(&env, &["--log-format", "json"]);
    expect_pings(&lab, false, true, "before the kill");
    let entry_before = deny_packets(&env, &v4);
    let total_before = stats_total(&env);
    assert!(
        entry_before >= u64::from(PINGS),
        "deny entry counted the pings"
    );
    let att_before = attachment(&env, &lab);

    let (got_v4, got_v6) = thread::scope(|s| {
        let p4 = s.spawn(|| ping(&lab.a, lab.b_addr(false), RUNNING));
        let p6 = s.spawn(|| ping(&lab.a, lab.b_addr(true), RUNNING));
        thread::sleep(Duration::from_millis(1500));
        agent.kill9();

        // Dead agent: nothing serves, the dataplane filters as before.
        assert!(!serving(&env.socket), "nothing serves after kill -9");
        assert_eq!(
            udp(&lab, false, 7400),
            0,
            "agent dead: IPv4 UDP still dropped"
        );
        assert_eq!(
            udp(&lab, true, 7400),
            DATAGRAMS,
            "agent dead: IPv6 UDP still passes"
        );
        // The CLI falls back to the pins.
        let out = env.cli_ok(&["deny", "list", "--json"]);
        assert_eq!(
            list_json_prefixes(&parse_json("deny list", &out)),
            vec![v4.clone()]
        );

        agent = AgentProc::start(&env, &["--log-format", "json"]);
        (
            p4.join().expect("IPv4 ping thread"),
            p6.join().expect("IPv6 ping thread"),
        )
    });
    assert_eq!(
        got_v4, 0,
        "no IPv4 ping got through across the kill and restart"
    );
    assert_eq!(
        got_v6, RUNNING,
        "every IPv6 ping got through across the kill and restart"
    );

    let entry_after = deny_packets(&env, &v4);
    let total_after = stats_total(&env);
    assert!(
        entry_after >= entry_before + u64::from(RUNNING + DATAGRAMS),
        "deny entry packets {entry_before} before, {entry_after} after: reset by the restart?"
    );
    assert!(
        total_after >= total_before + u64::from(2 * RUNNING + 2 * DATAGRAMS),
        "stats total {total_before} before, {total_after} after: reset by the restart?"
    );
    assert_eq!(attachment(&env, &lab), att_before, "same program and link");

    let log = agent.log();
    assert!(
        json_log_events(&log, "agent state loaded")
            .iter()
            .any(|e| e["resumed"] == true),
        "the restarted agent should log resumed=true:\n{log}"
    );
    assert!(
        json_log_events(&log, "agent ready")
            .iter()
            .any(|e| e["changes"] == 0),
        "the restarted agent should change nothing (changes=0):\n{log}"
    );
    expect_pings(&lab, false, true, "after the restart");

    // A counter reset through the agent: every count from zero, no version.
    let version = env.cli_json(&["history", "--json"]);
    let out = env.cli_ok(&["stats", "--reset"]);
    assert!(
        stdout(&out).starts_with("counters reset at 20"),
        "{}",
        stdout(&out)
    );
    assert_eq!(deny_packets(&env, &v4), 0, "the entry's hits are zeroed");
    assert!(
        stats_total(&env) < 10,
        "counting from zero (a few packets may arrive since)"
    );
    assert_eq!(
        env.cli_json(&["history", "--json"]),
        version,
        "a reset is not a version"
    );
    let s = env.cli_json(&["stats", "--json"]);
    assert!(s["reset_unix_ns"].as_u64().is_some(), "{s}");
}

// ---------------------------------------------------------------------------
// 4. Reload: the config file changes on disk, SIGHUP, a broken edit
// ---------------------------------------------------------------------------

#[test]
fn agent_reloads_its_config_file() {
    let lab = Lab::new("reload");
    let env = AgentEnv::new("reload");
    let (v4, v6) = (v4_host(&lab), v6_host(&lab));
    let config_a = with_iface(&lab, &policy_toml("pass", &[], &[v4.as_str()]));
    env.write_config(&config_a);
    let agent = AgentProc::start(&env, &[]);
    expect_pings(&lab, false, true, "config A");
    let log = || agent.log();

    // An edit (temp file + rename) is picked up on its own.
    env.write_config(&with_iface(&lab, &policy_toml("pass", &[], &[v6.as_str()])));
    wait_until(Duration::from_secs(5), "edit applied", log, || {
        history_len(&env) == 2
    });
    let h = history(&env);
    let (_, author, cause) = version_row(&h[1]);
    assert_eq!(author, "agent (reload)");
    assert_eq!(cause, format!("applied {}", env.config.display()));
    assert_eq!(deny_list(&env), vec![v6.clone()]);
    expect_pings(&lab, true, false, "after the edit");
    assert!(
        agent.log().contains("config file changed on disk"),
        "{}",
        agent.log()
    );

    // SIGHUP re-reads the file: unchanged, nothing happens ...
    agent.signal(libc::SIGHUP);
    assert!(
        agent.wait_for_log("config file unchanged", Duration::from_secs(5)),
        "SIGHUP on an unchanged file:\n{}",
        agent.log()
    );
    assert_eq!(history_len(&env), 2);
    // ... after an edit, it applies it.
    let mut both = vec![v4.clone(), v6.clone()];
    both.sort();
    let both_refs: Vec<&str> = both.iter().map(String::as_str).collect();
    env.write_config(&with_iface(&lab, &policy_toml("pass", &[], &both_refs)));
    agent.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(5), "edit + SIGHUP applied", log, || {
        history_len(&env) == 3
    });
    assert!(agent.log().contains("SIGHUP: reloading"), "{}", agent.log());
    assert_eq!(deny_list(&env), both);
    expect_pings(&lab, false, false, "after edit + SIGHUP");

    // A broken edit is refused: the policy stays, the agent keeps serving.
    let broken = with_iface(
        &lab,
        &policy_toml("pass", &[], &[v6.as_str(), "198.18.0.300"]),
    );
    env.write_config(&broken);
    let text = env.config_text(&broken);
    let (line, col) = text
        .lines()
        .enumerate()
        .find_map(|(i, l)| l.find("\"198.18.0.300\"").map(|c| (i + 1, c + 1)))
        .expect("the bad prefix is in the file");
    assert!(
        agent.wait_for_log("reload refused", Duration::from_secs(5)),
        "broken edit:\n{}",
        agent.log()
    );
    let at = format!("{}:{line}:{col}", env.config.display());
    assert!(
        agent.log().contains(&at),
        "the refusal should point at {at}:\n{}",
        agent.log()
    );
    thread::sleep(Duration::from_millis(1500)); // a watcher tick or two more
    assert_eq!(history_len(&env), 3, "a refused reload adds no version");
    assert_eq!(deny_list(&env), both, "a refused reload changes nothing");
    let out = env.cli_ok(&["deny", "list"]);
    assert_through_agent(&env, "deny list after the refused reload", &out);
    // `--covering` through the agent: the entry that holds the address.
    let v = env.cli_json(&["deny", "list", "--covering", &both[0], "--json"]);
    assert_eq!(list_json_prefixes(&v), vec![both[0].clone()], "{v}");
    expect_pings(&lab, false, false, "after the refused reload");

    // Fixing the file applies it.
    env.write_config(&config_a);
    wait_until(Duration::from_secs(5), "fixed file applied", log, || {
        history_len(&env) == 4
    });
    assert_eq!(deny_list(&env), vec![v4]);
    expect_pings(&lab, false, true, "after fixing the file");
}

// ---------------------------------------------------------------------------
// 5. The API is root-only; one agent per socket
// ---------------------------------------------------------------------------

#[test]
fn agent_socket_is_root_only_and_single_agent() {
    let lab = Lab::new("sock");
    let env = AgentEnv::new("sock");
    env.write_config(&with_iface(
        &lab,
        &policy_toml("pass", &[], &["198.19.3.3/32"]),
    ));
    let agent = AgentProc::start(&env, &[]);

    let meta = std::fs::symlink_metadata(&env.socket).expect("socket exists");
    assert!(
        meta.file_type().is_socket(),
        "{} is a socket",
        env.socket.display()
    );
    assert_eq!(meta.mode() & 0o7777, 0o600, "socket mode {:o}", meta.mode());
    assert_eq!(meta.uid(), 0, "socket owned by root");

    // Only meaningful if nobody can run the binary at all.
    let out = env.cli_unprivileged(&["--version"]);
    assert!(
        out.status.success(),
        "nobody cannot run {SLUICE} (check the directories' permissions): {}",
        stderr(&out)
    );

    let deny_before = deny_list(&env);
    let history_before = history(&env);
    for args in [
        &["deny", "add", "198.18.9.9"][..],
        &["history"][..],
        &["deny", "list"][..],
    ] {
        let out = env.cli_unprivileged(args);
        assert!(!out.status.success(), "nobody: sluice {args:?} should fail");
        assert_eq!(
            out.status.code(),
            Some(1),
            "nobody: sluice {args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).to_lowercase().contains("permission denied"),
            "nobody: sluice {args:?} should say permission denied: {}",
            stderr(&out)
        );
    }
    assert_eq!(deny_list(&env), deny_before, "nobody changed the deny list");
    assert_eq!(history(&env), history_before, "nobody changed the history");

    // A second agent on the same socket refuses to start and leaves the first alone.
    let mut second = AgentProc::spawn(&env, &[]);
    let status = second.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "second agent: {}", second.log());
    assert!(
        second.log().contains("already serving"),
        "second agent: {}",
        second.log()
    );
    assert!(serving(&env.socket), "the first agent still serves");
    assert_eq!(deny_list(&env), deny_before);
    assert_eq!(history(&env), history_before);
    drop(agent);
}

// ---------------------------------------------------------------------------
// 6. Shutdown
// ---------------------------------------------------------------------------

#[test]
fn agent_sigterm_leaves_the_dataplane_running() {
    let lab = Lab::new("term");
    let env = AgentEnv::new("term");
    env.write_config(&with_iface(
        &lab,
        &policy_toml("pass", &[], &[v4_host(&lab).as_str()]),
    ));
    let mut agent = AgentProc::start(&env, &[]);
    let att = attachment(&env, &lab);
    expect_pings(&lab, false, true, "agent running");

    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "SIGTERM exit: {status}; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("dataplane left running"),
        "{}",
        agent.log()
    );
    assert!(
        !env.socket.exists(),
        "the socket is removed on a graceful exit"
    );

    let out = env.cli_ok_in(&lab.b, &["--no-agent", "status", "--json"]);
    assert_eq!(
        attachment_in(&parse_json("status", &out), &lab),
        att,
        "still attached with the same program and link"
    );
    assert!(!env.pin.pins().is_empty(), "pins stay");
    assert!(xdp_on(&lab.b, &lab.b_if), "XDP still on {}", lab.b_if);
    expect_pings(&lab, false, true, "after SIGTERM");
}

#[test]
fn agent_sigterm_with_detach_on_exit_removes_everything() {
    let lab = Lab::new("detach");
    let env = AgentEnv::new("detach");
    env.write_config(&with_iface(
        &lab,
        &policy_toml("pass", &[], &[v4_host(&lab).as_str()]),
    ));
    let mut agent = AgentProc::start(&env, &["--detach-on-exit"]);
    expect_pings(&lab, false, true, "agent running");
    assert!(env.pin_root().exists());

    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "SIGTERM exit: {status}; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("detached every interface"),
        "{}",
        agent.log()
    );
    assert!(
        !env.pin_root().exists(),
        "pin root should be gone: {:?}",
        env.pin.pins()
    );
    assert!(!xdp_on(&lab.b, &lab.b_if), "XDP still on {}", lab.b_if);
    expect_pings(&lab, true, true, "after SIGTERM with --detach-on-exit");
}

// ---------------------------------------------------------------------------
// 7. Capabilities
// ---------------------------------------------------------------------------

/// The list in `missing capabilities: A, B; ...`.
fn missing_caps(err: &str) -> String {
    err.split_once("missing capabilities: ")
        .and_then(|(_, rest)| rest.split_once(';'))
        .map(|(list, _)| list.to_owned())
        .unwrap_or_else(|| panic!("no `missing capabilities: ...;` in {err:?}"))
}

#[test]
fn agent_refuses_to_start_without_capabilities() {
    let env = AgentEnv::new("caps");
    env.write_config(&policy_toml("pass", &[], &[]));
    let config = env.config.to_str().expect("utf-8 path").to_owned();

    let mut cmd = unprivileged(SLUICE);
    cmd.args(["agent", "--config", &config]);
    let out = output_with_timeout(&mut cmd, CLI_TIMEOUT);
    assert_eq!(out.status.code(), Some(1), "as nobody: {}", stderr(&out));
    assert_eq!(
        missing_caps(&stderr(&out)),
        "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN",
        "as nobody"
    );

    // Root with two of the three dropped from the bounding set.
    if Path::new("/usr/sbin/capsh").exists() || Path::new("/sbin/capsh").exists() {
        let out = output_with_timeout(
            Command::new("capsh").args([
                "--drop=cap_bpf,cap_net_admin",
                "--",
                "-c",
                "exec \"$@\"",
                "sh",
                SLUICE,
                "agent",
                "--config",
                &config,
            ]),
            CLI_TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(1), "capsh: {}", stderr(&out));
        assert_eq!(
            missing_caps(&stderr(&out)),
            "CAP_BPF, CAP_NET_ADMIN",
            "capsh"
        );
    } else {
        eprintln!("capsh not found: only the setpriv case was checked");
    }

    assert!(!env.socket.exists(), "no socket was made");
    assert!(!env.state_dir.exists(), "no state was made");
    assert!(!env.pin_root().exists(), "nothing was pinned");
}

/// `deny replace` and `deny flush` through the agent: each one change and
/// one version (a temporary entry kept by the replace becomes permanent),
/// judged by packets, and rolled back like any other change.
#[test]
fn agent_list_replace_and_flush_are_one_version_each() {
    let lab = Lab::new("replace");
    let env = AgentEnv::new("replace");
    let (v4, v6) = (v4_host(&lab), v6_host(&lab));
    env.write_config(&with_iface(&lab, &policy_toml("pass", &[], &[&v4])));
    let _agent = AgentProc::start(&env, &[]);
    expect_pings(&lab, false, true, "the config's deny list");
    env.cli_ok(&["deny", "add", "--ttl", "1h", &v6]);
    expect_pings(&lab, false, false, "a temporary IPv6 entry");
    let before = history(&env).len();

    let out = env.cli_ok(&["deny", "replace", &v6, "198.19.5.0/24"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("deny replace: 2 prefix(es), 1 added, 1 removed (version"),
        "{said}"
    );
    expect_pings(&lab, true, false, "after replace");
    let mut want = vec![v6.clone(), "198.19.5.0/24".to_string()];
    want.sort();
    assert_eq!(deny_list(&env), want);
    let list = env.cli_json(&["deny", "list", "--json"]);
    let entry = list_json_entries(&list)
        .iter()
        .find(|e| e["prefix"] == v6.as_str())
        .expect("the IPv6 entry");
    assert!(
        entry.get("expires_unix").is_none(),
        "replaced in: permanent now: {entry}"
    );
    let h = history(&env);
    assert_eq!(h.len(), before + 1, "one version");
    assert_eq!(
        version_row(&h[h.len() - 1]).2,
        "deny replace: 2 prefix(es) (+1 -1, 1 made permanent)"
    );

    let out = env.cli_ok(&["deny", "flush"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("deny flush: 2 removed (version"), "{said}");
    expect_pings(&lab, true, true, "after flush");
    assert!(deny_list(&env).is_empty());
    let h = history(&env);
    assert_eq!(version_row(&h[h.len() - 1]).2, "deny flush (-2)");

    // Bad input changes nothing.
    for (args, want) in [
        (vec!["deny", "replace"], "no prefixes given"),
        (
            vec!["deny", "replace", "198.18.1.0/8"],
            "has bits set beyond",
        ),
        (vec!["deny", "replace", "0.0.0.0/0"], "--force"),
    ] {
        let out = env.cli(&args);
        let line = crate::support::cli::expect_one_line_error(&format!("{args:?}"), &out);
        assert!(line.contains(want), "{args:?}: {line}");
    }
    assert_eq!(history(&env).len(), before + 2);

    // Rollback to the replaced list.
    env.cli_ok(&["rollback"]);
    expect_pings(&lab, true, false, "rolled back to the replace");
    assert_eq!(deny_list(&env), want);
}

/// `sluice export` through the agent writes the desired state (config plus
/// runtime changes, services with their health checks; temporary entries
/// left out) as a config file that `check` accepts and `apply` takes back
/// with nothing to change: same policy, same packets, no duplicated rule.
#[test]
fn agent_export_is_a_config_that_apply_takes_back_unchanged() {
    let lab = Lab::new("export");
    let env = AgentEnv::new("export");
    let v4 = v4_host(&lab);
    env.write_config(&with_iface(
        &lab,
        &policy_toml("pass", &["drop udp dport 4444"], &["198.19.9.0/24"]),
    ));
    // Pins that already hold a policy made without an agent: the first
    // start replaces it, with a warning that says so.
    let direct = |args: &[&str]| {
        let mut cmd = Command::new(SLUICE);
        cmd.arg("--pin-root")
            .arg(env.pin_root())
            .args(["-n", lab.b.name()])
            .args(args);
        let out = output_with_timeout(&mut cmd, CLI_TIMEOUT);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    direct(&["attach", &lab.b_if, "--mode", "native"]);
    direct(&["deny", "add", "198.19.77.0/24"]);
    let agent = AgentProc::start(&env, &[]);
    assert!(
        agent
            .log()
            .contains("the pins hold a policy made without the agent"),
        "{}",
        agent.log()
    );
    assert!(!deny_list(&env).contains(&"198.19.77.0/24".to_string()));
    env.cli_ok(&["deny", "add", &v4]);
    env.cli_ok(&["rule", "add", "--at", "0", "pass", "icmpv6"]);
    env.cli_ok(&["deny", "add", "--ttl", "1h", "198.19.8.0/24"]);
    env.cli_ok(&[
        "lb",
        "service",
        "add",
        "198.19.0.10:80",
        "--backend",
        "198.18.11.2:8080,weight=2",
        "--health",
        "http",
        "--health-path",
        "/healthz",
        "--health-interval",
        "5s",
    ]);
    expect_pings(&lab, false, true, "before the export");
    let policy_before = env.cli_json(&["export", "--json"]);
    let rules_before = rule_texts(&env);

    let out = env.cli_ok(&["export"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("# sluice export: the agent's desired state, version"),
        "{text}"
    );
    assert!(
        text.contains(&v4) && !text.contains("198.19.8.0/24"),
        "{text}"
    );
    assert!(text.contains("path = \"/healthz\""), "{text}");
    let file = env.file("exported.toml", &text);
    let file = file.to_str().expect("utf-8 path").to_string();
    env.cli_ok(&["check", &file]);
    let versions = history(&env).len();
    env.cli_ok(&["apply", &file]);
    println!(
        "exported:\n{text}\nrules before {rules_before:?}\nafter {:?}",
        rule_texts(&env)
    );
    let h = history(&env);
    assert!(h.len() <= versions + 1, "{h:#?}");
    assert_eq!(
        h.last().map(|v| v["changes"].clone()),
        Some(0.into()),
        "{h:#?}"
    );
    assert_eq!(
        env.cli_json(&["export", "--json"]),
        policy_before,
        "the same desired state"
    );
    assert_eq!(rule_texts(&env), rules_before, "no rule twice");
    expect_pings(&lab, false, true, "after applying the export");
    // A restart from the exported file alone gives the same policy too.
    let out = env.cli_ok(&["export"]);
    let again = String::from_utf8_lossy(&out.stdout);
    let body = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        body(&again),
        body(&text),
        "exporting again gives the same file"
    );
}

/// Unmounts a test's tmpfs when dropped (also on failure).
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full state directory (a small tmpfs filled up): a change is refused
/// with exit 1, the log says why at ERROR, the packets keep the old policy;
/// once there is room again the same change works.
#[test]
fn agent_with_a_full_state_directory_refuses_changes_and_says_why() {
    let lab = Lab::new("full");
    let env = AgentEnv::new("full");
    std::fs::create_dir_all(&env.state_dir).expect("state dir");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&env.state_dir)
        .status()
        .expect("run mount");
    assert!(st.success(), "mount a tmpfs on the state dir");
    let _mounted = Mounted(env.state_dir.clone());
    let v4 = v4_host(&lab);
    env.write_config(&with_iface(&lab, &policy_toml("pass", &[], &[])));
    let agent = AgentProc::start(&env, &[]);
    expect_pings(&lab, true, true, "empty policy");

    // Fill the file system (bounded: 64 writes of 64 KiB > 1 MiB).
    let filler = env.state_dir.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).expect("filler");
        for _ in 0..64 {
            if f.write_all(&[0u8; 65536]).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
    }
    let out = env.cli(&["deny", "add", &v4]);
    let line = crate::support::cli::expect_one_line_error("deny add on a full state dir", &out);
    assert!(line.contains("No space left"), "{line}");
    assert!(
        agent.wait_for_log("cannot write the state journal", Duration::from_secs(5)),
        "{}",
        agent.log()
    );
    expect_pings(&lab, true, true, "a refused change changes nothing");

    std::fs::remove_file(&filler).expect("remove the filler");
    env.cli_ok(&["deny", "add", &v4]);
    expect_pings(&lab, false, true, "with room again, the change works");
    drop(agent);
}

/// `make demo`, the README's main job, runs here too (with this build's
/// binary) so that it cannot rot: every chapter's checks must pass and it
/// must clean up after itself.
#[test]
fn the_demo_runs_and_every_check_passes() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
    let mut cmd = Command::new("timeout");
    cmd.args(["300", "bash"])
        .arg(&script)
        .env("SLUICE", SLUICE)
        .env("NO_COLOR", "1");
    let out = cmd.output().expect("run scripts/demo.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("demo finished: everything behaved as expected"),
        "the demo failed ({}):\n{text}",
        out.status
    );
    assert!(!text.contains("UNEXPECTED"), "{text}");
    for chapter in [
        "Capture: what XDP dropped",
        "Load balancer",
        "A backend dies",
        "The socket LB: clients on b itself",
        "DDoS: a per-source limit",
        "DDoS: the SYN guard",
        "Flow records and top",
        "Workloads: connect and bind policy",
        "sk_lookup steering: one socket answers a whole prefix",
        "kill -9 the agent",
    ] {
        assert!(
            text.contains(chapter),
            "the demo has no {chapter:?} chapter:\n{text}"
        );
    }
}
