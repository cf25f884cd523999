//! Attaching, re-adopting and detaching; what sluice refuses (a pinned map of
//! another layout, users without privileges, a full list, a bad prefix file);
//! and the counters `stats` and `deny list` report.
//!
//! Needs root, bpffs, `ping` (iputils-ping), `bpftool` and `setpriv`
//! (util-linux). The end-to-end tests each make their own [`Lab`] and
//! [`PinRoot`] and attach sluice in namespace B; the bulk-load test needs no
//! namespace: it drives the real program through BPF_PROG_TEST_RUN in a
//! [`Sandbox`](sluice::dataplane::sandbox::Sandbox).

use std::{
    net::{IpAddr, Ipv4Addr},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net};
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng, seq::index::sample};
use serde_json::Value;
use sluice::dataplane::{
    Change, DataplaneError,
    sandbox::{XDP_DROP, XDP_PASS},
};
use sluice_common::{LIST_CAPACITY, ListId, SETTINGS_F_DIRTY};

use crate::support::{
    cli::{
        CLI_TIMEOUT, SLUICE, TempFile, deny_list_in, expect_one_line_error, list_json_entries,
        parse_json, sluice, sluice_json, sluice_output, status_json_attachment, xdp_on,
    },
    frames::Frame,
    kernel,
    netns::{Lab, Netns, PinRoot, output_with_timeout, ping, run_ok},
};

const PINGS: u32 = 3;

// ---------------------------------------------------------------------------
// Attach, detach and status through the CLI
// ---------------------------------------------------------------------------

/// What `attach --json` reports.
#[derive(Debug)]
struct Attached {
    mode: String,
    fell_back: bool,
    readopted: bool,
    program_id: u64,
    link_id: u64,
}

/// `attach --json` → `{"mode":..,"fell_back":..,"readopted":..,"program_id":N,"link_id":N}`.
fn attach_report(v: &Value) -> Attached {
    let field = |k: &str| {
        v.get(k)
            .unwrap_or_else(|| panic!("attach --json has no {k}: {v}"))
    };
    let flag = |k: &str| {
        field(k)
            .as_bool()
            .unwrap_or_else(|| panic!("attach --json: {k} is not a bool: {v}"))
    };
    let id = |k: &str| {
        field(k)
            .as_u64()
            .unwrap_or_else(|| panic!("attach --json: {k} is not a number: {v}"))
    };
    Attached {
        mode: field("mode")
            .as_str()
            .unwrap_or_else(|| panic!("attach --json: mode is not a string: {v}"))
            .to_owned(),
        fell_back: flag("fell_back"),
        readopted: flag("readopted"),
        program_id: id("program_id"),
        link_id: id("link_id"),
    }
}

/// `sluice -n NS attach IFACE [--mode MODE] --json`, which must succeed.
fn attach(pin: &PinRoot, ns: &Netns, iface: &str, mode: Option<&str>) -> Attached {
    let mut args = vec!["attach", iface, "--json"];
    if let Some(m) = mode {
        args.extend(["--mode", m]);
    }
    attach_report(&sluice_json(pin, ns, &args))
}

/// `sluice -n NS detach IFACE --json`, which must succeed: whether that was
/// the last attachment (`removed_all`).
fn detach(pin: &PinRoot, ns: &Netns, iface: &str) -> bool {
    let v = sluice_json(pin, ns, &["detach", iface, "--json"]);
    v["removed_all"]
        .as_bool()
        .unwrap_or_else(|| panic!("detach --json has no removed_all bool: {v}"))
}

/// `status --json` → every attachment as (interface, mode, program id), sorted.
fn attachments(pin: &PinRoot, ns: &Netns) -> Vec<(String, String, u64)> {
    let status = sluice_json(pin, ns, &["status", "--json"]);
    let mut v: Vec<(String, String, u64)> = status["attachments"]
        .as_array()
        .unwrap_or_else(|| panic!("status --json has no attachments array: {status}"))
        .iter()
        .map(|a| {
            let iface = a["interface"].as_str().unwrap_or_default().to_owned();
            let (id, mode) = status_json_attachment(&status, &iface);
            (iface, mode, id)
        })
        .collect();
    v.sort();
    v
}

/// The word `ip -d link show` puts after the flags for an XDP program:
/// `xdpgeneric` (generic), `xdp` (native), ...; `None` without one.
fn xdp_word(ns: &Netns, iface: &str) -> Option<String> {
    let out = ns.exec_ok(["ip", "-d", "link", "show", "dev", iface]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("xdp"))
        .map(str::to_owned)
}

fn v4_host(lab: &Lab) -> String {
    format!("{}/32", lab.a_v4)
}

// ---------------------------------------------------------------------------
// A second veth pair between the lab's namespaces
// ---------------------------------------------------------------------------

/// A second veth pair from A to B, IPv4 only: `a_if` has 198.18.X.65 and
/// `b_if` 198.18.X.66, as point-to-point /32s, so it lives inside the lab's
/// own 198.18.X.0/24 and the host routes send traffic for these two
/// addresses over this pair, not the lab's. Removed with the lab's namespaces.
struct Pair {
    a_if: String,
    b_if: String,
    a_v4: Ipv4Addr,
    b_v4: Ipv4Addr,
}

fn second_pair(lab: &Lab) -> Pair {
    // The lab's names start with 'v' and are unique to the lab; 'w' keeps
    // them unique and as short.
    let a_if = lab.a_if.replacen('v', "w", 1);
    let b_if = lab.b_if.replacen('v', "w", 1);
    let a_v4 = Ipv4Addr::new(198, 18, lab.x, 65);
    let b_v4 = Ipv4Addr::new(198, 18, lab.x, 66);
    lab.a.exec_ok([
        "ip",
        "link",
        "add",
        &a_if,
        "type",
        "veth",
        "peer",
        "name",
        &b_if,
        "netns",
        lab.b.name(),
    ]);
    for (ns, ifname, local, peer) in [(&lab.a, &a_if, a_v4, b_v4), (&lab.b, &b_if, b_v4, a_v4)] {
        ns.exec_ok([
            "ip",
            "addr",
            "add",
            &format!("{local}/32"),
            "peer",
            &format!("{peer}/32"),
            "dev",
            ifname,
        ]);
        ns.exec_ok(["ip", "link", "set", "dev", ifname, "up"]);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while ![(&lab.a, &a_if), (&lab.b, &b_if)]
        .iter()
        .all(|(ns, ifname)| {
            let out = ns.exec(["ip", "link", "show", "dev", ifname.as_str()]);
            String::from_utf8_lossy(&out.stdout).contains("LOWER_UP")
        })
    {
        assert!(
            Instant::now() < deadline,
            "second veth pair {a_if}/{b_if} not up after 5 s"
        );
        thread::sleep(Duration::from_millis(20));
    }
    Pair {
        a_if,
        b_if,
        a_v4,
        b_v4,
    }
}

// ---------------------------------------------------------------------------
// 1. Attach modes
// ---------------------------------------------------------------------------

/// Generic mode attaches and filters; `auto` falls back to generic on
/// loopback (no native XDP) and says so; `native` on loopback fails with one
/// line naming the interface and attaches nothing.
#[test]
fn e2e_attach_modes() {
    let lab = Lab::new("mode");
    let pin = PinRoot::new();

    let r = attach(&pin, &lab.b, &lab.b_if, Some("generic"));
    assert_eq!(r.mode, "generic", "{r:?}");
    assert!(!r.fell_back && !r.readopted, "{r:?}");
    let prog = r.program_id;
    assert_eq!(
        attachments(&pin, &lab.b),
        vec![(lab.b_if.clone(), "generic".to_owned(), prog)],
        "status --json after a generic attach"
    );
    assert_eq!(
        xdp_word(&lab.b, &lab.b_if).as_deref(),
        Some("xdpgeneric"),
        "ip link shows a generic XDP program on {}",
        lab.b_if
    );

    // Filtering works in generic mode.
    assert_eq!(ping(&lab.a, lab.b_v4.into(), PINGS), PINGS, "before deny");
    sluice(&pin, &lab.b, &["deny", "add", &v4_host(&lab)]);
    assert_eq!(
        ping(&lab.a, lab.b_v4.into(), PINGS),
        0,
        "A's IPv4 denied, generic mode"
    );
    assert_eq!(
        ping(&lab.a, lab.b_v6.into(), PINGS),
        PINGS,
        "IPv6 not denied, generic mode"
    );
    sluice(&pin, &lab.b, &["deny", "del", &v4_host(&lab)]);
    assert_eq!(
        ping(&lab.a, lab.b_v4.into(), PINGS),
        PINGS,
        "deny entry deleted, generic mode"
    );

    // Native on loopback: refused, one line naming the interface, nothing attached.
    let out = sluice_output(&pin, &lab.b, &["attach", "lo", "--mode", "native"]);
    let err = expect_one_line_error("attach lo --mode native", &out);
    assert!(
        err.split(|c: char| !c.is_alphanumeric()).any(|w| w == "lo"),
        "the error names the interface lo: {err:?}"
    );
    assert!(err.contains("native"), "the error names the mode: {err:?}");
    assert!(!xdp_on(&lab.b, "lo"), "nothing attached to lo");
    assert_eq!(attachments(&pin, &lab.b).len(), 1, "only {}", lab.b_if);

    // Auto on loopback: generic, and it says it fell back.
    let r = attach(&pin, &lab.b, "lo", Some("auto"));
    assert_eq!(r.mode, "generic", "auto on lo: {r:?}");
    assert!(r.fell_back, "auto on lo reports the fallback: {r:?}");
    assert!(!r.readopted, "{r:?}");
    assert_eq!(r.program_id, prog, "lo shares the program");
    assert_eq!(xdp_word(&lab.b, "lo").as_deref(), Some("xdpgeneric"));
    let mut want = vec![
        (lab.b_if.clone(), "generic".to_owned(), prog),
        ("lo".to_owned(), "generic".to_owned(), prog),
    ];
    want.sort();
    assert_eq!(attachments(&pin, &lab.b), want);
    // The human-readable form says so too (A's loopback, same pin root).
    let out = sluice(&pin, &lab.a, &["attach", "lo", "--mode", "auto"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("generic") && text.contains("native refused"),
        "attach lo --mode auto says it fell back to generic: {text:?}"
    );
    assert!(!detach(&pin, &lab.a, "lo"));

    assert!(!detach(&pin, &lab.b, "lo"));
    assert!(!xdp_on(&lab.b, "lo"));
    assert!(detach(&pin, &lab.b, &lab.b_if), "last detach");
    assert!(!xdp_on(&lab.b, &lab.b_if));
    assert!(!pin.path().exists(), "pin root removed by the last detach");
}

/// A first attach that fails (native mode on loopback) leaves nothing pinned:
/// no program and no maps that `detach` could no longer remove.
#[test]
fn e2e_failed_first_attach_leaves_no_pins() {
    let lab = Lab::new("leak");
    let pin = PinRoot::new();
    let out = sluice_output(&pin, &lab.b, &["attach", "lo", "--mode", "native"]);
    expect_one_line_error("first attach lo --mode native", &out);
    assert!(!xdp_on(&lab.b, "lo"));
    assert_eq!(
        pin.pins(),
        Vec::<std::path::PathBuf>::new(),
        "a failed first attach left pins behind"
    );
}

// ---------------------------------------------------------------------------
// 2. Re-adoption and several interfaces
// ---------------------------------------------------------------------------

/// Attaching again re-adopts the pinned link (same program and link, policy
/// kept); a second interface shares the program and the maps; detaching one
/// leaves the other filtering; the last detach removes the pin root.
#[test]
fn e2e_readopt_and_shared_policy() {
    let lab = Lab::new("share");
    let pin = PinRoot::new();
    let pair = second_pair(&lab);
    let lab_net = format!("198.18.{}.0/24", lab.x);

    let first = attach(&pin, &lab.b, &lab.b_if, Some("native"));
    assert!(!first.readopted && !first.fell_back, "{first:?}");
    assert_eq!(first.mode, "native");
    // One deny entry covering A's addresses on both pairs.
    sluice(&pin, &lab.b, &["deny", "add", &lab_net]);
    assert_eq!(ping(&lab.a, lab.b_v4.into(), PINGS), 0, "denied on pair 1");
    assert_eq!(
        ping(&lab.a, pair.b_v4.into(), PINGS),
        PINGS,
        "pair 2 not filtered yet"
    );

    // Again, with the default mode (auto): re-adopted, nothing changed.
    let again = attach(&pin, &lab.b, &lab.b_if, None);
    assert!(again.readopted, "second attach re-adopts: {again:?}");
    assert_eq!(again.program_id, first.program_id, "same program");
    assert_eq!(again.link_id, first.link_id, "same link");
    assert_eq!(again.mode, "native", "the pinned link's mode: {again:?}");
    assert_eq!(deny_list_in(&pin, &lab.b), vec![lab_net.clone()]);
    assert_eq!(
        ping(&lab.a, lab.b_v4.into(), PINGS),
        0,
        "still denied after re-adoption"
    );

    // A second interface (generic, for variety): same program, same maps.
    let second = attach(&pin, &lab.b, &pair.b_if, Some("generic"));
    assert!(!second.readopted, "{second:?}");
    assert_eq!(second.program_id, first.program_id, "one shared program");
    assert_ne!(second.link_id, first.link_id, "its own link");
    let mut want = vec![
        (lab.b_if.clone(), "native".to_owned(), first.program_id),
        (pair.b_if.clone(), "generic".to_owned(), first.program_id),
    ];
    want.sort();
    assert_eq!(attachments(&pin, &lab.b), want);
    assert_eq!(
        ping(&lab.a, pair.b_v4.into(), PINGS),
        0,
        "the deny entry added before applies on pair 2 ({} {} -> {})",
        pair.a_if,
        pair.a_v4,
        pair.b_v4
    );
    assert_eq!(
        ping(&lab.a, lab.b_v4.into(), PINGS),
        0,
        "and still on pair 1"
    );

    // Detach pair 1: pair 2 keeps filtering with the same policy.
    assert!(!detach(&pin, &lab.b, &lab.b_if), "not the last attachment");
    assert!(!xdp_on(&lab.b, &lab.b_if));
    assert!(xdp_on(&lab.b, &pair.b_if));
    assert_eq!(
        ping(&lab.a, lab.b_v4.into(), PINGS),
        PINGS,
        "pair 1 open after its detach"
    );
    assert_eq!(
        ping(&lab.a, pair.b_v4.into(), PINGS),
        0,
        "pair 2 still filtering"
    );
    assert_eq!(deny_list_in(&pin, &lab.b), vec![lab_net.clone()]);
    assert!(pin.path().exists());

    // The last detach removes everything.
    assert!(detach(&pin, &lab.b, &pair.b_if), "last attachment");
    assert!(!xdp_on(&lab.b, &pair.b_if));
    assert!(
        !pin.path().exists(),
        "pin root {} still there after the last detach: {:?}",
        pin.path().display(),
        pin.pins()
    );
    assert_eq!(
        ping(&lab.a, pair.b_v4.into(), PINGS),
        PINGS,
        "pair 2 open after the last detach"
    );
}

// ---------------------------------------------------------------------------
// 3. A pinned map of another layout
// ---------------------------------------------------------------------------

/// `bpftool -j map show pinned PATH` → (id, key size, value size).
fn bpftool_map(path: &std::path::Path) -> (u64, u64, u64) {
    let out = run_ok([
        "bpftool".as_ref(),
        "-j".as_ref(),
        "map".as_ref(),
        "show".as_ref(),
        "pinned".as_ref(),
        path.as_os_str(),
    ]);
    let v = parse_json("bpftool map show", &out);
    let n = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("bpftool map show: no {k}: {v}"))
    };
    (n("id"), n("bytes_key"), n("bytes_value"))
}

/// A pinned DENY_V4 this build cannot use is refused with one line naming it;
/// nothing is attached and the user's pin stays as it was.
#[test]
fn e2e_incompatible_pinned_map_is_refused() {
    let lab = Lab::new("compat");
    let pin = PinRoot::new();
    let maps = pin.path().join("maps");
    std::fs::create_dir_all(&maps).expect("mkdir maps under the pin root");
    let deny_v4 = maps.join("DENY_V4");
    run_ok([
        "bpftool".as_ref(),
        "map".as_ref(),
        "create".as_ref(),
        deny_v4.as_os_str(),
        "type".as_ref(),
        "lpm_trie".as_ref(),
        "key".as_ref(),
        "8".as_ref(),
        "value".as_ref(),
        "8".as_ref(),
        "entries".as_ref(),
        "16".as_ref(),
        "name".as_ref(),
        "DENY_V4".as_ref(),
        "flags".as_ref(),
        "1".as_ref(),
    ]);
    let before = bpftool_map(&deny_v4);
    assert_eq!((before.1, before.2), (8, 8));

    for mode in ["native", "generic", "auto"] {
        let out = sluice_output(&pin, &lab.b, &["attach", &lab.b_if, "--mode", mode]);
        let err = expect_one_line_error(&format!("attach --mode {mode}"), &out);
        assert!(
            err.contains("DENY_V4") && err.contains("does not match"),
            "attach --mode {mode}: the error names DENY_V4 and says it does not match: {err:?}"
        );
        assert!(
            !xdp_on(&lab.b, &lab.b_if),
            "attach --mode {mode} refused, yet {} has an XDP program",
            lab.b_if
        );
        assert_eq!(
            pin.pins(),
            vec![deny_v4.clone()],
            "attach --mode {mode}: only the user's pin under the root"
        );
        assert_eq!(
            bpftool_map(&deny_v4),
            before,
            "the user's DENY_V4 is the same map, untouched"
        );
    }
    let status = sluice_json(&pin, &lab.b, &["status", "--json"]);
    assert_eq!(
        status["attachments"].as_array().map(Vec::len),
        Some(0),
        "status shows no attachment: {status}"
    );
}

/// Asking for another mode drops the live link first; when the new mode is
/// then refused, the interface must not be left unfiltered: the old mode is
/// attached again. Native XDP on a veth is refused when the peer's MTU is
/// too large for one page (generic mode does not care).
#[test]
fn e2e_refused_mode_change_keeps_filtering() {
    let lab = Lab::new("remode");
    let pin = PinRoot::new();
    attach(&pin, &lab.b, &lab.b_if, Some("generic"));
    sluice(&pin, &lab.b, &["deny", "add", &v4_host(&lab)]);
    assert_eq!(ping(&lab.a, lab.b_v4.into(), PINGS), 0, "denied");

    lab.a
        .exec_ok(["ip", "link", "set", "dev", &lab.a_if, "mtu", "9000"]);
    let out = sluice_output(&pin, &lab.b, &["attach", &lab.b_if, "--mode", "native"]);
    let err = expect_one_line_error("attach --mode native over a generic attachment", &out);
    assert!(err.contains("generic"), "{err:?}");
    assert_eq!(
        xdp_word(&lab.b, &lab.b_if).as_deref(),
        Some("xdpgeneric"),
        "the refused mode change left {} unfiltered",
        lab.b_if
    );
    assert_eq!(ping(&lab.a, lab.b_v4.into(), PINGS), 0, "still denied");
}

// ---------------------------------------------------------------------------
// 4. Without privileges
// ---------------------------------------------------------------------------

/// `setpriv` to nobody:nogroup with no capabilities, then `sluice --pin-root
/// ROOT args...` (no `-n`: entering a namespace needs privileges of its own).
fn sluice_unprivileged(pin: &PinRoot, args: &[&str]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        SLUICE,
        "--pin-root",
    ])
    .arg(pin.path())
    .args(args);
    output_with_timeout(&mut cmd, CLI_TIMEOUT)
}

/// Whether an error says the user lacks privileges.
fn says_needs_privileges(err: &str) -> bool {
    let e = err.to_lowercase();
    e.contains("permission denied") || e.contains("root") || e.contains("cap_bpf")
}

/// Attaches as root in a new lab and adds one deny entry; the lab and pin
/// root are returned so the caller keeps them alive.
fn attached_with_one_entry(tag: &str) -> (Lab, PinRoot, Vec<String>) {
    let lab = Lab::new(tag);
    let pin = PinRoot::new();
    attach(&pin, &lab.b, &lab.b_if, Some("native"));
    sluice(&pin, &lab.b, &["deny", "add", "198.18.250.1/32"]);
    let before = deny_list_in(&pin, &lab.b);
    assert_eq!(before, vec!["198.18.250.1/32".to_owned()]);
    // The test is only meaningful if nobody can run the binary at all.
    let out = sluice_unprivileged(&pin, &["--version"]);
    assert!(
        out.status.success(),
        "nobody cannot run {SLUICE} (check the directories' permissions): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (lab, pin, before)
}

/// Unprivileged `status` and `deny add` fail with one line and change
/// nothing; `status` says it needs privileges.
#[test]
fn e2e_unprivileged_commands_are_refused() {
    let (lab, pin, before) = attached_with_one_entry("nopriv");

    let out = sluice_unprivileged(&pin, &["status"]);
    let err = expect_one_line_error("unprivileged status", &out);
    assert!(
        says_needs_privileges(&err),
        "unprivileged status should say it needs root or CAP_BPF: {err:?}"
    );

    for args in [
        vec!["deny", "add", "198.18.250.2/32"],
        vec!["deny", "del", "198.18.250.1/32"],
    ] {
        let out = sluice_unprivileged(&pin, &args);
        let err = expect_one_line_error(&format!("unprivileged {args:?}"), &out);
        // The text is checked by the ignored test below (known poor message).
        eprintln!("unprivileged {args:?}: {err}");
        assert_eq!(
            deny_list_in(&pin, &lab.b),
            before,
            "unprivileged {args:?} changed the deny list"
        );
    }

    assert!(detach(&pin, &lab.b, &lab.b_if));
}

/// Known issue: unprivileged policy commands say
/// "pinned map ROOT/maps/ALLOW_V4 cannot be opened: `BPF_OBJ_GET` failed"
/// instead of naming the missing privileges (pins.rs `check_pinned_maps`
/// wraps the EPERM from `MapInfo::from_pin` as `PinnedMap` without the
/// permission check `open_map` does).
#[test]
fn e2e_unprivileged_policy_commands_name_privileges() {
    let (lab, pin, before) = attached_with_one_entry("noprivmsg");
    for args in [
        vec!["deny", "add", "198.18.250.2/32"],
        vec!["deny", "list"],
        vec!["stats"],
    ] {
        let out = sluice_unprivileged(&pin, &args);
        let err = expect_one_line_error(&format!("unprivileged {args:?}"), &out);
        assert!(
            says_needs_privileges(&err),
            "unprivileged {args:?} should say it needs root or CAP_BPF: {err:?}"
        );
    }
    assert_eq!(deny_list_in(&pin, &lab.b), before);
    assert!(detach(&pin, &lab.b, &lab.b_if));
}

// ---------------------------------------------------------------------------
// 5. Bulk load, a full list, and a bad prefix file
// ---------------------------------------------------------------------------

/// Source addresses of the bulk test: 10.0.0.0 + i (the sandbox is not
/// attached anywhere, so these are only map keys).
fn bulk_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i)
}

fn bulk_net(i: u32) -> IpNet {
    IpNet::V4(Ipv4Net::new(bulk_addr(i), 32).expect("/32"))
}

/// An ICMP echo from `src`, as BPF_PROG_TEST_RUN input.
fn echo_from(src: Ipv4Addr, seq: u16) -> Vec<u8> {
    Frame::v4(src, Ipv4Addr::new(198, 18, 250, 1))
        .icmp_echo(0x5a, seq)
        .build()
}

/// One million IPv4 /32s go in with one commit and all drop; a commit that
/// would pass the list's capacity by one is refused with `ListFull` and
/// changes nothing; one that fills it exactly is accepted.
#[test]
fn sandbox_million_prefixes_then_full_list() {
    const LOADED: u32 = 1_000_000;
    const SAMPLES: usize = 1_000;
    let seed: u64 = std::env::var("SLUICE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    let mut rng = SmallRng::seed_from_u64(seed);
    eprintln!("seed {seed} (rerun with SLUICE_SEED={seed})");

    let sandbox = kernel::new_sandbox();
    let mut maps = sandbox.policy().expect("policy maps");
    let deny_len = |maps: &sluice::dataplane::PolicyMaps| {
        maps.active_settings().expect("settings").list_len[ListId::DenyV4 as usize]
    };
    let run = |frame: &[u8]| sandbox.run(frame).expect("test run").action;

    let change = Change {
        add: (0..LOADED).map(|i| (ListId::DenyV4, bulk_net(i))).collect(),
        ..Change::default()
    };
    let start = Instant::now();
    let report = maps.commit(change).expect("commit 1,000,000 prefixes");
    eprintln!(
        "committed {LOADED} IPv4 /32s in one change in {:.2?}",
        start.elapsed()
    );
    assert_eq!(report.added, LOADED as usize, "{report:?}");
    assert_eq!(report.already_present, 0, "{report:?}");
    let settings = maps.active_settings().expect("settings");
    for list in ListId::ALL {
        let want = if list == ListId::DenyV4 { LOADED } else { 0 };
        assert_eq!(
            settings.list_len[list as usize], want,
            "{list:?} length: {settings:?}"
        );
    }

    let picked: Vec<u32> = sample(&mut rng, LOADED as usize, SAMPLES)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    for (n, &i) in picked.iter().enumerate() {
        assert_eq!(
            run(&echo_from(bulk_addr(i), n as u16)),
            XDP_DROP,
            "loaded prefix {} (index {i}, seed {seed}) should drop",
            bulk_net(i)
        );
    }
    for src in [bulk_addr(LOADED), Ipv4Addr::new(198, 18, 250, 7)] {
        assert_eq!(run(&echo_from(src, 0)), XDP_PASS, "{src} is not loaded");
    }

    // One more than fits.
    let extra = LIST_CAPACITY - LOADED + 1;
    assert_eq!(extra, 48_577);
    let generation = maps.active_generation().expect("generation");
    let change = Change {
        add: (LOADED..LOADED + extra)
            .map(|i| (ListId::DenyV4, bulk_net(i)))
            .collect(),
        ..Change::default()
    };
    match maps.commit(change) {
        Err(
            ref e @ DataplaneError::ListFull {
                list,
                capacity,
                current,
                adding,
            },
        ) => {
            // The list's name is for people ("deny (IPv4)"; once "DENY_V4").
            let name = list.to_lowercase();
            assert!(
                name.contains("deny") && name.contains("v4"),
                "ListFull names the IPv4 deny list: {list:?}"
            );
            assert_eq!(capacity, LIST_CAPACITY);
            assert_eq!(current, LOADED);
            assert_eq!(adding, extra as usize);
            let msg = e.to_string();
            assert!(
                msg.contains(list) && msg.contains(&LIST_CAPACITY.to_string()),
                "the message names the list and its capacity: {msg:?}"
            );
        }
        other => panic!("adding {extra} to {LOADED} should fail with ListFull, got {other:?}"),
    }
    assert_eq!(
        deny_len(&maps),
        LOADED,
        "the refused change changed list_len"
    );
    assert_eq!(
        maps.active_generation().expect("generation"),
        generation,
        "the refused change flipped the generation"
    );
    for g in 0..2 {
        let s = maps.settings(g).expect("settings");
        assert_eq!(
            s.flags & SETTINGS_F_DIRTY,
            0,
            "generation {g} left dirty: {s:?}"
        );
        assert_eq!(
            s.list_len[ListId::DenyV4 as usize],
            LOADED,
            "generation {g}: {s:?}"
        );
    }
    assert_eq!(
        run(&echo_from(bulk_addr(picked[0]), 1)),
        XDP_DROP,
        "still drops"
    );
    assert_eq!(run(&echo_from(bulk_addr(0), 2)), XDP_DROP, "still drops");
    assert_eq!(
        run(&echo_from(bulk_addr(LOADED), 3)),
        XDP_PASS,
        "nothing of the refused change went in"
    );
    assert_eq!(
        run(&echo_from(bulk_addr(LOADED + extra - 1), 4)),
        XDP_PASS,
        "nothing of the refused change went in"
    );

    // Exactly full is fine, and then one more is refused.
    let change = Change {
        add: (LOADED..LOADED + extra - 1)
            .map(|i| (ListId::DenyV4, bulk_net(i)))
            .collect(),
        ..Change::default()
    };
    maps.commit(change).expect("filling the list exactly");
    assert_eq!(deny_len(&maps), LIST_CAPACITY);
    assert_eq!(run(&echo_from(bulk_addr(LOADED), 5)), XDP_DROP);
    let err = maps
        .commit(Change {
            add: vec![(ListId::DenyV4, bulk_net(LOADED + extra - 1))],
            ..Change::default()
        })
        .expect_err("one prefix into a full list");
    assert!(
        matches!(err, DataplaneError::ListFull { adding: 1, .. }),
        "{err:?}"
    );
    assert_eq!(deny_len(&maps), LIST_CAPACITY);
}

/// `deny add --file` with a malformed line fails naming FILE:LINE and adds
/// nothing, not even the valid lines or the prefixes on the command line.
#[test]
fn e2e_deny_file_with_bad_line_changes_nothing() {
    let lab = Lab::new("file");
    let pin = PinRoot::new();
    attach(&pin, &lab.b, &lab.b_if, Some("native"));
    sluice(&pin, &lab.b, &["deny", "add", "198.18.250.1/32"]);
    let before = deny_list_in(&pin, &lab.b);

    let bad = TempFile::new(
        "bad.txt",
        "# blocklist\n198.18.251.0/24\n\n198.18.252.1 # one host\n198.18.253.999/24\n2001:2:0:ff01::/64\n",
    );
    let file = bad.path().to_string_lossy().into_owned();
    let out = sluice_output(
        &pin,
        &lab.b,
        &["deny", "add", "198.18.254.1/32", "--file", &file],
    );
    let err = expect_one_line_error("deny add --file with a bad line 5", &out);
    assert!(
        err.contains(&format!("{file}:5")),
        "the error names {file}:5: {err:?}"
    );
    assert!(
        err.contains("198.18.253.999/24"),
        "the error quotes the bad line: {err:?}"
    );
    assert_eq!(
        deny_list_in(&pin, &lab.b),
        before,
        "a refused --file changes nothing"
    );

    // The same file with line 5 fixed goes in whole.
    let good = TempFile::new(
        "good.txt",
        "# blocklist\n198.18.251.0/24\n\n198.18.252.1 # one host\n198.18.253.0/24\n2001:2:0:ff01::/64\n",
    );
    sluice(
        &pin,
        &lab.b,
        &[
            "deny",
            "add",
            "198.18.254.1/32",
            "--file",
            &good.path().to_string_lossy(),
        ],
    );
    let mut want: Vec<String> = [
        "198.18.250.1/32",
        "198.18.251.0/24",
        "198.18.252.1/32",
        "198.18.253.0/24",
        "198.18.254.1/32",
        "2001:2:0:ff01::/64",
    ]
    .map(str::to_owned)
    .to_vec();
    want.sort();
    assert_eq!(deny_list_in(&pin, &lab.b), want);

    assert!(detach(&pin, &lab.b, &lab.b_if));
}

// ---------------------------------------------------------------------------
// 6. Counters
// ---------------------------------------------------------------------------

/// `stats --json` → `by_reason[KEY].packets`, 0 when the reason is absent.
fn by_reason_packets(stats: &Value, key: &str) -> u64 {
    let by_reason = stats["by_reason"]
        .as_object()
        .unwrap_or_else(|| panic!("stats --json has no by_reason object: {stats}"));
    by_reason.get(key).map_or(0, |t| {
        t["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {t}"))
    })
}

/// Denied and passed pings show up in `stats` by reason, in its top entries,
/// and in the deny entry's own counters and last-seen time.
#[test]
fn e2e_stats_count_denied_and_passed() {
    const DENIED: u32 = 5;
    const PASSED: u32 = 4;
    /// ping's default 56 data bytes: 14 + 20 + 8 + 56.
    const ECHO_FRAME: u64 = 98;
    let lab = Lab::new("stats");
    let pin = PinRoot::new();
    attach(&pin, &lab.b, &lab.b_if, Some("native"));
    let host = v4_host(&lab);
    sluice(&pin, &lab.b, &["deny", "add", &host]);

    assert_eq!(ping(&lab.a, lab.b_v4.into(), DENIED), 0, "denied pings");
    assert_eq!(
        ping(&lab.a, IpAddr::V6(lab.b_v6), PASSED),
        PASSED,
        "IPv6 pings pass by default"
    );

    let stats = sluice_json(&pin, &lab.b, &["stats", "--json"]);
    let denied = by_reason_packets(&stats, "drop/deny-list");
    let passed = by_reason_packets(&stats, "pass/default");
    assert!(
        denied >= u64::from(DENIED),
        "drop/deny-list {denied} < {DENIED}: {stats}"
    );
    assert!(
        passed >= u64::from(PASSED),
        "pass/default {passed} < {PASSED}: {stats}"
    );
    let top = stats["top_entries"]
        .as_array()
        .unwrap_or_else(|| panic!("stats --json has no top_entries array: {stats}"));
    let entry = top
        .iter()
        .find(|e| e["prefix"] == host.as_str())
        .unwrap_or_else(|| panic!("top_entries does not list {host}: {stats}"));
    assert_eq!(entry["list"], "deny", "{entry}");
    let packets = entry["packets"].as_u64().unwrap_or_default();
    assert!(
        packets >= u64::from(DENIED),
        "top entry packets {packets}: {entry}"
    );
    assert!(
        entry["bytes"].as_u64().unwrap_or_default() >= packets * ECHO_FRAME,
        "top entry bytes: {entry}"
    );

    let list = sluice_json(&pin, &lab.b, &["deny", "list", "--json"]);
    let entry = list_json_entries(&list)
        .iter()
        .find(|e| e["prefix"] == host.as_str())
        .unwrap_or_else(|| panic!("deny list --json does not list {host}: {list}"));
    let packets = entry["packets"].as_u64().unwrap_or_default();
    assert!(
        packets >= u64::from(DENIED),
        "deny entry packets {packets}: {entry}"
    );
    let ago = entry["last_seen_secs_ago"]
        .as_f64()
        .unwrap_or_else(|| panic!("last_seen_secs_ago should be a number after hits: {entry}"));
    assert!(
        (0.0..120.0).contains(&ago),
        "last seen {ago} s ago, but the pings were just now: {entry}"
    );
    assert!(stats.get("reset_unix_ns").is_none(), "never reset: {stats}");

    // A reset zeroes every counter (classes, list entries) and is shown;
    // the policy stays, and new packets count from zero.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let r = sluice_json(&pin, &lab.b, &["stats", "--reset", "--json"]);
    assert_eq!(r["entries"].as_u64(), Some(1), "{r}");
    let stats = sluice_json(&pin, &lab.b, &["stats", "--json"]);
    assert_eq!(stats["total"]["packets"].as_u64(), Some(0), "{stats}");
    assert!(
        stats["reset_unix_ns"].as_u64().is_some_and(|t| t >= before),
        "{stats}"
    );
    let list = sluice_json(&pin, &lab.b, &["deny", "list", "--json"]);
    let entry = list_json_entries(&list)
        .iter()
        .find(|e| e["prefix"] == host.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("the entry stays: {list}"));
    assert_eq!(entry["packets"].as_u64(), Some(0), "{entry}");
    assert_eq!(ping(&lab.a, lab.b_v4.into(), 2), 0, "still denied");
    let stats = sluice_json(&pin, &lab.b, &["stats", "--json"]);
    assert_eq!(by_reason_packets(&stats, "drop/deny-list"), 2, "{stats}");
    let text = String::from_utf8_lossy(&sluice(&pin, &lab.b, &["stats"]).stdout).into_owned();
    assert!(text.starts_with("counters since 20"), "{text}");

    assert!(detach(&pin, &lab.b, &lab.b_if));
}
