//! Host-side stub target: lets `sluice` name this crate as a build-dependency so
//! cargo re-runs its build script (which builds the real eBPF binary) whenever
//! this crate or `sluice-common` changes. The programs are in `main.rs`.
#![no_std]
