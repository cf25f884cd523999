//! Named, exclusive locks on a pin root that live as long as their holder:
//! one capture at a time, one agent owning a pin root. A bpffs pin root
//! cannot hold a regular file to lock, so they live in /run/sluice, which is
//! cleared on boot; a holder that dies (even by kill -9) releases its lock
//! with its last descriptor, so a stale lock is never in the way.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    time::Duration,
};

/// Where the lock files live.
pub const LOCK_DIR: &str = "/run/sluice";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone holds it; `holder` is what they wrote into the file.
    #[error("lock {path} is held ({holder})")]
    Busy { path: PathBuf, holder: String },
    #[error("lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The lock file of `kind` for `root`: the root's canonical path with `%`
/// and `/` escaped, so two spellings of one root share a lock and two roots
/// never do.
#[must_use]
pub fn path_for(kind: &str, root: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let text = canonical.to_string_lossy();
    let mut name = format!("{kind}-");
    for c in text.trim_start_matches('/').chars() {
        match c {
            '%' => name.push_str("%25"),
            '/' => name.push_str("%2F"),
            c => name.push(c),
        }
    }
    name.push_str(".lock");
    Path::new(LOCK_DIR).join(name)
}

fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

fn contents(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut text);
    text.trim().to_string()
}

/// A held lock. Dropping it removes the file and releases the lock.
#[derive(Debug)]
pub struct LockFile {
    file: File,
    path: PathBuf,
}

impl LockFile {
    /// Takes the lock at `path` without waiting, writing `holder` into it.
    /// Busy when another process holds it.
    pub fn acquire(path: &Path, holder: &str) -> Result<Self, LockError> {
        let io_err = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        // A releasing holder unlinks the file while still holding it, and a
        // `holder()` probe holds it shared for a moment: retry on both for
        // a little while (a real holder stays).
        const ATTEMPTS: u32 = 40;
        for attempt in 1..=ATTEMPTS {
            let mut file = open(path).map_err(io_err)?;
            if !flock(&file, libc::LOCK_EX).map_err(io_err)? {
                if attempt < ATTEMPTS {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                return Err(LockError::Busy {
                    path: path.to_path_buf(),
                    holder: contents(&mut file),
                });
            }
            let same = match (file.metadata(), std::fs::metadata(path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            file.set_len(0).map_err(io_err)?;
            file.write_all(holder.as_bytes()).map_err(io_err)?;
            file.flush().map_err(io_err)?;
            return Ok(Self {
                file,
                path: path.to_path_buf(),
            });
        }
        Err(io_err(io::Error::other(
            "the lock file kept being replaced",
        )))
    }

    /// What the holder of the lock at `path` wrote, if it is held now.
    pub fn holder(path: &Path) -> Result<Option<String>, LockError> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LockError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        // A shared lock succeeds only when nobody holds it exclusively.
        let free = flock(&file, libc::LOCK_SH).map_err(|source| LockError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if free {
            return Ok(None);
        }
        Ok(Some(contents(&mut file)))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Unlink before unlocking (closing): a waiter that locked the
        // unlinked file notices and retries on a fresh one.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.flush();
    }
}

/// Who owns a pin root: the agent that keeps it in line with its desired
/// state. One owner per pin root; written into the owner lock file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// The owner's API socket.
    pub socket: PathBuf,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the agent with pid {} (API socket {})",
            self.pid,
            self.socket.display()
        )
    }
}

/// The owner lock file of a pin root.
#[must_use]
pub fn owner_path(root: &Path) -> PathBuf {
    path_for("owner", root)
}

/// The agent that owns `root` now, if any.
pub fn owner_of(root: &Path) -> Result<Option<Owner>, LockError> {
    let path = owner_path(root);
    Ok(LockFile::holder(&path)?.map(|text| {
        serde_json::from_str(&text).unwrap_or(Owner {
            pid: 0,
            socket: PathBuf::from(format!("unknown: lock {} holds {text:?}", path.display())),
        })
    }))
}

/// Held by the agent for as long as it runs.
#[derive(Debug)]
pub struct OwnerLock {
    _lock: LockFile,
}

impl OwnerLock {
    /// Takes ownership of `root`, or names the agent that has it.
    pub fn acquire(root: &Path, socket: &Path) -> Result<Self, LockError> {
        let me = Owner {
            pid: std::process::id(),
            socket: socket.to_path_buf(),
        };
        let text = serde_json::to_string(&me).expect("serialisable");
        LockFile::acquire(&owner_path(root), &text).map(|l| Self { _lock: l })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_and_release_on_drop() {
        let dir = std::env::temp_dir().join(format!("sluice-lockfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.lock");
        assert_eq!(LockFile::holder(&path).unwrap(), None);
        let a = LockFile::acquire(&path, "pid 1").unwrap();
        assert_eq!(LockFile::holder(&path).unwrap().as_deref(), Some("pid 1"));
        // flock locks belong to the open file description: a second open in
        // this process conflicts like another process would.
        match LockFile::acquire(&path, "pid 2") {
            Err(LockError::Busy { holder, .. }) => assert_eq!(holder, "pid 1"),
            other => panic!("expected busy, got {other:?}"),
        }
        drop(a);
        assert_eq!(LockFile::holder(&path).unwrap(), None);
        let b = LockFile::acquire(&path, "pid 3").unwrap();
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
