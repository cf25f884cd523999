//! Shared test plumbing: frame builders, the reference model of the verdict
//! logic, network-namespace guards, the kernel-program harness, and a driver
//! for the `sluice` binary.

pub mod agent;
pub mod cgroup;
pub mod cli;
pub mod frames;
pub mod guest;
pub mod kernel;
pub mod model;
pub mod netns;
pub mod openapi;
pub mod rate;

use std::sync::{Mutex, MutexGuard};

/// Held by tests that keep a CPU (or both) busy for seconds to minutes: a
/// SYN flood, the Linux 6.1 guest. All tests share one process now, so two
/// of these would otherwise measure (or slow down) each other.
pub fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
