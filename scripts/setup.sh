#!/usr/bin/env bash
# Installs everything building, testing and demoing sluice needs, on a
# Debian-like host that has only the Rust toolchains (stable + nightly):
#   - Debian packages: LLVM 22 (for bpf-linker), clang, bpftool and the network
#     tools the tests, the demo and the benchmarks drive (ip, iptables, nft,
#     ipset, ping, ethtool, ...);
#   - rust-src for the nightly toolchain (the BPF target builds `core` itself);
#   - bpf-linker, built against LLVM 22;
#   - bpffs mounted at /sys/fs/bpf (where sluice pins its maps);
#   - for the Linux 6.1 test tier (sluice/tests/it/lts.rs): qemu and busybox
#     (Debian packages) and Debian's 6.1 cloud kernel, downloaded as a .deb
#     and unpacked into a cache directory (never installed into /boot).
#
# Idempotent: it only does what is missing, prints one line per thing it
# installs and nothing at all when everything is already there. Needs root
# (or sudo) only when something has to be installed. Never reads stdin.
set -euo pipefail

LLVM_PREFIX=/usr/lib/llvm-22
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
export PATH="$LLVM_PREFIX/bin:$CARGO_BIN:$PATH"
export DEBIAN_FRONTEND=noninteractive

# Packages sluice's own build/tests/demo/benchmarks use directly (ethtool: the
# benchmarks turn GRO on so a veth takes XDP_TX frames without an XDP program).
# The second line is what a bare image with only rustup may lack: make (the
# entry point), a C linker for Rust's host builds, python3 (demo UDP
# receiver), CA certificates (cargo).
PACKAGES=(
    llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev clang bpftool iproute2
    iptables nftables ipset iputils-ping tcpdump procps kmod ethtool
    make gcc libc6-dev python3 ca-certificates
    qemu-system-x86 busybox-static
)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root (directly, or through non-interactive sudo).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root to run: $*"
    fi
}

# Runs a command with its output kept in a log; shows the log only on failure.
quietly() {
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 </dev/null || rc=$?
    if [ "$rc" -ne 0 ]; then
        printf 'setup: error: command failed (exit %d): %s\n' "$rc" "$*" >&2
        tail -n 40 "$log" >&2
        rm -f "$log"
        exit "$rc"
    fi
    rm -f "$log"
}

# --- Debian packages ---------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: ${missing[*]}"
    for pkg in "${missing[@]}"; do say "installing $pkg (apt)"; done
    quietly as_root apt-get update -q
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends -o DPkg::Lock::Timeout=120 "${missing[@]}"
fi

# --- Rust: nightly + rust-src ----------------------------------------------
command -v rustup >/dev/null 2>&1 || die "rustup not found (expected in $CARGO_BIN)"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    say "installing the nightly Rust toolchain (rustup)"
    quietly rustup toolchain install nightly --profile minimal --component rust-src
fi
sysroot=$(rustc +nightly --print sysroot)
if [ ! -d "$sysroot/lib/rustlib/src/rust/library/core" ]; then
    say "installing rust-src for nightly (rustup)"
    quietly rustup component add rust-src --toolchain nightly
fi

# --- bpf-linker ----------------------------------------------------------------
if ! bpf-linker --version >/dev/null 2>&1; then
    say "installing bpf-linker (cargo install, built against LLVM 22; takes ~2 minutes)"
    quietly env LLVM_SYS_221_PREFIX="$LLVM_PREFIX" \
        cargo install bpf-linker --no-default-features --features llvm-22 --locked
fi

# --- bpffs -------------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
    say "mounting bpffs at /sys/fs/bpf"
    as_root mkdir -p /sys/fs/bpf
    as_root mount -t bpf bpf /sys/fs/bpf
fi

# --- Linux 6.1 for the LTS test tier ------------------------------------------
# Debian's 6.1 cloud kernel (the newest ABI apt offers; never a hard-coded
# number), unpacked under $LTS_CACHE/<package>_<version>, with
# $LTS_CACHE/current pointing at it. A failure here is not fatal: the tier
# then says it is skipped and why.
LTS_CACHE=${SLUICE_LTS_CACHE:-/var/cache/sluice/linux-6.1}
lts_package() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' 2>/dev/null \
        | awk '{print $1}' | sort -V | tail -n 1
}
lts_fetch() {
    local pkg version dir tmp
    pkg=$(lts_package)
    if [ -z "$pkg" ]; then
        quietly as_root apt-get update -q
        pkg=$(lts_package)
    fi
    if [ -z "$pkg" ]; then
        say "no Linux 6.1 cloud kernel package in apt's lists: the 6.1 test tier will be skipped"
        return 0
    fi
    version=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
    dir="$LTS_CACHE/${pkg}_${version}"
    if [ -f "$dir/.complete" ]; then
        [ "$(readlink "$LTS_CACHE/current" 2>/dev/null)" = "${pkg}_${version}" ] \
            || as_root ln -sfn "${pkg}_${version}" "$LTS_CACHE/current"
        return 0
    fi
    say "fetching $pkg $version for the 6.1 test tier (apt-get download into $LTS_CACHE)"
    as_root mkdir -p "$LTS_CACHE"
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && quietly apt-get download -q "$pkg=$version"); then
        rm -rf "$tmp"
        say "cannot download $pkg: the 6.1 test tier will be skipped"
        return 0
    fi
    as_root rm -rf "$dir"
    as_root mkdir -p "$dir"
    quietly as_root dpkg-deb -x "$tmp"/*.deb "$dir"
    rm -rf "$tmp"
    # The package leaves modules.dep to its install scripts: the tier needs
    # it to load veth, clsact and cls_bpf with their dependencies.
    local release
    release=$(basename "$dir"/boot/vmlinuz-* | sed 's/^vmlinuz-//')
    quietly as_root depmod -b "$dir" "$release"
    as_root touch "$dir/.complete"
    as_root ln -sfn "${pkg}_${version}" "$LTS_CACHE/current"
    # Only the current kernel is kept.
    for old in "$LTS_CACHE"/*_*; do
        [ "$old" = "$dir" ] || as_root rm -rf "$old"
    done
}
if [ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ]; then
    lts_fetch
elif [ ! -e "$LTS_CACHE/current" ]; then
    say "not an amd64 host: no Linux 6.1 cloud kernel; the 6.1 test tier will be skipped"
fi
