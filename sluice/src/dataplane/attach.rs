//! Attaching the XDP program to interfaces, detaching it, and reporting what
//! is attached where. Links are pinned so filtering outlives the command.

use std::{os::fd::AsFd as _, path::Path};

use aya::{
    EbpfLoader,
    programs::{
        ProgramInfo, SchedClassifier, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use aya_obj::programs::XdpAttachType;
use sluice_common::{
    JUMP_LB, JUMP_SYN_CHALLENGE, LB_PROGRAM, ListId, SYN_CHALLENGE_PROGRAM, TC_EGRESS_PROGRAM,
    Verdict, XDP_PROGRAM, map_names,
};

use super::{
    DataplaneError, OBJECT,
    pins::{self, PinRoot, RootLock},
    policy::PolicyMaps,
    sys, tc,
};

pub use sluice_common::settings::AttachMode;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AttachReport {
    pub interface: String,
    pub netns: String,
    pub mode: AttachMode,
    /// The mode asked for was native and the driver refused it.
    pub fell_back: bool,
    /// Already attached: the pinned link was re-adopted, nothing changed.
    pub readopted: bool,
    pub program_id: u32,
    pub link_id: u32,
    /// Map pins that were put back to the maps the programs read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<super::integrity::Finding>,
    /// The TC egress attachment made or re-adopted with it.
    #[serde(default)]
    pub tc: Option<tc::TcStatus>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DetachReport {
    pub interface: String,
    pub netns: String,
    /// This was the last attachment: the program and every map pin were removed.
    pub removed_all: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub netns: String,
    pub mode: AttachMode,
    pub link_id: u32,
    pub program_id: u32,
    /// The interface index the link is attached to; 0 when the interface is gone.
    pub ifindex: u32,
    /// The TC egress attachment on the same interface: TCX, or the clsact
    /// fallback on kernels without TCX.
    #[serde(default)]
    pub tc: Option<tc::TcStatus>,
    /// For a veth: whether its peer runs an XDP program in native mode
    /// (without one, frames sent back with `XDP_TX` — the SYN guard's
    /// challenges — never reach the peer). `None`: not a veth, or unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_native_xdp: Option<bool>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProgramStatus {
    pub id: u32,
    pub tag: String,
    pub name: String,
    /// Run count and total run time: only counted while
    /// `kernel.bpf_stats_enabled` is 1.
    pub bpf_stats_enabled: bool,
    pub run_count: u64,
    pub run_time_ns: u64,
    pub jited_bytes: u32,
    pub verified_insns: Option<u32>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ListStatus {
    pub list: String,
    pub family: String,
    pub entries: u32,
    pub capacity: u32,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub pin_root: String,
    pub attachments: Vec<Attachment>,
    pub program: Option<ProgramStatus>,
    pub generation: Option<u32>,
    pub default_action: Option<String>,
    pub malformed_action: Option<String>,
    /// Policy-wide audit mode.
    #[serde(default)]
    pub audit: Option<bool>,
    pub rules: Option<u32>,
    pub rule_capacity: u32,
    /// The rules hold a `syn-guard` rule.
    #[serde(default)]
    pub syn_guard: Option<bool>,
    pub lists: Vec<ListStatus>,
    /// Load-balanced services: backends in each state.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// Whether the pinned maps are the ones the live programs read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<super::integrity::Report>,
    /// Every program: the XDP entry, the programs it tail-calls, TC egress.
    #[serde(default)]
    pub programs: Vec<ProgramStatus>,
    /// Cgroups the socket programs are linked to (workloads).
    #[serde(default)]
    pub cgroups: Vec<CgroupLinks>,
    /// The socket LB, when it is linked to the root cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_lb: Option<super::sock_lb::SockLbState>,
    /// sk_lookup steering, when linked to a network namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steer: Option<super::steer::SteerStatus>,
}

/// The socket programs linked to one cgroup.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CgroupLinks {
    pub cgroup_id: u64,
    /// The cgroup's path; `None` when no cgroup has that id any more.
    pub path: Option<String>,
    pub hooks: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub mode: String,
    pub backends: usize,
    /// Taking new connections.
    pub active: usize,
    pub draining: usize,
    /// Failed their health checks.
    pub down: usize,
}

/// Pin name of a link: `<netns>:<ifname>:<mode>` (interface names cannot
/// contain ':', so the last two fields split cleanly).
fn link_pin_name(netns: &str, iface: &str, mode: AttachMode) -> String {
    format!("{netns}:{iface}:{}", mode.name())
}

fn parse_link_pin_name(name: &str) -> Option<(String, String, AttachMode)> {
    let mut parts = name.rsplitn(3, ':');
    let mode = AttachMode::attached_from_name(parts.next()?)?;
    let iface = parts.next()?.to_string();
    let netns = parts.next()?.to_string();
    Some((netns, iface, mode))
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            DataplaneError::Permission { what }
        } else {
            DataplaneError::Io { what, source }
        }
    }
}

/// The interfaces attached under `root` in the namespace labelled `netns`
/// (as pins and `status` name it), in name order.
pub fn attached_in(root: &PinRoot, netns: &str) -> Result<Vec<String>, DataplaneError> {
    Ok(pinned_links(root)?
        .into_iter()
        .filter(|(ns, ..)| ns == netns)
        .map(|(_, iface, ..)| iface)
        .collect())
}

/// The pinned links of `root`, parsed from their pin names.
fn pinned_links(
    root: &PinRoot,
) -> Result<Vec<(String, String, AttachMode, std::path::PathBuf)>, DataplaneError> {
    let dir = root.links_dir();
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    for e in entries {
        let e = e.map_err(io_err(format!("reading {}", dir.display())))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((netns, iface, mode)) = parse_link_pin_name(&name) {
            out.push((netns, iface, mode, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Loads the program (creating or re-using the pinned maps) and pins it, or
/// opens the program already pinned.
pub(crate) fn pinned_program(root: &PinRoot) -> Result<Xdp, DataplaneError> {
    let specs = pins::expected_maps(OBJECT)?;
    pins::check_pinned_maps(root, &specs)?;
    if root.prog().exists() {
        return Xdp::from_pin(root.prog(), XdpAttachType::Interface).map_err(|e| {
            DataplaneError::PinnedMap {
                path: root.prog(),
                source: e.into(),
            }
        });
    }
    let preexisting: Vec<bool> = specs.iter().map(|s| root.map(&s.name).exists()).collect();
    let cleanup = |root: &PinRoot| {
        for (spec, existed) in specs.iter().zip(&preexisting) {
            if !existed {
                let _ = std::fs::remove_file(root.map(&spec.name));
            }
        }
    };
    let result = (|| {
        let mut ebpf = load_program(root, &specs)?;
        let _ = std::fs::remove_file(tc::prog_path(root));
        tc_of(&mut ebpf)?
            .pin(tc::prog_path(root))
            .map_err(|e| DataplaneError::Io {
                what: format!("pinning {}", tc::prog_path(root).display()),
                source: std::io::Error::other(e.to_string()),
            })?;
        let prog = xdp_of(&mut ebpf)?;
        // Settings must be initialised before any interface sees the program.
        PolicyMapsInit::run(root)?;
        super::runtime::initialise_if_needed(root)?;
        super::lb::initialise_if_needed(root)?;
        prog.pin(root.prog()).map_err(|e| DataplaneError::Io {
            what: format!("pinning {}", root.prog().display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        pins::stamp_program(root)?;
        Xdp::from_pin(root.prog(), XdpAttachType::Interface).map_err(|e| {
            DataplaneError::PinnedMap {
                path: root.prog(),
                source: e.into(),
            }
        })
    })();
    if result.is_err() {
        cleanup(root);
        let _ = std::fs::remove_file(root.prog());
        let _ = std::fs::remove_file(tc::prog_path(root));
    }
    result
}

/// Creates and pins `LB_MAGLEV` (an array of Maglev tables) when it is not
/// pinned yet. Made here rather than by aya: aya creates the inner-map
/// template with the object's BTF ids even when it loaded no BTF, which the
/// kernel refuses; the loader then re-uses this pin.
pub(crate) fn create_maglev_outer(root: &PinRoot) -> Result<(), DataplaneError> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
    let path = root.map(map_names::LB_MAGLEV);
    if path.exists() {
        return Ok(());
    }
    let err = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source: std::io::Error| DataplaneError::Io { what, source }
    };
    let inner = sys::map_create(
        BPF_MAP_TYPE_ARRAY,
        4,
        4,
        sluice_common::lb::TABLE_SIZE,
        "lb_maglev_tmpl",
        None,
    )
    .map_err(err("creating the inner template of"))?;
    let outer = sys::map_create(
        BPF_MAP_TYPE_ARRAY_OF_MAPS,
        4,
        4,
        sluice_common::lb::MAX_SERVICES,
        map_names::LB_MAGLEV,
        Some(inner.as_fd()),
    )
    .map_err(err("creating"))?;
    sys::obj_pin(outer.as_fd(), &path).map_err(err("pinning"))
}

/// Loads this build's object with every map bound to its pin under `root`
/// (created when missing, re-used when present) and the XDP program loaded
/// into the kernel (verified), not yet pinned or attached.
fn load_program(root: &PinRoot, specs: &[pins::MapSpec]) -> Result<aya::Ebpf, DataplaneError> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(String, std::path::PathBuf)> = specs
        .iter()
        .map(|s| (s.name.clone(), root.map(&s.name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name.as_str(), path.as_path());
    }
    // Used only when the table is created; a pinned one keeps its size.
    loader.map_max_entries(map_names::LB_CONNS, root.conn_capacity);
    create_maglev_outer(root)?;
    let mut ebpf = loader.load(OBJECT).map_err(|e| {
        if super::is_permission(&e) {
            DataplaneError::Permission {
                what: "loading the XDP program".into(),
            }
        } else {
            DataplaneError::Load { source: e.into() }
        }
    })?;
    xdp_of(&mut ebpf)?
        .load()
        .map_err(|e| load_error(XDP_PROGRAM, e))?;
    fill_jumps(&mut ebpf)?;
    tc_of(&mut ebpf)?
        .load()
        .map_err(|e| load_error(TC_EGRESS_PROGRAM, e))?;
    Ok(ebpf)
}

/// Loads the programs `sluice_xdp` tail-calls and puts them in its pinned
/// `JUMP` map (which keeps them loaded; an upgrade replaces them).
fn fill_jumps(ebpf: &mut aya::Ebpf) -> Result<(), DataplaneError> {
    let fd = load_jump_target(ebpf, SYN_CHALLENGE_PROGRAM)?;
    let lb_fd = load_jump_target(ebpf, LB_PROGRAM)?;
    let map = ebpf
        .map_mut(map_names::JUMP)
        .ok_or_else(|| load_err(format!("map {} missing from the object", map_names::JUMP)))?;
    let mut jump = aya::maps::ProgramArray::try_from(map)
        .map_err(|e| DataplaneError::map_err("open", map_names::JUMP, e))?;
    jump.set(JUMP_SYN_CHALLENGE, &fd, 0)
        .map_err(|e| DataplaneError::map_err("write", map_names::JUMP, e))?;
    jump.set(JUMP_LB, &lb_fd, 0)
        .map_err(|e| DataplaneError::map_err("write", map_names::JUMP, e))?;
    Ok(())
}

fn load_err(source: impl Into<super::Cause>) -> DataplaneError {
    DataplaneError::Load {
        source: source.into(),
    }
}

/// Loads a program `sluice_xdp` tail-calls and returns its fd.
fn load_jump_target(
    ebpf: &mut aya::Ebpf,
    name: &str,
) -> Result<aya::programs::ProgramFd, DataplaneError> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| load_err(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| load_err(e))?;
    prog.load().map_err(|e| load_error(name, e))?;
    prog.fd().map_err(load_err)?.try_clone().map_err(load_err)
}

/// The TC egress program of a loaded object (loaded into the kernel).
fn tc_of(ebpf: &mut aya::Ebpf) -> Result<&mut SchedClassifier, DataplaneError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(TC_EGRESS_PROGRAM)
        .ok_or_else(|| {
            load_err(format!(
                "program {TC_EGRESS_PROGRAM} missing from the object"
            ))
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| load_err(e))?;
    Ok(prog)
}

/// Attaches the TC egress program (reverse NAT) to `iface`, or re-adopts
/// its pinned attachment; adds the interface to the LB's redirect targets.
fn attach_tc(
    root: &PinRoot,
    iface: &str,
    index: u32,
    netns: &str,
) -> Result<tc::TcStatus, DataplaneError> {
    super::lb::add_tx_port(root, index)?;
    tc::attach(root, iface, index, netns)
}

/// Removes the TC egress attachment of `iface` and the interface from the
/// redirect targets.
fn detach_tc(root: &PinRoot, iface: &str, netns: &str) {
    let index = sys::ifindex(iface);
    tc::detach(root, iface, index, netns);
    if let Some(index) = index {
        let _ = super::lb::remove_tx_port(root, index);
    }
}

fn xdp_of(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp, DataplaneError> {
    ebpf.program_mut(XDP_PROGRAM)
        .ok_or_else(|| DataplaneError::Load {
            source: format!("program {XDP_PROGRAM} missing from the object").into(),
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load { source: e.into() })
}

/// Initialises fresh settings without taking the root lock (the caller holds it).
struct PolicyMapsInit;

impl PolicyMapsInit {
    fn run(root: &PinRoot) -> Result<(), DataplaneError> {
        let mut maps = PolicyMaps::open_unlocked(root)?;
        maps.initialise_if_needed()
    }
}

/// Lines of the verifier's log a refusal shows (its verdict is at the end).
const LOG_TAIL_LINES: usize = 20;

/// Kernel features sluice's programs use that Linux 6.1 (the oldest kernel
/// the test suite runs) has, with the first kernel that has each: a
/// refusal on an older kernel names what it lacks.
const KERNEL_FEATURES: &[(&str, (u32, u32))] = &[
    ("BPF ring buffers", (5, 8)),
    ("bpf_link for XDP", (5, 9)),
    ("the bpf_loop helper", (5, 17)),
    ("the bpf_xdp_load_bytes helper", (5, 18)),
];

/// This kernel's (major, minor) from uname.
fn kernel_version() -> Option<(u32, u32)> {
    let u = nix::sys::utsname::uname().ok()?;
    let release = u.release().to_str()?;
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// What this kernel is too old for, if anything (versions only hint: a
/// distribution kernel may have backported features, so nothing is refused
/// on this ground; the verifier decides).
fn missing_features() -> Option<String> {
    let (major, minor) = kernel_version()?;
    let missing: Vec<String> = KERNEL_FEATURES
        .iter()
        .filter(|(_, v)| (major, minor) < *v)
        .map(|(f, (a, b))| format!("{f} needs Linux {a}.{b}+"))
        .collect();
    (!missing.is_empty()).then(|| format!("this is Linux {major}.{minor}: {}", missing.join(", ")))
}

/// A failed program load as a `DataplaneError` naming the program: for a
/// verifier refusal, with the errno and the last lines of its log.
pub fn load_error(program: &str, e: aya::programs::ProgramError) -> DataplaneError {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL_LINES).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            if io_error.kind() == std::io::ErrorKind::PermissionDenied && log.trim().is_empty() {
                return DataplaneError::Permission {
                    what: format!("loading program {program}"),
                };
            }
            DataplaneError::Verifier {
                program: program.to_string(),
                source: io_error,
                log_tail: tail.join("\n"),
                hint: missing_features(),
            }
        }
        other => DataplaneError::Load {
            source: format!("program {program}: {other}").into(),
        },
    }
}

/// Loads (verifies) program `name` of `ebpf` as XDP.
pub fn load_xdp(ebpf: &mut aya::Ebpf, name: &str) -> Result<(), DataplaneError> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| DataplaneError::Load {
            source: format!("program {name} missing from the object").into(),
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load { source: e.into() })?;
    prog.load().map_err(|e| load_error(name, e))
}

/// Every program of the dataplane pinned at `root` (the XDP entry, the
/// programs it tail-calls, TC egress), as the kernel reports it.
pub fn programs(root: &PinRoot) -> Result<Vec<ProgramStatus>, DataplaneError> {
    let mut ids = Vec::new();
    for path in [root.prog(), tc::prog_path(root)] {
        if let Ok(info) = ProgramInfo::from_pin(&path) {
            ids.push(info.id());
        }
    }
    let jump = root.map(map_names::JUMP);
    if let Ok(fd) = sys::obj_get(&jump) {
        for slot in 0..sluice_common::JUMP_SLOTS {
            match sys::prog_array_get(fd.as_fd(), slot) {
                Ok(Some(id)) => ids.push(id),
                Ok(None) => {}
                Err(e) => return Err(io_err(format!("reading {}", jump.display()))(e)),
            }
        }
    }
    // The socket programs, when workloads are configured or the socket LB is on.
    let sock = super::sock::sock_root(root);
    for name in super::sock::object_programs() {
        if let Ok(info) = ProgramInfo::from_pin(sock.prog_dir().join(name)) {
            ids.push(info.id());
        }
    }
    let stats = bpf_stats_enabled();
    let mut out = Vec::new();
    for info in aya::programs::loaded_programs().flatten() {
        if let Some(pos) = ids.iter().position(|id| *id == info.id()) {
            out.push((pos, program_status(&info, stats)));
        }
    }
    out.sort_by_key(|(pos, _)| *pos);
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

fn program_status(info: &ProgramInfo, stats: bool) -> ProgramStatus {
    ProgramStatus {
        id: info.id(),
        tag: format!("{:016x}", info.tag()),
        name: info.name_as_str().unwrap_or("").to_string(),
        bpf_stats_enabled: stats,
        run_count: info.run_count(),
        run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        jited_bytes: info.size_jitted(),
        verified_insns: info.verified_instruction_count(),
    }
}

/// Attaches sluice's XDP program to `iface` in the current network namespace.
pub fn attach(
    root: &PinRoot,
    iface: &str,
    mode: AttachMode,
    netns: &str,
) -> Result<AttachReport, DataplaneError> {
    let index = sys::ifindex(iface).ok_or_else(|| DataplaneError::UnknownInterface {
        name: iface.to_string(),
        netns: netns.to_string(),
    })?;
    pins::ensure_bpffs(&root.root)?;
    for dir in [
        root.root.clone(),
        root.maps_dir(),
        root.prog_dir(),
        root.links_dir(),
    ] {
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    let _lock = RootLock::acquire(&root.root)?;
    // Pins that lost the programs' maps get them back before anything is
    // attached with, or written through, them.
    let repaired = repair_pins(root)?;

    // Load (or open) the program and check the pinned maps before touching
    // any live link, so a refusal leaves the interface filtered as it was.
    let first = !root.prog().exists();
    let mut prog = pinned_program(root)?;
    // Already attached here? Re-adopt the pinned link if it is still live.
    let mut previous_mode = None;
    for (ns, name, pinned_mode, path) in pinned_links(root)? {
        if ns != netns || name != iface {
            continue;
        }
        let fd = sys::obj_get(&path).map_err(io_err(format!("opening {}", path.display())))?;
        let info = sys::link_info(&fd).map_err(io_err(format!("reading {}", path.display())))?;
        let live = info.xdp_ifindex == index;
        let mode_differs = mode != AttachMode::Auto && mode != pinned_mode;
        if live && !mode_differs {
            let tc = attach_tc(root, iface, index, netns)?;
            return Ok(AttachReport {
                interface: iface.to_string(),
                netns: netns.to_string(),
                mode: pinned_mode,
                fell_back: false,
                readopted: true,
                program_id: info.prog_id,
                link_id: info.id,
                repaired,
                tc: Some(tc),
            });
        }
        // The interface it was attached to is gone (or was re-created), or a
        // different mode was asked for: drop this link (the maps stay) and
        // attach anew below.
        std::fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
        if live {
            previous_mode = Some(pinned_mode);
        }
    }

    let mut result = attach_prog(root, &mut prog, iface, index, mode, netns).map(|mut r| {
        r.repaired = repaired;
        r
    });
    if let Ok(r) = &mut result {
        match attach_tc(root, iface, index, netns) {
            Ok(tc) => r.tc = Some(tc),
            Err(e) => {
                // Both hooks or neither: the XDP link just made goes again.
                let _ = std::fs::remove_file(
                    root.links_dir().join(link_pin_name(netns, iface, r.mode)),
                );
                result = Err(e);
            }
        }
    }
    if let (Err(e), Some(old)) = (&result, previous_mode) {
        // A refused mode change must not leave the interface unfiltered.
        let restored = attach_prog(root, &mut prog, iface, index, old, netns).is_ok();
        let detail = match e {
            DataplaneError::Attach { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        result = Err(DataplaneError::Attach {
            iface: iface.to_string(),
            mode: mode.name(),
            source: format!(
                "{detail}; {}",
                if restored {
                    format!("still attached in {} mode", old.name())
                } else {
                    "re-attaching in the previous mode failed too".to_string()
                }
            )
            .into(),
        });
    }
    // A failed first attach must not leave a program and maps pinned with
    // nothing using them.
    // (The socket layer's pins under sock/ are not the XDP side's to remove.)
    if result.is_err() && first && pinned_links(root).is_ok_and(|l| l.is_empty()) {
        let _ = remove_packet_pins(root);
    }
    result
}

/// Re-pins the programs' own maps where a pin went missing or was
/// replaced (see `integrity`); refuses when live programs disagree about a
/// map (only `upgrade` mends that). The caller holds the root lock.
fn repair_pins(root: &PinRoot) -> Result<Vec<super::integrity::Finding>, DataplaneError> {
    if !root.prog().exists() {
        return Ok(Vec::new());
    }
    let report = super::integrity::repair(root)?;
    if !report.findings.is_empty() {
        return Err(DataplaneError::Unbound {
            findings: report.findings,
        });
    }
    Ok(report.repaired)
}

fn attach_prog(
    root: &PinRoot,
    prog: &mut Xdp,
    iface: &str,
    index: u32,
    mode: AttachMode,
    netns: &str,
) -> Result<AttachReport, DataplaneError> {
    let try_mode = |prog: &mut Xdp, m: AttachMode| {
        let xm = match m {
            AttachMode::Native => XdpMode::Driver,
            _ => XdpMode::Skb,
        };
        prog.attach_to_if_index(index, xm)
    };
    let (used, fell_back, link_id) = match mode {
        AttachMode::Auto => match try_mode(prog, AttachMode::Native) {
            Ok(id) => (AttachMode::Native, false, id),
            Err(native_err) => match try_mode(prog, AttachMode::Generic) {
                Ok(id) => (AttachMode::Generic, true, id),
                Err(e) => {
                    return Err(attach_error(iface, "native or generic", &native_err, &e));
                }
            },
        },
        m => match try_mode(prog, m) {
            Ok(id) => (m, false, id),
            Err(e) => return Err(attach_error(iface, m.name(), &e, &e)),
        },
    };
    let link = prog
        .take_link(link_id)
        .map_err(|e| DataplaneError::Attach {
            iface: iface.to_string(),
            mode: used.name(),
            source: e.into(),
        })?;
    let fd_link = FdLink::try_from(link).map_err(|e| DataplaneError::Attach {
        iface: iface.to_string(),
        mode: used.name(),
        source: format!("the kernel did not give a bpf_link ({e}); sluice needs Linux 5.9+").into(),
    })?;
    let info = fd_link.info().map_err(|e| DataplaneError::Attach {
        iface: iface.to_string(),
        mode: used.name(),
        source: e.into(),
    })?;
    let pin = root.links_dir().join(link_pin_name(netns, iface, used));
    fd_link.pin(&pin).map_err(|e| DataplaneError::Io {
        what: format!("pinning {}", pin.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(AttachReport {
        interface: iface.to_string(),
        netns: netns.to_string(),
        mode: used,
        fell_back,
        readopted: false,
        program_id: info.program_id(),
        link_id: info.id(),
        repaired: Vec::new(),
        tc: None,
    })
}

fn attach_error(
    iface: &str,
    mode: &'static str,
    first: &aya::programs::ProgramError,
    last: &aya::programs::ProgramError,
) -> DataplaneError {
    let errnos = [super::errno(first), super::errno(last)];
    let detail: String = if errnos.contains(&Some(libc::EBUSY)) {
        "another XDP program is already attached to it (not sluice's, or from another pin root)"
            .to_string()
    } else if errnos.contains(&Some(libc::EOPNOTSUPP)) {
        format!(
            "{}: the driver has no native XDP; use --mode generic or --mode auto",
            last
        )
    } else if super::is_permission(first) || super::is_permission(last) {
        return DataplaneError::Permission {
            what: format!("attaching to {iface}"),
        };
    } else {
        super::chain(last)
    };
    DataplaneError::Attach {
        iface: iface.to_string(),
        mode,
        source: detail.into(),
    }
}

/// Detaches from `iface`; the last detach removes the program and every map pin.
pub fn detach(root: &PinRoot, iface: &str, netns: &str) -> Result<DetachReport, DataplaneError> {
    if !root.root.exists() {
        return Err(DataplaneError::NotAttached {
            root: root.root.clone(),
        });
    }
    let lock = RootLock::acquire(&root.root)?;
    let links = pinned_links(root)?;
    let Some((_, _, _, path)) = links
        .iter()
        .find(|(ns, name, _, _)| ns == netns && name == iface)
    else {
        return Err(DataplaneError::NotAttachedTo {
            iface: iface.to_string(),
            netns: netns.to_string(),
        });
    };
    // Dropping the last reference to the link detaches the program.
    let link = PinnedLink::from_pin(path).map_err(|e| DataplaneError::Io {
        what: format!("opening {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    let fd_link = link
        .unpin()
        .map_err(io_err(format!("removing {}", path.display())))?;
    drop(fd_link);
    detach_tc(root, iface, netns);
    let removed_all = links.len() == 1;
    if removed_all {
        drop(lock);
        remove_packet_pins(root)?;
    }
    Ok(DetachReport {
        interface: iface.to_string(),
        netns: netns.to_string(),
        removed_all,
    })
}

/// Removes the XDP/TC side of a pin root: all of it, unless the socket
/// layer still has workloads there (`sock/`), which keep their own pins.
fn remove_packet_pins(root: &PinRoot) -> Result<(), DataplaneError> {
    // The socket LB balances by the packet LB's maps: it goes with them.
    super::sock_lb::detach(root);
    let sock = super::sock::sock_root(root).root;
    // Steering needs no packet maps: it stays, like workloads.
    if sock.exists()
        && super::sock::links(root)?.is_empty()
        && !super::steer::link_pin(root).exists()
    {
        super::sock::remove_all(root)?;
    }
    if !sock.exists() {
        return pins::remove_tree(&root.root)
            .map_err(io_err(format!("removing {}", root.root.display())));
    }
    let entries = std::fs::read_dir(&root.root)
        .map_err(io_err(format!("reading {}", root.root.display())))?;
    for e in entries {
        let e = e.map_err(io_err(format!("reading {}", root.root.display())))?;
        let p = e.path();
        if p == sock {
            continue;
        }
        let r = if p.is_dir() {
            pins::remove_tree(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(io_err(format!("removing {}", p.display())))?;
    }
    Ok(())
}

fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// What is attached where, the program, and the policy in force.
pub fn status(root: &PinRoot) -> Result<Status, DataplaneError> {
    let mut st = Status {
        pin_root: root.root.display().to_string(),
        attachments: Vec::new(),
        program: None,
        generation: None,
        default_action: None,
        malformed_action: None,
        audit: None,
        rules: None,
        rule_capacity: sluice_common::MAX_RULES,
        syn_guard: None,
        lists: Vec::new(),
        services: Vec::new(),
        integrity: None,
        programs: Vec::new(),
        cgroups: Vec::new(),
        socket_lb: None,
        steer: None,
    };
    if !root.root.exists() {
        return Ok(st);
    }
    let sl = super::sock_lb::state(root);
    st.socket_lb = (!sl.hooks.is_empty()).then_some(sl);
    st.steer = super::steer::status(root);
    st.cgroups = super::sock::links(root)?
        .into_iter()
        .map(|(cgroup_id, hooks)| CgroupLinks {
            cgroup_id,
            path: super::sock::cgroup_path(cgroup_id).map(|p| p.display().to_string()),
            hooks,
        })
        .collect();
    for (netns, iface, mode, path) in pinned_links(root)? {
        let fd = sys::obj_get(&path).map_err(io_err(format!("opening {}", path.display())))?;
        let info = sys::link_info(&fd).map_err(io_err(format!("reading {}", path.display())))?;
        let tc = tc::status(root, &iface, &netns);
        let index = info.xdp_ifindex;
        let peer_native_xdp = if index == 0 {
            None
        } else {
            tc::in_netns(&netns, move || sys::veth_peer_has_native_xdp(index))
                .ok()
                .and_then(Result::ok)
                .flatten()
        };
        st.attachments.push(Attachment {
            interface: iface,
            netns,
            mode,
            link_id: info.id,
            program_id: info.prog_id,
            ifindex: index,
            tc,
            peer_native_xdp,
        });
    }
    if root.prog().exists() {
        let info = ProgramInfo::from_pin(root.prog()).map_err(|e| DataplaneError::PinnedMap {
            path: root.prog(),
            source: e.into(),
        })?;
        st.program = Some(program_status(&info, bpf_stats_enabled()));
        st.programs = programs(root)?;
        let integrity = super::integrity::check(root)?;
        let ok = integrity.is_ok();
        st.integrity = Some(integrity);
        if !ok {
            // What the pins hold is not what packets get: show no policy
            // rather than a wrong one.
            return Ok(st);
        }
        let maps = PolicyMaps::open(root)?;
        let g = maps.active_generation()?;
        let s = maps.settings(g)?;
        st.generation = Some(g);
        st.default_action = Verdict::from_u32(s.default_action).map(|v| v.name().to_string());
        st.malformed_action = Verdict::from_u32(s.malformed_action).map(|v| v.name().to_string());
        st.audit = Some(s.flags & sluice_common::SETTINGS_F_AUDIT != 0);
        st.rules = Some(s.rule_count);
        st.syn_guard = Some(s.flags & sluice_common::SETTINGS_F_SYN_GUARD != 0);
        for list in ListId::ALL {
            st.lists.push(ListStatus {
                list: list.kind().to_string(),
                family: match list {
                    ListId::DenyV4 | ListId::AllowV4 => "ipv4",
                    ListId::DenyV6 | ListId::AllowV6 => "ipv6",
                }
                .to_string(),
                entries: s.list_len[list as usize],
                capacity: sluice_common::LIST_CAPACITY,
            });
        }
    }
    Ok(st)
}

/// True when `path` is an existing pin root with at least one attachment.
pub fn has_attachments(root: &PinRoot) -> bool {
    pinned_links(root).is_ok_and(|l| !l.is_empty()) && Path::new(&root.root).exists()
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UpgradeReport {
    pub old_program_id: u32,
    pub old_tag: String,
    pub new_program_id: u32,
    pub new_tag: String,
    /// Links switched to the new program.
    pub links: usize,
    /// Nothing to do: the pinned program is this build's already.
    pub unchanged: bool,
    /// Attachments whose interface is gone (left as they are; detach them).
    #[serde(default)]
    pub skipped: Vec<String>,
    /// Map pins put back to the maps the live programs read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<super::integrity::Finding>,
    /// Live programs disagreed about these maps: every program was loaded
    /// again with the pinned maps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reloaded_for: Vec<super::integrity::Finding>,
    /// The socket programs on the workloads' cgroup links (when any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sock: Option<super::sock::SockUpgrade>,
}

/// Swaps this build's program in on every pinned link, atomically per link
/// (packets see the old program or the new one), reusing the pinned maps so
/// policy and counters carry over. Maps this build cannot use are refused
/// before anything changes. Same program (same tag) is left alone unless
/// `force`.
/// Moves every pinned TC egress link to the new object's TC program and
/// re-pins it. Links whose swap fails keep the old program (it stays
/// loaded while a link uses it).
fn upgrade_tc(root: &PinRoot, ebpf: &mut aya::Ebpf) -> Result<(), DataplaneError> {
    let path = tc::prog_path(root);
    // Held open so the old program stays loaded until every attachment
    // has moved (or keeps it, if its swap failed).
    let old_fd = sys::obj_get(&path).ok();
    let _ = std::fs::remove_file(&path);
    tc_of(ebpf)?.pin(&path).map_err(|e| DataplaneError::Io {
        what: format!("pinning {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    tc::upgrade(root, old_fd, &path)
}

pub fn upgrade(root: &PinRoot, force: bool) -> Result<UpgradeReport, DataplaneError> {
    if !root.is_set_up() && super::sock::is_loaded(root) {
        // Workloads only: the socket programs are all there is to upgrade.
        let _lock = RootLock::acquire(&root.root)?;
        let repaired = super::integrity::repair_sock(root)?;
        let sock = super::sock::upgrade(root, force)?;
        return Ok(UpgradeReport {
            old_program_id: 0,
            old_tag: String::new(),
            new_program_id: 0,
            new_tag: String::new(),
            links: 0,
            unchanged: sock.programs == 0,
            skipped: Vec::new(),
            repaired: repaired.repaired,
            reloaded_for: repaired.findings,
            sock: Some(sock),
        });
    }
    if !root.is_set_up() {
        return Err(DataplaneError::NotAttached {
            root: root.root.clone(),
        });
    }
    let _lock = RootLock::acquire(&root.root)?;
    // Pins first go back to the maps the programs read, so the new program
    // is loaded with the maps packets are judged by today.
    let integrity = super::integrity::repair(root)?;
    // Live programs that read different maps under one name are mended only
    // by loading every program again with the pinned maps.
    let force = force || !integrity.findings.is_empty();
    let specs = pins::expected_maps(OBJECT)?;
    pins::check_pinned_maps(root, &specs)?;
    let old = ProgramInfo::from_pin(root.prog()).map_err(|e| DataplaneError::PinnedMap {
        path: root.prog(),
        source: e.into(),
    })?;
    let old_fd =
        sys::obj_get(&root.prog()).map_err(io_err(format!("opening {}", root.prog().display())))?;

    // The socket programs first: a refusal there changes nothing here.
    let sock = if super::sock::is_loaded(root) {
        super::integrity::repair_sock(root)?;
        Some(super::sock::upgrade(root, force)?)
    } else {
        None
    };
    let mut ebpf = load_program(root, &specs)?;
    let prog = xdp_of(&mut ebpf)?;
    let new = prog
        .info()
        .map_err(|e| DataplaneError::Load { source: e.into() })?;
    let mut report = UpgradeReport {
        old_program_id: old.id(),
        old_tag: format!("{:016x}", old.tag()),
        new_program_id: new.id(),
        new_tag: format!("{:016x}", new.tag()),
        links: 0,
        unchanged: false,
        skipped: Vec::new(),
        repaired: integrity.repaired,
        reloaded_for: integrity.findings,
        sock,
    };
    if old.tag() == new.tag() && !force {
        pins::stamp_program(root)?;
        report.unchanged = true;
        report.new_program_id = old.id();
        return Ok(report);
    }
    let new_fd = prog
        .fd()
        .map_err(|e| DataplaneError::Load { source: e.into() })?;
    let new_fd = new_fd.as_fd();
    let mut swapped = Vec::new();
    for (_, iface, _, path) in pinned_links(root)? {
        let link = sys::obj_get(&path).map_err(io_err(format!("opening {}", path.display())))?;
        let info = sys::link_info(&link).map_err(io_err(format!("reading {}", path.display())))?;
        if info.xdp_ifindex == 0 {
            // The interface is gone; nothing runs on this link to upgrade.
            report.skipped.push(iface);
            continue;
        }
        if let Err(e) = sys::link_update(link.as_fd(), new_fd, old_fd.as_fd()) {
            // All or nothing: put the links already swapped back.
            for done in &swapped {
                let _ = sys::link_update(std::os::fd::AsFd::as_fd(done), old_fd.as_fd(), new_fd);
            }
            return Err(DataplaneError::Upgrade {
                iface,
                source: e.into(),
            });
        }
        swapped.push(link);
        report.links += 1;
    }
    upgrade_tc(root, &mut ebpf)?;
    let prog = xdp_of(&mut ebpf)?;
    // The pin follows the program the links now run; the old one is freed
    // once nothing references it.
    let _ = std::fs::remove_file(root.prog());
    prog.pin(root.prog()).map_err(|e| DataplaneError::Io {
        what: format!("pinning {}", root.prog().display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    pins::stamp_program(root)?;
    Ok(report)
}
