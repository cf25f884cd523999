//! The CLI's side of the agent API: HTTP/1.1 over the unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};

use crate::api::{ErrorBody, Info};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agent is running at {path} ({reason})")]
    NoAgent { path: PathBuf, reason: String },
    #[error("permission denied on the agent socket {path}: the API is for root only")]
    Permission { path: PathBuf },
    #[error("talking to the agent at {path}: {reason}")]
    Transport { path: PathBuf, reason: String },
    #[error(
        "the agent at {path} went away while carrying out this change (request {request}: \
         {reason}); an agent finishes or undoes an interrupted change when it starts again, \
         and `sluice history` then shows which"
    )]
    Interrupted {
        path: PathBuf,
        request: String,
        reason: String,
    },
    #[error("the agent refused: {}{}", .body.error, if .body.diagnostics.is_empty() { String::new() } else { format!("\n{}", .body.diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")) })]
    Refused { status: u16, body: ErrorBody },
}

pub struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
    /// Send `X-Sluice-Force: 1`: apply even if the lock-out guard objects.
    pub force: bool,
}

fn user() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_default()
}

impl Client {
    /// Connects to the agent; `Ok(None)` when none is running there.
    pub fn connect(socket: &Path) -> Result<Option<(Self, Info)>, ClientError> {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(ClientError::Permission {
                    path: socket.to_path_buf(),
                });
            }
            Err(_) => return Ok(None),
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Transport {
                path: socket.to_path_buf(),
                reason: e.to_string(),
            })?;
        let client = Self {
            socket: socket.to_path_buf(),
            rt,
            force: false,
        };
        let info: Info = client.call(Method::GET, "/v1/info", None::<&()>)?;
        Ok(Some((client, info)))
    }

    /// Asks the agent to apply even if its lock-out guard objects.
    #[must_use]
    pub fn with_force(mut self, force: bool) -> Self {
        self.force = force;
        self
    }

    /// Like `connect`, but an absent agent is an error.
    pub fn require(socket: &Path) -> Result<Self, ClientError> {
        match Self::connect(socket)? {
            Some((c, _)) => Ok(c),
            None => Err(ClientError::NoAgent {
                path: socket.to_path_buf(),
                reason: "start one with `sluice agent --config FILE`".into(),
            }),
        }
    }

    pub fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let socket = self.socket.clone();
        let transport = |reason: String| ClientError::Transport {
            path: socket.clone(),
            reason,
        };
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| transport(e.to_string()))?,
            None => Vec::new(),
        };
        let request = super::new_request_id();
        let changes = method != Method::GET;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("x-sluice-request", &request)
            .header("host", "sluice")
            .header("content-type", "application/json")
            .header("x-sluice-user", user())
            .header(
                "x-sluice-session",
                std::env::var("SSH_CONNECTION").unwrap_or_default(),
            )
            .header("x-sluice-force", if self.force { "1" } else { "0" })
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| transport(e.to_string()))?;
        let interrupted = |reason: String| {
            if changes {
                ClientError::Interrupted {
                    path: socket.clone(),
                    request: request.clone(),
                    reason,
                }
            } else {
                transport(reason)
            }
        };
        // A peer that closes the socket while the body is still being sent
        // (it refused the request, or died) must give an error, not kill
        // the CLI with SIGPIPE (which it otherwise leaves at its default).
        let _sigpipe = SigpipeBlocked::new();
        let (status, bytes) = self.rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| transport(e.to_string()))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| transport(e.to_string()))?;
            tokio::spawn(conn);
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| interrupted(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| interrupted(e.to_string()))?
                .to_bytes();
            Ok::<_, ClientError>((status, bytes))
        })?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| transport(format!("unexpected reply: {e}")))
        } else {
            let body = serde_json::from_slice(&bytes).unwrap_or(ErrorBody {
                error: String::from_utf8_lossy(&bytes).into_owned(),
                diagnostics: Vec::new(),
            });
            Err(ClientError::Refused {
                status: status.as_u16(),
                body,
            })
        }
    }
}

/// Blocks SIGPIPE for this thread while it lives; a SIGPIPE raised by a
/// write to a closed socket meanwhile is taken off the pending set before
/// the old mask comes back (the write itself fails with EPIPE).
struct SigpipeBlocked {
    old: libc::sigset_t,
}

impl SigpipeBlocked {
    fn new() -> Self {
        // SAFETY: plain signal-mask calls on sets this function owns.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGPIPE);
            libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, &raw mut old);
            Self { old }
        }
    }
}

impl Drop for SigpipeBlocked {
    fn drop(&mut self) {
        // SAFETY: as above; a zero timeout only polls the pending set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGPIPE);
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            while libc::sigtimedwait(&raw const set, std::ptr::null_mut(), &raw const zero)
                == libc::SIGPIPE
            {}
            libc::pthread_sigmask(libc::SIG_SETMASK, &raw const self.old, std::ptr::null_mut());
        }
    }
}
