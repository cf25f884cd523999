//! Kernel compatibility, run on the host's kernel and inside the Linux 6.1
//! guest (`lts`): every program loads and passes the verifier well
//! under its limits (the verified instruction counts are printed); a
//! refusal names the program and shows the end of the verifier's log; the
//! TC egress hook uses TCX where the kernel has it and a clsact filter of
//! sluice's own otherwise, and other owners' clsact filters survive
//! attach, re-adopt, upgrade and detach. Needs root.

use std::io::Write as _;

use serde_json::Value;
use sluice::dataplane::{DataplaneError, attach, tc};

use crate::support::{
    cli::{sluice, sluice_json, sluice_output, stderr},
    netns::{Lab, Netns, PinRoot},
};

/// The verifier's limit on instructions processed per program.
const VERIFIER_LIMIT: u32 = 1_000_000;

/// Writes past libtest's capture (the tier and `make test` show it).
fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .expect("uname")
        .release()
        .to_string_lossy()
        .into_owned()
}

/// Whether this kernel has TCX (6.6+), from its version: what the test
/// expects sluice to have found out by asking the kernel.
fn kernel_has_tcx() -> bool {
    let release = kernel_release();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

#[test]
fn every_program_verifies_well_under_the_limit() {
    let sb = crate::support::kernel::new_sandbox();
    let programs = attach::programs(sb.root()).expect("program status");
    let names: Vec<&str> = programs.iter().map(|p| p.name.as_str()).collect();
    // Kernel names are cut at 15 bytes.
    for want in [
        "sluice_xdp",
        "sluice_syn_chal",
        "sluice_lb",
        "sluice_tc_egres",
    ] {
        assert!(names.contains(&want), "{want} not loaded: {names:?}");
    }
    let release = kernel_release();
    for p in &programs {
        let insns = p
            .verified_insns
            .expect("verified_insns is reported from Linux 5.16 on");
        note(&format!(
            "verified: Linux {release}: {} {insns} insns",
            p.name
        ));
        assert!(insns > 0, "{}: no instructions verified", p.name);
        assert!(
            insns < VERIFIER_LIMIT / 4,
            "{}: {insns} instructions verified, too close to the verifier's limit of {VERIFIER_LIMIT}",
            p.name
        );
    }
}

/// The socket object's programs (workload policy, socket LB, sk_lookup
/// steering) verify too (loaded as a workload's first apply, or the socket LB, loads
/// them), each well under the limit.
#[test]
fn every_socket_program_verifies_well_under_the_limit() {
    let sb = crate::support::kernel::new_sandbox();
    sluice::dataplane::sock::ensure_loaded(sb.root()).expect("socket programs load");
    let programs = attach::programs(sb.root()).expect("program status");
    let release = kernel_release();
    let mut seen = 0;
    for name in sluice::dataplane::sock::object_programs() {
        let p = programs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{name} not loaded"));
        let insns = p.verified_insns.expect("verified_insns is reported");
        note(&format!("verified: Linux {release}: {name} {insns} insns"));
        assert!(insns > 0 && insns < VERIFIER_LIMIT / 4, "{name}: {insns}");
        seen += 1;
    }
    assert_eq!(seen, 16);
}

#[test]
fn a_verifier_refusal_names_the_program_and_shows_the_log_tail() {
    let mut ebpf = aya::Ebpf::load(sluice::dataplane::BENCH_OBJECT).expect("parse bench object");
    let err =
        attach::load_xdp(&mut ebpf, "probe_refused").expect_err("the verifier must refuse it");
    let DataplaneError::Verifier {
        program,
        source,
        log_tail,
        ..
    } = &err
    else {
        panic!("not a verifier refusal: {err:?}");
    };
    assert_eq!(program, "probe_refused");
    assert_eq!(source.raw_os_error(), Some(libc::EACCES), "{err}");
    // The verifier's own words for the refused access, and its summary.
    assert!(
        log_tail.contains("invalid access to packet"),
        "log tail: {log_tail}"
    );
    assert!(log_tail.contains("processed"), "log tail: {log_tail}");
    let shown = err.to_string();
    assert!(
        shown.contains("probe_refused") && shown.contains(log_tail.as_str()),
        "{shown}"
    );
}

/// A classic-BPF filter that never matches (returns 0), standing for
/// another owner's filter on the same hook.
fn add_foreign_filter(ns: &Netns, iface: &str, prio: &str, handle: &str) {
    let _ = ns.exec(["tc", "qdisc", "add", "dev", iface, "clsact"]);
    ns.exec_ok([
        "tc",
        "filter",
        "add",
        "dev",
        iface,
        "egress",
        "prio",
        prio,
        "handle",
        handle,
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ]);
}

/// `tc filter show dev IFACE egress`: (pref, handle, description) per filter.
fn egress_filters(ns: &Netns, iface: &str) -> Vec<(u32, u32, String)> {
    let out = ns.exec_ok(["tc", "filter", "show", "dev", iface, "egress"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut filters = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let pick = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .copied()
        };
        let (Some(pref), Some(handle)) = (pick("pref"), pick("handle")) else {
            continue;
        };
        let handle = u32::from_str_radix(handle.trim_start_matches("0x"), 16).expect("hex handle");
        filters.push((pref.parse().expect("pref"), handle, line.to_string()));
    }
    filters
}

fn tc_of_status<'a>(status: &'a Value, iface: &str) -> &'a Value {
    let att = status["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .find(|a| a["interface"] == iface)
        .unwrap_or_else(|| panic!("no attachment on {iface}: {status}"));
    &att["tc"]
}

#[test]
fn tc_egress_uses_tcx_or_its_own_clsact_filter_and_keeps_foreign_filters() {
    let lab = Lab::new("tcfb");
    let pin = PinRoot::new();
    let iface = lab.b_if.clone();
    add_foreign_filter(&lab.b, &iface, "100", "1");
    let foreign = |ns: &Netns| {
        egress_filters(ns, &iface)
            .iter()
            .any(|(p, h, _)| *p == 100 && *h == 1)
    };
    let ours = |ns: &Netns| {
        egress_filters(ns, &iface)
            .iter()
            .any(|(p, h, _)| *p == u32::from(tc::CLSACT_PRIORITY) && *h == tc::CLSACT_HANDLE)
    };

    let report = sluice_json(&pin, &lab.b, &["--json", "attach", &iface]);
    let expected = if kernel_has_tcx() { "tcx" } else { "clsact" };
    assert_eq!(report["tc"]["mode"], expected, "{report}");
    assert_eq!(report["tc"]["live"], true, "{report}");
    if expected == "clsact" {
        assert_eq!(report["tc"]["priority"], tc::CLSACT_PRIORITY, "{report}");
        assert!(
            report["tc"]["fallback"]
                .as_str()
                .is_some_and(|f| f.contains(tc::TCX_MIN_KERNEL)),
            "the fallback must say why: {report}"
        );
    } else {
        assert_eq!(report["tc"]["fallback"], Value::Null, "{report}");
    }
    assert!(foreign(&lab.b), "attach removed the foreign filter");
    assert_eq!(ours(&lab.b), expected == "clsact", "sluice's clsact filter");

    let status = sluice_json(&pin, &lab.b, &["--json", "status"]);
    let st = tc_of_status(&status, &iface);
    assert_eq!(st["mode"], expected, "{status}");
    assert_eq!(st["live"], true, "{status}");
    let first_prog = st["program_id"].as_u64().expect("program_id");
    let table = sluice(&pin, &lab.b, &["status"]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains(expected),
        "status table lacks the TC mode"
    );

    // Re-adopt: nothing changes.
    let again = sluice_json(&pin, &lab.b, &["--json", "attach", &iface]);
    assert_eq!(again["readopted"], true, "{again}");
    assert_eq!(
        again["tc"]["program_id"].as_u64(),
        Some(first_prog),
        "{again}"
    );

    // Upgrade: the TC program is replaced in place, the foreign filter stays.
    sluice(&pin, &lab.b, &["upgrade", "--force"]);
    let status = sluice_json(&pin, &lab.b, &["--json", "status"]);
    let st = tc_of_status(&status, &iface);
    assert_eq!(st["live"], true, "after upgrade: {status}");
    assert_ne!(
        st["program_id"].as_u64(),
        Some(first_prog),
        "the upgrade left the old TC program: {status}"
    );
    assert!(foreign(&lab.b), "upgrade removed the foreign filter");
    assert_eq!(ours(&lab.b), expected == "clsact");

    sluice(&pin, &lab.b, &["detach", &iface]);
    assert!(foreign(&lab.b), "detach removed the foreign filter");
    assert!(!ours(&lab.b), "detach left sluice's clsact filter");
    assert!(pin.pins().is_empty(), "pins left: {:?}", pin.pins());
}

#[test]
fn a_foreign_filter_in_sluices_clsact_slot_is_never_replaced() {
    let lab = Lab::new("tcslot");
    let pin = PinRoot::new();
    let iface = lab.b_if.clone();
    let prio = tc::CLSACT_PRIORITY.to_string();
    let handle = format!("{:#x}", tc::CLSACT_HANDLE);
    add_foreign_filter(&lab.b, &iface, &prio, &handle);
    let out = sluice_output(&pin, &lab.b, &["attach", &iface]);
    if kernel_has_tcx() {
        // TCX: the clsact hook is not sluice's concern at all.
        assert!(out.status.success(), "{}", stderr(&out));
        sluice(&pin, &lab.b, &["detach", &iface]);
    } else {
        let err = stderr(&out);
        assert!(!out.status.success(), "attach replaced a foreign filter");
        assert!(
            err.contains(&prio) && err.contains("another owner"),
            "the refusal must name the slot: {err}"
        );
        assert!(
            pin.pins().is_empty(),
            "a refused first attach left pins: {:?}",
            pin.pins()
        );
    }
    let still = egress_filters(&lab.b, &iface);
    assert!(
        still
            .iter()
            .any(|(p, h, d)| *p == u32::from(tc::CLSACT_PRIORITY)
                && *h == tc::CLSACT_HANDLE
                && d.contains("bytecode")),
        "the foreign filter is gone: {still:?}"
    );
}
