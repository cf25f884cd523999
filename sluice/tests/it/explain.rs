//! `sluice explain` against the packets: for each row of a table, the
//! described frame is sent for real through a veth into the attached
//! program and the counters say what it got (verdict, reason, and the rule
//! or list entry that counted it); then `explain` must say the same, name
//! the same rule or entry, and its own frame must be counted in the same
//! class (it is a packet to the program). Bad descriptions and a missing
//! dataplane are refused. Needs root.

use sluice::{
    dataplane::{PolicyMaps, stats},
    model::explain::Described,
};
use sluice_common::ListId;

use crate::support::{
    cli::{expect_one_line_error, explained_class, sluice, sluice_json, sluice_output},
    netns::{Lab, PacketSocket, PinRoot, eventually},
};

/// Every counter class with its packets, every rule and list entry with
/// theirs, read from the pinned maps: what one packet changes is the
/// difference of two of these.
fn snapshot(pin: &PinRoot) -> Vec<(String, u64)> {
    let maps =
        PolicyMaps::open(&sluice::dataplane::PinRoot::new(pin.path())).expect("the pinned maps");
    let counters = maps.counters().expect("counters");
    let mut classes = std::collections::BTreeMap::new();
    for (_, _, v, r, c) in stats::nonzero(&counters) {
        *classes
            .entry(format!("class {}/{}", v.name(), r.name()))
            .or_insert(0) += c.packets;
    }
    let mut out: Vec<(String, u64)> = classes.into_iter().collect();
    for r in maps.rules().expect("rules") {
        out.push((format!("rule {}", r.rule.id), r.packets));
    }
    for list in ListId::ALL {
        for e in maps.list_entries(list).expect("list entries") {
            out.push((format!("{} {}", list.kind(), e.prefix), e.packets));
        }
    }
    out
}

/// The keys whose count went up from `before` to `after`, with how much.
fn grown(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<(String, u64)> {
    after
        .iter()
        .filter_map(|(k, n)| {
            let was = before.iter().find(|(b, _)| b == k).map_or(0, |(_, m)| *m);
            (*n > was).then(|| (k.clone(), n - was))
        })
        .collect()
}

fn total(s: &[(String, u64)]) -> u64 {
    s.iter()
        .filter(|(k, _)| k.starts_with("class "))
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn explain_agrees_with_the_real_verdicts_of_a_packet_table() {
    let lab = Lab::new("explain");
    let pin = PinRoot::new();
    // The sending side's own stack stays quiet (no router solicitations or
    // neighbour traffic to count by mistake): frames come from a raw socket.
    lab.a.exec_ok([
        "sysctl",
        "-qw",
        &format!("net.ipv6.conf.{}.disable_ipv6=1", lab.a_if),
    ]);
    sluice(&pin, &lab.b, &["attach", &lab.b_if, "--mode", "native"]);
    let x = lab.x;
    let deny4 = format!("198.19.{x}.0/24");
    let allow4 = format!("198.19.{x}.7/32");
    let deny6 = format!("2001:2:0:{:x}::/64", 0x100 + u16::from(x));
    sluice(&pin, &lab.b, &["deny", "add", &deny4, &deny6]);
    sluice(&pin, &lab.b, &["allow", "add", &allow4]);
    for rule in [
        "drop tcp flags syn,fin",
        "drop udp sport 53 dport 1024-65535",
        "pass tcp dport 22 src 198.18.0.0/16",
        "drop tcp dport 22",
        "audit drop udp dport 5353",
        "drop tcp flags /syn,rst,ack",
        "drop icmp",
    ] {
        let words: Vec<&str> = ["rule", "add"]
            .into_iter()
            .chain(rule.split_whitespace())
            .collect();
        sluice(&pin, &lab.b, &words);
    }
    let b4 = lab.b_v4.to_string();
    let b6 = lab.b_v6.to_string();
    let mac = {
        let ifname = lab.b_if.clone();
        lab.b
            .run(move || sluice::dataplane::sys::mac_address(&ifname))
            .expect("the veth's MAC address")
    };
    let sock = {
        let ifname = lab.a_if.clone();
        lab.a.run(move || PacketSocket::open(&ifname, false))
    };
    let rows: Vec<(String, &str)> = vec![
        (
            format!("tcp src 198.18.{x}.9 dst {b4} dport 80"),
            "pass/default",
        ),
        (
            format!("tcp src 198.19.{x}.9 dst {b4} dport 80"),
            "drop/deny-list",
        ),
        (
            format!("tcp src 198.19.{x}.7 dst {b4} dport 22"),
            "pass/allow-list",
        ),
        (
            format!("tcp src 198.18.{x}.9 dst {b4} dport 22"),
            "pass/rule",
        ),
        (format!("tcp src 198.20.0.9 dst {b4} dport 22"), "drop/rule"),
        (
            format!("tcp src 198.18.{x}.9 dst {b4} dport 80 flags syn,fin"),
            "drop/rule",
        ),
        (
            format!("tcp src 198.18.{x}.9 dst {b4} dport 80 flags psh,urg"),
            "drop/rule",
        ),
        (
            format!("tcp src 198.18.{x}.9 dst {b4} dport 80 flags ack,psh"),
            "pass/default",
        ),
        (
            format!("udp src 198.18.{x}.9 sport 53 dst {b4} dport 40000"),
            "drop/rule",
        ),
        (
            format!("udp src 198.18.{x}.9 sport 54 dst {b4} dport 40000"),
            "pass/default",
        ),
        (
            format!("udp src 198.18.{x}.9 dst {b4} dport 5353"),
            "audit/rule",
        ),
        (format!("icmp src 198.18.{x}.9 dst {b4}"), "drop/rule"),
        (
            format!("tcp src 2001:2::9 dst {b6} dport 443 len 200"),
            "pass/default",
        ),
        (
            format!(
                "udp src 2001:2:0:{:x}::5 dst {b6} dport 53",
                0x100 + u16::from(x)
            ),
            "drop/deny-list",
        ),
        (format!("icmpv6 src 2001:2::9 dst {b6}"), "pass/default"),
    ];
    let mut classes_seen = std::collections::BTreeSet::new();
    for (text, want_class) in &rows {
        let words: Vec<String> = text.split_whitespace().map(String::from).collect();
        let d = Described::parse(&words).unwrap_or_else(|e| panic!("{text}: {e}"));
        // The real packet: sent from the peer, judged by the attached program.
        let before = snapshot(&pin);
        assert!(sock.send(&d.frame(mac)), "{text}: send failed");
        let mut after = before.clone();
        assert!(
            eventually(|| {
                after = snapshot(&pin);
                total(&after) > total(&before)
            }),
            "{text}: the frame was never counted"
        );
        let real = grown(&before, &after);
        assert_eq!(
            total(&after),
            total(&before) + 1,
            "{text}: more than one packet counted: {real:?}"
        );
        let class = real
            .iter()
            .find_map(|(k, _)| k.strip_prefix("class "))
            .expect("a class grew")
            .to_string();
        assert_eq!(
            &class, want_class,
            "{text}: the table is wrong about the real verdict: {real:?}"
        );
        classes_seen.insert(class.clone());

        // explain: the same verdict, reason, rule or entry.
        let mut args = vec!["explain", "--json"];
        args.extend(text.split_whitespace());
        let e = sluice_json(&pin, &lab.b, &args);
        assert_eq!(
            explained_class(&e),
            class,
            "{text}: explain says {e}, the packet got {real:?}"
        );
        assert_eq!(e["interface"], lab.b_if.as_str(), "{e}");
        let counted_rule = real.iter().find_map(|(k, _)| k.strip_prefix("rule "));
        match counted_rule {
            Some(id) => assert_eq!(e["rule"]["id"].to_string(), id, "{text}: {e} vs {real:?}"),
            None => assert!(e["rule"].is_null(), "{text}: {e}"),
        }
        let counted_entry = real
            .iter()
            .find_map(|(k, _)| k.strip_prefix("deny ").or(k.strip_prefix("allow ")));
        match counted_entry {
            Some(p) => assert_eq!(e["entry"], p, "{text}: {e} vs {real:?}"),
            None => assert!(e["entry"].is_null(), "{text}: {e}"),
        }
        // explain's own frame was a packet to the program: counted alike.
        let after_explain = snapshot(&pin);
        assert_eq!(
            grown(&after, &after_explain),
            real,
            "{text}: explain's frame was counted differently from the real one"
        );
    }
    assert!(
        classes_seen.len() >= 6,
        "too few kinds of verdicts: {classes_seen:?}"
    );

    // Text output names the interface and what decided.
    let out = sluice(
        &pin,
        &lab.b,
        &[
            "explain",
            "tcp",
            "src",
            "198.20.0.9",
            "dst",
            &b4,
            "dport",
            "22",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("on {}", lab.b_if)), "{text}");
    assert!(text.contains("drop (firewall), reason rule"), "{text}");
    assert!(text.contains("'drop tcp dport 22'"), "{text}");

    // An interface sluice is not attached to: run as if the frame arrived
    // there, and said so.
    let e = sluice_json(
        &pin,
        &lab.b,
        &[
            "explain",
            "--json",
            "--interface",
            "lo",
            "tcp",
            "src",
            "198.20.0.9",
            "dst",
            &b4,
            "dport",
            "22",
        ],
    );
    assert_eq!(
        (e["interface"].as_str(), e["reason"].as_str()),
        (Some("lo"), Some("rule")),
        "{e}"
    );
    assert!(
        e["note"]
            .as_str()
            .is_some_and(|n| n.contains("lo is not attached")),
        "{e}"
    );

    // Bad input: a clear error, exit 1, nothing counted.
    let before = snapshot(&pin);
    for (text, want) in [
        (format!("tcp src 198.18.0.9 dst {b4}"), "needs dport"),
        (
            "tcp src 198.18.0.9 dst 2001:2::1 dport 1".to_string(),
            "different address families",
        ),
        (
            format!("--interface nope0 tcp src 198.18.0.9 dst {b4} dport 1"),
            "interface nope0 does not exist",
        ),
        (
            format!("tcp src 198.18.0.9 dst {b4} dport 1 flags syn/syn,ack"),
            "not a mask",
        ),
    ] {
        let args: Vec<&str> = std::iter::once("explain")
            .chain(text.split_whitespace())
            .collect();
        let out = sluice_output(&pin, &lab.b, &args);
        let err = expect_one_line_error(&format!("{args:?}"), &out);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(snapshot(&pin), before, "a refused explain counted a packet");

    // No dataplane: refused, naming it.
    let empty = PinRoot::new();
    let out = sluice_output(
        &empty,
        &lab.b,
        &[
            "explain",
            "tcp",
            "src",
            "198.18.0.9",
            "dst",
            &b4,
            "dport",
            "1",
        ],
    );
    let err = expect_one_line_error("explain without a dataplane", &out);
    assert!(err.contains("no sluice dataplane"), "{err}");
}
