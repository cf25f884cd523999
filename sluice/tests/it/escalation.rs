//! Escalation and expiry through the agent: a source that stays over a
//! per-source limit lands on the deny list with a reason and a TTL, and the
//! agent takes it off again when the TTL is up; `deny add --ttl` does the
//! same by hand. Needs root.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::{
    agent::{AgentEnv, AgentProc, interface_toml, policy_toml, stderr},
    netns::Lab,
};

/// UDP datagrams from `lab.a` to `lab.b` at about `pps` for `secs`.
fn send_udp(lab: &Lab, v6: bool, port: u16, pps: u32, secs: f64) -> u32 {
    let dst = SocketAddr::new(lab.b_addr(v6), port);
    let bind: SocketAddr = if v6 {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    lab.a
        .spawn(move || {
            let s = UdpSocket::bind(bind).expect("bind");
            let start = Instant::now();
            let gap = Duration::from_secs_f64(1.0 / f64::from(pps));
            let mut sent = 0u32;
            // Bounded by time and by count.
            while start.elapsed().as_secs_f64() < secs && sent < pps * 60 {
                let due = start + gap * sent;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let _ = s.send_to(b"escalation test", dst);
                sent += 1;
            }
            sent
        })
        .join()
        .expect("sender thread")
}

fn deny_entries(env: &AgentEnv) -> Vec<Value> {
    env.cli_json(&["deny", "list", "--json"])["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn entry_for<'a>(entries: &'a [Value], prefix: &str) -> Option<&'a Value> {
    entries.iter().find(|e| e["prefix"] == prefix)
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

fn escalates_and_expires(v6: bool) {
    let tag = if v6 { "esc6" } else { "esc4" };
    let lab = Lab::new(tag);
    let env = AgentEnv::new(tag);
    env.write_config(&format!(
        "{}{}",
        interface_toml(&lab.b, &lab.b_if),
        policy_toml(
            "pass",
            &["limit 50/s burst 5 per-source escalate 1s ttl 4s udp dport 9"],
            &[]
        )
    ));
    let agent = AgentProc::start(&env, &[]);
    let src = lab.a_addr(v6);
    let host = if v6 { 128 } else { 32 };
    let prefix = format!("{src}/{host}");

    // Under the limit for 1.5 s: no escalation.
    send_udp(&lab, v6, 9, 25, 1.5);
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        entry_for(&deny_entries(&env), &prefix).is_none(),
        "a source under its limit was escalated"
    );

    // Four times the limit for 2.5 s: on the deny list within about 1 s + a tick.
    let started = Instant::now();
    send_udp(&lab, v6, 9, 200, 2.5);
    let mut found = None;
    assert!(
        wait_until(Duration::from_secs(3), || {
            found = entry_for(&deny_entries(&env), &prefix).cloned();
            found.is_some()
        }),
        "source over its limit not escalated; agent log:\n{}",
        agent.log()
    );
    let e = found.unwrap();
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("rate limit") && reason.contains("rule"),
        "{e}"
    );
    let expires = e["expires_unix"].as_u64().expect("expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        expires > now && expires <= now + 5,
        "expiry {expires} not within the 4 s TTL of now {now}"
    );
    assert!(
        e["packets"].as_u64().unwrap_or(0) > 0,
        "the deny entry took no packets while the flood went on: {e}"
    );
    let table = String::from_utf8_lossy(&env.cli_ok(&["deny", "list"]).stdout).to_string();
    assert!(
        table.contains("EXPIRES") && table.contains("REASON") && table.contains("rate limit"),
        "{table}"
    );
    let history = String::from_utf8_lossy(&env.cli_ok(&["history"]).stdout).to_string();
    assert!(history.contains("temporary"), "{history}");

    // The agent takes it off when the TTL is up.
    assert!(
        wait_until(Duration::from_secs(8), || entry_for(
            &deny_entries(&env),
            &prefix
        )
        .is_none()),
        "escalated entry never expired; agent log:\n{}",
        agent.log()
    );
    let history = String::from_utf8_lossy(&env.cli_ok(&["history"]).stdout).to_string();
    assert!(history.contains("expired"), "{history}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "expired before its TTL"
    );
}

#[test]
fn escalation_denies_then_expires_ipv4() {
    escalates_and_expires(false);
}

#[test]
fn escalation_denies_then_expires_ipv6() {
    escalates_and_expires(true);
}

#[test]
fn manual_ttl_entries_and_their_errors() {
    let lab = Lab::new("ttl");
    let env = AgentEnv::new("ttl");
    env.write_config(&format!(
        "{}{}",
        interface_toml(&lab.b, &lab.b_if),
        policy_toml("pass", &[], &["198.18.200.0/24"])
    ));

    // Without an agent, --ttl is refused (nothing would expire the entry).
    let out = env.cli(&["--no-agent", "deny", "add", "198.18.201.1", "--ttl", "10s"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("needs the agent"), "{}", stderr(&out));

    let _agent = AgentProc::start(&env, &[]);
    for (args, needle) in [
        (
            vec!["deny", "add", "198.18.201.1", "--ttl", "10"],
            "invalid --ttl",
        ),
        (
            vec!["deny", "add", "198.18.201.1", "--ttl", "0s"],
            "invalid --ttl",
        ),
        (
            vec!["allow", "add", "198.18.201.1", "--ttl", "10s"],
            "deny list only",
        ),
        (
            vec!["deny", "add", "198.18.201.1", "--reason", "x"],
            "--ttl",
        ),
    ] {
        let out = env.cli(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    assert!(
        entry_for(&deny_entries(&env), "198.18.201.1/32").is_none(),
        "a refused command changed the list"
    );

    env.cli_ok(&[
        "deny",
        "add",
        "198.18.201.1",
        "2001:2:0:c9::/64",
        "--ttl",
        "2s",
        "--reason",
        "scanner",
    ]);
    // An entry the file denies for good is left as it is.
    env.cli_ok(&["deny", "add", "198.18.200.0/24", "--ttl", "2s"]);
    let entries = deny_entries(&env);
    for p in ["198.18.201.1/32", "2001:2:0:c9::/64"] {
        let e = entry_for(&entries, p).unwrap_or_else(|| panic!("{p} missing: {entries:?}"));
        assert_eq!(e["reason"], "scanner", "{e}");
    }
    let permanent = entry_for(&entries, "198.18.200.0/24").expect("file entry");
    assert!(permanent.get("expires_unix").is_none(), "{permanent}");

    assert!(
        wait_until(Duration::from_secs(6), || {
            let e = deny_entries(&env);
            entry_for(&e, "198.18.201.1/32").is_none()
                && entry_for(&e, "2001:2:0:c9::/64").is_none()
        }),
        "manual TTL entries never expired"
    );
    assert!(
        entry_for(&deny_entries(&env), "198.18.200.0/24").is_some(),
        "the permanent entry went with the temporary ones"
    );
}

/// `[ddos]` reaches the kernel at start and again after an edit.
#[test]
fn ddos_settings_reach_the_kernel() {
    let lab = Lab::new("ddoscfg");
    let env = AgentEnv::new("ddoscfg");
    let body = |rate: u32, ttl: &str| {
        format!(
            "{}{}\n[ddos]\nnew_sources_per_second = {rate}\nverified_ttl = \"{ttl}\"\n",
            interface_toml(&lab.b, &lab.b_if),
            policy_toml("pass", &[], &[])
        )
    };
    env.write_config(&body(50, "10m"));
    let agent = AgentProc::start(&env, &[]);
    let root = sluice::dataplane::PinRoot::new(env.pin_root());
    let kernel = || sluice::dataplane::runtime::ddos_config(&root).expect("DDOS_CONFIG");
    assert!(
        wait_until(Duration::from_secs(5), || {
            let k = kernel();
            k.new_source_interval_ns == 20_000_000 && k.verified_ttl_ns == 600_000_000_000
        }),
        "[ddos] not applied: {:?}; log:\n{}",
        kernel(),
        agent.log()
    );
    let key = kernel().secret;
    assert_ne!(key, [0, 0], "no cookie key");

    env.write_config(&body(0, "2h"));
    assert!(
        wait_until(Duration::from_secs(8), || {
            let k = kernel();
            k.new_source_interval_ns == 0 && k.verified_ttl_ns == 7_200_000_000_000
        }),
        "[ddos] edit not applied: {:?}; log:\n{}",
        kernel(),
        agent.log()
    );
    assert_eq!(
        kernel().secret,
        key,
        "the cookie key changed with the settings"
    );

    // A bad value is refused with its position; the running settings stay.
    env.write_config(&body(0, "5ms"));
    let out = env.cli(&["check", env_config(&env).as_str()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("verified_ttl"), "{}", stderr(&out));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(kernel().verified_ttl_ns, 7_200_000_000_000);
}

fn env_config(env: &AgentEnv) -> String {
    env.config.display().to_string()
}
