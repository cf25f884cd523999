//! Fault injection: sluice must never report a policy the packets do not
//! get. Each test breaks something (a full list, a removed pin, a second
//! agent, a file that never ends, a huge change, a kill -9 mid-apply, input
//! that lies) and judges by real packets through a lab veth, before, during
//! and after the fault; the CLI/API answers and `history` must agree with
//! what the packets get, and the agent's view with a read-back of the maps
//! the attached program references (`assert_agent_matches_kernel`).
//!
//! Needs root, bpffs, ping, bpftool. Lists at capacity hold 1,048,576 IPv6
//! /128s inside 2001:2::/48 (no traffic is sent to them).

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::{
    agent::{
        AgentEnv, AgentProc, agent_policy, api_request, assert_agent_matches_kernel,
        interface_toml, kernel_policy, stderr, stdout,
    },
    cli::{CLI_TIMEOUT, SLUICE},
    netns::{Lab, PinRoot, output_with_timeout, ping},
    openapi::Doc,
};

/// The deny lists' capacity per family (sluice_common::LIST_CAPACITY).
const CAP: usize = 1 << 20;
/// Loading or replacing a million entries, and an agent start with them.
const BIG: Duration = Duration::from_secs(120);

/// `n` distinct IPv6 /128s in 2001:2::/48 (never a lab address: those have
/// a non-zero fourth group), starting at index `from`, one per line.
fn filler(from: usize, n: usize) -> String {
    let mut s = String::with_capacity(n * 26);
    for i in from..from + n {
        let _ = writeln!(s, "2001:2::{:x}:{:x}/128", i >> 16, i & 0xffff);
    }
    s
}

fn filler_entry(i: usize) -> String {
    format!("2001:2::{:x}:{:x}/128", i >> 16, i & 0xffff)
}

fn a4(lab: &Lab) -> String {
    format!("{}/32", lab.a_v4)
}

fn a6(lab: &Lab) -> String {
    format!("{}/128", lab.a_v6)
}

/// Replies to 5 pings from A to B over IPv4 / IPv6.
fn pings(lab: &Lab, v6: bool) -> u32 {
    ping(&lab.a, lab.b_addr(v6), 5)
}

fn history(env: &AgentEnv) -> Vec<Value> {
    let v: Value =
        serde_json::from_slice(&env.cli_ok(&["history", "--json"]).stdout).expect("JSON");
    v.as_array().expect("array").clone()
}

/// Exit status 1 (not a signal, not 0) with one `sluice: error:` line.
fn assert_clean_failure(what: &str, out: &std::process::Output) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected exit 1, got {} (stderr: {err})",
        out.status
    );
    assert!(
        err.lines().any(|l| l.starts_with("sluice: error:")),
        "{what}: no error line: {err}"
    );
    err
}

fn config_with_files(
    env: &AgentEnv,
    lab: &Lab,
    name: &str,
    extra_deny: &[String],
    files: &[&Path],
) -> PathBuf {
    let quoted = |v: Vec<String>| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = env.config_text(&format!(
        "{}[deny]\nprefixes = [{}]\nfiles = [{}]\n",
        interface_toml(&lab.b, &lab.b_if),
        quoted(extra_deny.to_vec()),
        quoted(files.iter().map(|p| p.display().to_string()).collect())
    ));
    env.file(name, &text)
}

// ---------------------------------------------------------------------------
// 1. Full lists
// ---------------------------------------------------------------------------

#[test]
fn a_full_list_is_accepted_a_refused_change_leaves_the_old_policy_and_deletions_always_work() {
    let lab = Lab::new("full");
    let env = AgentEnv::new("full");
    // Old: A's IPv6 address plus filler, exactly at capacity.
    let old = env.file("old.txt", &(a6(&lab) + "\n" + &filler(0, CAP - 1)));
    // New: a different full list without A.
    let new = env.file("new.txt", &filler(CAP, CAP));
    // Over: the old list and one more.
    let over = env.file("over.txt", &filler(3 * CAP, 1));
    let c_old = config_with_files(&env, &lab, "c-old.toml", &[], &[&old]);
    std::fs::copy(&c_old, &env.config).unwrap();
    let _agent = AgentProc::start_within(&env, &[], BIG);
    assert_eq!(pings(&lab, true), 0, "A's IPv6 address is denied");
    assert_eq!(pings(&lab, false), 5, "IPv4 is not");

    // Full to a different full list.
    let c_new = config_with_files(&env, &lab, "c-new.toml", &[], &[&new]);
    env.cli_ok_unchecked(&["apply", c_new.to_str().unwrap()]);
    assert_eq!(pings(&lab, true), 5, "the new full list does not hold A");
    let versions = history(&env).len();

    // One over capacity: refused (the config is checked before anything
    // is written), and the new list stays in force, in the kernel and in
    // the agent.
    let c_over = config_with_files(&env, &lab, "c-over.toml", &[a6(&lab)], &[&old, &over]);
    let out = env.cli(&["apply", c_over.to_str().unwrap()]);
    let err = assert_clean_failure("apply over capacity", &out);
    assert!(err.contains("1048576"), "{err}");
    assert_eq!(
        history(&env).len(),
        versions,
        "a refused change made a version"
    );
    assert_eq!(
        pings(&lab, true),
        5,
        "the refused list (denying A) reached the packets"
    );
    let kernel = kernel_policy(env.pin_root());
    assert_eq!(kernel.deny.len(), CAP);
    assert!(kernel.deny.contains(&filler_entry(CAP).parse().unwrap()));
    assert!(!kernel.deny.contains(&a6(&lab).parse().unwrap()));
    assert_eq!(
        agent_policy(&env.socket).1,
        kernel,
        "agent and kernel disagree"
    );

    // A full list takes deletions; the freed slot takes A.
    env.cli_ok_unchecked(&["deny", "del", &filler_entry(CAP)]);
    env.cli_ok_unchecked(&["deny", "add", &a6(&lab)]);
    assert_eq!(pings(&lab, true), 0);
    // Full again: one more is refused by the kernel's capacity check; the
    // agent proves the old policy is still in force.
    let out = env.cli(&["deny", "add", &filler_entry(5 * CAP)]);
    let err = assert_clean_failure("deny add to a full list", &out);
    assert!(
        err.contains("full") && err.contains("previous policy is in force"),
        "{err}"
    );
    assert_eq!(
        history(&env).len(),
        versions + 2,
        "a refused change made a version"
    );
    assert_eq!(pings(&lab, true), 0);
    env.cli_ok_unchecked(&["deny", "del", &a6(&lab)]);
    assert_eq!(pings(&lab, true), 5);
    assert_agent_matches_kernel(&env);
}

#[test]
fn direct_mode_fills_a_list_exactly_refuses_one_more_and_deletes_from_it() {
    let lab = Lab::new("fulld");
    let pin = PinRoot::new();
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(SLUICE);
        cmd.arg("--pin-root")
            .arg(pin.path())
            .arg("--socket")
            .arg("/nonexistent/sluice.sock")
            .args(args);
        output_with_timeout(&mut cmd, Duration::from_secs(180))
    };
    let ok = |args: &[&str]| {
        let out = cli(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        out
    };
    ok(&["-n", lab.b.name(), "attach", &lab.b_if]);
    let dir = tempdir("fulld");
    let full = dir.join("full.txt");
    std::fs::write(&full, a6(&lab) + "\n" + &filler(0, CAP - 1)).unwrap();
    ok(&["deny", "add", "--file", full.to_str().unwrap()]);
    assert_eq!(pings(&lab, true), 0);
    let out = cli(&["deny", "add", &filler_entry(CAP)]);
    let err = assert_clean_failure("one over capacity", &out);
    assert!(err.contains("full"), "{err}");
    assert_eq!(pings(&lab, true), 0, "a refused add changed the verdict");
    // Deletions from the full list, half of it in one change.
    let half = dir.join("half.txt");
    std::fs::write(&half, filler(0, CAP / 2)).unwrap();
    ok(&["deny", "del", "--file", half.to_str().unwrap()]);
    ok(&["deny", "del", &a6(&lab)]);
    assert_eq!(pings(&lab, true), 5);
    let kernel = kernel_policy(pin.path());
    assert_eq!(kernel.deny.len(), CAP - 1 - CAP / 2);
    ok(&["-n", lab.b.name(), "detach", &lab.b_if]);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-trust-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---------------------------------------------------------------------------
// 2. A map pin removed or replaced under the pin root
// ---------------------------------------------------------------------------

/// Replaces the pin of `map` with a new, empty map of the same shape (what a
/// careless loader would leave): bpftool reads the old one's shape.
pub(crate) fn replace_pin(pin_root: &Path, map: &str) {
    let path = pin_root.join("maps").join(map);
    let out = crate::support::netns::run_ok([
        "bpftool",
        "-j",
        "map",
        "show",
        "pinned",
        path.to_str().unwrap(),
    ]);
    let info: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    std::fs::remove_file(&path).unwrap();
    crate::support::netns::run_ok([
        "bpftool",
        "map",
        "create",
        path.to_str().unwrap(),
        "type",
        info["type"].as_str().unwrap(),
        "key",
        &info["bytes_key"].to_string(),
        "value",
        &info["bytes_value"].to_string(),
        "entries",
        &info["max_entries"].to_string(),
        "name",
        map,
        "flags",
        &info["flags"].to_string(),
    ]);
}

#[test]
fn a_removed_map_pin_is_repaired_and_writes_never_miss_the_program() {
    let lab = Lab::new("pin");
    let env = AgentEnv::new("pin");
    let port = crate::support::agent::free_port();
    env.write_config(&format!("{}[agent]\n", interface_toml(&lab.b, &lab.b_if)));
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace(
            "[agent]\n",
            &format!("[agent]\nmetrics = \"127.0.0.1:{port}\"\n"),
        )
        .replacen(
            &format!("\n[agent]\nmetrics = \"127.0.0.1:{port}\"\n"),
            "\n",
            1,
        );
    std::fs::write(&env.config, text).unwrap();
    let mut agent = AgentProc::start(&env, &[]);
    assert_eq!(pings(&lab, false), 5);

    // Removed while the agent runs: the next change goes to the program's map.
    std::fs::remove_file(env.pin_root().join("maps/DENY_V4")).unwrap();
    env.cli_ok(&["deny", "add", &a4(&lab)]);
    assert_eq!(
        pings(&lab, false),
        0,
        "the agent reported a deny the packets do not get"
    );
    assert!(agent.wait_for_log("pinned the program's own map again", Duration::from_secs(5)));
    let metrics = crate::support::agent::scrape(port);
    assert!(
        crate::support::agent::sample(&metrics, "sluice_agent_integrity_repairs_total")
            .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );

    // Removed, then the agent restarts: repaired at start, changes land.
    agent.kill9();
    std::fs::remove_file(env.pin_root().join("maps/DENY_V4")).unwrap();
    let agent = AgentProc::start(&env, &[]);
    assert!(agent.wait_for_log("pinned the program's own map again", Duration::from_secs(5)));
    assert_eq!(
        pings(&lab, false),
        0,
        "the deny made before the restart is gone"
    );
    env.cli_ok(&["deny", "del", &a4(&lab)]);
    assert_eq!(pings(&lab, false), 5);

    // Replaced by an unconnected map of the same shape, with the agent
    // stopped: direct mode refuses to write through it, status says so.
    drop(agent);
    replace_pin(env.pin_root(), "DENY_V4");
    let out = env.cli(&["--no-agent", "deny", "add", &a4(&lab)]);
    let err = assert_clean_failure("deny add through a replaced pin", &out);
    assert!(
        err.contains("does not read") && err.contains("DENY_V4"),
        "{err}"
    );
    let status = stdout(&env.cli_ok(&["--no-agent", "status"]));
    assert!(
        status.contains("MISMATCH") && status.contains("DENY_V4"),
        "{status}"
    );
    assert_eq!(pings(&lab, false), 5);
    // `upgrade` pins the program's own map again; writes work.
    let up = stdout(&env.cli_ok(&["--no-agent", "upgrade"]));
    assert!(up.contains("repaired"), "{up}");
    env.cli_ok(&["--no-agent", "deny", "add", &a4(&lab)]);
    assert_eq!(pings(&lab, false), 0);
    env.cli_ok(&["--no-agent", "deny", "del", &a4(&lab)]);
    // The agent starts on it cleanly (nothing left to repair).
    let agent = AgentProc::start(&env, &[]);
    assert!(
        !agent.log().contains("pinned the program's own map again"),
        "{}",
        agent.log()
    );
    assert_agent_matches_kernel(&env);
}

// ---------------------------------------------------------------------------
// 3. Two owners
// ---------------------------------------------------------------------------

#[test]
fn one_agent_per_pin_root_and_no_direct_changes_behind_its_back() {
    let lab = Lab::new("owner");
    let env_a = AgentEnv::new("owner-a");
    let env_b = AgentEnv::new("owner-b");
    env_a.write_config(&format!(
        "{}{}",
        interface_toml(&lab.b, &lab.b_if),
        crate::support::agent::policy_toml("pass", &[], &[&a4(&lab)])
    ));
    // B: its own socket and state, A's pin root, no deny entries.
    let b_text = env_b
        .config_text(&interface_toml(&lab.b, &lab.b_if))
        .replace(
            &env_b.pin_root().display().to_string(),
            &env_a.pin_root().display().to_string(),
        );
    std::fs::write(&env_b.config, b_text).unwrap();
    let mut agent_a = AgentProc::start(&env_a, &[]);
    assert_eq!(pings(&lab, false), 0);

    let mut agent_b = AgentProc::spawn(&env_b, &[]);
    let status = agent_b.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
    let log = agent_b.log();
    assert!(
        log.contains(&format!("pid {}", agent_a.pid()))
            && log.contains(&env_a.socket.display().to_string()),
        "the refusal does not name the owner: {log}"
    );
    // No flapping: every packet from the denied source is dropped.
    assert_eq!(ping(&lab.a, lab.b_addr(false), 20), 0);

    // A direct change on A's pin root (through B's socket, where no agent
    // answers) is refused naming A; --no-agent overrides.
    let direct = |args: &[&str]| {
        let mut cmd = std::process::Command::new(SLUICE);
        cmd.arg("--socket")
            .arg(&env_b.socket)
            .arg("--pin-root")
            .arg(env_a.pin_root())
            .args(args)
            .env_remove("SSH_CONNECTION");
        output_with_timeout(&mut cmd, CLI_TIMEOUT)
    };
    let out = direct(&["deny", "del", &a4(&lab)]);
    let err = assert_clean_failure("direct change while owned", &out);
    assert!(
        err.contains(&format!("pid {}", agent_a.pid())) && err.contains("--no-agent"),
        "{err}"
    );
    assert_eq!(pings(&lab, false), 0);
    // Reading is fine; --no-agent says the caller means it.
    assert!(direct(&["deny", "list"]).status.success());
    let out = direct(&["--no-agent", "deny", "del", &a4(&lab)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        pings(&lab, false),
        5,
        "the --no-agent delete reached the packets"
    );
    let out = direct(&["--no-agent", "deny", "add", &a4(&lab)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pings(&lab, false), 0);

    // The owner dies (kill -9): the lock is free; B takes over.
    agent_a.kill9();
    let _agent_b = AgentProc::start(&env_b, &[]);
    assert_eq!(pings(&lab, false), 5, "B's policy (no deny) is in force");
    let out = direct(&["deny", "add", &a4(&lab)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("through the agent"),
        "{}",
        stderr(&out)
    );
    assert_eq!(pings(&lab, false), 0);
}

// ---------------------------------------------------------------------------
// 4. Files that never end, block, or are too large
// ---------------------------------------------------------------------------

#[test]
fn files_that_are_not_regular_or_too_large_are_refused_at_once() {
    let lab = Lab::new("files");
    let env = AgentEnv::new("files");
    env.write_config(&format!(
        "{}{}",
        interface_toml(&lab.b, &lab.b_if),
        crate::support::agent::policy_toml("pass", &[], &[&a4(&lab)])
    ));
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("[agent]\n", "[agent]\nfile_size_limit = 2048\n");
    std::fs::write(&env.config, text).unwrap();
    let _agent = AgentProc::start(&env, &[]);
    assert_eq!(pings(&lab, false), 0);
    let versions = history(&env).len();

    let fifo = env.dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let link = env.dir.join("zero-link");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let big = env.file("big.txt", &filler(0, 200)); // ~5 KB > 2048
    for (name, file, want) in [
        ("dev-zero", PathBuf::from("/dev/zero"), "not a regular file"),
        ("symlink", link.clone(), "not a regular file"),
        ("fifo", fifo.clone(), "a FIFO"),
        ("directory", env.dir.clone(), "not a regular file"),
        ("too large", big.clone(), "file size limit"),
    ] {
        let config = env.config_text(&format!(
            "{}[deny]\nfiles = [\"{}\"]\n",
            interface_toml(&lab.b, &lab.b_if),
            file.display()
        ));
        // Sent to the agent as `apply`/`diff` would (the CLI checks files
        // itself first; this is what reaches the agent from any client).
        let body =
            serde_json::json!({"path": env.dir.join(format!("{name}.toml")), "text": config})
                .to_string();
        for endpoint in ["/v1/policy/diff", "/v1/policy/apply"] {
            let started = Instant::now();
            let (code, reply) = api_request(
                &env.socket,
                "POST",
                endpoint,
                &[("content-type", "application/json")],
                Some(&body),
            )
            .expect("the agent answers");
            assert_eq!(code, 400, "{name} {endpoint}: {reply}");
            assert!(reply.contains(want), "{name} {endpoint}: {reply}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{name} {endpoint} took {:?}",
                started.elapsed()
            );
        }
        // The CLI refuses the same file for `check` and `apply` at once.
        let path = env.file(&format!("{name}.toml"), &config);
        for cmd in ["check", "apply"] {
            let started = Instant::now();
            let limit = if name == "too large" {
                &["--file-size-limit", "2048"][..]
            } else {
                &[][..]
            };
            let mut args: Vec<&str> = limit.to_vec();
            args.extend([cmd, path.to_str().unwrap()]);
            let out = env.cli(&args);
            let err = assert_clean_failure(&format!("{cmd} {name}"), &out);
            assert!(err.contains(want), "{cmd} {name}: {err}");
            assert!(started.elapsed() < Duration::from_secs(5));
        }
        // The agent is not held up.
        let started = Instant::now();
        assert!(env.cli(&["history"]).status.success());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    assert_eq!(
        history(&env).len(),
        versions,
        "a refused file made a version"
    );
    assert_eq!(pings(&lab, false), 0, "the policy in force changed");
    assert_agent_matches_kernel(&env);
}

// ---------------------------------------------------------------------------
// 5. Changes of any documented size through the agent
// ---------------------------------------------------------------------------

#[test]
fn large_changes_go_through_the_agent_and_failures_are_one_line() {
    let lab = Lab::new("large");
    let env = AgentEnv::new("large");
    env.write_config(&interface_toml(&lab.b, &lab.b_if));
    let _agent = AgentProc::start(&env, &[]);
    // 300,000 prefixes (about 8 MB of JSON) in one `deny add --file`.
    let list = env.file("300k.txt", &(a4(&lab) + "\n" + &filler(0, 300_000)));
    let out = env.cli_ok(&["deny", "add", "--file", list.to_str().unwrap()]);
    assert!(stdout(&out).contains("300001"), "{}", stdout(&out));
    assert_eq!(pings(&lab, false), 0);
    // A 4.5 MB config file with its prefixes inline.
    let inline: Vec<String> = (0..180_000)
        .map(|i| format!("\"{}\"", filler_entry(CAP + i)))
        .collect();
    let config = env.file(
        "inline.toml",
        &env.config_text(&format!(
            "{}[deny]\nprefixes = [{}]\n",
            interface_toml(&lab.b, &lab.b_if),
            inline.join(", ")
        )),
    );
    assert!(std::fs::metadata(&config).unwrap().len() > 4_000_000);
    env.cli_ok(&["apply", config.to_str().unwrap()]);
    assert_eq!(
        pings(&lab, false),
        0,
        "runtime changes stay on top of an applied file"
    );
    let kernel = kernel_policy(env.pin_root());
    assert_eq!(kernel.deny.len(), 300_001 + 180_000);
    // Past the CLI's own file limit: one line, exit 1, no signal.
    let out = env.cli(&[
        "--file-size-limit",
        "4KiB",
        "deny",
        "add",
        "--file",
        list.to_str().unwrap(),
    ]);
    let err = assert_clean_failure("over the file size limit", &out);
    assert!(err.contains("file size limit"), "{err}");
}

// ---------------------------------------------------------------------------
// 6. History keeps changes, not copies
// ---------------------------------------------------------------------------

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn with_a_million_entries_a_one_entry_change_adds_bytes_not_megabytes() {
    let lab = Lab::new("hist");
    let env = AgentEnv::new("hist");
    let big = env.file("big.txt", &filler(0, 1_000_000));
    let c = config_with_files(&env, &lab, "c.toml", &[], &[&big]);
    std::fs::copy(&c, &env.config).unwrap();
    let mut agent = AgentProc::start_within(&env, &[], BIG);
    let before = dir_bytes(&env.state_dir);
    let v0 = history(&env).last().unwrap()["version"].as_u64().unwrap();
    // 15 changes: history keeps 20 versions by default.
    for i in 0..14 {
        let verb = if i % 2 == 0 { "add" } else { "del" };
        env.cli_ok_unchecked(&["deny", verb, &a4(&lab)]);
    }
    env.cli_ok_unchecked(&["deny", "add", &a4(&lab)]);
    let grown = dir_bytes(&env.state_dir) - before;
    assert!(
        grown < 15 * 1024,
        "15 one-entry changes grew the store by {grown} bytes"
    );
    assert_eq!(pings(&lab, false), 0);
    // Versions rebuilt from the deltas are exactly what they were.
    env.cli_ok_unchecked(&["rollback", &(v0 + 2).to_string()]);
    assert_eq!(
        pings(&lab, false),
        5,
        "version {} had A's deny deleted",
        v0 + 2
    );
    env.cli_ok_unchecked(&["rollback", &(v0 + 1).to_string()]);
    assert_eq!(pings(&lab, false), 0);
    // And survive a restart (snapshot + journal).
    agent.kill9();
    let agent = AgentProc::start_within(&env, &[], BIG);
    assert!(
        !agent.log().contains("does not match the fingerprint"),
        "{}",
        agent.log()
    );
    env.cli_ok_unchecked(&["rollback", &(v0 + 2).to_string()]);
    assert_eq!(pings(&lab, false), 5);
    assert_agent_matches_kernel(&env);
}

// ---------------------------------------------------------------------------
// 7. kill -9 during a million-entry apply
// ---------------------------------------------------------------------------

/// A small seeded generator (xorshift), so a failing run can be repeated
/// with SLUICE_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn kill9_at_random_points_of_a_million_entry_apply_recovers_to_what_history_says() {
    let seed: u64 = std::env::var("SLUICE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) * 7919 + 17);
    eprintln!("kill -9 points from seed {seed} (repeat with SLUICE_SEED={seed})");
    let mut rng = Rng(seed | 1);
    let lab = Lab::new("kill");
    let env = AgentEnv::new("kill");
    // Two policies of a million entries each, overlapping by half; only
    // the first denies A.
    let l1 = env.file("l1.txt", &filler(0, 1_000_000));
    let l2 = env.file("l2.txt", &filler(500_000, 1_000_000));
    let c1 = config_with_files(&env, &lab, "c1.toml", &[a4(&lab)], &[&l1]);
    let c2 = config_with_files(&env, &lab, "c2.toml", &[], &[&l2]);
    std::fs::copy(&c1, &env.config).unwrap();
    let mut agent = AgentProc::start_within(&env, &[], BIG);
    // How long an apply takes here, to spread the kills over it.
    let started = Instant::now();
    env.cli_ok_unchecked(&["apply", c2.to_str().unwrap()]);
    let full = started.elapsed();
    env.cli_ok_unchecked(&["apply", c1.to_str().unwrap()]);
    let mut in_force_is_c1 = true;
    let mut outcomes = Vec::new();
    for round in 0..10 {
        let target = if in_force_is_c1 { &c2 } else { &c1 };
        let at = Duration::from_millis(rng.next() % (full.as_millis() as u64 + 1));
        let mut cmd = env.cli_cmd(None, &["apply", target.to_str().unwrap()]);
        let cli = crate::support::netns::Child::spawn(
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        );
        std::thread::sleep(at);
        agent.kill9();
        let cli_out = cli.wait_with_output_timeout(Duration::from_secs(30));
        agent = AgentProc::start_within(&env, &[], BIG);
        // What the agent now says, what history says, what the kernel and
        // the packets do: all must agree.
        let (_, desired) = agent_policy(&env.socket);
        let kernel = kernel_policy(env.pin_root());
        assert_eq!(
            desired, kernel,
            "round {round}: the agent's view is not the kernel's"
        );
        let denies_a = desired.deny.contains(&a4(&lab).parse().unwrap());
        let replies = pings(&lab, false);
        assert_eq!(
            replies == 0,
            denies_a,
            "round {round}: packets disagree with the policy"
        );
        let cli_said = format!("{}{}", stdout(&cli_out), stderr(&cli_out));
        // The CLI names its request when the agent went away; history
        // tells what became of it.
        let request = cli_said
            .split("request ")
            .nth(1)
            .and_then(|t| t.split(|c: char| !c.is_ascii_hexdigit()).next())
            .unwrap_or("")
            .to_string();
        let about: Vec<Value> = history(&env)
            .into_iter()
            .filter(|v| {
                !request.is_empty()
                    && (v["request"] == request.as_str()
                        || v["cause"].as_str().is_some_and(|c| c.contains(&request)))
            })
            .collect();
        let outcome = if cli_out.status.success() {
            // Answered before the kill: the change is in force.
            assert!(cli_said.contains("applied"), "{cli_said}");
            "applied"
        } else {
            // Gone before the change was sent ("no agent", or a failed
            // first request), or while it was carried out ("went away",
            // naming the request).
            assert!(
                cli_said.contains("went away")
                    || cli_said.contains("no agent")
                    || cli_said.contains("talking to the agent"),
                "round {round}: the CLI said {cli_said}"
            );
            assert!(
                !cli_said.contains("went away") || !request.is_empty(),
                "round {round}: no request id in {cli_said}"
            );
            match about.last().and_then(|v| v["cause"].as_str()) {
                Some(c) if c.contains("undone after a crash") => "undone",
                Some(c) if c.contains("finished when it restarted") => "finished",
                // Recorded before the kill; only the answer was lost.
                Some(_) => "applied, answer lost",
                // Never journaled: nothing happened.
                None => "not started",
            }
        };
        let took_effect = matches!(outcome, "applied" | "finished" | "applied, answer lost");
        let now_c1 = if took_effect {
            !in_force_is_c1
        } else {
            in_force_is_c1
        };
        assert_eq!(
            denies_a, now_c1,
            "round {round} ({outcome} at {at:?}): history and kernel disagree"
        );
        assert_eq!(
            desired.deny.len(),
            if now_c1 { 1_000_001 } else { 1_000_000 }
        );
        in_force_is_c1 = now_c1;
        outcomes.push(format!("{at:?}: {outcome}"));
    }
    eprintln!("kill -9 outcomes: {}", outcomes.join(", "));
}

// ---------------------------------------------------------------------------
// 8. Input that lies
// ---------------------------------------------------------------------------

fn post(env: &AgentEnv, path: &str, body: &str) -> (u16, Value) {
    let (code, text) = api_request(
        &env.socket,
        "POST",
        path,
        &[("content-type", "application/json")],
        Some(body),
    )
    .expect("the agent answers");
    (
        code,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({code}): {text}")),
    )
}

#[test]
fn input_that_lies_is_refused_with_the_documented_json_and_changes_nothing() {
    let lab = Lab::new("lies");
    let env = AgentEnv::new("lies");
    env.write_config(&interface_toml(&lab.b, &lab.b_if));
    let _agent = AgentProc::start(&env, &[]);
    let doc = Doc::load();
    let versions = history(&env).len();
    let target = a4(&lab);

    // A misspelt field would have made a permanent entry; a wrong type too.
    for body in [
        format!(r#"{{"prefixes": ["{target}"], "ttl": "1s"}}"#),
        format!(r#"{{"prefixes": ["{target}"], "ttl_secs": "1s"}}"#),
        r#"{"prefixes": ["198.18.1.0/8"]}"#.to_string(),
        format!(
            r#"{{"prefixes": ["{target}"], "ttl_secs": 60, "reason": "x\n198.18.0.0/16  0  0 B  never"}}"#
        ),
        format!(r#"{{"prefixes": ["{target}"], "ttl_secs": 60, "reason": "\u001b[2Jgone"}}"#),
        "not json".to_string(),
    ] {
        let (code, v) = post(&env, "/v1/lists/deny/add", &body);
        assert_eq!(code, 400, "{body}: {v}");
        doc.check("POST", "/v1/lists/{kind}/{verb}", code, &v);
    }
    // No content type, an unknown path, a wrong method: JSON errors too.
    let (code, text) =
        api_request(&env.socket, "POST", "/v1/lists/deny/add", &[], Some("{}")).unwrap();
    assert_eq!(code, 400, "{text}");
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_string());
    let (code, text) = api_request(&env.socket, "GET", "/v1/nothing-here", &[], None).unwrap();
    assert_eq!(code, 404);
    assert!(
        serde_json::from_str::<Value>(&text).unwrap()["error"].is_string(),
        "{text}"
    );
    let (code, text) = api_request(&env.socket, "DELETE", "/v1/history", &[], None).unwrap();
    assert_eq!(code, 405);
    assert!(
        serde_json::from_str::<Value>(&text).unwrap()["error"].is_string(),
        "{text}"
    );
    // An unknown interface is the caller's mistake (400), not the agent's.
    let (code, v) = post(
        &env,
        "/v1/interfaces/attach",
        r#"{"name": "nosuch0", "mode": "native"}"#,
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("does not exist"),
        "{v}"
    );
    doc.check("POST", "/v1/interfaces/attach", code, &v);
    assert_eq!(
        history(&env).len(),
        versions,
        "refused input made a version"
    );
    assert_eq!(pings(&lab, false), 5);

    // The CLI: host bits, control characters, deny-everything.
    let err = assert_clean_failure("host bits", &env.cli(&["deny", "add", "198.18.1.0/8"]));
    assert!(err.contains("198.0.0.0/8"), "{err}");
    let err = assert_clean_failure(
        "reason with a newline",
        &env.cli(&["deny", "add", &target, "--ttl", "1m", "--reason", "a\nb"]),
    );
    assert!(err.contains("control"), "{err}");
    let bad_cfg = env.file("hostbits.toml", "[deny]\nprefixes = [\"198.18.1.0/8\"]\n");
    let err = assert_clean_failure(
        "check with host bits",
        &env.cli(&["check", bad_cfg.to_str().unwrap()]),
    );
    assert!(err.contains(":2:") && err.contains("198.0.0.0/8"), "{err}");
    for everything in ["0.0.0.0/0", "::/0"] {
        let err = assert_clean_failure(everything, &env.cli(&["deny", "add", everything]));
        assert!(err.contains("--force"), "{err}");
        let err = assert_clean_failure(
            everything,
            &env.cli(&["--no-agent", "deny", "add", everything]),
        );
        assert!(err.contains("--force"), "{err}");
    }
    assert_eq!(history(&env).len(), versions);
    assert_eq!(pings(&lab, false), 5);
    env.cli_ok(&["--force", "deny", "add", "0.0.0.0/0"]);
    assert_eq!(pings(&lab, false), 0);
    assert_eq!(pings(&lab, true), 5);
    env.cli_ok(&["deny", "del", "0.0.0.0/0"]);
    assert_eq!(pings(&lab, false), 5);

    // Real responses fit the documented schemas, field by field.
    env.cli_ok(&["deny", "add", &target, "--ttl", "10m", "--reason", "test"]);
    env.cli_ok(&["rule", "add", "drop", "udp", "dport", "9"]);
    for (path, template) in [
        ("/v1/info", "/v1/info"),
        ("/v1/status", "/v1/status"),
        ("/v1/stats", "/v1/stats"),
        ("/v1/events", "/v1/events"),
        ("/v1/lists/deny", "/v1/lists/{kind}"),
        ("/v1/rules", "/v1/rules"),
        ("/v1/history", "/v1/history"),
        ("/v1/history/1", "/v1/history/{version}"),
        ("/v1/history/diff?from=1", "/v1/history/diff"),
        ("/v1/policy", "/v1/policy"),
        ("/v1/flows/stats", "/v1/flows/stats"),
        ("/v1/flows", "/v1/flows"),
        ("/v1/flows/top", "/v1/flows/top"),
        ("/v1/lb", "/v1/lb"),
    ] {
        let (code, text) = api_request(&env.socket, "GET", path, &[], None).unwrap();
        assert_eq!(code, 200, "{path}: {text}");
        doc.check("GET", template, code, &serde_json::from_str(&text).unwrap());
    }
    let (code, v) = post(
        &env,
        "/v1/lists/allow/add",
        r#"{"prefixes": ["198.18.99.0/24"]}"#,
    );
    assert_eq!(code, 200, "{v}");
    doc.check("POST", "/v1/lists/{kind}/{verb}", code, &v);
    let (code, v) = post(
        &env,
        "/v1/lists/allow/del",
        r#"{"prefixes": ["198.18.98.0/24"]}"#,
    );
    assert_eq!(code, 400, "{v}");
    doc.check("POST", "/v1/lists/{kind}/{verb}", code, &v);
    let (code, v) = post(&env, "/v1/rollback", r#"{"version": 999999}"#);
    assert_eq!(code, 404, "{v}");
    doc.check("POST", "/v1/rollback", code, &v);
    assert_agent_matches_kernel(&env);
    let _ = IpAddr::from(lab.a_v4);
}
