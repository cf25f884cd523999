//! The benchmark suite's smoke test: `sluice-bench --smoke` (tiny sizes,
//! a few seconds per section) must finish and produce every section with
//! positive numbers and no errors, so the benchmarks cannot rot. It checks
//! that the suite works, never how fast anything is. Needs root, like the
//! rest of `make test`.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The smoke run normally takes well under a minute.
const LIMIT: Duration = Duration::from_secs(300);

/// A results directory under the target dir, removed afterwards.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn smoke_run_produces_every_section() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("sluice-bench-smoke-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let log = |name: &str| std::fs::File::create(dir.0.join(name)).expect("log file");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["--smoke", "--out"])
        .arg(&dir.0)
        .stdin(Stdio::null())
        .stdout(log("stdout.txt"))
        .stderr(log("stderr.txt"))
        .spawn()
        .expect("run sluice-bench");
    let pid = child.id();
    // Bounded: a hung suite is killed (SIGTERM first, so it cleans up).
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > LIMIT {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
            panic!("sluice-bench --smoke still running after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    let stdout = std::fs::read_to_string(dir.0.join("stdout.txt")).unwrap_or_default();
    let stderr = std::fs::read_to_string(dir.0.join("stderr.txt")).unwrap_or_default();
    // What failed, from results.json (the tables only say "see notes").
    let failures: Vec<String> = std::fs::read_to_string(dir.0.join("results.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| {
            v["sections"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["measurements"].as_array().cloned().unwrap_or_default())
                .filter(|m| {
                    m["status"]
                        .as_str()
                        .is_some_and(|st| st.starts_with("error"))
                })
                .map(|m| format!("{}: {}", m["id"], m["status"]))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        status.success(),
        "sluice-bench --smoke failed ({status}):\nfailed measurements:\n{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        failures.join("\n")
    );
    eprintln!("sluice-bench --smoke took {took:?}");

    let path = dir.0.join("results.json");
    let text = std::fs::read_to_string(&path).expect("results.json written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("results.json is JSON");
    assert_eq!(v["smoke"], true);
    assert_eq!(
        v["errors"].as_array().map(Vec::len),
        Some(0),
        "errors: {}",
        v["errors"]
    );
    for key in ["cpu_model", "kernel", "date_utc", "git_commit"] {
        assert!(
            v["machine"][key].as_str().is_some_and(|s| !s.is_empty()),
            "machine.{key} missing"
        );
    }
    assert!(v["machine"]["cores"].as_u64().unwrap_or(0) > 0);

    let sections = v["sections"].as_array().expect("sections");
    let keys: Vec<&str> = sections.iter().filter_map(|s| s["key"].as_str()).collect();
    assert_eq!(
        keys,
        [
            "per_packet",
            "live",
            "scale",
            "control",
            "ddos",
            "lb",
            "sock",
            "socklb"
        ]
    );
    for s in sections {
        let key = s["key"].as_str().unwrap_or("?");
        assert!(
            s["method"].as_str().is_some_and(|m| m.len() > 40),
            "{key}: no method text"
        );
        let ms = s["measurements"].as_array().expect("measurements");
        assert!(!ms.is_empty(), "{key}: no measurements");
        let mut measured = 0;
        for m in ms {
            let id = m["id"].as_str().unwrap_or("?");
            let status = m["status"].as_str().unwrap_or("");
            assert!(!status.starts_with("error"), "{key}/{id}: {status}");
            assert!(
                m["method"].as_str().is_some_and(|x| !x.is_empty()),
                "{key}/{id}: no method"
            );
            if status != "ok" {
                // Only rows the suite says it cannot measure here, with why.
                assert!(status.starts_with("not measured: "), "{key}/{id}: {status}");
                continue;
            }
            measured += 1;
            for f in ["median", "min", "max"] {
                let x = m[f].as_f64().unwrap_or(-1.0);
                assert!(x > 0.0, "{key}/{id}: {f} = {}", m[f]);
            }
            assert!(m["runs"].as_u64().unwrap_or(0) >= 1, "{key}/{id}: no runs");
            assert!(
                !m["unit"].as_str().unwrap_or("").is_empty(),
                "{key}/{id}: no unit"
            );
        }
        assert!(measured > 0, "{key}: nothing measured");
    }
    // The ratios the issue asks for are there.
    let find = |sec: &str, id: &str| {
        sections
            .iter()
            .find(|s| s["key"] == sec)
            .and_then(|s| s["measurements"].as_array())
            .and_then(|ms| ms.iter().find(|m| m["id"] == id).cloned())
            .unwrap_or_else(|| panic!("{sec}/{id} missing"))
    };
    assert!(
        find("per_packet", "sluice/ipv4-udp-drop/1")["extra"]["ratio_to_reference"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
    assert!(
        find("live", "sluice-native/1")["extra"]["ratio_to_ceiling"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
    assert!(
        stdout.contains("Live drop rate"),
        "no table printed:\n{stdout}"
    );

    // Everything the suite made is gone (its names carry its pid).
    let pid_prefix = format!("sluice-bench-{pid}-");
    let leftover_ns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&pid_prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftover_ns.is_empty(),
        "namespaces left behind: {leftover_ns:?}"
    );
    let leftover_pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&pid_prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftover_pins.is_empty(),
        "pins left behind: {leftover_pins:?}"
    );
}
