//! The `FLOWS` ring (and the socket layer's `SOCK_EVENTS` and `STEER_FLOWS`) as async
//! sources of records for the agent's flow reader. A ring has one read
//! position: only one reader may drain it.

use std::{io, marker::PhantomData, os::unix::fs::MetadataExt as _, path::Path};

use aya::maps::{MapData, RingBuf};
use sluice_common::{FlowRecord, map_names, sock::SockEvent};
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

/// Identity of the pinned `SOCK_EVENTS` ring (as [`ring_identity`]).
#[must_use]
pub fn sock_ring_identity(root: &PinRoot) -> Option<u64> {
    let s = super::sock::sock_root(root);
    std::fs::metadata(s.map(sluice_common::sock::sock_map_names::SOCK_EVENTS))
        .ok()
        .map(|m| m.ino())
}

/// Identity of the pinned `STEER_FLOWS` ring (as [`ring_identity`]).
#[must_use]
pub fn steer_ring_identity(root: &PinRoot) -> Option<u64> {
    let s = super::sock::sock_root(root);
    std::fs::metadata(s.map(sluice_common::steer::steer_map_names::STEER_FLOWS))
        .ok()
        .map(|m| m.ino())
}

/// A pinned ring of `T` records, read asynchronously.
pub struct Ring<T> {
    fd: AsyncFd<RingBuf<MapData>>,
    identity: Option<u64>,
    /// Ring entries too short to be a record (never expected).
    pub short: u64,
    _records: PhantomData<T>,
}

/// The flow records ring.
pub type FlowRing = Ring<FlowRecord>;
/// The socket layer's ring of denied and audited calls.
pub type SockRing = Ring<SockEvent>;

impl FlowRing {
    /// Opens the pinned ring for reading. Must run inside a tokio runtime
    /// (the fd is registered with its reactor).
    pub fn open(root: &PinRoot) -> Result<Self, DataplaneError> {
        let identity = ring_identity(root);
        let ring = runtime::open_ring(root, map_names::FLOWS)?;
        Self::register(ring, identity, &root.map(map_names::FLOWS))
    }
}

/// Opens steering's pinned ring of flow records (reason `steer`; as
/// [`FlowRing::open`]).
pub fn open_steer_ring(root: &PinRoot) -> Result<FlowRing, DataplaneError> {
    use sluice_common::steer::steer_map_names::STEER_FLOWS;
    let s = super::sock::sock_root(root);
    let identity = steer_ring_identity(root);
    let ring = runtime::open_ring(&s, STEER_FLOWS)?;
    FlowRing::register(ring, identity, &s.map(STEER_FLOWS))
}

impl SockRing {
    /// Opens the socket layer's pinned ring (as [`FlowRing::open`]).
    pub fn open(root: &PinRoot) -> Result<Self, DataplaneError> {
        use sluice_common::sock::sock_map_names::SOCK_EVENTS;
        let s = super::sock::sock_root(root);
        let identity = sock_ring_identity(root);
        let ring = runtime::open_ring(&s, SOCK_EVENTS)?;
        Self::register(ring, identity, &s.map(SOCK_EVENTS))
    }
}

impl<T: Copy> Ring<T> {
    fn register(
        ring: runtime::Ring,
        identity: Option<u64>,
        path: &Path,
    ) -> Result<Self, DataplaneError> {
        // SAFETY: the fd is the ring's own map fd: it stays open, and is the
        // same fd, for as long as the RingBuf (owned by the AsyncFd) lives.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| DataplaneError::Io {
                what: format!("polling {}", path.display()),
                source: e.into(),
            })?;
        Ok(Self {
            fd,
            identity,
            short: 0,
            _records: PhantomData,
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
    pub async fn read(&mut self, max: usize, out: &mut Vec<T>) -> io::Result<()> {
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
    pub fn drain_now(&mut self, max: usize, out: &mut Vec<T>) -> usize {
        let (taken, short) = drain(self.fd.get_mut(), max, out);
        self.short += short;
        taken
    }
}

/// Takes at most `max` records. `T` is one of the rings' record types
/// (`FlowRecord`, `SockEvent`): plain-integer `repr(C)` types for which
/// every bit pattern is valid.
fn drain<T: Copy>(ring: &mut RingBuf<MapData>, max: usize, out: &mut Vec<T>) -> (usize, u64) {
    let mut taken = 0;
    let mut short = 0;
    while taken < max {
        let Some(item) = ring.next() else { break };
        taken += 1;
        if item.len() < size_of::<T>() {
            short += 1;
            continue;
        }
        // SAFETY: the entry holds at least one T, a plain-integer repr(C)
        // type (see above); the ring gives no alignment promise beyond 8
        // bytes, so read unaligned.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) });
    }
    (taken, short)
}
