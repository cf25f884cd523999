//! The load balancer's services, backends and Maglev tables: declared once,
//! built into both objects. The XDP object creates and pins them; the
//! socket object binds the same names to those pins, so the packet LB and
//! the socket LB balance by one set of tables and one backend health.
//! Written only by the control plane.

use aya_ebpf::{
    btf_maps::{Array as BtfArray, ArrayOfMaps},
    macros::{btf_map, map},
    maps::{Array, HashMap},
};
use sluice_common::lb::{self, Backend, Service, ServiceKey};

/// Services by (VIP, port, protocol), plus one marker entry per VIP (port
/// 0, protocol 0) so a packet costs one lookup to learn it is not for a VIP.
/// `MAX_SERVICES` x 2 entries (+ markers); the control plane refuses more.
#[map]
pub static LB_SERVICES: HashMap<ServiceKey, Service> =
    HashMap::with_max_entries(lb::MAX_SERVICES * 3, 0);

/// Backend slots (one per service member), indexed by slot. Fixed size;
/// the control plane refuses members beyond `MAX_BACKENDS`.
#[map]
pub static LB_BACKENDS: Array<Backend> = Array::with_max_entries(lb::MAX_BACKENDS, 0);

/// Per service id: its Maglev table (`TABLE_SIZE` backend slots). The
/// control plane builds a new table and swaps it in with one update.
#[btf_map]
pub static LB_MAGLEV: ArrayOfMaps<
    BtfArray<u32, { lb::TABLE_SIZE as usize }>,
    { lb::MAX_SERVICES as usize },
> = ArrayOfMaps::new();
