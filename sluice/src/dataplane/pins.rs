//! Where sluice keeps its kernel objects on bpffs, how the pin root is made
//! ready (bpffs mounted, directories, a lock), and the compatibility check
//! that refuses a pinned map this build cannot use.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;

use super::DataplaneError;

pub use sluice_common::settings::DEFAULT_PIN_ROOT;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The layout of a pin root:
/// `maps/<MAP>`, `prog/sluice_xdp`, `links/<netns>:<ifname>:<mode>`.
#[derive(Debug, Clone)]
pub struct PinRoot {
    pub root: PathBuf,
    /// Entries of the LB connection table when this root's maps are first
    /// created (a pinned table keeps its size).
    pub conn_capacity: u32,
}

impl PinRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            conn_capacity: sluice_common::lb::CONN_CAPACITY,
        }
    }

    /// The connection table size to create, held to what sluice creates.
    #[must_use]
    pub fn with_conn_capacity(self, n: u32) -> Self {
        use sluice_common::settings::{MAX_CONNS, MIN_CONNS};
        Self {
            conn_capacity: n.clamp(MIN_CONNS, MAX_CONNS),
            ..self
        }
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn prog_dir(&self) -> PathBuf {
        self.root.join("prog")
    }

    pub fn prog(&self) -> PathBuf {
        self.prog_dir().join(sluice_common::XDP_PROGRAM)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// True when a dataplane has been set up here (the program is pinned).
    pub fn is_set_up(&self) -> bool {
        self.prog().exists()
    }
}

/// Makes sure the filesystem holding `root` is a bpffs, mounting one at
/// /sys/fs/bpf when that is where the root lives and nothing is mounted.
pub fn ensure_bpffs(root: &Path) -> Result<(), DataplaneError> {
    let mut probe = root.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe)? {
        return Ok(());
    }
    let sys_bpf = Path::new("/sys/fs/bpf");
    if root.starts_with(sys_bpf) {
        if private_mount_namespace() {
            return Err(DataplaneError::PrivateMountNamespace);
        }
        std::fs::create_dir_all(sys_bpf).map_err(|source| DataplaneError::Io {
            what: "creating /sys/fs/bpf".into(),
            source,
        })?;
        if !is_bpffs(sys_bpf)? {
            nix::mount::mount(
                Some("bpf"),
                sys_bpf,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| DataplaneError::MountBpffs {
                source: io::Error::from(e),
            })?;
        }
        return Ok(());
    }
    Err(DataplaneError::NotBpffs {
        path: root.to_path_buf(),
    })
}

/// True when this process has a mount namespace of its own, unlike the
/// process that started it (as under `ip netns exec`, which unshares the
/// mount namespace and remounts /sys): a bpffs mounted here would vanish
/// with the process. Unknown (unreadable) counts as shared.
fn private_mount_namespace() -> bool {
    let ino = |p: &str| {
        std::fs::metadata(p)
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    };
    let me = ino("/proc/self/ns/mnt");
    let parent = format!("/proc/{}/ns/mnt", std::os::unix::process::parent_id());
    let differs = |other: Option<u64>| matches!((me, other), (Some(a), Some(b)) if a != b);
    differs(ino(&parent)) || differs(ino("/proc/1/ns/mnt")) || sys_remounted_for_netns()
}

/// `ip netns exec` mounts a fresh sysfs on /sys named after the namespace;
/// the host's is named `sysfs`.
fn sys_remounted_for_netns() -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        let mount_point = left.split(' ').nth(4);
        let mut r = right.split(' ');
        let (fstype, source) = (r.next(), r.next());
        mount_point == Some("/sys")
            && fstype == Some("sysfs")
            && !matches!(source, Some("sysfs" | "none" | "sys"))
    })
}

fn is_bpffs(path: &Path) -> Result<bool, DataplaneError> {
    let st = nix::sys::statfs::statfs(path).map_err(|e| DataplaneError::Io {
        what: format!("statfs {}", path.display()),
        source: io::Error::from(e),
    })?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// An exclusive lock on the pin root, held while a command changes it, so two
/// commands never interleave their generation flips.
pub struct RootLock {
    _file: File,
}

impl RootLock {
    pub fn acquire(root: &Path) -> Result<Self, DataplaneError> {
        let file = File::open(root).map_err(|source| DataplaneError::Io {
            what: format!("opening {}", root.display()),
            source,
        })?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(DataplaneError::Io {
                what: format!("locking {}", root.display()),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { _file: file })
    }
}

/// What this build expects of one map, read from the embedded object file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSpec {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The specs of every map in the embedded object.
pub fn expected_maps(object: &[u8]) -> Result<Vec<MapSpec>, DataplaneError> {
    let obj =
        aya_obj::Object::parse(object).map_err(|e| DataplaneError::Object { source: e.into() })?;
    let mut specs: Vec<MapSpec> = obj
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, m)| MapSpec {
            name: name.clone(),
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: m.max_entries(),
            flags: m.map_flags(),
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}

/// Refuses a pinned map whose type, key size, value size, capacity or flags
/// differ from what this build expects. Missing pins are fine (they will be
/// created).
/// A pinned map that could not be opened: for want of privileges, or why.
pub(crate) fn pinned_map_error(
    path: &std::path::Path,
    e: impl std::error::Error + Send + Sync + 'static,
) -> DataplaneError {
    if super::is_permission(&e) {
        DataplaneError::Permission {
            what: format!("opening {}", path.display()),
        }
    } else {
        DataplaneError::PinnedMap {
            path: path.to_path_buf(),
            source: e.into(),
        }
    }
}

pub fn check_pinned_maps(root: &PinRoot, specs: &[MapSpec]) -> Result<(), DataplaneError> {
    for spec in specs {
        let path = root.map(&spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| pinned_map_error(&path, e))?;
        let found = MapSpec {
            name: spec.name.clone(),
            map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        // The kernel may report extra internal flag bits; compare the ones we set.
        let flags_ok = found.flags & spec.flags == spec.flags;
        // The connection table is sized when it is created (`[lb] connections`).
        let sized = spec.name == sluice_common::map_names::LB_CONNS;
        if found.map_type != spec.map_type
            || found.key_size != spec.key_size
            || found.value_size != spec.value_size
            || (found.max_entries != spec.max_entries && !sized)
            || !flags_ok
        {
            return Err(DataplaneError::IncompatibleMap {
                path,
                expected: format!(
                    "type {} key {} value {} entries {} flags {:#x}",
                    spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags
                ),
                found: format!(
                    "type {} key {} value {} entries {} flags {:#x}",
                    found.map_type,
                    found.key_size,
                    found.value_size,
                    found.max_entries,
                    found.flags
                ),
            });
        }
    }
    Ok(())
}

/// Removes a pin root and everything under it, ignoring what is already gone.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::read_dir(path) {
        Ok(entries) => {
            for e in entries {
                let e = e?;
                let p = e.path();
                if e.file_type()?.is_dir() {
                    remove_tree(&p)?;
                } else {
                    match std::fs::remove_file(&p) {
                        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                        _ => {}
                    }
                }
            }
            match std::fs::remove_dir(path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A one-word value user space keeps beside the maps (a one-entry `ARRAY`
/// pinned as `<root>/maps/NAME`; no program reads it): `None` when never
/// set.
pub fn word(root: &PinRoot, name: &'static str) -> Option<u64> {
    if !root.map(name).exists() {
        return None;
    }
    let m: aya::maps::Array<aya::maps::MapData, u64> = super::policy::typed(root, name).ok()?;
    m.get(&0, 0).ok()
}

/// Sets a [`word`], creating and pinning its array the first time. It goes
/// with the other pins when the last attachment does.
pub fn set_word(root: &PinRoot, name: &'static str, value: u64) -> Result<(), DataplaneError> {
    let path = root.map(name);
    if !path.exists() {
        const BPF_MAP_TYPE_ARRAY: u32 = 2;
        let fd = super::sys::map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1, name, None).map_err(|e| {
            DataplaneError::Io {
                what: format!("creating {}", path.display()),
                source: e,
            }
        })?;
        super::sys::obj_pin(std::os::fd::AsFd::as_fd(&fd), &path).map_err(|e| {
            DataplaneError::Io {
                what: format!("pinning {}", path.display()),
                source: e,
            }
        })?;
    }
    let mut m: aya::maps::Array<aya::maps::MapData, u64> = super::policy::typed(root, name)?;
    m.set(0, value, 0)
        .map_err(|e| DataplaneError::map_err("write", name, e))
}

/// What the pinned XDP program understands beyond the first release's
/// maps, as the build that pinned it recorded (`PROGRAM_FEATURES`): a
/// build whose maps have the same layout but whose program reads more of
/// them. A change that needs a feature the pinned program lacks is refused
/// until `sluice upgrade` (the agent upgrades on start). The record names
/// the program it describes (its id in the high 32 bits): a program pinned
/// by a build that writes no record (an older one, a downgrade) leaves a
/// record that no longer matches, which reads as no features.
pub const PROGRAM_FEATURES: &str = "PROGRAM_FEATURES";
/// Rules with source ports (`RULE_F_SPORT`) and TCP flags
/// (`RULE_F_TCP_FLAGS`); a program without it would read them as rules
/// without those conditions, matching more.
pub const FEATURE_RULE_PORTS_FLAGS: u64 = 1 << 0;
/// Every feature of this build's program.
pub const THIS_BUILD_FEATURES: u64 = FEATURE_RULE_PORTS_FLAGS;

fn pinned_program_id(root: &PinRoot) -> Option<u32> {
    aya::programs::ProgramInfo::from_pin(root.prog())
        .ok()
        .map(|i| i.id())
}

/// Records that the program pinned now is this build's.
pub fn stamp_program(root: &PinRoot) -> Result<(), DataplaneError> {
    let id = pinned_program_id(root).ok_or_else(|| DataplaneError::Io {
        what: format!("reading {}", root.prog().display()),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    set_word(
        root,
        PROGRAM_FEATURES,
        u64::from(id) << 32 | THIS_BUILD_FEATURES,
    )
}

/// The features of the pinned program: none when no record names it.
#[must_use]
pub fn program_features(root: &PinRoot) -> u64 {
    match (word(root, PROGRAM_FEATURES), pinned_program_id(root)) {
        (Some(w), Some(id)) if w >> 32 == u64::from(id) => w & 0xffff_ffff,
        _ => 0,
    }
}
