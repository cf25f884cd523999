//! Network namespaces by name, as `ip netns` keeps them under /run/netns:
//! entering one for the whole process (the CLI's -n) or running one piece of
//! work inside one on a thread of its own (the agent, which serves many).

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {name} does not exist (see `ip netns list`)")]
    Missing { name: String },
    #[error("entering network namespace {name}: {reason}")]
    Enter { name: String, reason: String },
}

/// The file of namespace `name` (`/run/netns/NAME`), or of the calling
/// thread's own (`None`).
#[must_use]
pub fn path(name: Option<&str>) -> PathBuf {
    match name {
        Some(n) => Path::new("/run/netns").join(n),
        None => PathBuf::from("/proc/thread-self/ns/net"),
    }
}

/// Moves the calling thread into namespace `name`; only the network
/// namespace changes, so the host's bpffs stays visible.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = path(Some(name));
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

/// Makes a TCP socket inside namespace `name` for code that runs elsewhere
/// (the agent's health probes: a socket belongs to the namespace it was
/// made in, whichever thread uses it later). One long-lived thread per
/// namespace name makes them: it enters the namespace by name for each
/// socket (so a replaced namespace is followed) and goes back to its own
/// at once (so a deleted one is not kept alive). Non-blocking, close-on-exec.
///
/// # Errors
/// The namespace is missing or cannot be entered, or socket(2) failed.
pub fn tcp_socket_in(name: &str, v6: bool) -> Result<std::os::fd::OwnedFd, NetnsError> {
    use std::sync::{Mutex, OnceLock, mpsc};
    static MAKERS: OnceLock<Mutex<std::collections::HashMap<String, mpsc::Sender<SocketRequest>>>> =
        OnceLock::new();
    let makers = MAKERS.get_or_init(Default::default);
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let failed = |reason: String| NetnsError::Enter {
        name: name.to_string(),
        reason,
    };
    {
        let mut m = makers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tx = m.entry(name.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<SocketRequest>();
            let name = name.to_string();
            std::thread::Builder::new()
                .name(format!("netns-{name}"))
                .spawn(move || socket_maker(&name, &rx))
                .map(|_| ())
                .unwrap_or(());
            tx
        });
        if tx.send((v6, reply_tx.clone())).is_err() {
            // The maker thread is gone (it could not be spawned): next
            // call starts a new one.
            m.remove(name);
            return Err(failed("no thread to make sockets in it".into()));
        }
    }
    drop(reply_tx);
    reply_rx
        .recv()
        .map_err(|_| failed("the socket maker stopped".into()))?
}

/// (IPv6?, where the socket goes).
type SocketRequest = (
    bool,
    std::sync::mpsc::SyncSender<Result<std::os::fd::OwnedFd, NetnsError>>,
);

fn socket_maker(name: &str, rx: &std::sync::mpsc::Receiver<SocketRequest>) {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    // The thread goes back to where it started after every socket, so it
    // never keeps a namespace alive after `ip netns del`.
    let home = match std::fs::File::open("/proc/thread-self/ns/net") {
        Ok(f) => f,
        Err(e) => {
            for (_, reply) in rx {
                let _ = reply.send(Err(NetnsError::Enter {
                    name: name.to_string(),
                    reason: format!("cannot open this thread's own namespace: {e}"),
                }));
            }
            return;
        }
    };
    for (v6, reply) in rx {
        let made = enter(name).and_then(|()| {
            let family = if v6 {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            };
            socket(
                family,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| NetnsError::Enter {
                name: name.to_string(),
                reason: format!("socket: {e}"),
            })
        });
        let back = nix::sched::setns(home.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
        let _ = reply.send(made);
        if back.is_err() {
            // Stranded in another namespace: end the thread; the next
            // request starts a new one.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    /// The socket maker goes home after each socket: it does not hold the
    /// namespace (which `ip netns del` must be able to free). Needs root.
    #[test]
    fn the_socket_maker_holds_no_namespace() {
        let name = format!("sluice-unit-{}", std::process::id());
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(ip(&["netns", "add", &name]), "ip netns add");
        let made = super::tcp_socket_in(&name, false);
        let thread_ns = std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .filter_map(Result::ok)
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| {
                    c.trim() == format!("netns-{name}").chars().take(15).collect::<String>()
                })
            })
            .and_then(|t| std::fs::read_link(t.path().join("ns/net")).ok());
        let own = std::fs::read_link("/proc/self/ns/net").ok();
        ip(&["netns", "del", &name]);
        made.expect("a socket in the namespace");
        assert!(thread_ns.is_some(), "the maker thread exists");
        assert_eq!(
            thread_ns, own,
            "the maker thread is back in the process's namespace"
        );
    }

    #[test]
    fn a_socket_in_a_missing_namespace_names_it() {
        let e = super::tcp_socket_in("sluice-no-such-netns", false).expect_err("missing");
        assert!(
            e.to_string()
                .contains("sluice-no-such-netns does not exist"),
            "{e}"
        );
    }
}
