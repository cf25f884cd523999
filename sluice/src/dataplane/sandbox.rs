//! An unattached instance of the dataplane for BPF_PROG_TEST_RUN: the real
//! program and maps, pinned under a private root, driven by the same policy
//! code as the CLI. Used by packet tests and benchmarks; removed on drop.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};

use super::{
    DataplaneError,
    attach::pinned_program,
    pins::{self, PinRoot, RootLock},
    policy::PolicyMaps,
};

/// XDP return codes the program uses.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub struct Sandbox {
    root: PinRoot,
    prog: Xdp,
}

#[derive(Debug, Clone, Copy)]
pub struct RunResult {
    pub action: u32,
    /// Average time per run as the kernel measured it.
    pub duration: Duration,
}

impl Sandbox {
    /// Loads the program and creates fresh maps under
    /// `/sys/fs/bpf/sluice-sandbox-<pid>-<n>`.
    pub fn new() -> Result<Self, DataplaneError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let root = PinRoot::new(format!(
            "/sys/fs/bpf/sluice-sandbox-{}-{n}",
            std::process::id()
        ));
        pins::ensure_bpffs(&root.root)?;
        // A root left by an earlier process with the same pid is stale.
        pins::remove_tree(&root.root).map_err(|source| DataplaneError::Io {
            what: format!("removing stale {}", root.root.display()),
            source,
        })?;
        for dir in [root.root.clone(), root.maps_dir(), root.prog_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| DataplaneError::Io {
                what: format!("creating {}", dir.display()),
                source,
            })?;
        }
        let prog = {
            let _lock = RootLock::acquire(&root.root)?;
            pinned_program(&root)
        };
        match prog {
            Ok(prog) => Ok(Self { root, prog }),
            Err(e) => {
                let _ = pins::remove_tree(&root.root);
                Err(e)
            }
        }
    }

    pub fn root(&self) -> &PinRoot {
        &self.root
    }

    /// The policy maps, as the CLI sees them.
    pub fn policy(&self) -> Result<PolicyMaps, DataplaneError> {
        PolicyMaps::open(&self.root)
    }

    /// Runs the program once on `frame` (at least 14 bytes: the kernel
    /// refuses shorter test input).
    pub fn run(&self, frame: &[u8]) -> Result<RunResult, DataplaneError> {
        self.run_repeat(frame, 1)
    }

    /// Runs the program once on `frame` and returns the frame as the program
    /// left it (what `XDP_TX` would send).
    pub fn run_out(&self, frame: &[u8]) -> Result<(RunResult, Vec<u8>), DataplaneError> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        let r = self.prog.test_run(opts).map_err(|e| DataplaneError::Map {
            op: "test_run",
            map: "sluice_xdp",
            source: e.into(),
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((
            RunResult {
                action: r.return_value,
                duration: r.duration,
            },
            out,
        ))
    }

    /// Runs the program `repeat` times on `frame`; the duration is per run.
    pub fn run_repeat(&self, frame: &[u8], repeat: u32) -> Result<RunResult, DataplaneError> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let r = self.prog.test_run(opts).map_err(|e| DataplaneError::Map {
            op: "test_run",
            map: "sluice_xdp",
            source: format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )
            .into(),
        })?;
        Ok(RunResult {
            action: r.return_value,
            duration: r.duration,
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = pins::remove_tree(&self.root.root);
    }
}
