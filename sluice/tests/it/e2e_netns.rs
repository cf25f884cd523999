//! End-to-end tests: the real `sluice` binary attached to a veth in a network
//! namespace, with real traffic (ping, UDP, TCP) from a peer namespace.
//!
//! Needs root, bpffs and `ping` (iputils-ping). Every test makes its own
//! [`Lab`] (namespaces A and B joined by a veth pair) and [`PinRoot`], attaches
//! sluice on B's veth end, and detaches in the test body; the guards remove
//! whatever is left if a test fails half-way.
//!
//! The CLI's JSON output is read only through the small lookup helpers below
//! and in crate::support::cli, so a change of field names touches few places.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::{
    cli::{
        CLI_TIMEOUT, SLUICE, TempFile, deny_list_in, sluice, sluice_cmd, sluice_json,
        sluice_output, status_json_attachment, stderr, xdp_on,
    },
    netns::{Child, Lab, Netns, PinRoot, ping, tcp_connect, udp_probe},
};

// ---------------------------------------------------------------------------
// Driving the CLI (the generic helpers are in crate::support::cli)
// ---------------------------------------------------------------------------

fn attach(pin: &PinRoot, lab: &Lab) {
    sluice(pin, &lab.b, &["attach", &lab.b_if, "--mode", "native"]);
}

fn detach(pin: &PinRoot, lab: &Lab) {
    sluice(pin, &lab.b, &["detach", &lab.b_if]);
}

// ---------------------------------------------------------------------------
// JSON lookups (with those in crate::support::cli, the only places that know field names)
// ---------------------------------------------------------------------------

fn program_id(pin: &PinRoot, lab: &Lab) -> u64 {
    let status = sluice_json(pin, &lab.b, &["status", "--json"]);
    let (id, mode) = status_json_attachment(&status, &lab.b_if);
    assert_eq!(mode, "native", "attached in native mode: {status}");
    id
}

fn deny_list(pin: &PinRoot, lab: &Lab) -> Vec<String> {
    deny_list_in(pin, &lab.b)
}

/// `rule list --json` → `{"rules":[{"id":N,"action":"drop",..}]}`: (id, action) pairs.
fn rule_list_json(list: &Value) -> Vec<(u64, String)> {
    crate::support::cli::rule_list_fields(list, "action")
}

/// `rule add ...` prints `rule N added`: N.
fn rule_add_id(out: &Output) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = stdout.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "rule")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("rule add did not print `rule N added`: {stdout:?}"))
}

fn rule_add(pin: &PinRoot, lab: &Lab, args: &[&str]) -> u64 {
    let mut full = vec!["rule", "add"];
    full.extend_from_slice(args);
    rule_add_id(&sluice(pin, &lab.b, &full))
}

// ---------------------------------------------------------------------------
// Traffic expectations
// ---------------------------------------------------------------------------

const PINGS: u32 = 3;
const DATAGRAMS: u32 = 10;
const UDP_PORT: u16 = 7000;
const TCP_PORT: u16 = 7001;

fn family(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

/// Ping, UDP and TCP from A to B over one family all get through.
fn assert_open(lab: &Lab, v6: bool, ctx: &str) {
    let dst = lab.b_addr(v6);
    let f = family(v6);
    assert_eq!(
        ping(&lab.a, dst, PINGS),
        PINGS,
        "{ctx}: {f} ping should pass"
    );
    assert_eq!(
        udp_probe(&lab.a, &lab.b, dst, UDP_PORT, DATAGRAMS),
        DATAGRAMS,
        "{ctx}: {f} UDP should pass"
    );
    assert!(
        tcp_connect(&lab.a, &lab.b, dst, TCP_PORT),
        "{ctx}: {f} TCP should connect"
    );
}

/// Ping, UDP and TCP from A to B over one family are all dropped.
fn assert_blocked(lab: &Lab, v6: bool, ctx: &str) {
    let dst = lab.b_addr(v6);
    let f = family(v6);
    assert_eq!(
        ping(&lab.a, dst, PINGS),
        0,
        "{ctx}: {f} ping should be dropped"
    );
    assert_eq!(
        udp_probe(&lab.a, &lab.b, dst, UDP_PORT, DATAGRAMS),
        0,
        "{ctx}: {f} UDP should be dropped"
    );
    assert!(
        !tcp_connect(&lab.a, &lab.b, dst, TCP_PORT),
        "{ctx}: {f} TCP should not connect"
    );
}

fn v4_host(lab: &Lab) -> String {
    format!("{}/32", lab.a_v4)
}

fn v6_host(lab: &Lab) -> String {
    format!("{}/128", lab.a_v6)
}

/// Whether `ip link show` lists an XDP program on B's veth end.
fn xdp_on_link(lab: &Lab) -> bool {
    xdp_on(&lab.b, &lab.b_if)
}

// ---------------------------------------------------------------------------
// The plumbing itself (needs no sluice)
// ---------------------------------------------------------------------------

#[test]
fn plumbing_lab_carries_traffic_both_families() {
    let lab = Lab::new("plumb");
    for v6 in [false, true] {
        assert_open(&lab, v6, "plain lab");
    }
    // Threads entered with setns really are inside B: B's address can be bound
    // there, and not in the test's own namespace.
    let b_v4 = lab.b_v4;
    assert!(
        lab.b
            .run(move || std::net::UdpSocket::bind((b_v4, 0)).is_ok())
    );
    assert!(std::net::UdpSocket::bind((b_v4, 0)).is_err());

    // The failure path is bounded in time: with B's end down nothing arrives.
    lab.b
        .exec_ok(["ip", "link", "set", "dev", &lab.b_if, "down"]);
    let start = Instant::now();
    for v6 in [false, true] {
        assert_blocked(&lab, v6, "B's veth end down");
    }
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "failure checks took {:?}",
        start.elapsed()
    );
}

#[test]
fn plumbing_guards_clean_up() {
    // Namespaces (and with them the veth pair) go away with the lab.
    let lab = Lab::new("gone");
    let names = [lab.a.name().to_owned(), lab.b.name().to_owned()];
    assert!(names.iter().all(|n| Netns::exists(n)));
    drop(lab);
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for n in &names {
        assert!(!Netns::exists(n), "namespace {n} left behind");
        assert!(
            !listed.contains(n.as_str()),
            "ip netns list still shows {n}"
        );
    }

    // Also on panic.
    let mut kept = String::new();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ns = Netns::new("panic");
        kept = ns.name().to_owned();
        panic!("test panic");
    }));
    assert!(res.is_err());
    assert!(
        !kept.is_empty() && !Netns::exists(&kept),
        "namespace {kept} survived a panic"
    );

    // Pin roots: the directory tree under bpffs is removed.
    let pin = PinRoot::new();
    let path = pin.path().to_owned();
    assert!(path.starts_with("/sys/fs/bpf"));
    std::fs::create_dir_all(path.join("sub/dir")).expect("mkdir in bpffs");
    assert!(pin.pins().is_empty());
    drop(pin);
    assert!(!path.exists(), "pin root {} left behind", path.display());

    // Children are killed and reaped.
    let child = Child::spawn(Command::new("sleep").arg("30").stdout(Stdio::null()));
    let pid = child.id();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let start = Instant::now();
    drop(child);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "child {pid} still there"
    );
}

// ---------------------------------------------------------------------------
// sluice end to end
// ---------------------------------------------------------------------------

/// (a) Deny entries block one family at a time, removing them restores
/// traffic, and none of it reloads the program.
#[test]
fn e2e_deny_blocks_each_family_without_reload() {
    let lab = Lab::new("deny");
    let pin = PinRoot::new();
    attach(&pin, &lab);
    let prog = program_id(&pin, &lab);
    for v6 in [false, true] {
        assert_open(&lab, v6, "after attach");
    }

    sluice(&pin, &lab.b, &["deny", "add", &v4_host(&lab)]);
    assert_eq!(deny_list(&pin, &lab), vec![v4_host(&lab)]);
    assert_blocked(&lab, false, "A's IPv4 /32 denied");
    assert_open(&lab, true, "A's IPv4 /32 denied");
    assert_eq!(
        program_id(&pin, &lab),
        prog,
        "deny add must not reload the program"
    );

    sluice(&pin, &lab.b, &["deny", "add", &v6_host(&lab)]);
    assert_blocked(&lab, true, "A's IPv6 /128 denied too");
    assert_eq!(ping(&lab.a, lab.b_v4.into(), PINGS), 0, "IPv4 still denied");
    assert_eq!(program_id(&pin, &lab), prog);

    sluice(&pin, &lab.b, &["deny", "del", &v4_host(&lab)]);
    sluice(&pin, &lab.b, &["deny", "del", &v6_host(&lab)]);
    assert!(deny_list(&pin, &lab).is_empty());
    for v6 in [false, true] {
        assert_open(&lab, v6, "deny entries deleted");
    }
    assert_eq!(
        program_id(&pin, &lab),
        prog,
        "deny del must not reload the program"
    );

    detach(&pin, &lab);
}

/// (b) An allow entry overrides a wider deny entry.
#[test]
fn e2e_allow_overrides_deny() {
    let lab = Lab::new("allow");
    let pin = PinRoot::new();
    attach(&pin, &lab);

    let v4_net = format!("198.18.{}.0/24", lab.x);
    let v6_net = format!("2001:2:0:{:x}::/64", lab.x);
    sluice(&pin, &lab.b, &["deny", "add", &v4_net]);
    sluice(&pin, &lab.b, &["deny", "add", &v6_net]);
    assert_blocked(&lab, false, "A's /24 denied");
    assert_eq!(ping(&lab.a, lab.b_v6.into(), PINGS), 0, "A's /64 denied");

    // Which entries cover an address: most specific (the one that decides) first.
    sluice(&pin, &lab.b, &["deny", "add", "198.18.0.0/15"]);
    let covering = |q: &str| -> Vec<String> {
        let v = sluice_json(&pin, &lab.b, &["deny", "list", "--covering", q, "--json"]);
        v["entries"]
            .as_array()
            .unwrap_or_else(|| panic!("entries in {v}"))
            .iter()
            .map(|e| e["prefix"].as_str().expect("prefix").to_string())
            .collect()
    };
    let a4 = lab.a_v4.to_string();
    assert_eq!(covering(&a4), vec![v4_net.clone(), "198.18.0.0/15".into()]);
    assert_eq!(covering(&lab.a_v6.to_string()), vec![v6_net.clone()]);
    assert_eq!(covering("198.18.0.0/15"), vec!["198.18.0.0/15".to_string()]);
    assert!(covering("2001:2:ffff::1").is_empty());
    let text = sluice(
        &pin,
        &lab.b,
        &["deny", "list", "--covering", "2001:2:ffff::1"],
    );
    assert_eq!(
        String::from_utf8_lossy(&text.stdout).trim(),
        "no deny list entry covers 2001:2:ffff::1/128"
    );
    let bad = sluice_output(&pin, &lab.b, &["deny", "list", "--covering", "nope"]);
    let line = crate::support::cli::expect_one_line_error("--covering nope", &bad);
    assert!(line.contains("invalid prefix 'nope'"), "{line}");
    sluice(&pin, &lab.b, &["deny", "del", "198.18.0.0/15"]);

    sluice(&pin, &lab.b, &["allow", "add", &v4_host(&lab)]);
    sluice(&pin, &lab.b, &["allow", "add", &v6_host(&lab)]);
    for v6 in [false, true] {
        assert_open(&lab, v6, "A's host allowed inside a denied net");
    }

    sluice(&pin, &lab.b, &["allow", "del", &v4_host(&lab)]);
    sluice(&pin, &lab.b, &["allow", "del", &v6_host(&lab)]);
    assert_blocked(&lab, false, "allow entry deleted");
    assert_eq!(
        ping(&lab.a, lab.b_v6.into(), PINGS),
        0,
        "IPv6 allow entry deleted"
    );

    detach(&pin, &lab);
}

/// (c) Port rules drop exactly the ports they name, and `rule del` restores.
#[test]
fn e2e_port_rules() {
    let lab = Lab::new("rule");
    let pin = PinRoot::new();
    attach(&pin, &lab);

    let udp_rule = rule_add(&pin, &lab, &["drop", "udp", "dport", "4444"]);
    for v6 in [false, true] {
        let dst = lab.b_addr(v6);
        let f = family(v6);
        assert_eq!(
            udp_probe(&lab.a, &lab.b, dst, 4444, DATAGRAMS),
            0,
            "{f} UDP 4444 dropped"
        );
        assert_eq!(
            udp_probe(&lab.a, &lab.b, dst, 4445, DATAGRAMS),
            DATAGRAMS,
            "{f} UDP 4445 passes"
        );
        assert!(
            tcp_connect(&lab.a, &lab.b, dst, 4444),
            "{f} TCP 4444 is not UDP"
        );
    }

    let tcp_rule = rule_add(&pin, &lab, &["drop", "tcp", "dport", "5000-5001"]);
    assert_ne!(udp_rule, tcp_rule);
    for v6 in [false, true] {
        let dst = lab.b_addr(v6);
        let f = family(v6);
        assert!(
            !tcp_connect(&lab.a, &lab.b, dst, 5000),
            "{f} TCP 5000 dropped"
        );
        assert!(
            !tcp_connect(&lab.a, &lab.b, dst, 5001),
            "{f} TCP 5001 dropped"
        );
        assert!(
            tcp_connect(&lab.a, &lab.b, dst, 5002),
            "{f} TCP 5002 passes"
        );
        assert_eq!(
            udp_probe(&lab.a, &lab.b, dst, 5000, DATAGRAMS),
            DATAGRAMS,
            "{f} UDP 5000 passes"
        );
    }
    assert_eq!(
        ping(&lab.a, lab.b_v4.into(), PINGS),
        PINGS,
        "ICMP untouched by port rules"
    );

    let rules = rule_list_json(&sluice_json(&pin, &lab.b, &["rule", "list", "--json"]));
    assert_eq!(
        rules,
        vec![(udp_rule, "drop".to_owned()), (tcp_rule, "drop".to_owned())]
    );

    sluice(&pin, &lab.b, &["rule", "del", &udp_rule.to_string()]);
    let rules = rule_list_json(&sluice_json(&pin, &lab.b, &["rule", "list", "--json"]));
    assert_eq!(
        rules.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![tcp_rule]
    );
    for v6 in [false, true] {
        let dst = lab.b_addr(v6);
        assert_eq!(
            udp_probe(&lab.a, &lab.b, dst, 4444, DATAGRAMS),
            DATAGRAMS,
            "UDP 4444 restored"
        );
        assert!(
            !tcp_connect(&lab.a, &lab.b, dst, 5000),
            "TCP rule still there"
        );
    }

    sluice(&pin, &lab.b, &["rule", "del", &tcp_rule.to_string()]);
    assert!(rule_list_json(&sluice_json(&pin, &lab.b, &["rule", "list", "--json"])).is_empty());
    for v6 in [false, true] {
        assert!(
            tcp_connect(&lab.a, &lab.b, lab.b_addr(v6), 5000),
            "TCP 5000 restored"
        );
    }

    detach(&pin, &lab);
}

/// (d) Detach removes the program and every pin, and traffic a deny entry
/// blocked flows again.
#[test]
fn e2e_detach_restores_and_leaves_no_pins() {
    let lab = Lab::new("detach");
    let pin = PinRoot::new();
    attach(&pin, &lab);
    assert!(
        xdp_on_link(&lab),
        "ip link shows the XDP program after attach"
    );
    assert!(
        !pin.pins().is_empty(),
        "attach pins maps under {}",
        pin.path().display()
    );

    sluice(&pin, &lab.b, &["deny", "add", &v4_host(&lab)]);
    sluice(&pin, &lab.b, &["deny", "add", &v6_host(&lab)]);
    assert_eq!(ping(&lab.a, lab.b_v4.into(), PINGS), 0);
    assert_eq!(ping(&lab.a, lab.b_v6.into(), PINGS), 0);

    detach(&pin, &lab);
    let left = pin.pins();
    assert!(left.is_empty(), "pins left after detach: {left:?}");
    assert!(
        !xdp_on_link(&lab),
        "XDP program still on {} after detach",
        lab.b_if
    );
    for v6 in [false, true] {
        assert_open(&lab, v6, "after detach with deny entries present");
    }
}

/// (e) Filtering lives in the kernel, not in the CLI process: it goes on after
/// the CLI exits, and a CLI killed in the middle of a big change leaves a
/// working, consistent policy.
#[test]
fn e2e_filtering_outlives_the_cli() {
    let lab = Lab::new("kill");
    let pin = PinRoot::new();
    attach(&pin, &lab);
    let prog = program_id(&pin, &lab);

    // A one-shot command: it exits, nothing of it stays running, and the
    // entry it added keeps blocking.
    let mut cli = Child::spawn(
        sluice_cmd(&pin, &lab.b, &["deny", "add", &v4_host(&lab)])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let status = cli.wait_timeout(CLI_TIMEOUT).expect("deny add exits");
    assert!(status.success(), "deny add failed: {status}");
    let root = pin.path().to_string_lossy().into_owned();
    let lingering: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(SLUICE) && c.contains(&root))
        .collect();
    assert!(
        lingering.is_empty(),
        "sluice processes still running: {lingering:?}"
    );
    // 10 pings 0.2 s apart: blocked for the whole 2 s.
    assert_eq!(
        ping(&lab.a, lab.b_v4.into(), 10),
        0,
        "deny entry keeps blocking after the CLI exited"
    );

    // A big change, killed part-way. 500,000 host entries that match no lab
    // address: 198.19.0.0/16 and 198.18.200.0-198.18.255.255 (labs use
    // 198.18.1-199.x), the rest IPv6 /128s in 2001:2:0:ff00::/64.
    let mut big = String::with_capacity(500_000 * 24);
    let mut n = 0u32;
    for third in 0..=255u32 {
        for fourth in 0..=255u32 {
            big.push_str(&format!("198.19.{third}.{fourth}/32\n"));
            n += 1;
        }
    }
    for third in 200..=255u32 {
        for fourth in 0..=255u32 {
            big.push_str(&format!("198.18.{third}.{fourth}/32\n"));
            n += 1;
        }
    }
    let mut i = 0u32;
    while n < 500_000 {
        big.push_str(&format!(
            "2001:2:0:ff00::{:x}:{:x}/128\n",
            i >> 16,
            i & 0xffff
        ));
        i += 1;
        n += 1;
    }
    let file = TempFile::new("big.txt", &big);
    drop(big);
    let mut cli = Child::spawn(
        sluice_cmd(
            &pin,
            &lab.b,
            &["deny", "add", "--file", &file.path().to_string_lossy()],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null()),
    );
    thread::sleep(Duration::from_millis(300));
    if let Ok(Some(status)) = cli.try_wait() {
        eprintln!("note: the big deny add had already exited ({status}) before SIGKILL");
    }
    cli.kill_and_wait();
    drop(cli);

    assert_eq!(
        ping(&lab.a, lab.b_v4.into(), PINGS),
        0,
        "earlier deny still blocks after the killed change"
    );
    assert_eq!(
        udp_probe(&lab.a, &lab.b, lab.b_v4.into(), UDP_PORT, DATAGRAMS),
        0,
        "earlier deny still blocks UDP"
    );
    assert_open(&lab, true, "unrelated IPv6 traffic after the killed change");

    // The policy is still consistent and usable.
    let list = deny_list(&pin, &lab);
    assert!(list.contains(&v4_host(&lab)), "A's entry still listed");
    assert!(!list.contains(&v6_host(&lab)));
    sluice(&pin, &lab.b, &["deny", "add", &v6_host(&lab)]);
    assert_eq!(
        ping(&lab.a, lab.b_v6.into(), PINGS),
        0,
        "a new deny entry works after the killed change"
    );
    sluice(&pin, &lab.b, &["deny", "del", &v4_host(&lab)]);
    sluice(&pin, &lab.b, &["deny", "del", &v6_host(&lab)]);
    let list = deny_list(&pin, &lab);
    assert!(
        !list.contains(&v4_host(&lab)) && !list.contains(&v6_host(&lab)),
        "entries deleted: {list:?}"
    );
    for v6 in [false, true] {
        assert_open(&lab, v6, "deny entries deleted after the killed change");
    }
    assert_eq!(
        program_id(&pin, &lab),
        prog,
        "no reload through all of this"
    );

    detach(&pin, &lab);
}

/// (f) Errors: a non-zero exit and one line on stderr that names the problem,
/// and nothing changed.
#[test]
fn e2e_errors() {
    let lab = Lab::new("err");
    let pin = PinRoot::new();

    // Policy commands before anything is attached.
    for args in [
        vec!["deny", "add", "198.18.250.1/32"],
        vec!["allow", "add", "198.18.250.1/32"],
        vec!["rule", "add", "drop", "udp", "dport", "4444"],
    ] {
        let out = sluice_output(&pin, &lab.b, &args);
        assert!(
            !out.status.success(),
            "sluice {args:?} before attach should fail"
        );
        let err = stderr(&out);
        assert!(
            err.to_lowercase().contains("attach"),
            "sluice {args:?} before attach should say to attach first: {err:?}"
        );
    }

    // A nonexistent interface.
    let out = sluice_output(&pin, &lab.b, &["attach", "nosuchif0", "--mode", "native"]);
    assert!(
        !out.status.success(),
        "attach to a missing interface should fail"
    );
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line on stderr: {err:?}");
    assert!(
        err.contains("nosuchif0"),
        "the error names the interface: {err:?}"
    );
    assert!(!xdp_on_link(&lab));

    // A bad CIDR changes nothing.
    attach(&pin, &lab);
    sluice(&pin, &lab.b, &["deny", "add", "198.18.250.1/32"]);
    let before = deny_list(&pin, &lab);
    let out = sluice_output(&pin, &lab.b, &["deny", "add", "198.18.0.300/24"]);
    assert!(!out.status.success(), "deny add of a bad CIDR should fail");
    let err = stderr(&out);
    assert!(
        err.contains("198.18.0.300/24"),
        "the error names the bad CIDR: {err:?}"
    );
    assert_eq!(
        deny_list(&pin, &lab),
        before,
        "a rejected deny add changes nothing"
    );

    detach(&pin, &lab);
}

/// `deny replace` makes the list exactly the file's prefixes in one change,
/// `deny flush` empties it; judged by packets. Bad input changes nothing.
#[test]
fn e2e_replace_and_flush() {
    let lab = Lab::new("replace");
    let pin = PinRoot::new();
    attach(&pin, &lab);
    let v4_net = format!("198.18.{}.0/24", lab.x);
    let v6_net = format!("2001:2:0:{:x}::/64", lab.x);
    sluice(&pin, &lab.b, &["deny", "add", &v4_net, "198.18.200.0/24"]);
    assert_blocked(&lab, false, "A's /24 denied");

    let file = TempFile::new(
        "replace.txt",
        &format!("# the new list\n198.18.201.0/24\n{v6_net}\n"),
    );
    let file_arg = file.path().to_str().expect("utf-8").to_string();
    let out = sluice(
        &pin,
        &lab.b,
        &["deny", "replace", "--file", &file_arg, "198.18.200.0/24"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "deny list replaced: 2 added, 1 removed, 1 kept"
    );
    let mut want = vec![
        "198.18.200.0/24".to_string(),
        "198.18.201.0/24".to_string(),
        v6_net.clone(),
    ];
    want.sort();
    let mut got = deny_list(&pin, &lab);
    got.sort();
    assert_eq!(got, want);
    assert_open(&lab, false, "A's /24 replaced away");
    assert_eq!(
        ping(&lab.a, lab.b_v6.into(), PINGS),
        0,
        "A's /64 replaced in"
    );

    for (args, want) in [
        (vec!["deny", "replace"], "no prefixes given"),
        (vec!["deny", "replace", "198.18.1.0/8"], "bits set beyond"),
        (vec!["deny", "replace", "::/0"], "--force"),
    ] {
        let out = sluice_output(&pin, &lab.b, &args);
        let line = crate::support::cli::expect_one_line_error(&format!("{args:?}"), &out);
        assert!(line.contains(want), "{args:?}: {line}");
    }
    assert_eq!(deny_list(&pin, &lab).len(), 3, "refusals changed nothing");

    // Without an agent, export writes what the pins hold: a config that
    // `check` accepts, with the interface, the rules and the lists.
    sluice(
        &pin,
        &lab.b,
        &["rule", "add", "drop", "udp", "dport", "4444"],
    );
    let out = sluice(&pin, &lab.b, &["export"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("# sluice export: what the pins at"),
        "{text}"
    );
    assert!(text.contains("rules = [\"drop udp dport 4444\"]"), "{text}");
    assert!(text.contains(&format!("name = \"{}\"", lab.b_if)), "{text}");
    let exported = TempFile::new("export.toml", &text);
    let out = Command::new(SLUICE)
        .arg("check")
        .arg(exported.path())
        .output()
        .expect("run sluice check");
    assert!(
        out.status.success(),
        "check of the export: {}",
        stderr(&out)
    );
    let v = sluice_json(&pin, &lab.b, &["export", "--json"]);
    let mut deny: Vec<String> = v["policy"]["deny"]
        .as_array()
        .expect("deny in the JSON export")
        .iter()
        .map(|p| p.as_str().expect("prefix").to_string())
        .collect();
    deny.sort();
    assert_eq!(deny, want);

    let out = sluice(&pin, &lab.b, &["deny", "flush"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "deny list flushed: 0 added, 3 removed, 0 kept"
    );
    assert!(deny_list(&pin, &lab).is_empty());
    assert_open(&lab, true, "flushed");
    detach(&pin, &lab);
}
