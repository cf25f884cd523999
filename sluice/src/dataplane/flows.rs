//! The `FLOWS` ring as an async source of `FlowRecord`s for the agent's flow
//! reader. The ring has one read position: only one reader may drain it.

use std::{io, os::unix::fs::MetadataExt as _};

use aya::maps::{MapData, RingBuf};
use sluice_common::{FlowRecord, map_names};
use tokio::io::unix::AsyncFd;

use super::{DataplaneError, PinRoot, runtime};

/// Identity of the pinned `FLOWS` map (its pin's inode): it changes when the
/// last detach removed the maps and a later attach made new ones.
#[must_use]
pub fn ring_identity(root: &PinRoot) -> Option<u64> {
    std::fs::metadata(root.map(map_names::FLOWS))
        .ok()
        .map(|m| m.ino())
}

pub struct FlowRing {
    fd: AsyncFd<RingBuf<MapData>>,
    identity: Option<u64>,
    /// Ring entries too short to be a record (never expected).
    pub short: u64,
}

impl FlowRing {
    /// Opens the pinned ring for reading. Must run inside a tokio runtime
    /// (the fd is registered with its reactor).
    pub fn open(root: &PinRoot) -> Result<Self, DataplaneError> {
        let identity = ring_identity(root);
        let ring = runtime::open_ring(root, map_names::FLOWS)?;
        // SAFETY: the fd is the ring's own map fd: it stays open, and is the
        // same fd, for as long as the RingBuf (owned by the AsyncFd) lives.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| DataplaneError::Io {
                what: format!("polling {}", root.map(map_names::FLOWS).display()),
                source: e.into(),
            })?;
        Ok(Self {
            fd,
            identity,
            short: 0,
        })
    }

    /// The identity of the map this reader holds (see [`ring_identity`]).
    #[must_use]
    pub fn identity(&self) -> Option<u64> {
        self.identity
    }

    /// Waits until the ring has records, then moves at most `max` of them
    /// to `out`. Readiness is kept while records remain, so the next call
    /// returns at once.
    pub async fn read(&mut self, max: usize, out: &mut Vec<FlowRecord>) -> io::Result<()> {
        let mut guard = self.fd.readable_mut().await?;
        let (taken, short) = drain(guard.get_inner_mut(), max, out);
        self.short += short;
        if taken < max {
            guard.clear_ready();
        }
        Ok(())
    }

    /// Moves at most `max` records to `out` without waiting; returns how
    /// many were taken.
    pub fn drain_now(&mut self, max: usize, out: &mut Vec<FlowRecord>) -> usize {
        let (taken, short) = drain(self.fd.get_mut(), max, out);
        self.short += short;
        taken
    }
}

fn drain(ring: &mut RingBuf<MapData>, max: usize, out: &mut Vec<FlowRecord>) -> (usize, u64) {
    let mut taken = 0;
    let mut short = 0;
    while taken < max {
        let Some(item) = ring.next() else { break };
        taken += 1;
        if item.len() < size_of::<FlowRecord>() {
            short += 1;
            continue;
        }
        // SAFETY: the entry holds at least one FlowRecord, a plain-integer
        // repr(C) type for which every bit pattern is valid; the ring gives
        // no alignment promise beyond 8 bytes, so read unaligned.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowRecord>()) });
    }
    (taken, short)
}
