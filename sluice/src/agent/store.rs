//! The agent's embedded store: a snapshot (`state.json`) plus a journal of
//! every change since (`journal.ndjson`), both in the state directory.
//!
//! A change is journaled before it reaches the kernel (`begin`) and again
//! when it took effect (`commit`) or was refused (`abort`); each record is
//! fsynced. So a change costs bytes proportional to itself, history keeps
//! the difference each version made (not a copy of the policy), and after a
//! crash the agent finds the change it was in the middle of and finishes or
//! undoes it (see `core`). The snapshot is rewritten (write, fsync, rename)
//! only when the journal has grown as large as it, and the journal then
//! starts again. See docs/decisions/006-journaled-store.md.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{BufRead as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use crate::model::policy::{Action, Delta, Desired, Op, Policy};

pub const STATE_FILE: &str = "state.json";
pub const JOURNAL_FILE: &str = "journal.ndjson";
/// Snapshot format written by this build (1: history held whole policies).
pub const FORMAT: u32 = 2;
/// The journal is folded into a new snapshot once it is at least this large
/// and as large as the snapshot.
const MIN_JOURNAL_FOR_SNAPSHOT: u64 = 8 << 20;

/// What a version's policy looked like (for `history` without rebuilding it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub deny: usize,
    pub allow: usize,
    pub rules: usize,
    pub default: Action,
    pub malformed: Action,
    /// Load-balanced services (0 in versions recorded before it was kept).
    #[serde(default)]
    pub services: usize,
}

impl Summary {
    pub fn of(p: &Policy, services: usize) -> Self {
        Self {
            deny: p.deny.len(),
            allow: p.allow.len(),
            rules: p.rules.len(),
            default: p.default,
            malformed: p.malformed,
            services,
        }
    }
}

/// One applied version: what changed, and a fingerprint of the policy after
/// it (to check a policy rebuilt from history before it is applied).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Version {
    pub number: u64,
    /// Seconds since the Unix epoch.
    pub time: u64,
    pub author: String,
    pub cause: String,
    /// The request that made it (`X-Sluice-Request`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// From the previous version's desired state to this one's.
    pub delta: Delta,
    pub fingerprint: u64,
    pub summary: Summary,
}

/// The persistent state: the last applied file as the base, runtime changes
/// as an overlay on top, and the history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// Format of this file; bumped with a migration when it changes.
    pub format: u32,
    /// The last applied file (interfaces and policy) ...
    pub base: Desired,
    /// ... where it came from and its content hash (to notice edits).
    pub base_source: String,
    pub base_hash: String,
    /// Hash of the agent's own config file when it was last taken in, so an
    /// edit is noticed (also across restarts) without undoing an `apply` of
    /// another file.
    #[serde(default)]
    pub config_hash: String,
    /// ... plus runtime changes made through the API since.
    pub overlay: Vec<Op>,
    /// Newest last; at most `[agent] history` entries.
    pub history: VecDeque<Version>,
    /// The last journal record this snapshot includes.
    #[serde(default)]
    pub seq: u64,
}

impl Default for State {
    fn default() -> Self {
        Self {
            format: FORMAT,
            base: Desired::default(),
            base_source: String::new(),
            base_hash: String::new(),
            config_hash: String::new(),
            overlay: Vec::new(),
            history: VecDeque::new(),
            seq: 0,
        }
    }
}

impl State {
    /// Desired state replayed from scratch: the base with the overlay on top
    /// (cost: the size of the policy; the agent keeps the result).
    pub fn replay(&self) -> Desired {
        let mut d = self.base.clone();
        for op in &self.overlay {
            // Ops that no longer fit the base (deleting an entry the new file
            // dropped) are skipped; they were logged when the base changed.
            let _ = op.apply(&mut d, false);
        }
        d
    }

    pub fn current_version(&self) -> u64 {
        self.history.back().map_or(0, |v| v.number)
    }
}

/// How the state moves from one version to the next.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// Runtime changes, appended to the overlay.
    Ops { ops: Vec<Op> },
    /// A file becomes the base (`apply`, a reload, the config at start).
    Base {
        base: Box<Desired>,
        source: String,
        hash: String,
        /// Set when the file is the agent's own config file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config_hash: Option<String>,
    },
    /// The policy and workloads of an earlier version become the base's;
    /// runtime policy and workload changes are dropped (interfaces and
    /// services stay).
    Rollback { to: u64 },
    /// A version that changes nothing, to say something in history (the
    /// agent's first start, a change a crash interrupted and that was undone).
    Note,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// A change is about to reach the kernel.
    Begin {
        seq: u64,
        time: u64,
        author: String,
        cause: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<String>,
        step: Box<Step>,
    },
    /// It took effect; `version` is the version it made (none: it changed
    /// no policy, only bookkeeping such as the base's source).
    Commit { seq: u64, version: Option<u64> },
    /// It did not take effect; the state before it stays.
    Abort { seq: u64, error: String },
}

impl Record {
    pub fn seq(&self) -> u64 {
        match self {
            Self::Begin { seq, .. } | Self::Commit { seq, .. } | Self::Abort { seq, .. } => *seq,
        }
    }
}

/// A change that began but has no outcome in the journal (the agent died
/// while carrying it out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub seq: u64,
    pub time: u64,
    pub author: String,
    pub cause: String,
    pub request: Option<String>,
    pub step: Step,
}

/// What is on disk: the snapshot, the journal's finished changes after it
/// (to replay, in order), and the one left unfinished, if any.
#[derive(Debug, Default)]
pub struct Loaded {
    pub state: Option<State>,
    /// (begin, version it made) for each committed change after the snapshot.
    pub committed: Vec<(Pending, Option<u64>)>,
    pub pending: Option<Pending>,
    pub last_seq: u64,
    /// A torn last line (a crash while appending) was dropped.
    pub torn_tail: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `error` is shown in the message (not as a `source`, so a chain
    /// printer does not say it twice).
    #[error(
        "state file {path} is not valid ({}{error}); move it aside to start from the config file alone",
        at_line(*.line)
    )]
    Corrupt {
        path: PathBuf,
        /// The journal line (1-based) that does not parse; `None`: the snapshot.
        line: Option<usize>,
        error: serde_json::Error,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|n| format!("line {n}: ")).unwrap_or_default()
}

pub struct Store {
    dir: PathBuf,
    journal: Option<File>,
    journal_bytes: u64,
    snapshot_bytes: u64,
    next_seq: u64,
}

/// The version-1 snapshot: history held each version's whole policy.
#[derive(serde::Deserialize)]
struct StateV1 {
    base: Desired,
    base_source: String,
    base_hash: String,
    #[serde(default)]
    config_hash: String,
    overlay: Vec<Op>,
    history: VecDeque<VersionV1>,
}

#[derive(serde::Deserialize)]
struct VersionV1 {
    number: u64,
    time: u64,
    author: String,
    cause: String,
    policy: Policy,
}

fn migrate_v1(v1: StateV1) -> State {
    let mut history = VecDeque::new();
    let mut prev = Policy::default();
    for v in v1.history {
        history.push_back(Version {
            number: v.number,
            time: v.time,
            author: v.author,
            cause: v.cause,
            request: None,
            delta: Delta::between_policies(&prev, &v.policy),
            fingerprint: crate::model::policy::delta::fingerprint(&v.policy),
            summary: Summary::of(&v.policy, 0),
        });
        prev = v.policy;
    }
    State {
        format: FORMAT,
        base: v1.base,
        base_source: v1.base_source,
        base_hash: v1.base_hash,
        config_hash: v1.config_hash,
        overlay: v1.overlay,
        history,
        seq: 0,
    }
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            journal: None,
            journal_bytes: 0,
            snapshot_bytes: 0,
            next_seq: 1,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    fn io(&self, path: PathBuf) -> impl FnOnce(std::io::Error) -> StoreError {
        move |source| StoreError::Io { path, source }
    }

    /// Reads the snapshot and the journal.
    pub fn load(&mut self) -> Result<Loaded, StoreError> {
        let path = self.path();
        let mut loaded = Loaded::default();
        match std::fs::read(&path) {
            Ok(bytes) => {
                self.snapshot_bytes = bytes.len() as u64;
                let corrupt = |error| StoreError::Corrupt {
                    path: path.clone(),
                    line: None,
                    error,
                };
                let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(corrupt)?;
                let state = if value.get("format").and_then(serde_json::Value::as_u64) == Some(1) {
                    migrate_v1(serde_json::from_value(value).map_err(corrupt)?)
                } else {
                    serde_json::from_value(value).map_err(corrupt)?
                };
                loaded.last_seq = state.seq;
                loaded.state = Some(state);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { path, source }),
        }
        let jpath = self.journal_path();
        let file = match File::open(&jpath) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(StoreError::Io {
                    path: jpath,
                    source,
                });
            }
        };
        let mut good_bytes = 0u64;
        if let Some(f) = file {
            let snapshot_seq = loaded.last_seq;
            let mut lines = std::io::BufReader::new(f).split(b'\n').peekable();
            let mut open: Option<Pending> = None;
            let mut n = 0usize;
            while let Some(line) = lines.next() {
                n += 1;
                let line = line.map_err(self.io(jpath.clone()))?;
                let is_last = lines.peek().is_none();
                let record: Record = match serde_json::from_slice(&line) {
                    Ok(r) => r,
                    // A crash while appending leaves a torn last line: that
                    // record never counted (its fsync had not returned).
                    Err(_) if is_last => {
                        loaded.torn_tail = true;
                        break;
                    }
                    Err(error) => {
                        return Err(StoreError::Corrupt {
                            path: jpath,
                            line: Some(n),
                            error,
                        });
                    }
                };
                good_bytes += line.len() as u64 + 1;
                let seq = record.seq();
                loaded.last_seq = loaded.last_seq.max(seq);
                if seq <= snapshot_seq {
                    continue;
                }
                match record {
                    Record::Begin {
                        seq,
                        time,
                        author,
                        cause,
                        request,
                        step,
                    } => {
                        // A begin with no outcome before the next begin was
                        // abandoned before it reached the kernel.
                        open = Some(Pending {
                            seq,
                            time,
                            author,
                            cause,
                            request,
                            step: *step,
                        });
                    }
                    Record::Commit { seq, version } => {
                        if let Some(p) = open.take_if(|p| p.seq == seq) {
                            loaded.committed.push((p, version));
                        }
                    }
                    Record::Abort { seq, .. } => {
                        open.take_if(|p| p.seq == seq);
                    }
                }
            }
            loaded.pending = open;
        }
        if loaded.torn_tail {
            // Cut the torn line so new records start on a line of their own.
            let f = OpenOptions::new()
                .write(true)
                .open(&jpath)
                .map_err(self.io(jpath.clone()))?;
            f.set_len(good_bytes).map_err(self.io(jpath.clone()))?;
            f.sync_all().map_err(self.io(jpath.clone()))?;
        }
        self.journal_bytes = good_bytes;
        self.next_seq = loaded.last_seq + 1;
        Ok(loaded)
    }

    /// The sequence number the next change gets.
    pub fn next_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Appends one record and waits until it is on disk.
    pub fn append(&mut self, record: &Record) -> Result<(), StoreError> {
        let jpath = self.journal_path();
        if self.journal.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&jpath)
                .map_err(self.io(jpath.clone()))?;
            self.journal = Some(f);
        }
        let mut line = serde_json::to_vec(record).expect("records always serialise");
        line.push(b'\n');
        let f = self.journal.as_mut().expect("opened above");
        f.write_all(&line)
            .and_then(|()| f.sync_data())
            .map_err(|source| StoreError::Io {
                path: jpath,
                source,
            })?;
        self.journal_bytes += line.len() as u64;
        Ok(())
    }

    /// Whether the journal has grown enough to fold it into a new snapshot.
    pub fn wants_snapshot(&self) -> bool {
        self.journal_bytes >= MIN_JOURNAL_FOR_SNAPSHOT && self.journal_bytes >= self.snapshot_bytes
    }

    /// Bytes in the snapshot and the journal now.
    pub fn sizes(&self) -> (u64, u64) {
        (self.snapshot_bytes, self.journal_bytes)
    }

    /// Replaces the snapshot atomically (readers and crashes see the old file
    /// or the new one) with `state`, which includes every journal record up
    /// to `state.seq`; then starts the journal afresh.
    pub fn snapshot(&mut self, state: &State) -> Result<(), StoreError> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(state).expect("state always serialises");
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.snapshot_bytes = bytes.len() as u64;
        // Every record is in the snapshot now; one crash before this point
        // replays nothing twice (records up to `state.seq` are skipped).
        let jpath = self.journal_path();
        self.journal = None;
        match std::fs::remove_file(&jpath) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Io {
                    path: jpath,
                    source,
                });
            }
        }
        self.journal_bytes = 0;
        Ok(())
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A short content hash (FNV-1a, 64 bit) to notice that a file changed.
pub fn content_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn begin(seq: u64, ops: Vec<Op>) -> Record {
        Record::Begin {
            seq,
            time: 1,
            author: "test".into(),
            cause: format!("change {seq}"),
            request: Some(format!("r{seq}")),
            step: Box::new(Step::Ops { ops }),
        }
    }

    #[test]
    fn journal_replays_committed_changes_and_reports_the_unfinished_one() {
        let d = dir("journal");
        let mut store = Store::open(&d).unwrap();
        assert!(store.load().unwrap().state.is_none());
        let op = |p: &str| Op::ListAdd {
            allow: false,
            prefixes: vec![p.parse().unwrap()],
        };
        for (seq, rec) in [
            (1, begin(1, vec![op("198.18.1.0/24")])),
            (
                1,
                Record::Commit {
                    seq: 1,
                    version: Some(1),
                },
            ),
            (2, begin(2, vec![op("198.18.2.0/24")])),
            (
                2,
                Record::Abort {
                    seq: 2,
                    error: "refused".into(),
                },
            ),
            (3, begin(3, vec![op("198.18.3.0/24")])),
        ] {
            assert_eq!(rec.seq(), seq);
            store.append(&rec).unwrap();
        }
        // A torn line after the last record.
        let mut f = OpenOptions::new()
            .append(true)
            .open(store.journal_path())
            .unwrap();
        f.write_all(b"{\"record\":\"commit\",\"se").unwrap();
        drop(f);
        let mut again = Store::open(&d).unwrap();
        let l = again.load().unwrap();
        assert!(l.torn_tail);
        assert_eq!(l.committed.len(), 1);
        assert_eq!(l.committed[0].0.seq, 1);
        assert_eq!(l.committed[0].1, Some(1));
        assert_eq!(l.pending.as_ref().map(|p| p.seq), Some(3));
        assert_eq!(again.next_seq(), 4);
        // The torn line is gone: appending goes on cleanly.
        again
            .append(&Record::Commit {
                seq: 3,
                version: Some(2),
            })
            .unwrap();
        let l = Store::open(&d).unwrap().load().unwrap();
        assert!(!l.torn_tail && l.pending.is_none() && l.committed.len() == 2);
        // A snapshot folds the journal in; records up to its seq are skipped.
        let state = State {
            seq: 3,
            ..State::default()
        };
        again.snapshot(&state).unwrap();
        assert!(!again.journal_path().exists());
        let l = Store::open(&d).unwrap().load().unwrap();
        assert_eq!(l.state, Some(state));
        assert!(l.committed.is_empty() && l.pending.is_none());
        assert_eq!(l.last_seq, 3);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_damaged_journal_line_before_the_end_is_an_error() {
        let d = dir("damaged");
        let mut store = Store::open(&d).unwrap();
        store.load().unwrap();
        store.append(&begin(1, vec![])).unwrap();
        std::fs::write(
            store.journal_path(),
            format!(
                "garbage\n{}\n",
                serde_json::to_string(&Record::Commit {
                    seq: 1,
                    version: None
                })
                .unwrap()
            ),
        )
        .unwrap();
        let e = Store::open(&d).unwrap().load().unwrap_err();
        assert!(
            matches!(e, StoreError::Corrupt { line: Some(1), .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("is not valid (line 1: "), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn version_1_snapshots_are_migrated_to_deltas() {
        let d = dir("v1");
        std::fs::create_dir_all(&d).unwrap();
        let v1 = serde_json::json!({
            "format": 1,
            "base": Desired::default(),
            "base_source": "x.toml",
            "base_hash": "00",
            "overlay": [],
            "history": [
                {"number": 1, "time": 1, "author": "a", "cause": "c1",
                 "policy": {"default": "pass", "malformed": "drop", "deny": ["198.18.0.0/24"], "allow": [], "rules": []}},
                {"number": 2, "time": 2, "author": "a", "cause": "c2",
                 "policy": {"default": "drop", "malformed": "drop", "deny": ["198.18.0.0/24", "198.18.1.0/24"], "allow": [], "rules": []}}
            ]
        });
        std::fs::write(d.join(STATE_FILE), v1.to_string()).unwrap();
        let s = Store::open(&d).unwrap().load().unwrap().state.unwrap();
        assert_eq!(s.format, FORMAT);
        assert_eq!(s.history.len(), 2);
        let v2 = &s.history[1];
        assert_eq!(v2.delta.deny_add, vec!["198.18.1.0/24".parse().unwrap()]);
        assert_eq!(v2.delta.default, Some((Action::Pass, Action::Drop)));
        assert_eq!(v2.summary.deny, 2);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
