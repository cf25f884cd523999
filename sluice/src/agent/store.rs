//! The agent's embedded store: desired state and the history of applied
//! versions in one JSON file, replaced atomically (write, fsync, rename).

use std::{
    collections::VecDeque,
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::policy::{Desired, Op, Policy};

pub const STATE_FILE: &str = "state.json";

/// One applied version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Version {
    pub number: u64,
    /// Seconds since the Unix epoch.
    pub time: u64,
    pub author: String,
    pub cause: String,
    /// The policy packets were judged by from this version on.
    pub policy: Policy,
}

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
    /// Newest last; at most `history` entries.
    pub history: VecDeque<Version>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            format: 1,
            base: Desired::default(),
            base_source: String::new(),
            base_hash: String::new(),
            config_hash: String::new(),
            overlay: Vec::new(),
            history: VecDeque::new(),
        }
    }
}

impl State {
    /// Desired state: the base with the overlay replayed on top.
    pub fn desired(&self) -> Desired {
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

    pub fn record(&mut self, author: &str, cause: String, keep: usize) -> u64 {
        let number = self.current_version() + 1;
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.history.push_back(Version {
            number,
            time,
            author: author.to_string(),
            cause,
            policy: self.desired().policy,
        });
        while self.history.len() > keep.max(1) {
            self.history.pop_front();
        }
        number
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {path} is not valid ({detail}); move it aside to start from the config file alone"
    )]
    Corrupt { path: PathBuf, detail: String },
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved state, or `None` on first start.
    pub fn load(&self) -> Result<Option<State>, StoreError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        path,
                        detail: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Replaces the state file atomically: readers and crashes see the old
    /// file or the new one, never a mix.
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(state).expect("state always serialises");
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode_0600()
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
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
    use crate::policy::{Action, RuleSpec};

    #[test]
    fn save_and_load_round_trip_and_history_is_bounded() {
        let dir = std::env::temp_dir().join(format!("sluice-store-test-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap(), None);
        let mut s = State::default();
        s.base.policy.deny.insert("198.18.0.0/24".parse().unwrap());
        s.overlay.push(Op::Default {
            action: Action::Drop,
        });
        s.overlay.push(Op::RuleAdd {
            at: None,
            rule: RuleSpec::parse(&["drop".into(), "udp".into(), "dport".into(), "53".into()])
                .unwrap(),
        });
        for i in 0..5 {
            s.record("test", format!("change {i}"), 3);
        }
        assert_eq!(s.history.len(), 3);
        assert_eq!(s.current_version(), 5);
        assert_eq!(s.history[0].number, 3);
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), Some(s.clone()));
        let d = s.desired();
        assert_eq!(d.policy.default, Action::Drop);
        assert_eq!(d.policy.rules.len(), 1);
        std::fs::write(store.path(), b"{not json").unwrap();
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
