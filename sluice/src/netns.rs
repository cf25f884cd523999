//! Network namespaces by name, as `ip netns` keeps them under /run/netns:
//! entering one for the whole process (the CLI's -n) or running one piece of
//! work inside one on a thread of its own (the agent, which serves many).

use std::{os::fd::AsFd, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {name} does not exist (see `ip netns list`)")]
    Missing { name: String },
    #[error("entering network namespace {name}: {reason}")]
    Enter { name: String, reason: String },
}

/// Moves the calling thread into namespace `name`; only the network
/// namespace changes, so the host's bpffs stays visible.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = Path::new("/run/netns").join(name);
    let file = std::fs::File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            NetnsError::Missing {
                name: name.to_string(),
            }
        } else {
            NetnsError::Enter {
                name: name.to_string(),
                reason: e.to_string(),
            }
        }
    })?;
    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        NetnsError::Enter {
            name: name.to_string(),
            reason: if e == nix::errno::Errno::EPERM {
                "permission denied: needs root or CAP_SYS_ADMIN".into()
            } else {
                e.to_string()
            },
        }
    })
}

/// Runs `f` inside namespace `name` (or right here when `None`) on a
/// short-lived thread, so the caller's own namespace never changes.
pub fn run_in<T: Send + 'static>(
    name: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let Some(name) = name else { return Ok(f()) };
    let name = name.to_string();
    std::thread::spawn(move || {
        enter(&name)?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// The label links are pinned under: the namespace name, `host` for the
/// initial namespace, or `netns-<inode>` for an unnamed one.
pub fn label(name: Option<&str>) -> String {
    if let Some(n) = name {
        return n.to_string();
    }
    let inode = |p: &str| {
        std::fs::metadata(p)
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    };
    match (inode("/proc/thread-self/ns/net"), inode("/proc/1/ns/net")) {
        (Some(a), Some(b)) if a != b => format!("netns-{a}"),
        // Same as pid 1's, or pid 1's cannot be read (not root): the host.
        _ => "host".into(),
    }
}
