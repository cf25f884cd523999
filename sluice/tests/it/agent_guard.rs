//! The agent's safety nets and observability: the lock-out guard, audit
//! mode through the agent, the metrics endpoint, and running with only the
//! capabilities it needs. Needs root.

use std::{net::IpAddr, process::Output, time::Duration};

use crate::support::{
    agent::{AgentEnv, AgentProc, free_port, interface_toml, policy_toml, sample, scrape},
    cli::{CLI_TIMEOUT, parse_json},
    netns::{Lab, output_with_timeout, ping},
};

/// The CLI against `env`'s agent, as if run from an SSH session `ssh`.
fn cli_from_session(env: &AgentEnv, ssh: &str, args: &[&str]) -> Output {
    let mut cmd = env.cli_cmd(None, args);
    cmd.env("SSH_CONNECTION", ssh);
    output_with_timeout(&mut cmd, CLI_TIMEOUT)
}

fn history_len(env: &AgentEnv) -> usize {
    env.cli_json(&["history", "--json"])
        .as_array()
        .expect("history")
        .len()
}

#[test]
fn lock_out_guard_protects_the_session_and_metrics() {
    let lab = Lab::new("guard");
    let env = AgentEnv::new("guard");
    let port = free_port();
    env.write_config(&format!(
        "{}{}",
        interface_toml(&lab.b, &lab.b_if),
        policy_toml("pass", &[], &[])
    ));
    // The metrics endpoint on every address: XDP sees its scrapers.
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        "[agent]\n",
        &format!("[agent]\nmetrics = \"0.0.0.0:{port}\"\n"),
    );
    std::fs::write(&env.config, text).unwrap();
    let _agent = AgentProc::start(&env, &[]);
    let ssh = format!("{} 50022 {} 22", lab.a_v4, lab.b_v4);
    let versions = history_len(&env);

    // Denying the session's own source is refused, naming what and why.
    let o = lab.a_v4.octets();
    let session_net = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    let out = cli_from_session(&env, &ssh, &["deny", "add", &session_net]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "deny of the session's source was applied"
    );
    assert!(
        err.contains("your SSH session") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        history_len(&env),
        versions,
        "a refused change is not recorded"
    );
    assert!(
        env.cli_json(&["deny", "list", "--json"])["entries"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // A default drop would cut off both the session and the metrics endpoint.
    let out = cli_from_session(&env, &ssh, &["default", "drop"]);
    assert!(!out.status.success());
    // Open the session's port and the metrics port, then it is fine.
    cli_ok(cli_from_session(
        &env,
        &ssh,
        &["rule", "add", "pass", "tcp", "dport", "22"],
    ));
    let out = cli_from_session(&env, &ssh, &["default", "drop"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("metrics endpoint"),
        "{err}"
    );
    cli_ok(cli_from_session(
        &env,
        &ssh,
        &["rule", "add", "pass", "tcp", "dport", &port.to_string()],
    ));
    cli_ok(cli_from_session(&env, &ssh, &["default", "drop"]));

    // --force applies what the guard would refuse.
    let out = cli_from_session(
        &env,
        &ssh,
        &["deny", "add", &format!("{}/32", lab.a_v4), "--force"],
    );
    cli_ok(out);
    assert_eq!(
        ping(&lab.a, IpAddr::V4(lab.b_v4), 2),
        0,
        "the forced deny is in force"
    );
}

fn cli_ok(out: Output) {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn audit_mode_and_metrics_through_the_agent() {
    let lab = Lab::new("audit");
    let env = AgentEnv::new("audit");
    let port = free_port();
    let a = format!("{}/32", lab.a_v4);
    env.write_config(&format!(
        "{}{}",
        interface_toml(&lab.b, &lab.b_if),
        policy_toml("pass", &[], &[a.as_str()])
    ));
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        "[agent]\n",
        &format!("[agent]\nmetrics = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::write(&env.config, text).unwrap();
    let _agent = AgentProc::start(&env, &[]);
    assert_eq!(
        ping(&lab.a, IpAddr::V4(lab.b_v4), 2),
        0,
        "denied before audit"
    );

    env.cli_ok(&["audit", "on"]);
    assert_eq!(
        env.cli_json(&["status", "--json"])["audit"],
        true,
        "status reports audit mode"
    );
    assert_eq!(
        ping(&lab.a, IpAddr::V4(lab.b_v4), 3),
        3,
        "audit mode passes what it would drop"
    );
    let stats = env.cli_json(&["stats", "--json"]);
    let audited = stats["by_reason"]["audit/deny-list"]["packets"]
        .as_u64()
        .unwrap_or(0);
    assert!(audited >= 3, "counted as audit/deny-list: {stats}");
    env.cli_ok(&["audit", "off"]);
    assert_eq!(
        ping(&lab.a, IpAddr::V4(lab.b_v4), 2),
        0,
        "audit off drops again"
    );

    // One audited rule among enforcing ones.
    env.cli_ok(&["deny", "del", &a]);
    env.cli_ok(&["rule", "add", "audit", "drop", "icmp"]);
    assert_eq!(
        ping(&lab.a, IpAddr::V4(lab.b_v4), 2),
        2,
        "an audit rule passes its matches"
    );
    let rules = env.cli_json(&["rule", "list", "--json"]);
    assert_eq!(rules["rules"][0]["rule"], "audit drop icmp", "{rules}");
    assert!(
        rules["rules"][0]["packets"].as_u64().unwrap() >= 2,
        "{rules}"
    );

    // The metrics endpoint shows the same counters, by reason, and the agent's own figures.
    let m = scrape(port);
    let audited_metric = sample(
        &m,
        "sluice_packets_total{family=\"ipv4\",protocol=\"icmp\",verdict=\"audit\",reason=\"deny-list\"}",
    )
    .unwrap_or_else(|| panic!("no audit/deny-list sample:\n{m}"));
    assert!(audited_metric >= 3.0);
    assert!(
        sample(&m, "sluice_agent_applies_total").unwrap() >= 4.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "sluice_map_capacity{list=\"deny\",family=\"ipv4\"}"),
        Some(1_048_576.0)
    );
    assert_eq!(
        sample(&m, "sluice_map_entries{list=\"rules\",family=\"any\"}"),
        Some(1.0)
    );
    assert!(m.contains("sluice_rule_packets_total{id=\""), "{m}");
    assert!(
        m.contains("sluice_agent_apply_duration_seconds_bucket"),
        "{m}"
    );
    assert_eq!(sample(&m, "sluice_dataplane_up"), Some(1.0));
    assert!(m.contains("sluice_build_info{version=\""), "{m}");
}

#[test]
fn agent_runs_with_only_the_capabilities_it_needs() {
    let lab = Lab::new("caps");
    let env = AgentEnv::new("caps");
    let a = format!("{}/32", lab.a_v4);
    env.write_config(&format!(
        "{}{}",
        interface_toml(&lab.b, &lab.b_if),
        policy_toml("pass", &[], &[a.as_str()])
    ));
    // Root, but with every capability outside these three taken away.
    let caps = "-all,+bpf,+net_admin,+sys_admin";
    let agent = AgentProc::start_wrapped(
        &env,
        &[
            "setpriv",
            "--bounding-set",
            caps,
            "--inh-caps",
            caps,
            "--ambient-caps",
            caps,
        ],
        &[],
    );
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    // CAP_NET_ADMIN (12), CAP_SYS_ADMIN (21), CAP_BPF (39) and nothing else.
    assert_eq!(
        u64::from_str_radix(&eff, 16).ok(),
        Some((1 << 12) | (1 << 21) | (1 << 39)),
        "the agent ran with CapEff {eff}"
    );
    assert_eq!(
        ping(&lab.a, IpAddr::V4(lab.b_v4), 2),
        0,
        "the agent attached and applied the deny"
    );
    env.cli_ok(&["deny", "del", &a]);
    assert_eq!(
        ping(&lab.a, IpAddr::V4(lab.b_v4), 2),
        2,
        "and takes changes"
    );
    let st = parse_json("status", &env.cli_ok(&["status", "--json"]));
    assert_eq!(st["attachments"].as_array().map(Vec::len), Some(1), "{st}");
}

/// Deletes a namespace the test made by hand (it must not exist when the
/// agent starts).
struct LateNetns(String);

impl Drop for LateNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn agent_waits_for_missing_interfaces_and_detaches_the_last_one() {
    let lab = Lab::new("late");
    let env = AgentEnv::new("late");
    let late = LateNetns(format!("slt-{}-late", std::process::id()));
    env.write_config(&format!(
        "{}[[interface]]\nname = \"lt0\"\nnetns = \"{}\"\nmode = \"generic\"\n\n{}",
        interface_toml(&lab.b, &lab.b_if),
        late.0,
        policy_toml("pass", &[], &[&format!("{}/32", lab.a_v4)])
    ));
    let agent = AgentProc::start(&env, &["--drift-interval", "1"]);
    assert!(agent.log().contains("cannot attach yet"), "{}", agent.log());
    assert_eq!(
        ping(&lab.a, IpAddr::V4(lab.b_v4), 2),
        0,
        "the present interface is filtered"
    );

    // The namespace and interface appear; the next drift check attaches.
    for args in [
        vec!["netns", "add", late.0.as_str()],
        vec![
            "-n",
            late.0.as_str(),
            "link",
            "add",
            "lt0",
            "type",
            "veth",
            "peer",
            "name",
            "lt1",
        ],
    ] {
        assert!(
            std::process::Command::new("ip")
                .args(&args)
                .status()
                .unwrap()
                .success()
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = env.cli_json(&["status", "--json"]);
        if st["attachments"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never attached to lt0: {st}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Detaching both through the agent really detaches; the last removes the pins.
    let out = output_with_timeout(
        &mut env.cli_cmd(None, &["-n", &late.0, "detach", "lt0"]),
        CLI_TIMEOUT,
    );
    cli_ok(out);
    env.cli_ok_in(&lab.b, &["detach", &lab.b_if]);
    assert!(
        !env.pin_root().exists(),
        "the last detach removed the pin root"
    );
    assert_eq!(
        ping(&lab.a, IpAddr::V4(lab.b_v4), 2),
        2,
        "no longer filtered"
    );
    let st = env.cli_json(&["status", "--json"]);
    assert!(
        st["attachments"].as_array().is_none_or(Vec::is_empty),
        "{st}"
    );
}

/// `sluice agent` refuses the global options it does not take, naming each
/// one given (flag or environment variable), and starts nothing.
#[test]
fn agent_refuses_global_options_by_name() {
    let cfg = std::env::temp_dir().join(format!("sluice-agent-opts-{}.toml", std::process::id()));
    std::fs::write(&cfg, "").expect("write config");
    let cfg_s = cfg.to_str().expect("utf-8 path");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(crate::support::cli::SLUICE);
        cmd.args(args)
            .env_remove("SLUICE_SOCKET")
            .env_remove("SLUICE_PIN_ROOT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        output_with_timeout(&mut cmd, CLI_TIMEOUT)
    };
    for (args, env, want) in [
        (
            vec!["-n", "lab", "agent", "--config", cfg_s],
            vec![],
            "does not take -n lab:",
        ),
        (
            vec!["--json", "agent", "--config", cfg_s],
            vec![],
            "does not take --json:",
        ),
        (
            vec!["agent", "--config", cfg_s],
            vec![("SLUICE_SOCKET", "/tmp/x.sock")],
            "does not take --socket /tmp/x.sock (or SLUICE_SOCKET):",
        ),
        (
            vec!["--pin-root", "/sys/fs/bpf/x", "agent", "--config", cfg_s],
            vec![],
            "does not take --pin-root /sys/fs/bpf/x (or SLUICE_PIN_ROOT):",
        ),
    ] {
        let out = run(&args, &env);
        let line = crate::support::cli::expect_one_line_error(&format!("{args:?}"), &out);
        assert!(line.contains(want), "{args:?} {env:?}: {line}");
    }
    let _ = std::fs::remove_file(&cfg);
}
