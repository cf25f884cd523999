//! Builds the kernel programs (sluice-ebpf) with aya-build, after checking that
//! the toolchain it needs is present and saying exactly what is missing if not.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

fn check_toolchain() -> anyhow::Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    match nightly {
        Ok(out) if out.status.success() => {}
        _ => bail!(
            "the nightly Rust toolchain is missing; sluice's kernel programs need it \
             (run `make setup`, or `rustup toolchain install nightly`)"
        ),
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("running rustc +nightly --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        bail!(
            "rust-src for the nightly toolchain is missing; it is needed to build core for \
             the BPF target (run `make setup`, or `rustup component add rust-src --toolchain nightly`)"
        );
    }
    if which::which("bpf-linker").is_err() {
        bail!(
            "bpf-linker is not on PATH; it links sluice's kernel programs (run `make setup`, or \
             `cargo install bpf-linker --no-default-features --features llvm-22` with \
             LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 after `apt-get install llvm-22-dev`)"
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    if std::env::var_os("AYA_BUILD_SKIP").is_none() {
        check_toolchain()?;
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?)
        .join("../sluice-ebpf")
        .canonicalize()
        .context("locating sluice-ebpf")?;
    let root = root.to_str().context("sluice-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "sluice-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
