//! The frames the benchmarks feed the programs: sluice's own frame builder
//! (`sluice::model::frame`, also what `sluice explain` runs the program on).

pub use sluice::model::frame::*;
