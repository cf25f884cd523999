//! Types shared by sluice's kernel programs and user space: map names, key and
//! value layouts, capacities and the verdict/reason vocabulary. One definition
//! each, in one module per concern, each type's `aya::Pod` impl (feature
//! "user") beside it. Everything but `lb`, `handoff` and `sock` is also
//! reachable from the crate root, as it was before the split.
#![no_std]

pub mod addr;
pub mod ddos;
pub mod firewall;
pub mod handoff;
pub mod lb;
pub mod names;
pub mod observe;
pub mod packet;
pub mod settings;
pub mod sock;
pub mod steer;
pub mod verdict;

pub use addr::*;
pub use ddos::*;
pub use firewall::*;
pub use names::*;
pub use observe::*;
pub use packet::*;
pub use verdict::*;
