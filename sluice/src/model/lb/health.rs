//! Health check specs: how a backend is probed and the limits a spec must
//! keep (checked here, run by the agent's checker).

use std::time::Duration;

use hyper::{Uri, header::HeaderValue};

/// How a backend is probed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Probe {
    /// A completed TCP handshake is success; the connection is closed at once.
    Tcp,
    /// `GET path` over HTTP/1.1; success iff the status is `expect_status`.
    Http {
        path: String,
        expect_status: u16,
        /// Host header; the backend's socket address when absent, since
        /// virtual-hosted backends may answer a bare address differently.
        host: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub probe: Probe,
    /// Start-to-start period between probes.
    pub interval: Duration,
    /// Bound on one whole probe (connect plus any HTTP exchange); at most
    /// `interval`, so probes of one target never overlap.
    pub timeout: Duration,
    /// Consecutive successes that bring a Down backend back Up.
    pub rise: u32,
    /// Consecutive failures that take an Up backend Down.
    pub fall: u32,
    /// The network namespace (a name under /run/netns) probes connect
    /// from; `None`: the agent's own.
    pub netns: Option<String>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    #[error("health check interval must be greater than zero")]
    ZeroInterval,
    #[error("health check timeout must be greater than zero")]
    ZeroTimeout,
    #[error("health check timeout {timeout:?} exceeds the interval {interval:?}")]
    TimeoutExceedsInterval {
        timeout: Duration,
        interval: Duration,
    },
    #[error("health check rise must be at least 1")]
    ZeroRise,
    #[error("health check fall must be at least 1")]
    ZeroFall,
    #[error("health check path {path:?} must start with '/'")]
    RelativePath { path: String },
    #[error("health check path {path:?} is not a valid request target")]
    InvalidPath { path: String },
    #[error("health check host {host:?} is not a valid Host header")]
    InvalidHost { host: String },
    #[error("health check expected status {status} is outside 100..=599")]
    InvalidStatus { status: u16 },
}

impl CheckSpec {
    /// Checks the spec as config validation would; `Checker::set_targets`
    /// clamps invalid specs rather than refusing them.
    ///
    /// # Errors
    /// The first offending field, as a `HealthError`.
    pub fn validate(&self) -> Result<(), HealthError> {
        if self.interval.is_zero() {
            return Err(HealthError::ZeroInterval);
        }
        if self.timeout.is_zero() {
            return Err(HealthError::ZeroTimeout);
        }
        if self.timeout > self.interval {
            return Err(HealthError::TimeoutExceedsInterval {
                timeout: self.timeout,
                interval: self.interval,
            });
        }
        if self.rise == 0 {
            return Err(HealthError::ZeroRise);
        }
        if self.fall == 0 {
            return Err(HealthError::ZeroFall);
        }
        if let Probe::Http {
            path,
            expect_status,
            host,
        } = &self.probe
        {
            if !path.starts_with('/') {
                return Err(HealthError::RelativePath { path: path.clone() });
            }
            // Rejected here rather than failing every probe at run time.
            if path.parse::<Uri>().is_err() {
                return Err(HealthError::InvalidPath { path: path.clone() });
            }
            if let Some(host) = host
                && (host.is_empty() || HeaderValue::from_str(host).is_err())
            {
                return Err(HealthError::InvalidHost { host: host.clone() });
            }
            if !(100..=599).contains(expect_status) {
                return Err(HealthError::InvalidStatus {
                    status: *expect_status,
                });
            }
        }
        Ok(())
    }

    /// A spec the probe loop can run without panicking or overlapping probes.
    pub fn sanitized(&self) -> Self {
        let interval = self.interval.max(Duration::from_millis(1));
        let timeout = if self.timeout.is_zero() || self.timeout > interval {
            interval
        } else {
            self.timeout
        };
        Self {
            probe: self.probe.clone(),
            interval,
            timeout,
            rise: self.rise.max(1),
            fall: self.fall.max(1),
            netns: self.netns.clone(),
        }
    }
}
