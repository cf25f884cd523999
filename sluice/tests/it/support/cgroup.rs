//! A [`Cgroup`] guard: a cgroup v2 directory (and children) made for one test
//! under the cgroup v2 mount, with processes started inside it, all killed
//! and the directories removed on drop (also when the test panics).
//!
//! The mount is found as sluice finds it, from /proc/self/mountinfo (fstype
//! `cgroup2`), never assumed: /sys/fs/cgroup on a unified host,
//! /sys/fs/cgroup/unified on a hybrid one. Directory names carry the test
//! process's pid and a counter; those of test processes that no longer exist
//! are swept by the next one.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Once, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// Prefix of every cgroup directory the tests make (directly under the mount).
pub const CGROUP_PREFIX: &str = "sluice-t-";

/// How long a drop waits for the killed processes to leave and the
/// directories to go.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(10);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The cgroup v2 mount point, found as sluice finds it (the mount of the
/// hierarchy's root in /proc/self/mountinfo). Panics when there is none
/// (the socket layer needs it).
pub fn cgroup2_mount() -> &'static Path {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    MOUNT.get_or_init(|| {
        sluice::dataplane::sock::cgroup2_mount()
            .unwrap_or_else(|e| panic!("no cgroup v2 mount: {e}"))
    })
}

/// A cgroup v2 directory `<mount>/sluice-t-{pid}-{n}-{tag}`, removed with
/// its children on drop after every process in it was killed.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Cgroup {
        sweep_stale();
        let name = format!(
            "{CGROUP_PREFIX}{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = cgroup2_mount().join(name);
        if path.exists() {
            destroy(&path);
        }
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("mkdir cgroup {}: {e}", path.display()));
        Cgroup { path }
    }

    /// Absolute path of the directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path relative to the cgroup v2 mount (what a `[[workload]]` names).
    pub fn rel(&self) -> String {
        rel_of(&self.path)
    }

    /// Makes `self/name` (`name` may have several levels: `a/b`) and returns
    /// its absolute path. Removed with this guard.
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir cgroup {}: {e}", p.display()));
        p
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        destroy(&self.path);
    }
}

/// A path under the mount, relative to it (no leading `/`).
pub fn rel_of(path: &Path) -> String {
    path.strip_prefix(cgroup2_mount())
        .unwrap_or_else(|_| panic!("{} is not under the cgroup2 mount", path.display()))
        .to_string_lossy()
        .into_owned()
}

/// The cgroup id of a cgroup directory: its inode number.
pub fn cgroup_id(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())),
    )
}

/// `program`, not started, that first moves itself into cgroup `dir` (the
/// shell writes its own pid to `cgroup.procs`, then execs the program, which
/// keeps the pid). Everything it starts, also through `ip netns exec`
/// (which remounts /sys but leaves cgroup membership alone), stays inside.
pub fn command_in(dir: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$0\" && exec \"$@\"")
        .arg(dir.join("cgroup.procs"))
        .arg(program);
    cmd
}

/// The pids in `cgroup.procs` of `dir` (empty when it is gone).
pub fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Every directory of the subtree at `dir`, children before parents.
fn subtree_post_order(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subtree_post_order(&e.path()));
            }
        }
    }
    out.push(dir.to_owned());
    out
}

fn populated(dir: &Path) -> bool {
    // `populated 1` while any process is in the subtree; without the file
    // (never on cgroup v2 but the root), judge by the pids.
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(ev) => ev.lines().any(|l| l == "populated 1"),
        Err(_) => subtree_post_order(dir).iter().any(|d| !procs(d).is_empty()),
    }
}

fn kill_all(dir: &Path) {
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() && std::fs::write(&kill_file, "1").is_ok() {
        return;
    }
    for d in subtree_post_order(dir) {
        for pid in procs(&d) {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) on a pid read from the test's own cgroup.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Kills every process in the subtree at `dir`, waits for them to leave,
/// removes the directories. Errors are reported, not raised (drop).
fn destroy(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let deadline = Instant::now() + TEARDOWN_LIMIT;
    loop {
        kill_all(dir);
        if !populated(dir) {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "warning: processes still in cgroup {} after {TEARDOWN_LIMIT:?}",
                dir.display()
            );
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    for d in subtree_post_order(dir) {
        // EBUSY for a moment while a killed process is released.
        loop {
            match std::fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("warning: cannot remove cgroup {}: {e}", d.display());
                    break;
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Once per process: remove the cgroups of test processes that are gone.
fn sweep_stale() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(rd) = std::fs::read_dir(cgroup2_mount()) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let owner: Option<u32> = name
                .strip_prefix(CGROUP_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse().ok());
            if owner.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                destroy(&e.path());
            }
        }
    });
}
