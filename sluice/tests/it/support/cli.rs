//! Driving the real `sluice` binary from tests: run a command in a test
//! namespace against a test pin root, expect success or failure, parse JSON.
//!
//! The CLI's JSON output is read only through the small lookup helpers here
//! and in the test files, so a change of field names touches few places.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde_json::Value;

use super::netns::{Netns, PinRoot, output_with_timeout};

/// The binary under test.
pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
/// Limit for one CLI command (a command that is meant to be killed part-way
/// is never waited for with this).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// `sluice --pin-root ROOT -n NETNS args...`, not started.
pub fn sluice_cmd(pin: &PinRoot, ns: &Netns, args: &[&str]) -> Command {
    let mut cmd = Command::new(SLUICE);
    cmd.arg("--pin-root")
        .arg(pin.path())
        .arg("-n")
        .arg(ns.name())
        .args(args);
    cmd
}

/// Runs `sluice --pin-root ROOT -n NETNS args...` and returns its output,
/// whatever the exit status (for expected failures).
pub fn sluice_output(pin: &PinRoot, ns: &Netns, args: &[&str]) -> Output {
    output_with_timeout(&mut sluice_cmd(pin, ns, args), CLI_TIMEOUT)
}

/// Like [`sluice_output`], and asserts that the command succeeded.
pub fn sluice(pin: &PinRoot, ns: &Netns, args: &[&str]) -> Output {
    let out = sluice_output(pin, ns, args);
    assert!(
        out.status.success(),
        "sluice {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    out
}

/// `VERDICT/REASON` of an `explain --json` answer, as `stats` keys classes.
pub fn explained_class(e: &Value) -> String {
    format!(
        "{}/{}",
        e["verdict"].as_str().unwrap_or("?"),
        e["reason"].as_str().unwrap_or("?")
    )
}

/// Parses a command's stdout as JSON (`what` names the command in a failure).
pub fn parse_json(what: &str, out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs a successful command and parses its stdout as JSON.
pub fn sluice_json(pin: &PinRoot, ns: &Netns, args: &[&str]) -> Value {
    parse_json(&format!("sluice {args:?}"), &sluice(pin, ns, args))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that a command failed with exactly one line on stderr, and
/// returns that line.
pub fn expect_one_line_error(what: &str, out: &Output) -> String {
    assert!(
        !out.status.success(),
        "{what} should fail, but succeeded:\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = stderr(out);
    assert_eq!(
        err.trim().lines().count(),
        1,
        "{what}: one line on stderr expected, got {err:?}"
    );
    err.trim().to_owned()
}

// ---------------------------------------------------------------------------
// JSON lookups
// ---------------------------------------------------------------------------

/// `status --json` → `{"attachments":[{"interface":..,"netns":..,"mode":..,"program_id":N}]}`:
/// the program id and mode attached on `iface`.
pub fn status_json_attachment(status: &Value, iface: &str) -> (u64, String) {
    let att = status["attachments"]
        .as_array()
        .unwrap_or_else(|| panic!("status --json has no attachments array: {status}"))
        .iter()
        .find(|a| a["interface"] == iface)
        .unwrap_or_else(|| panic!("status --json has no attachment on {iface}: {status}"));
    let id = att["program_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("attachment without a numeric program_id: {att}"));
    let mode = att["mode"].as_str().unwrap_or_default().to_owned();
    (id, mode)
}

/// `deny list --json` / `allow list --json` → `{"entries":[{"prefix":"198.18.0.1/32",..}]}`:
/// the prefixes, sorted.
pub fn list_json_prefixes(list: &Value) -> Vec<String> {
    let mut v: Vec<String> = list_json_entries(list)
        .iter()
        .map(|e| {
            e["prefix"]
                .as_str()
                .unwrap_or_else(|| panic!("list entry without a prefix string: {e}"))
                .to_owned()
        })
        .collect();
    v.sort();
    v
}

/// `deny list --json` / `allow list --json` → the entry objects.
pub fn list_json_entries(list: &Value) -> &Vec<Value> {
    list["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("list --json has no entries array: {list}"))
}

/// The sorted prefixes of the deny list, as `deny list --json` in `ns` shows them.
pub fn deny_list_in(pin: &PinRoot, ns: &Netns) -> Vec<String> {
    list_json_prefixes(&sluice_json(pin, ns, &["deny", "list", "--json"]))
}

// ---------------------------------------------------------------------------
// The interface side
// ---------------------------------------------------------------------------

/// Whether `ip -d link show dev IFACE` in `ns` shows any XDP program
/// (`xdp`, `xdpgeneric`, `xdpdrv`, `xdpoffload`, `prog/xdp ...`).
pub fn xdp_on(ns: &Netns, iface: &str) -> bool {
    let out = ns.exec_ok(["ip", "-d", "link", "show", "dev", iface]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w.starts_with("xdp") || w.starts_with("prog/xdp"))
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// A temporary file, removed on drop. Names are unique per process and call.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &str) -> TempFile {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("sluice-e2e-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `rule list --json` → (id, `field`) for each rule, in evaluation order.
pub fn rule_list_fields(list: &Value, field: &str) -> Vec<(u64, String)> {
    list["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("rule list --json has no rules array: {list}"))
        .iter()
        .map(|r| {
            let id = r["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("rule without a numeric id: {r}"));
            (id, r[field].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}
