//! The layering rule (docs/decisions/008-layers.md), checked on the source:
//! every `crate::` path a module names must point down the layer order.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// Each top-level module and the modules it may name. Layers, top down:
/// cli > agent > api > engine > {model, dataplane} > {netns, files}; model
/// and dataplane never name each other. `files` reads the user's input
/// files (regular files only, bounded); the model may use it. The CLI reaches the agent only through
/// its entry (`agent::run` and its options), never its internals.
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "cli",
        &[
            "cli",
            "agent",
            "api",
            "engine",
            "model",
            "dataplane",
            "netns",
            "files",
        ],
    ),
    (
        "agent",
        &[
            "agent",
            "api",
            "engine",
            "model",
            "dataplane",
            "netns",
            "files",
        ],
    ),
    ("api", &["api", "engine", "model", "dataplane", "files"]),
    (
        "engine",
        &["engine", "model", "dataplane", "netns", "files"],
    ),
    ("model", &["model", "files"]),
    ("dataplane", &["dataplane", "netns", "files"]),
    ("netns", &["netns"]),
    ("files", &["files"]),
];

/// What the CLI may name inside `crate::agent`.
const AGENT_ENTRY: &[&str] = &["run", "Options", "LogFormat", "RunError", "init_logging"];

/// Crates the pure model never uses.
const MODEL_FORBIDDEN_CRATES: &[&str] = &["aya", "aya_obj", "tokio", "axum", "libc", "nix"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("reading the source tree") {
        let p = e.expect("a directory entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every Rust file below `src`: its path relative to `src` and its code
/// without comments.
fn sources(src: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(src).expect("under src").to_path_buf();
            let text = std::fs::read_to_string(f).expect("reading a source file");
            (rel, code_of(&text))
        })
        .collect()
}

/// The code of a file without comments (so prose naming a module is no
/// import).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("//") {
                ""
            } else {
                l.split(" // ").next().unwrap_or("")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every (module, item) pair a source names through `crate::`: plain paths
/// (`crate::a::b`) and grouped imports (`use crate::{a::b, c}`).
fn crate_paths(code: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // Top-level entries of the group, at brace depth 0.
            let mut depth = 0;
            let mut entry = String::new();
            let mut entries = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => entries.push(std::mem::take(&mut entry)),
                    _ if depth == 0 => entry.push(c),
                    _ => {}
                }
            }
            entries.push(entry);
            for e in entries {
                let e = e.trim();
                let m = ident(e);
                if !m.is_empty() {
                    let item = e.strip_prefix(&m).and_then(|x| x.strip_prefix("::"));
                    out.insert((m, item.map(ident).unwrap_or_default()));
                }
            }
        } else {
            let m = ident(after);
            let item = after[m.len()..].strip_prefix("::").map(ident);
            out.insert((m, item.unwrap_or_default()));
        }
        rest = &rest[i + "crate::".len()..];
    }
    out
}

#[test]
fn every_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (rel, code) in &sources(&src) {
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .unwrap_or_default();
        let Some((_, allowed)) = ALLOWED.iter().find(|(m, _)| *m == top) else {
            continue;
        };
        checked += 1;
        for (module, item) in crate_paths(code) {
            let ok = allowed.contains(&module.as_str())
                && !(top == "cli" && module == "agent" && !AGENT_ENTRY.contains(&item.as_str()));
            if !ok {
                wrong.push(format!("{} names crate::{module}::{item}", rel.display()));
            }
        }
        if top != "dataplane" && (code.contains("aya::") || code.contains("aya_obj::")) {
            wrong.push(format!("{} uses aya outside the dataplane", rel.display()));
        }
        if top == "model" {
            for krate in MODEL_FORBIDDEN_CRATES {
                if code.contains(&format!("{krate}::")) {
                    wrong.push(format!("{} (model) uses {krate}", rel.display()));
                }
            }
        }
    }
    assert!(
        checked > 40,
        "only {checked} files checked: is the tree where the test thinks?"
    );
    assert!(
        wrong.is_empty(),
        "arrows that point up (see docs/decisions/008-layers.md):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scanner_sees_plain_and_grouped_imports() {
    let code = "use crate::{\n    api::{self, X},\n    model::policy::{A, B},\n    netns,\n};\n\
                fn f() { crate::agent::core::run(); }";
    let got: Vec<(String, String)> = crate_paths(code).into_iter().collect();
    let want: Vec<(String, String)> = [
        ("agent", "core"),
        ("api", ""),
        ("model", "policy"),
        ("netns", ""),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
    .collect();
    assert_eq!(got, want);
    // Comments are no imports.
    assert!(crate_paths(&code_of("// crate::agent::x\nlet a = 1; // crate::cli")).is_empty());
}

/// The kernel crate (docs/decisions/009-kernel-layout.md): stages never name
/// each other (but the firewall calls the DDoS stage for its rate rules),
/// and the leaves below them name no stage and not the pipeline.
#[test]
fn kernel_stages_and_leaves_point_down_too() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sluice-ebpf/src");
    let mut wrong = Vec::new();
    let mut stages = 0;
    for (rel, code) in &sources(&src) {
        let name = rel.to_string_lossy().replace(".rs", "");
        let paths = crate_paths(code);
        if let Some(stage) = name.strip_prefix("stages/") {
            stages += 1;
            for (m, item) in &paths {
                let ok = match m.as_str() {
                    "pipeline" => false,
                    "stages" => stage == "firewall" && item == "ddos",
                    _ => true,
                };
                if !ok {
                    wrong.push(format!("stage {stage} names crate::{m}::{item}"));
                }
            }
        } else if !["main", "sock_main", "pipeline", "lib"].contains(&name.as_str()) {
            for (m, item) in &paths {
                if m == "stages" || m == "pipeline" {
                    wrong.push(format!("leaf {name} names crate::{m}::{item}"));
                }
            }
        }
    }
    assert!(
        stages >= 5,
        "only {stages} stage files found under {}",
        src.display()
    );
    assert!(
        wrong.is_empty(),
        "kernel arrows that point up or across:\n{}",
        wrong.join("\n")
    );
}
