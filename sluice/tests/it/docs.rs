//! The docs' examples against the real CLI, so that docs and behaviour keep
//! agreeing:
//!
//! 1. Every `$ sluice ...` example line in docs/*.md parses with the CLI's
//!    own definition (options, subcommands, argument order), and the ones
//!    the docs show failing with a usage error fail to parse. No privileges.
//! 2. The JSON examples of direct-mode commands in docs/cli.md, run for
//!    real in a lab built like the docs' one, print the same fields (keys,
//!    recursively; the first element of arrays) as the docs show. Needs
//!    root.

use std::{collections::BTreeSet, path::Path};

use clap::Parser as _;
use serde_json::Value;

use crate::support::{
    cli::sluice_output,
    netns::{Netns, PinRoot},
};

/// One `$ sluice ...` example: where it is, its words, and the output the
/// docs show under it (up to the next prompt or the end of the block).
#[derive(Debug)]
struct Example {
    at: String,
    words: Vec<String>,
    output: String,
}

/// Splits a shell command line into words (single and double quotes; no
/// expansions), stopping at a pipe, redirection or comment.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut started = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (None, '|' | '>' | '<' | '#' | ';' | '&') if !started || cur.is_empty() => break,
            (None, c) if c.is_whitespace() => {
                if started {
                    words.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            (None, c) => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(cur);
    }
    words
}

fn examples(file: &Path) -> Vec<Example> {
    let text = std::fs::read_to_string(file).expect("reading the docs");
    let mut out: Vec<Example> = Vec::new();
    let mut in_block = false;
    let mut current: Option<Example> = None;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            if let Some(e) = current.take() {
                out.push(e);
            }
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(cmd) = line.trim_start().strip_prefix("$ ") {
            if let Some(e) = current.take() {
                out.push(e);
            }
            let words = shell_words(cmd);
            if words.first().is_some_and(|w| w == "sluice") {
                current = Some(Example {
                    at: format!("{}:{}", file.display(), n + 1),
                    words,
                    output: String::new(),
                });
            }
        } else if let Some(e) = current.as_mut() {
            e.output.push_str(line);
            e.output.push('\n');
        }
    }
    out
}

fn all_docs() -> Vec<Example> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("docs directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"));
    files.sort();
    files.iter().flat_map(|f| examples(f)).collect()
}

#[test]
fn every_documented_command_line_parses() {
    let all = all_docs();
    // Each file's examples are found (a parser that stopped seeing one
    // file's would check nothing there).
    for (file, at_least) in [
        ("cli.md", 190),
        ("steer.md", 5),
        ("sock.md", 5),
        ("agent.md", 2),
    ] {
        let n = all.iter().filter(|e| e.at.contains(file)).count();
        assert!(n >= at_least, "only {n} examples found in {file}");
    }
    let mut problems = Vec::new();
    for e in &all {
        // A usage error (exit 2) is printed by clap as `error: ...`; the
        // docs show those on purpose.
        let first = e.output.lines().next().unwrap_or("").trim().to_string();
        let usage_error = first.starts_with("error: ");
        match (sluice::cli::Cli::try_parse_from(&e.words), usage_error) {
            (Ok(_), false) => {}
            (Err(err), true) => {
                // The same error as the docs show.
                let got = err.to_string();
                let got = got.lines().next().unwrap_or("").trim();
                if got != first {
                    problems.push(format!(
                        "{}: `{}`: the docs show `{first}`, clap says `{got}`",
                        e.at,
                        e.words.join(" ")
                    ));
                }
            }
            (Ok(_), true) => problems.push(format!(
                "{}: `{}` parses, but the docs show a usage error",
                e.at,
                e.words.join(" ")
            )),
            (Err(err), false) => problems.push(format!(
                "{}: `{}` does not parse: {}",
                e.at,
                e.words.join(" "),
                err.to_string().lines().next().unwrap_or("")
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Marks an object the docs elided (`...` inside it): only the keys shown
/// are checked there.
const ELIDED: &str = "__elided__";

/// Objects whose keys are data (counter classes), not fields: only the
/// shape of their values is compared.
const DATA_KEYED: &[&str] = &["by_family", "by_protocol", "by_reason", "by_verdict"];

/// The docs' JSON, elisions (`...` lines) marked in objects and dropped in
/// arrays, with the commas they leave dangling removed.
fn doc_json(e: &Example) -> Option<Value> {
    let mut lines = Vec::new();
    let mut stack: Vec<char> = Vec::new();
    for line in e.output.lines() {
        let t = line.trim();
        if t.starts_with('(') {
            continue;
        }
        if t == "..." || t == "...," {
            if stack.last() == Some(&'{') {
                lines.push(format!("\"{ELIDED}\": true,"));
            }
            continue;
        }
        let mut in_str = false;
        for c in t.chars() {
            match c {
                '"' => in_str = !in_str,
                '{' | '[' if !in_str => stack.push(c),
                '}' | ']' if !in_str => {
                    stack.pop();
                }
                _ => {}
            }
        }
        lines.push(line.to_string());
    }
    let text = lines.join("\n");
    // Drop every comma that only a closer follows.
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    for (i, c) in chars.iter().enumerate() {
        if *c == ','
            && matches!(
                chars[i + 1..].iter().find(|c| !c.is_whitespace()),
                Some(']' | '}')
            )
        {
            continue;
        }
        out.push(*c);
    }
    serde_json::from_str(&out).ok()
}

/// Differences in shape: keys one side has and the other lacks, by path.
fn shape_diff(path: &str, doc: &Value, real: &Value, out: &mut Vec<String>) {
    match (doc, real) {
        (Value::Object(d), Value::Object(r)) => {
            let name = path.rsplit('.').next().unwrap_or("");
            if DATA_KEYED.contains(&name) {
                // Every value of either side has the shape of the docs' first.
                if let Some(d0) = d.values().next() {
                    for (k, v) in r {
                        shape_diff(&format!("{path}.{k}"), d0, v, out);
                    }
                }
                return;
            }
            let elided = d.contains_key(ELIDED);
            let dk: BTreeSet<&String> = d.keys().filter(|k| *k != ELIDED).collect();
            let rk: BTreeSet<&String> = r.keys().collect();
            for k in dk.difference(&rk) {
                out.push(format!("{path}.{k}: in the docs, not printed"));
            }
            if !elided {
                for k in rk.difference(&dk) {
                    out.push(format!("{path}.{k}: printed, not in the docs"));
                }
            }
            for k in dk.intersection(&rk) {
                shape_diff(&format!("{path}.{k}"), &d[*k], &r[*k], out);
            }
        }
        (Value::Array(d), Value::Array(r)) => {
            if let (Some(d0), Some(r0)) = (d.first(), r.first()) {
                shape_diff(&format!("{path}[0]"), d0, r0, out);
            }
        }
        // A null on either side is data (nothing pinned, no hit yet).
        (Value::Null, _) | (_, Value::Null) => {}
        (d, r) if std::mem::discriminant(d) != std::mem::discriminant(r) => {
            out.push(format!("{path}: the docs show {d}, sluice prints {r}"));
        }
        _ => {}
    }
}

#[test]
fn documented_json_output_has_the_fields_sluice_prints() {
    // The docs' lab: veth0 in `lab`, its peer in `peer` (198.18.0.2).
    let lab = Netns::new("docs");
    let peer = Netns::new("docsp");
    lab.exec_ok([
        "ip",
        "link",
        "add",
        "veth0",
        "type",
        "veth",
        "peer",
        "name",
        "veth1",
        "netns",
        peer.name(),
    ]);
    lab.exec_ok(["ip", "addr", "add", "198.18.0.1/24", "dev", "veth0"]);
    lab.exec_ok([
        "ip",
        "-6",
        "addr",
        "add",
        "2001:2::1/64",
        "dev",
        "veth0",
        "nodad",
    ]);
    lab.exec_ok(["ip", "link", "set", "veth0", "up"]);
    peer.exec_ok(["ip", "addr", "add", "198.18.0.2/24", "dev", "veth1"]);
    peer.exec_ok(["ip", "link", "set", "veth1", "up"]);
    let pin = PinRoot::new();
    let run = |words: &[&str]| sluice_output(&pin, &lab, words);
    // The state the examples were captured in: lists, rules, a service.
    for setup in [
        "attach veth0 --mode native",
        "deny add 198.18.7.0/24 198.18.9.0/24 2001:2:0:7::/64",
        "allow add 198.18.5.0/24 198.18.7.7",
        "rule add drop udp dport 4444",
        "rule add drop tcp dport 1-1023 dst 198.18.1.0/24",
        "rule add --at 0 pass tcp dport 22 src 198.18.5.0/24",
        "rule add audit drop icmp src 198.18.0.0/24",
        "lb service add 198.18.0.100:80 --backend 198.18.0.2:8080",
    ] {
        let words: Vec<&str> = setup.split_whitespace().collect();
        let out = run(&words);
        assert!(
            out.status.success(),
            "{setup}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Traffic for counters and last-seen times: pings from the peer.
    crate::support::netns::ping(&peer, "198.18.0.1".parse().unwrap(), 2);
    run(&["explain", "icmp", "src", "198.18.7.1", "dst", "198.18.0.1"]);

    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md");
    // Direct-mode commands whose JSON the docs show; the agent's, capture's
    // and changes that would alter the lab are covered by their own tests.
    let runnable = [
        "status",
        "stats",
        "list",
        "rule list",
        "explain",
        "audit",
        "upgrade",
    ];
    let mut compared = 0;
    let mut problems = Vec::new();
    for e in examples(&doc) {
        if !e.words.iter().any(|w| w == "--json") {
            continue;
        }
        let args: Vec<&str> = e.words[1..]
            .iter()
            .map(String::as_str)
            .filter(|w| *w != "-n" && *w != "lab")
            .collect();
        let text = args.join(" ");
        if !runnable.iter().any(|r| text.contains(r)) || text.contains("--force") {
            continue;
        }
        let Some(want) = doc_json(&e) else {
            problems.push(format!("{}: the docs' JSON does not parse", e.at));
            continue;
        };
        let out = run(&args);
        assert!(
            out.status.success(),
            "{}: sluice {text}: {}",
            e.at,
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|err| panic!("{}: sluice {text}: not JSON: {err}", e.at));
        let mut diffs = Vec::new();
        shape_diff("", &want, &got, &mut diffs);
        for d in diffs {
            problems.push(format!("{}: sluice {text}: {d}", e.at));
        }
        compared += 1;
    }
    assert!(compared >= 8, "only {compared} JSON examples compared");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
