//! The agent's configuration file (TOML): parsing with positions, validation
//! that reports every problem with file, line and column, and resolution into
//! the desired state. See examples/sluice.toml for a commented example.

use std::{
    collections::BTreeSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use super::{Desired, Interface, Policy, RuleSpec, parse_prefix};
use crate::dataplane::AttachMode;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/sluice";
pub const DEFAULT_SOCKET: &str = "/run/sluice/sluice.sock";
pub const DEFAULT_HISTORY: usize = 20;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every problem found in a file (never just the first).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} problem(s) in {}:\n{}", .0.len(), .0.first().map(|d| d.file.display().to_string()).unwrap_or_default(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<Diagnostic>);

/// Agent settings from the `[agent]` table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentSettings {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub pin_root: PathBuf,
    /// Applied versions kept for rollback.
    pub history: usize,
    /// Prometheus endpoint; off when absent.
    pub metrics: Option<SocketAddr>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            state_dir: DEFAULT_STATE_DIR.into(),
            socket: DEFAULT_SOCKET.into(),
            pin_root: crate::dataplane::DEFAULT_PIN_ROOT.into(),
            history: DEFAULT_HISTORY,
            metrics: None,
        }
    }
}

/// A parsed and validated configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub agent: AgentSettings,
    pub desired: Desired,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default, rename = "interface")]
    interfaces: Vec<Spanned<RawInterface>>,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    deny: RawList,
    #[serde(default)]
    allow: RawList,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    state_dir: Option<Spanned<String>>,
    socket: Option<Spanned<String>>,
    pin_root: Option<Spanned<String>>,
    history: Option<Spanned<i64>>,
    metrics: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: Spanned<String>,
    netns: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    audit: bool,
    default: Option<Spanned<String>>,
    malformed: Option<Spanned<String>>,
    #[serde(default)]
    rules: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawList {
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    files: Vec<Spanned<String>>,
}

/// Turns byte offsets into 1-based line and column.
struct Positions<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Positions<'_> {
    fn at(&self, offset: usize, message: impl Into<String>) -> Diagnostic {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Diagnostic {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    fn span<T>(&self, s: &Spanned<T>, message: impl Into<String>) -> Diagnostic {
        self.at(s.span().start, message)
    }
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace)
        && name != "."
        && name != ".."
}

fn action(
    pos: &Positions<'_>,
    v: &Option<Spanned<String>>,
    default: sluice_common::Verdict,
    diags: &mut Vec<Diagnostic>,
) -> sluice_common::Verdict {
    match v {
        None => default,
        Some(s) => match s.get_ref().as_str() {
            "pass" => sluice_common::Verdict::Pass,
            "drop" => sluice_common::Verdict::Drop,
            other => {
                diags.push(pos.span(s, format!("expected \"pass\" or \"drop\", found {other:?}")));
                default
            }
        },
    }
}

/// Parses and validates configuration text. `path` is used for messages and
/// to resolve relative prefix files.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let pos = Positions { file: path, text };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            return Err(ConfigErrors(vec![pos.at(offset, e.message().to_string())]));
        }
    };
    let mut diags = Vec::new();
    let base_dir = path.parent().unwrap_or(Path::new("."));

    let mut agent = AgentSettings::default();
    let path_setting = |s: &Spanned<String>, diags: &mut Vec<Diagnostic>| -> Option<PathBuf> {
        let p = PathBuf::from(s.get_ref());
        if p.is_absolute() {
            Some(p)
        } else {
            diags.push(pos.span(s, format!("{:?} must be an absolute path", s.get_ref())));
            None
        }
    };
    if let Some(s) = &raw.agent.state_dir {
        agent.state_dir = path_setting(s, &mut diags).unwrap_or(agent.state_dir);
    }
    if let Some(s) = &raw.agent.socket {
        agent.socket = path_setting(s, &mut diags).unwrap_or(agent.socket);
    }
    if let Some(s) = &raw.agent.pin_root {
        agent.pin_root = path_setting(s, &mut diags).unwrap_or(agent.pin_root);
    }
    if let Some(h) = &raw.agent.history {
        match usize::try_from(*h.get_ref()) {
            Ok(n) if (1..=1000).contains(&n) => agent.history = n,
            _ => diags.push(pos.span(h, "history must be between 1 and 1000")),
        }
    }
    if let Some(m) = &raw.agent.metrics {
        match m.get_ref().parse::<SocketAddr>() {
            Ok(a) => agent.metrics = Some(a),
            Err(_) => diags.push(pos.span(
                m,
                format!(
                    "{:?} is not a listen address like 127.0.0.1:9464 or [::1]:9464",
                    m.get_ref()
                ),
            )),
        }
    }

    let mut interfaces = Vec::new();
    let mut seen = BTreeSet::new();
    for i in &raw.interfaces {
        let r = i.get_ref();
        let name = r.name.get_ref();
        if !valid_ifname(name) {
            diags.push(pos.span(&r.name, format!("{name:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)")));
            continue;
        }
        let mode = match &r.mode {
            None => AttachMode::Auto,
            Some(m) => match m.get_ref().as_str() {
                "native" => AttachMode::Native,
                "generic" => AttachMode::Generic,
                "auto" => AttachMode::Auto,
                other => {
                    diags.push(pos.span(
                        m,
                        format!("mode must be native, generic or auto, found {other:?}"),
                    ));
                    continue;
                }
            },
        };
        let netns = r.netns.as_ref().map(|n| n.get_ref().clone());
        if let Some(n) = &r.netns
            && (n.get_ref().is_empty() || n.get_ref().contains('/'))
        {
            diags.push(pos.span(
                n,
                format!("{:?} is not a network namespace name", n.get_ref()),
            ));
            continue;
        }
        if !seen.insert((netns.clone(), name.clone())) {
            diags.push(pos.span(&r.name, format!("interface {name} is listed twice")));
            continue;
        }
        interfaces.push(Interface {
            name: name.clone(),
            netns,
            mode,
        });
    }

    let mut policy = Policy {
        default: action(
            &pos,
            &raw.policy.default,
            sluice_common::Verdict::Pass,
            &mut diags,
        )
        .into(),
        malformed: action(
            &pos,
            &raw.policy.malformed,
            sluice_common::Verdict::Drop,
            &mut diags,
        )
        .into(),
        audit: raw.policy.audit,
        ..Policy::default()
    };
    for (list, into) in [
        (&raw.deny, &mut policy.deny),
        (&raw.allow, &mut policy.allow),
    ] {
        for p in &list.prefixes {
            match parse_prefix(p.get_ref()) {
                Ok(net) => {
                    into.insert(net);
                }
                Err(e) => diags.push(pos.span(p, e.to_string())),
            }
        }
        for f in &list.files {
            let file = base_dir.join(f.get_ref());
            match super::read_prefix_file(&file) {
                Ok(nets) => into.extend(nets),
                Err(e) => diags.push(pos.span(f, e.to_string())),
            }
        }
    }
    for r in &raw.policy.rules {
        let words: Vec<String> = r.get_ref().split_whitespace().map(String::from).collect();
        match RuleSpec::parse(&words) {
            Ok(spec) => policy.rules.push(spec),
            Err(e) => diags.push(pos.span(r, e.to_string())),
        }
    }
    if policy.rules.len() > sluice_common::MAX_RULES as usize {
        diags.push(pos.at(
            0,
            format!(
                "{} rules; sluice holds at most {}",
                policy.rules.len(),
                sluice_common::MAX_RULES
            ),
        ));
    }
    for (list, name) in [(&policy.deny, "deny"), (&policy.allow, "allow")] {
        let v4 = list.iter().filter(|n| n.addr().is_ipv4()).count();
        let v6 = list.len() - v4;
        if v4.max(v6) > sluice_common::LIST_CAPACITY as usize {
            diags.push(pos.at(
                0,
                format!(
                    "the {name} list has {} prefixes of one family; at most {} fit",
                    v4.max(v6),
                    sluice_common::LIST_CAPACITY
                ),
            ));
        }
    }
    diags.sort_by_key(|d| (d.line, d.column));
    if diags.is_empty() {
        Ok(Config {
            path: path.to_path_buf(),
            agent,
            desired: Desired { interfaces, policy },
        })
    } else {
        Err(ConfigErrors(diags))
    }
}

/// Reads and parses a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) => Err(ConfigErrors(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        }])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<(usize, usize, String)> {
        match parse(Path::new("/etc/sluice/test.toml"), text) {
            Ok(_) => Vec::new(),
            Err(ConfigErrors(d)) => d
                .into_iter()
                .map(|d| (d.line, d.column, d.message))
                .collect(),
        }
    }

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sluice.toml");
        let cfg = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.desired.interfaces.len(), 1);
        assert_eq!(cfg.desired.policy.rules.len(), 3);
        assert_eq!(cfg.desired.policy.deny.len(), 2);
        assert_eq!(cfg.agent, AgentSettings::default());
    }

    #[test]
    fn empty_file_is_the_default_policy() {
        let cfg = parse(Path::new("/x.toml"), "").unwrap();
        assert_eq!(cfg.desired, Desired::default());
    }

    /// Each bad file and where its (every) problem is reported.
    #[test]
    fn bad_files_report_every_problem_with_its_position() {
        // (file text, [(line, column, message fragment)])
        type Expected<'a> = &'a [(usize, usize, &'a str)];
        let table: &[(&str, Expected<'_>)] = &[
            (
                "[deny]\nprefixes = [\"198.18.0.300/24\"]\n",
                &[(2, 13, "invalid prefix '198.18.0.300/24'")],
            ),
            (
                "[deny]\nprefixes = [\"198.18.0.0/24\",\n  \"nonsense\", \"2001:2::/129\"]\n",
                &[
                    (3, 3, "invalid prefix 'nonsense'"),
                    (3, 15, "invalid prefix '2001:2::/129'"),
                ],
            ),
            (
                "[policy]\nrules = [\"drop tcp dport 80\", \"reject udp\"]\n",
                &[(2, 31, "expected 'drop', 'pass', 'limit' or 'syn-guard' first")],
            ),
            (
                "[policy]\nrules = [\"drop icmp dport 7\"]\n",
                &[(2, 10, "dport only applies to tcp and udp")],
            ),
            (
                "[policy]\ndefault = \"deny\"\n",
                &[(2, 11, "expected \"pass\" or \"drop\"")],
            ),
            (
                "[policy]\nmalformed = \"maybe\"\ndefault = \"drop\"\n",
                &[(2, 13, "expected \"pass\" or \"drop\"")],
            ),
            (
                "[[interface]]\nname = \"this-name-is-too-long\"\n",
                &[(2, 8, "not a valid interface name")],
            ),
            (
                "[[interface]]\nname = \"eth0\"\nmode = \"turbo\"\n",
                &[(3, 8, "mode must be native, generic or auto")],
            ),
            (
                "[[interface]]\nname = \"eth0\"\n[[interface]]\nname = \"eth0\"\n",
                &[(4, 8, "interface eth0 is listed twice")],
            ),
            (
                "[agent]\nmetrics = \"localhost\"\n",
                &[(2, 11, "not a listen address")],
            ),
            (
                "[agent]\nhistory = 0\n",
                &[(2, 11, "history must be between 1 and 1000")],
            ),
            (
                "[agent]\nstate_dir = \"relative/dir\"\n",
                &[(2, 13, "must be an absolute path")],
            ),
            (
                "[deny]\nfiles = [\"/nonexistent/sluice-deny.txt\"]\n",
                &[(2, 10, "cannot read /nonexistent/sluice-deny.txt")],
            ),
            (
                "[policy]\ndefault = \"pass\"\nbogus = 1\n",
                &[(3, 1, "unknown field `bogus`")],
            ),
            ("[deny\nprefixes = []\n", &[(1, 6, "")]),
            ("[policy]\nrules = \"drop udp\"\n", &[(2, 9, "")]),
        ];
        for (text, want) in table {
            let got = errors(text);
            assert_eq!(got.len(), want.len(), "file:\n{text}\ngot: {got:?}");
            for ((gl, gc, gm), (wl, wc, wm)) in got.iter().zip(want.iter()) {
                assert_eq!((gl, gc), (wl, wc), "file:\n{text}\nmessage: {gm}");
                assert!(
                    gm.contains(wm),
                    "file:\n{text}\n{gm:?} should contain {wm:?}"
                );
            }
        }
    }

    #[test]
    fn prefix_files_are_read_relative_to_the_config_with_line_numbers() {
        let dir = std::env::temp_dir().join(format!("sluice-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("deny.txt"),
            "# blocklist\n198.18.5.0/24\n\n2001:2:0:5::/64 # comment\n",
        )
        .unwrap();
        std::fs::write(dir.join("bad.txt"), "198.18.5.0/24\nnot-a-prefix\n").unwrap();
        let cfg = parse(&dir.join("sluice.toml"), "[deny]\nfiles = [\"deny.txt\"]\n").unwrap();
        assert_eq!(cfg.desired.policy.deny.len(), 2);
        let err = parse(&dir.join("sluice.toml"), "[deny]\nfiles = [\"bad.txt\"]\n").unwrap_err();
        assert!(err.0[0].message.contains("bad.txt:2"), "{}", err.0[0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
