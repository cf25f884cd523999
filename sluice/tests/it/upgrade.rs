//! Swapping the XDP program on live links: while a denied source keeps
//! sending, `sluice upgrade --force` replaces the program 20 times. Not one
//! denied packet gets through, the maps (policy and counters) carry over, and
//! allowed traffic keeps flowing. Needs root.

use std::net::IpAddr;

use crate::support::{
    cli::{
        expect_one_line_error, explained_class, sluice, sluice_json, sluice_output,
        status_json_attachment,
    },
    netns::{Lab, PinRoot, ping},
};

const SWAPS: usize = 20;

fn deny_packets(list: &serde_json::Value, prefix: &str) -> u64 {
    list["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["prefix"] == prefix)
        .and_then(|e| e["packets"].as_u64())
        .unwrap_or_else(|| panic!("{prefix} not in {list}"))
}

#[test]
fn upgrade_swaps_the_program_without_letting_a_denied_packet_through() {
    let lab = Lab::new("upg");
    let pin = PinRoot::new();
    sluice(&pin, &lab.b, &["attach", &lab.b_if, "--mode", "native"]);
    let prefix = format!("{}/32", lab.a_v4);
    sluice(&pin, &lab.b, &["deny", "add", &prefix]);
    let (first_prog, _) =
        status_json_attachment(&sluice_json(&pin, &lab.b, &["status", "--json"]), &lab.b_if);

    // A steady stream from the denied source for the whole swap sequence.
    let pinger = {
        let a = lab.a.name().to_string();
        let target = lab.b_v4.to_string();
        std::thread::spawn(move || {
            let out = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &a, "ping", "-q", "-c", "300", "-i", "0.01", "-W", "1",
                    &target,
                ])
                .output()
                .expect("ping");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = deny_packets(
        &sluice_json(&pin, &lab.b, &["deny", "list", "--json"]),
        &prefix,
    );
    let mut prog = first_prog;
    for _ in 0..SWAPS {
        let report = sluice_json(&pin, &lab.b, &["upgrade", "--force", "--json"]);
        assert_eq!(report["links"], 1, "{report}");
        let new = report["new_program_id"].as_u64().expect("new id");
        assert_ne!(new, prog, "each swap loads a new program");
        prog = new;
    }
    let summary = pinger.join().expect("pinger");
    let after = deny_packets(
        &sluice_json(&pin, &lab.b, &["deny", "list", "--json"]),
        &prefix,
    );

    assert!(
        summary.contains(" 0 received"),
        "a denied packet got through during the swaps:\n{summary}"
    );
    assert!(
        after > before,
        "the denied stream kept hitting the carried-over deny entry ({before} -> {after})"
    );
    let (now_prog, _) =
        status_json_attachment(&sluice_json(&pin, &lab.b, &["status", "--json"]), &lab.b_if);
    assert_eq!(now_prog, prog, "the link runs the last program swapped in");
    // Untouched traffic still flows through the new program.
    assert_eq!(
        ping(&lab.a, IpAddr::V6(lab.b_v6), 3),
        3,
        "IPv6 from A is not denied"
    );
    sluice(&pin, &lab.b, &["detach", &lab.b_if]);
    assert!(pin.pins().is_empty(), "detach removed every pin");
}

/// A pin root whose program an older build pinned (no `PROGRAM_FEATURES`
/// record) gets no rule with source ports or TCP flags: that program would
/// read `drop tcp flags rst` as `drop tcp`. Other rules still go in;
/// `upgrade` puts this build's program in and records it, and then the rule
/// goes in and judges real packets by its flags.
#[test]
fn rules_an_older_program_would_misread_wait_for_the_upgrade() {
    let lab = Lab::new("feat");
    let pin = PinRoot::new();
    sluice(&pin, &lab.b, &["attach", &lab.b_if, "--mode", "native"]);
    let stamp = pin.path().join("maps/PROGRAM_FEATURES");
    assert!(stamp.exists(), "attach records the program's features");
    std::fs::remove_file(&stamp).expect("removing the record");

    let out = sluice_output(
        &pin,
        &lab.b,
        &["rule", "add", "drop", "tcp", "flags", "rst"],
    );
    let err = expect_one_line_error("a flags rule for an old program", &out);
    assert!(err.contains("predates rules with sport or flags"), "{err}");
    let out = sluice_output(&pin, &lab.b, &["rule", "add", "drop", "udp", "sport", "53"]);
    expect_one_line_error("a sport rule for an old program", &out);
    let list = sluice_json(&pin, &lab.b, &["rule", "list", "--json"]);
    assert_eq!(
        list["rules"].as_array().map(Vec::len),
        Some(0),
        "nothing added: {list}"
    );
    sluice(&pin, &lab.b, &["rule", "add", "drop", "udp", "dport", "9"]);

    sluice(&pin, &lab.b, &["upgrade"]);
    assert!(stamp.exists(), "upgrade records the program's features");
    sluice(
        &pin,
        &lab.b,
        &["rule", "add", "drop", "tcp", "flags", "rst"],
    );
    // The program judges by the flags: a reset is dropped by the rule, a
    // SYN passes.
    let b4 = lab.b_v4.to_string();
    let a4 = lab.a_v4.to_string();
    for (flags, want) in [("rst", "drop/rule"), ("syn", "pass/default")] {
        let e = sluice_json(
            &pin,
            &lab.b,
            &[
                "explain", "--json", "tcp", "src", &a4, "dst", &b4, "dport", "80", "flags", flags,
            ],
        );
        assert_eq!(explained_class(&e), want, "{e}");
    }
    assert_eq!(ping(&lab.a, IpAddr::V4(lab.b_v4), 2), 2, "pings pass");
}
