//! A throwaway Linux guest for the kernel-compatibility tier: Debian's 6.1
//! cloud kernel booted in qemu (TCG) from an initramfs built here, holding
//! this build's test binary, its shared libraries and the tools it runs.
//!
//! Nothing is installed into the guest at run time: the initramfs is the
//! whole root filesystem. Suites run one after another from a small shell
//! init (busybox); their output comes back on a second serial port, kept
//! apart from the kernel's console, framed by marker lines with each
//! suite's exit status and wall time.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::BufWriter,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Where `make setup` unpacks the kernel package (`current` points at the
/// newest one); `SLUICE_LTS_KERNEL` overrides it with another unpacked
/// package directory.
pub const KERNEL_CACHE: &str = "/var/cache/sluice/linux-6.1/current";
const QEMU: &str = "qemu-system-x86_64";
const BUSYBOX: &str = "/bin/busybox";
/// Host tools the suites run, copied with their shared libraries (busybox
/// stands in for everything else).
const HOST_TOOLS: &[&str] = &[
    "ip",
    "tc",
    "ping",
    "bpftool",
    "setpriv",
    "sysctl",
    "mountpoint",
    "ethtool",
];
/// Kernel modules the suites need (veth pairs, clsact and its BPF filter);
/// their dependencies come along.
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];
/// Marker that starts every framing line on the results port.
const MARK: &str = "@@sluice-guest";

/// One suite to run in the guest: the test binary run once with these
/// tests named exactly.
#[derive(Debug, Clone)]
pub struct GuestSuite {
    pub name: String,
    /// Full test names (`module::test`), passed with `--exact`.
    pub tests: Vec<String>,
    /// Upper bound for the suite inside the guest (it is killed past it).
    pub limit: Duration,
}

/// What one suite did in the guest.
#[derive(Debug, Clone)]
pub struct SuiteResult {
    /// The binary's exit status; `None` when the guest never reported one
    /// (it crashed or timed out first).
    pub status: Option<i32>,
    pub seconds: u64,
    pub output: String,
}

#[derive(Debug)]
pub struct GuestRun {
    pub kernel_release: String,
    pub results: BTreeMap<String, SuiteResult>,
    /// The kernel's console (boot messages, warnings, panics).
    pub console: String,
    pub wall: Duration,
    pub boot: Option<Duration>,
    /// The guest kernel reported a soft lockup and was stopped at once (its
    /// suites cannot finish: a CPU spins in the kernel).
    pub lockup: bool,
}

/// Why the guest cannot run on this machine.
#[derive(Debug)]
pub struct Unavailable(pub String);

/// The kernel package unpacked on the host: its image and module tree.
#[derive(Debug)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub release: String,
    pub modules: PathBuf,
}

impl Kernel {
    pub fn find() -> Result<Kernel, Unavailable> {
        let root = std::env::var_os("SLUICE_LTS_KERNEL")
            .map_or_else(|| PathBuf::from(KERNEL_CACHE), PathBuf::from);
        let boot = root.join("boot");
        let vmlinuz = std::fs::read_dir(&boot)
            .ok()
            .and_then(|rd| {
                rd.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
                })
            })
            .ok_or_else(|| {
                Unavailable(format!(
                    "no Linux 6.1 kernel in {} (`make setup` fetches Debian's package)",
                    boot.display()
                ))
            })?;
        let release = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap_or_default()
            .to_owned();
        let modules = root.join("lib/modules").join(&release);
        if !modules.join("modules.dep").is_file() {
            return Err(Unavailable(format!(
                "kernel {release} has no module tree at {}",
                modules.display()
            )));
        }
        Ok(Kernel {
            vmlinuz,
            release,
            modules,
        })
    }

    /// `names` and everything they depend on, dependencies first, as paths
    /// relative to the module tree.
    fn module_closure(&self, names: &[&str]) -> Vec<String> {
        let dep =
            std::fs::read_to_string(self.modules.join("modules.dep")).expect("read modules.dep");
        let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in dep.lines() {
            let Some((m, rest)) = line.split_once(':') else {
                continue;
            };
            deps.insert(
                m.to_owned(),
                rest.split_whitespace().map(str::to_owned).collect(),
            );
        }
        let path_of = |name: &str| {
            deps.keys()
                .find(|k| {
                    Path::new(k)
                        .file_name()
                        .is_some_and(|f| f.to_string_lossy() == format!("{name}.ko"))
                })
                .cloned()
                .unwrap_or_else(|| panic!("module {name} is not in {}", self.release))
        };
        fn visit(
            m: &str,
            deps: &BTreeMap<String, Vec<String>>,
            seen: &mut BTreeSet<String>,
            out: &mut Vec<String>,
        ) {
            if !seen.insert(m.to_owned()) {
                return;
            }
            for d in deps.get(m).into_iter().flatten() {
                visit(d, deps, seen, out);
            }
            out.push(m.to_owned());
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for n in names {
            visit(&path_of(n), &deps, &mut seen, &mut out);
        }
        out
    }
}

/// Finds a program on PATH.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Everything needed to boot the guest, or why it cannot be.
pub fn preflight() -> Result<(Kernel, PathBuf), Unavailable> {
    let qemu = which(QEMU).ok_or_else(|| {
        Unavailable(format!(
            "{QEMU} not found (`make setup` installs qemu-system-x86)"
        ))
    })?;
    let kernel = Kernel::find()?;
    if !Path::new(BUSYBOX).is_file() {
        return Err(Unavailable(format!(
            "{BUSYBOX} not found (`make setup` installs busybox-static)"
        )));
    }
    for tool in HOST_TOOLS {
        if which(tool).is_none() {
            return Err(Unavailable(format!("{tool} not found (`make setup`)")));
        }
    }
    Ok((kernel, qemu))
}

// ---------------------------------------------------------------------------
// The initramfs
// ---------------------------------------------------------------------------

/// A `newc` cpio archive written entry by entry (the format the kernel
/// unpacks into its root filesystem).
struct Cpio<W: std::io::Write> {
    out: W,
    ino: u32,
    dirs: BTreeSet<PathBuf>,
    files: BTreeSet<PathBuf>,
}

impl<W: std::io::Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            dirs: BTreeSet::new(),
            files: BTreeSet::new(),
        }
    }

    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: usize) {
        let name_len = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            u32::try_from(size).expect("file under 4 GiB"),
            0,
            0,
            0,
            0,
            u32::try_from(name_len).expect("short name"),
            0,
        ];
        self.ino += 1;
        let mut h = String::from("070701");
        for f in fields {
            h.push_str(&format!("{f:08X}"));
        }
        self.out.write_all(h.as_bytes()).expect("write cpio");
        self.out.write_all(name.as_bytes()).expect("write cpio");
        self.out.write_all(&[0]).expect("write cpio");
        self.pad(h.len() + name_len);
    }

    fn pad(&mut self, len: usize) {
        let n = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..n]).expect("write cpio");
    }

    /// Directory `path` (absolute, in the guest) and its parents.
    fn dir(&mut self, path: &Path) {
        if path == Path::new("/") || self.dirs.contains(path) {
            return;
        }
        if let Some(parent) = path.parent() {
            self.dir(parent);
        }
        self.dirs.insert(path.to_owned());
        let name = path.to_string_lossy();
        self.header(name.trim_start_matches('/'), 0o040_755, 2, 0);
    }

    fn file(&mut self, path: &Path, mode: u32, data: &[u8]) {
        if !self.files.insert(path.to_owned()) {
            return;
        }
        if let Some(parent) = path.parent() {
            self.dir(parent);
        }
        let name = path.to_string_lossy();
        self.header(
            name.trim_start_matches('/'),
            0o100_000 | mode,
            1,
            data.len(),
        );
        self.out.write_all(data).expect("write cpio");
        self.pad(data.len());
    }

    fn symlink(&mut self, path: &Path, target: &str) {
        if !self.files.insert(path.to_owned()) {
            return;
        }
        if let Some(parent) = path.parent() {
            self.dir(parent);
        }
        let name = path.to_string_lossy();
        self.header(name.trim_start_matches('/'), 0o120_777, 1, target.len());
        self.out.write_all(target.as_bytes()).expect("write cpio");
        self.pad(target.len());
    }

    /// A host file at the same path in the guest (symlinks resolved).
    fn host_file(&mut self, path: &Path) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mode = std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o755);
        self.file(path, mode, &data);
    }

    fn finish(mut self) {
        self.header("TRAILER!!!", 0, 1, 0);
        self.out.flush().expect("flush cpio");
    }
}

/// The shared libraries `binary` loads (ldd), including the dynamic loader.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("ldd {}: {e}", binary.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    libs
}

/// A host binary for the guest: debug information stripped (the suites'
/// binaries are mostly DWARF), at the same absolute path.
fn add_binary(cpio: &mut Cpio<impl std::io::Write>, path: &Path, scratch: &Path) {
    let stripped = scratch.join("stripped");
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(path)
        .arg(&stripped)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let data = if ok {
        std::fs::read(&stripped).expect("read stripped binary")
    } else {
        std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    };
    cpio.file(path, 0o755, &data);
    for lib in shared_libraries(path) {
        cpio.host_file(&lib);
        // The loader is asked for by its canonical name too.
        if let Ok(real) = std::fs::canonicalize(&lib)
            && real != lib
        {
            cpio.host_file(&real);
        }
    }
}

/// The shell that runs inside the guest as PID 1. /tmp stays the
/// initramfs's own (already in RAM): a tmpfs there would hide the binaries
/// of a checkout under /tmp, which sit at their host paths.
fn init_script(
    kernel: &Kernel,
    modules: &[String],
    binary: &Path,
    suites: &[GuestSuite],
) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 SLUICE_GUEST=1\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs run /run\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null\n\
         mkdir -p /run/netns\n\
         ip link set lo up\n\
         exec 3>/dev/ttyS1\n",
    );
    s.push_str(&format!("echo \"{MARK} boot $(cat /proc/uptime)\" >&3\n"));
    for m in modules {
        s.push_str(&format!(
            "insmod /lib/modules/{}/{m} || echo \"{MARK} insmod-failed {m}\" >&3\n",
            kernel.release
        ));
    }
    for suite in suites {
        let args: Vec<String> = suite.tests.iter().map(|t| format!("'{t}'")).collect();
        s.push_str(&format!(
            "echo \"{MARK} begin {name}\" >&3\n\
             start=$(date +%s)\n\
             timeout -s KILL {limit} {path} --test-threads=2 --exact {args} >&3 2>&3 </dev/null\n\
             rc=$?\n\
             echo \"{MARK} end {name} $rc $(( $(date +%s) - start ))\" >&3\n",
            name = suite.name,
            limit = suite.limit.as_secs(),
            path = binary.display(),
            args = args.join(" "),
        ));
    }
    s.push_str(&format!("echo \"{MARK} done\" >&3\nsync\npoweroff -f\n"));
    s
}

/// Writes the initramfs that runs `suites` of the test `binary`.
fn build_initramfs(
    kernel: &Kernel,
    binary: &Path,
    suites: &[GuestSuite],
    extra_binaries: &[PathBuf],
    out: &Path,
    scratch: &Path,
) {
    let file = std::fs::File::create(out).expect("create initramfs");
    let mut cpio = Cpio::new(BufWriter::new(file));
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/root",
        "/etc",
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
    ] {
        cpio.dir(Path::new(d));
    }
    cpio.symlink(Path::new("/var/run"), "/run");
    cpio.file(
        Path::new("/etc/passwd"),
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    );
    cpio.file(
        Path::new("/etc/group"),
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n",
    );
    // busybox for the shell and everything no host tool provides.
    cpio.host_file(Path::new(BUSYBOX));
    let mut tools = BTreeSet::new();
    for tool in HOST_TOOLS {
        let path = which(tool).expect("checked by preflight");
        add_binary(&mut cpio, &path, scratch);
        tools.insert((*tool).to_owned());
        // Reachable on PATH whatever directory it lives in on the host.
        cpio.symlink(
            &Path::new("/usr/local/bin").join(tool),
            &path.to_string_lossy(),
        );
    }
    let applets = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if !tools.contains(applet) && applet != "busybox" {
            cpio.symlink(&Path::new("/bin").join(applet), BUSYBOX);
        }
    }
    let modules = kernel.module_closure(MODULES);
    for m in &modules {
        let data = std::fs::read(kernel.modules.join(m)).expect("read module");
        cpio.file(
            &Path::new("/lib/modules").join(&kernel.release).join(m),
            0o644,
            &data,
        );
    }
    add_binary(&mut cpio, binary, scratch);
    for path in extra_binaries {
        add_binary(&mut cpio, path, scratch);
    }
    let init = init_script(kernel, &modules, binary, suites);
    cpio.file(Path::new("/init"), 0o755, init.as_bytes());
    cpio.finish();
}

/// Parses the results port: `begin NAME`, output lines, `end NAME RC SECONDS`.
fn parse_results(text: &str) -> (BTreeMap<String, SuiteResult>, Option<Duration>) {
    let mut results = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let mut boot = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix(MARK) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                ["boot", uptime, ..] => {
                    boot = uptime.parse::<f64>().ok().map(Duration::from_secs_f64);
                }
                ["begin", name] => current = Some(((*name).to_owned(), String::new())),
                ["end", name, rc, secs] => {
                    let output = current.take().map(|(_, o)| o).unwrap_or_default();
                    results.insert(
                        (*name).to_owned(),
                        SuiteResult {
                            status: rc.parse().ok(),
                            seconds: secs.parse().unwrap_or(0),
                            output,
                        },
                    );
                }
                _ => {}
            }
        } else if let Some((_, out)) = current.as_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    // A suite that began but never ended: the guest died under it.
    if let Some((name, output)) = current {
        results.insert(
            name,
            SuiteResult {
                status: None,
                seconds: 0,
                output,
            },
        );
    }
    (results, boot)
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sluice-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boots the guest to run `suites` of the test `binary` and waits for it
/// (at most `limit`). `extra_binaries` go into the guest at their host
/// paths too (the CLI the suites run).
pub fn run(
    kernel: &Kernel,
    qemu: &Path,
    binary: &Path,
    suites: &[GuestSuite],
    extra_binaries: &[PathBuf],
    limit: Duration,
) -> GuestRun {
    let start = Instant::now();
    let scratch = Scratch::new("guest");
    let initramfs = scratch.0.join("initramfs.cpio");
    build_initramfs(
        kernel,
        binary,
        suites,
        extra_binaries,
        &initramfs,
        &scratch.0,
    );
    let console = scratch.0.join("console.log");
    let results = scratch.0.join("results.log");
    let mut child = Command::new(qemu)
        .args(["-machine", "q35", "-cpu", "max", "-m", "3072", "-smp", "2"])
        .args(["-display", "none", "-no-reboot", "-nodefaults"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .args([
            "-append",
            // loglevel 5: a soft lockup's or RCU stall's stack dump
            // (default level) reaches the console, for diagnosis.
            "console=ttyS0 panic=-1 oops=panic loglevel=5 rdinit=/init",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", qemu.display()));
    let deadline = Instant::now() + limit;
    let mut lockup = false;
    let mut checked = Instant::now();
    let timed_out = loop {
        match child.try_wait().expect("wait for qemu") {
            Some(_) => break false,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break true;
            }
            None => {
                // A soft lockup never ends by itself (the in-guest time
                // limits need a CPU that schedules): stop the guest now
                // rather than at the whole tier's limit.
                if checked.elapsed() >= Duration::from_secs(2) {
                    checked = Instant::now();
                    if std::fs::read_to_string(&console)
                        .is_ok_and(|c| c.contains("watchdog: BUG: soft lockup"))
                    {
                        std::thread::sleep(Duration::from_secs(2)); // its stack dump
                        let _ = child.kill();
                        let _ = child.wait();
                        lockup = true;
                        break false;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let mut console_text = std::fs::read_to_string(&console).unwrap_or_default();
    if timed_out {
        console_text.push_str(&format!("\n[host] guest killed after {limit:?}\n"));
    }
    if lockup {
        console_text.push_str("\n[host] guest stopped: its kernel reported a soft lockup\n");
    }
    if !stderr.trim().is_empty() {
        console_text.push_str(&format!("\n[host] qemu stderr:\n{stderr}"));
    }
    let text = std::fs::read_to_string(&results).unwrap_or_default();
    let (results, boot) = parse_results(&text);
    GuestRun {
        kernel_release: kernel.release.clone(),
        results,
        console: console_text,
        wall: start.elapsed(),
        boot,
        lockup,
    }
}
