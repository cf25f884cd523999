//! The TC egress hook (the LB's reverse NAT): a TCX link where the kernel
//! has TCX (Linux 6.6+), else a clsact filter at a priority and handle that
//! sluice owns. Either way the attachment is pinned under `tc-links/`, so
//! detach, re-adopt, upgrade and status work alike; filters of other owners
//! on the same clsact hook are never touched, and neither is the qdisc.

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, ProgramError, ProgramInfo, SchedClassifier, TcAttachType,
    links::FdLink,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use sluice_common::TC_EGRESS_PROGRAM;

use super::{DataplaneError, pins::PinRoot, sys};

/// Priority of sluice's clsact egress filter (lower runs earlier); it shows
/// in `tc filter show dev IFACE egress` as `pref 20942`.
pub const CLSACT_PRIORITY: u16 = 0x51ce;
/// Handle of sluice's clsact egress filter at [`CLSACT_PRIORITY`].
pub const CLSACT_HANDLE: u32 = 0x51ce;
/// The first kernel with TCX.
pub const TCX_MIN_KERNEL: &str = "6.6";

/// How the TC egress program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    /// A TCX link (Linux 6.6+).
    Tcx,
    /// A filter on the clsact qdisc's egress hook (the fallback without TCX).
    Clsact,
}

impl TcMode {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        }
    }
}

/// The TC egress attachment of one interface.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TcStatus {
    pub mode: TcMode,
    /// Why the fallback is in use (clsact only).
    pub fallback: Option<String>,
    /// The filter's priority and handle (clsact only).
    pub priority: Option<u16>,
    pub handle: Option<u32>,
    /// The program the link or filter runs.
    pub program_id: u32,
    /// The link or filter is on the interface, running that program.
    pub live: bool,
}

impl TcStatus {
    /// A live TCX link running `program_id`.
    fn tcx(program_id: u32) -> Self {
        Self {
            mode: TcMode::Tcx,
            fallback: None,
            priority: None,
            handle: None,
            program_id,
            live: true,
        }
    }
}

fn fallback_reason() -> String {
    format!("this kernel has no TCX (Linux {TCX_MIN_KERNEL}+)")
}

pub(super) fn prog_path(root: &PinRoot) -> PathBuf {
    root.prog_dir().join(TC_EGRESS_PROGRAM)
}

pub(super) fn links_dir(root: &PinRoot) -> PathBuf {
    root.root.join("tc-links")
}

/// Pin of the TCX link on `iface`: `tc-links/<netns>:<ifname>`.
fn tcx_pin(root: &PinRoot, netns: &str, iface: &str) -> PathBuf {
    links_dir(root).join(format!("{netns}:{iface}"))
}

/// Pin that records sluice's clsact filter on `iface`: the program the
/// filter runs, pinned at `tc-links/<netns>:<ifname>:clsact`.
fn clsact_pin(root: &PinRoot, netns: &str, iface: &str) -> PathBuf {
    links_dir(root).join(format!("{netns}:{iface}:clsact"))
}

fn attach_err(iface: &str, source: impl Into<super::Cause>) -> DataplaneError {
    DataplaneError::Attach {
        iface: iface.to_string(),
        mode: "tc egress",
        source: source.into(),
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |source| DataplaneError::Io { what, source }
}

/// The errno under an aya program error, if there is one.
fn errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        ProgramError::TcError(tc::TcError::NetlinkError(n)) => n.raw_os_error(),
        ProgramError::TcError(tc::TcError::IoError(io)) => io.raw_os_error(),
        ProgramError::NetlinkError(n) => n.raw_os_error(),
        ProgramError::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// Whether the kernel has TCX: a TCX query of the interface's egress hook
/// works from 6.6 on and is refused with EINVAL before (unknown attach type).
fn tcx_available(iface: &str) -> Result<bool, DataplaneError> {
    match SchedClassifier::query_tcx(iface, TcAttachType::Egress) {
        Ok(_) => Ok(true),
        Err(e) if errno(&e) == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(attach_err(
            iface,
            format!("asking the kernel for TCX: {}", super::chain(&e)),
        )),
    }
}

fn pinned_prog_id(path: &Path) -> Option<u32> {
    ProgramInfo::from_pin(path).ok().map(|i| i.id())
}

/// sluice's filter slot on the egress hook of `index`: what sits there.
fn clsact_slot(index: u32) -> std::io::Result<Option<sys::TcFilter>> {
    Ok(sys::tc_filters(index, sys::TC_PARENT_EGRESS)?
        .into_iter()
        .find(|f| f.priority == CLSACT_PRIORITY && f.handle == CLSACT_HANDLE))
}

/// Attaches the TC egress program to `iface` (index `index`, in the
/// calling thread's namespace), or re-adopts the attachment pinned for it
/// when it is still live.
pub(super) fn attach(
    root: &PinRoot,
    iface: &str,
    index: u32,
    netns: &str,
) -> Result<TcStatus, DataplaneError> {
    if let Some(st) = readopt(root, iface, index, netns)? {
        return Ok(st);
    }
    let mut prog = SchedClassifier::from_pin(prog_path(root))
        .map_err(|e| attach_err(iface, format!("opening the pinned TC program: {e}")))?;
    std::fs::create_dir_all(links_dir(root))
        .map_err(io_err(format!("creating {}", links_dir(root).display())))?;
    if tcx_available(iface)? {
        let id = prog
            .attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| attach_err(iface, super::chain(&e)))?;
        let link = prog.take_link(id).map_err(|e| attach_err(iface, e))?;
        let fd_link = FdLink::try_from(link).map_err(|e| attach_err(iface, e))?;
        let path = tcx_pin(root, netns, iface);
        fd_link.pin(&path).map_err(|e| DataplaneError::Io {
            what: format!("pinning {}", path.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        let info = sys::obj_get(&path)
            .and_then(|fd| sys::link_info(&fd))
            .map_err(io_err(format!("reading {}", path.display())))?;
        return Ok(TcStatus::tcx(info.prog_id));
    }
    attach_clsact(root, &mut prog, iface, index, netns)
}

fn attach_clsact(
    root: &PinRoot,
    prog: &mut SchedClassifier,
    iface: &str,
    index: u32,
    netns: &str,
) -> Result<TcStatus, DataplaneError> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => {}
        // Already there (another owner's, or sluice's from before): shared.
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(attach_err(
                iface,
                format!(
                    "adding the clsact qdisc: {}",
                    super::chain(&ProgramError::from(e))
                ),
            ));
        }
    }
    let program_id = prog.info().map_err(|e| attach_err(iface, e))?.id();
    let slot = clsact_slot(index).map_err(io_err(format!("listing TC filters of {iface}")))?;
    if let Some(f) = slot {
        return Err(DataplaneError::TcSlotTaken {
            iface: iface.to_string(),
            priority: CLSACT_PRIORITY,
            handle: CLSACT_HANDLE,
            kind: f.kind,
            name: f.name,
        });
    }
    // NLM_F_EXCL: never replaces a filter that appeared meanwhile.
    let id = prog
        .attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::Netlink(NlOptions {
                priority: CLSACT_PRIORITY,
                handle: TcHandle::from(CLSACT_HANDLE),
                classid: None,
            }),
        )
        .map_err(|e| {
            attach_err(
                iface,
                format!("adding the clsact filter: {}", super::chain(&e)),
            )
        })?;
    // The filter must outlive this process: take the link out of the
    // program (whose drop would detach it) and let it go without detaching.
    let link = prog.take_link(id).map_err(|e| attach_err(iface, e))?;
    std::mem::forget(link);
    let path = clsact_pin(root, netns, iface);
    let pinned = prog.pin(&path).map_err(|e| DataplaneError::Io {
        what: format!("pinning {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    });
    if let Err(e) = pinned {
        // Unrecorded, the filter could never be detached by sluice.
        let _ = remove_clsact_filter(iface, index, program_id);
        return Err(e);
    }
    Ok(TcStatus {
        mode: TcMode::Clsact,
        fallback: Some(fallback_reason()),
        priority: Some(CLSACT_PRIORITY),
        handle: Some(CLSACT_HANDLE),
        program_id,
        live: true,
    })
}

/// The pinned attachment of `iface` if it is still live (re-adopted as it
/// is); a stale pin (interface re-created, filter removed) is dropped.
fn readopt(
    root: &PinRoot,
    iface: &str,
    index: u32,
    netns: &str,
) -> Result<Option<TcStatus>, DataplaneError> {
    let tcx = tcx_pin(root, netns, iface);
    if tcx.exists() {
        let info = sys::obj_get(&tcx).and_then(|fd| sys::link_info(&fd));
        // A TCX link's info starts with its ifindex too.
        if let Ok(info) = info
            && info.xdp_ifindex == index
        {
            return Ok(Some(TcStatus::tcx(info.prog_id)));
        }
        std::fs::remove_file(&tcx).map_err(io_err(format!("removing {}", tcx.display())))?;
    }
    let cls = clsact_pin(root, netns, iface);
    if cls.exists() {
        let id = pinned_prog_id(&cls);
        let slot = clsact_slot(index).map_err(io_err(format!("listing TC filters of {iface}")))?;
        if let (Some(id), Some(f)) = (id, &slot)
            && f.prog_id == id
        {
            return Ok(Some(clsact_status(id, true)));
        }
        std::fs::remove_file(&cls).map_err(io_err(format!("removing {}", cls.display())))?;
    }
    Ok(None)
}

fn clsact_status(program_id: u32, live: bool) -> TcStatus {
    TcStatus {
        mode: TcMode::Clsact,
        fallback: Some(fallback_reason()),
        priority: Some(CLSACT_PRIORITY),
        handle: Some(CLSACT_HANDLE),
        program_id,
        live,
    }
}

/// Deletes sluice's filter from the egress hook of `iface`, but only while
/// it still runs `program_id` (whatever else sits there is not sluice's).
fn remove_clsact_filter(iface: &str, index: u32, program_id: u32) -> Result<(), DataplaneError> {
    let slot = clsact_slot(index).map_err(io_err(format!("listing TC filters of {iface}")))?;
    if slot.is_none_or(|f| f.prog_id != program_id) {
        return Ok(());
    }
    let link = SchedClassifierLink::attached(
        iface,
        TcAttachType::Egress,
        CLSACT_PRIORITY,
        TcHandle::from(CLSACT_HANDLE),
        None,
    )
    .map_err(io_err(format!("finding {iface}")))?;
    aya::programs::links::Link::detach(link).map_err(|e| DataplaneError::Io {
        what: format!("deleting sluice's clsact filter on {iface}"),
        source: std::io::Error::from_raw_os_error(errno(&e).unwrap_or(libc::EIO)),
    })
}

/// Removes the TC egress attachment of `iface` (in the calling thread's
/// namespace) and its pin. Best effort: the interface may be gone.
pub(super) fn detach(root: &PinRoot, iface: &str, index: Option<u32>, netns: &str) {
    // Dropping the last reference to a TCX link detaches it.
    let _ = std::fs::remove_file(tcx_pin(root, netns, iface));
    let cls = clsact_pin(root, netns, iface);
    if cls.exists() {
        if let (Some(index), Some(id)) = (index, pinned_prog_id(&cls)) {
            let _ = remove_clsact_filter(iface, index, id);
        }
        let _ = std::fs::remove_file(&cls);
    }
}

/// The TC attachment pinned for `iface` in `netns`, checked against the
/// kernel (a clsact filter is looked up in that namespace).
pub(super) fn status(root: &PinRoot, iface: &str, netns: &str) -> Option<TcStatus> {
    let tcx = tcx_pin(root, netns, iface);
    if tcx.exists() {
        let info = sys::obj_get(&tcx).and_then(|fd| sys::link_info(&fd)).ok();
        return Some(TcStatus {
            mode: TcMode::Tcx,
            fallback: None,
            priority: None,
            handle: None,
            program_id: info.map_or(0, |i| i.prog_id),
            live: info.is_some_and(|i| i.xdp_ifindex != 0),
        });
    }
    let cls = clsact_pin(root, netns, iface);
    let id = pinned_prog_id(&cls)?;
    let name = iface.to_string();
    let live = in_netns(netns, move || {
        let Some(index) = super::sys::ifindex(&name) else {
            return false;
        };
        clsact_slot(index).is_ok_and(|s| s.is_some_and(|f| f.prog_id == id))
    })
    .unwrap_or(false);
    Some(clsact_status(id, live))
}

/// Runs `f` in the namespace a pin name calls `label`: right here when it
/// is the calling thread's own, else on a thread that entered it.
pub(super) fn in_netns<T: Send + 'static>(
    label: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DataplaneError> {
    if crate::netns::label(None) == label {
        return Ok(f());
    }
    let path = if label == "host" {
        PathBuf::from("/proc/1/ns/net")
    } else {
        Path::new("/run/netns").join(label)
    };
    let file = std::fs::File::open(&path).map_err(io_err(format!(
        "opening network namespace {label} ({})",
        path.display()
    )))?;
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
    .map_err(io_err(format!("entering network namespace {label}")))
}

/// Moves every pinned TC egress attachment to the program pinned at
/// `new_prog` (this build's, loaded and pinned by the caller): TCX links
/// by a link update, clsact filters by replacing the filter's program in
/// place (in the filter's namespace). Both are atomic per interface.
/// Attachments whose swap fails keep the old program, which stays loaded
/// while they use it.
pub(super) fn upgrade(
    root: &PinRoot,
    old_prog: Option<std::os::fd::OwnedFd>,
    new_prog: &Path,
) -> Result<(), DataplaneError> {
    let new_fd =
        sys::obj_get(new_prog).map_err(io_err(format!("opening {}", new_prog.display())))?;
    let Ok(entries) = std::fs::read_dir(links_dir(root)) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_suffix(":clsact") {
            let Some((netns, iface)) = rest.rsplit_once(':') else {
                continue;
            };
            let (iface, new_prog) = (iface.to_string(), new_prog.to_path_buf());
            let Some(old_id) = pinned_prog_id(&e.path()) else {
                continue;
            };
            // Why a filter was not replaced does not matter here: only a
            // replaced one gets its pin moved to the new program.
            let replaced = in_netns(netns, move || -> Result<(), super::Cause> {
                let index = super::sys::ifindex(&iface).ok_or("interface gone")?;
                let mut prog = SchedClassifier::from_pin(&new_prog)?;
                let link = SchedClassifierLink::attached(
                    &iface,
                    TcAttachType::Egress,
                    CLSACT_PRIORITY,
                    TcHandle::from(CLSACT_HANDLE),
                    None,
                )?;
                // Only sluice's own filter is replaced.
                if !clsact_slot(index).is_ok_and(|s| s.is_some_and(|f| f.prog_id == old_id)) {
                    return Err("sluice's filter is gone".into());
                }
                let id = prog.attach_to_link(link)?;
                // Keep the filter when `prog` drops.
                std::mem::forget(prog.take_link(id)?);
                Ok(())
            });
            if matches!(replaced, Ok(Ok(()))) {
                let path = e.path();
                let _ = std::fs::remove_file(&path);
                sys::obj_pin(new_fd.as_fd(), &path)
                    .map_err(io_err(format!("pinning {}", path.display())))?;
            }
        } else if let Some(old) = &old_prog
            && let Ok(link) = sys::obj_get(&e.path())
        {
            let _ = sys::link_update(link.as_fd(), new_fd.as_fd(), old.as_fd());
        }
    }
    Ok(())
}
