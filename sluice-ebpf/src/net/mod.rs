//! Packet bytes: bounded parsing, the bounds-checked pointer, checksums and
//! wire numbers. Leaves: nothing here knows a stage or a map.

pub mod csum;
pub mod parse;
pub mod proto;
pub mod ptr;
