//! The few bpf(2) commands aya 0.14 does not expose: batched map updates and
//! deletes, opening any pinned object, reading an XDP link's interface, and
//! the maps a program reads (by id, for the integrity check).

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_CREATE: libc::c_long = 28;

/// bpf(2) with `attr`, one of this module's `#[repr(C)]` bpf_attr variants
/// (zero-initialised where the kernel expects zeros); the kernel may write
/// back into it.
fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, correctly sized bpf_attr variant for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<u8>(),
            size_of::<A>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Updates `keys[i] -> values[i]` in one syscall per kernel batch. On error,
/// returns how many elements were applied before it, with the error.
pub fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> Result<(), (usize, io::Error)> {
    write_batch(BPF_MAP_UPDATE_BATCH, map, keys, Some(values), count)
}

/// Deletes `keys` in batches. Missing keys are an error (ENOENT) from the kernel.
pub fn map_delete_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    count: usize,
) -> Result<(), (usize, io::Error)> {
    write_batch(BPF_MAP_DELETE_BATCH, map, keys, None, count)
}

/// One batched update or delete command over `count` elements, repeated
/// until the kernel has taken them all (it may take fewer per call).
fn write_batch(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
) -> Result<(), (usize, io::Error)> {
    let mut done = 0usize;
    let key_size = keys.len() / count.max(1);
    let value_size = values.map_or(0, |v| v.len() / count.max(1));
    while done < count {
        let mut attr = BatchAttr {
            keys: keys[done * key_size..].as_ptr() as u64,
            values: values.map_or(0, |v| v[done * value_size..].as_ptr() as u64),
            count: u32::try_from(count - done).unwrap_or(u32::MAX),
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let res = bpf(cmd, &mut attr);
        // The kernel writes back how many elements it processed.
        done += attr.count as usize;
        if let Err(e) = res {
            return Err((done, e));
        }
        if attr.count == 0 {
            break;
        }
    }
    Ok(())
}

/// Every value of an array map of `u32` values with `len` entries, read
/// with batched lookups.
pub fn array_lookup_all(map: BorrowedFd<'_>, len: u32) -> io::Result<Vec<u32>> {
    let (keys, values, n) = map_lookup_batch_all(map, 4, 4, len.max(1) as usize)?
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EOPNOTSUPP))?;
    let word =
        |b: &[u8], i: usize| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    let mut out = vec![0u32; len as usize];
    for i in 0..n {
        if let Some(slot) = out.get_mut(word(&keys, i) as usize) {
            *slot = word(&values, i);
        }
    }
    Ok(out)
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Deletes one element (aya has no delete for maps of maps).
pub fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(|_| ())
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    _rest: [u32; 8],
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;

/// Creates a map (without BTF). `inner` is the template of a map of maps.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
    inner: Option<BorrowedFd<'_>>,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        inner_map_fd: inner.map_or(0, |fd| fd.as_raw_fd() as u32),
        ..MapCreateAttr::default()
    };
    for (d, s) in attr.map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a bpf object at `path`.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..ObjGetAttr::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Opens any pinned bpf object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the XDP member of its union.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    // union: for XDP links the first u32 is the ifindex.
    union: [u64; 8],
}

/// What the kernel says about a link.
#[derive(Debug, Clone, Copy)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For XDP links: the interface index (0 once the interface is gone).
    pub xdp_ifindex: u32,
    /// For cgroup links: the cgroup's id (0 once the link was detached, or
    /// the cgroup removed).
    pub cgroup_id: u64,
    /// For network namespace links (sk_lookup): the namespace's inode
    /// number (0 once the namespace is gone).
    pub netns_ino: u32,
}

pub const BPF_LINK_TYPE_XDP: u32 = 6;

pub fn link_info(fd: impl AsFd) -> io::Result<LinkInfo> {
    let mut info = RawLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        info_len: size_of::<RawLinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        link_type: info.link_type,
        id: info.id,
        prog_id: info.prog_id,
        xdp_ifindex: (info.union[0] & 0xffff_ffff) as u32,
        cgroup_id: info.union[0],
        netns_ino: (info.union[0] & 0xffff_ffff) as u32,
    })
}

const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_F_REPLACE: u32 = 1 << 2;

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Atomically replaces the program of `link` with `new_prog`, but only if it
/// still runs `old_prog` (BPF_F_REPLACE), so a concurrent change is not lost.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old_prog.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    // The attach-type specific union, unused for cgroups and netns (must be zero).
    _rest: [u64; 4],
}

/// Links `prog` to the target open at `target` (a cgroup directory, or a
/// network namespace for sk_lookup) on hook `attach_type` (`bpf_attach_type`):
/// a bpf_link, multi-attach by nature; dropping the last reference (fd or
/// pin) detaches it.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        ..LinkCreateAttr::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct GetByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

fn fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetByIdAttr {
        id,
        ..GetByIdAttr::default()
    };
    let fd = bpf(cmd, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens a loaded program by its id.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    fd_by_id(BPF_PROG_GET_FD_BY_ID, id)
}

/// Opens a map by its id.
pub fn map_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    fd_by_id(BPF_MAP_GET_FD_BY_ID, id)
}

/// A program's id and the ids of the maps it references (its own map list,
/// fixed when it was loaded).
pub fn prog_maps(fd: impl AsFd) -> io::Result<(u32, Vec<u32>)> {
    use aya_obj::generated::bpf_prog_info;
    let get = |info: &mut bpf_prog_info| {
        let mut attr = InfoAttr {
            bpf_fd: fd.as_fd().as_raw_fd() as u32,
            info_len: size_of::<bpf_prog_info>() as u32,
            info: std::ptr::from_mut(info) as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
    };
    // SAFETY: bpf_prog_info is plain data; all zeroes is its empty value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    get(&mut info)?;
    let mut ids = vec![0u32; info.nr_map_ids as usize];
    if !ids.is_empty() {
        let id = info.id;
        // SAFETY: as above.
        info = unsafe { std::mem::zeroed() };
        info.nr_map_ids = ids.len() as u32;
        info.map_ids = ids.as_mut_ptr() as u64;
        get(&mut info)?;
        // The program cannot gain maps after loading, but never read past
        // what the kernel filled in.
        ids.truncate(info.nr_map_ids as usize);
        if info.id != id {
            return Err(io::Error::other("program changed while it was read"));
        }
    }
    Ok((info.id, ids))
}

/// A map's id and name (as the kernel keeps it: at most 15 bytes).
pub fn map_id_name(fd: impl AsFd) -> io::Result<(u32, String)> {
    use aya_obj::generated::bpf_map_info;
    // SAFETY: bpf_map_info is plain data; all zeroes is its empty value.
    let mut info: bpf_map_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        info_len: size_of::<bpf_map_info>() as u32,
        info: (&raw mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let name: Vec<u8> = info
        .name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Ok((info.id, String::from_utf8_lossy(&name).into_owned()))
}

/// The program id in one slot of a program array (`None`: empty slot).
pub fn prog_array_get(map: BorrowedFd<'_>, slot: u32) -> io::Result<Option<u32>> {
    let mut id = 0u32;
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: (&raw const slot) as u64,
        value: (&raw mut id) as u64,
        ..ElemAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(id)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Keys and values (as bytes, back to back) and how many there are.
pub type Entries = (Vec<u8>, Vec<u8>, usize);

/// Every key and value of a map, read `chunk` entries per syscall with
/// BPF_MAP_LOOKUP_BATCH (the batch token is a key). `Ok(None)` when the map
/// type or kernel has no batched lookup (the caller iterates instead).
pub fn map_lookup_batch_all(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    chunk: usize,
) -> io::Result<Option<Entries>> {
    let mut keys: Vec<u8> = Vec::new();
    let mut values: Vec<u8> = Vec::new();
    let mut token_in = vec![0u8; key_size];
    let mut token_out = vec![0u8; key_size];
    let mut total = 0usize;
    let mut first = true;
    loop {
        keys.resize((total + chunk) * key_size, 0);
        values.resize((total + chunk) * value_size, 0);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys[total * key_size..].as_mut_ptr() as u64,
            values: values[total * value_size..].as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let res = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        total += attr.count as usize;
        match res {
            Ok(_) => {}
            // ENOENT: the walk reached the end (with the last entries read).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e)
                if first
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EOPNOTSUPP | 524 /* ENOTSUPP */)
                    ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        first = false;
        token_in.copy_from_slice(&token_out);
        if attr.count == 0 {
            break;
        }
    }
    keys.truncate(total * key_size);
    values.truncate(total * value_size);
    Ok(Some((keys, values, total)))
}

// ---------------------------------------------------------------------------
// TC filters (rtnetlink): listing what sits on a clsact hook. aya attaches
// and detaches clsact filters but cannot say whose a filter is; sluice
// needs that to touch only its own.
// ---------------------------------------------------------------------------

const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;
// uapi/linux/if_link.h
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_TARGET_NETNSID: u16 = 46;

/// Parent of the clsact egress hook: `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`.
pub const TC_PARENT_EGRESS: u32 = 0xffff_fff3;

/// One filter on a TC hook, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilter {
    pub priority: u16,
    pub handle: u32,
    /// Classifier kind (`bpf`, `u32`, `matchall`, ...).
    pub kind: String,
    /// For an eBPF `bpf` filter: the program's id (0 otherwise).
    pub prog_id: u32,
    /// For a `bpf` filter: the name it was given.
    pub name: String,
}

/// The netlink attributes in `buf` as (type, payload).
fn nl_attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[4..len]));
        let aligned = (len + 3) & !3;
        buf = &buf[aligned.min(buf.len())..];
    }
    out
}

fn nl_string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Sends one rtnetlink request (`req`: header and body, the header's length
/// filled in here) and hands each answer's type and body to `each`. A dump
/// ends at `NLMSG_DONE`; any other request at its first answer. A kernel
/// error comes back as that errno.
fn nl_request(req: &mut [u8], dump: bool, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: req is readable for its length.
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= 16 {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
            if len < 16 || len > msgs.len() {
                return Err(io::Error::from(io::ErrorKind::InvalidData));
            }
            let body = &msgs[16..len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(
                        body.get(0..4)
                            .and_then(|b| b.try_into().ok())
                            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?,
                    );
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                _ => {
                    each(kind, body);
                    if !dump {
                        return Ok(());
                    }
                }
            }
            let aligned = (len + 3) & !3;
            msgs = &msgs[aligned.min(msgs.len())..];
        }
    }
}

/// A netlink request header (`struct nlmsghdr`, length filled in later).
fn nl_header(kind: u16, flags: u16) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[4..6].copy_from_slice(&kind.to_ne_bytes());
    h[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    h[8..12].copy_from_slice(&1u32.to_ne_bytes());
    h
}

/// Every filter on hook `parent` of interface `ifindex` (in the calling
/// thread's network namespace). A missing clsact qdisc lists nothing.
pub fn tc_filters(ifindex: u32, parent: u32) -> io::Result<Vec<TcFilter>> {
    // struct tcmsg: family, padding, ifindex, handle, parent, info.
    let mut req = nl_header(RTM_GETTFILTER, NLM_F_DUMP);
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&parent.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    let mut filters = Vec::new();
    let r = nl_request(&mut req, true, |_, body| {
        if body.len() < 20 {
            return;
        }
        let handle = u32::from_ne_bytes(body[8..12].try_into().expect("4 bytes"));
        let info = u32::from_ne_bytes(body[16..20].try_into().expect("4 bytes"));
        let mut f = TcFilter {
            priority: (info >> 16) as u16,
            handle,
            kind: String::new(),
            prog_id: 0,
            name: String::new(),
        };
        for (t, payload) in nl_attrs(&body[20..]) {
            match t {
                TCA_KIND => f.kind = nl_string(payload),
                TCA_OPTIONS => {
                    for (o, p) in nl_attrs(payload) {
                        match o {
                            TCA_BPF_ID if p.len() >= 4 => {
                                f.prog_id =
                                    u32::from_ne_bytes(p[0..4].try_into().expect("4 bytes"));
                            }
                            TCA_BPF_NAME => f.name = nl_string(p),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        // Handle 0 is the per-priority head the kernel lists before that
        // priority's filters, not a filter.
        if f.handle != 0 {
            filters.push(f);
        }
    });
    match r {
        Ok(()) => Ok(filters),
        // No clsact qdisc (or no such interface hook): nothing there.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(filters),
        Err(e) => Err(e),
    }
}

/// What `RTM_GETLINK` says of an interface: its kind, its link (a veth's
/// peer) and which XDP program runs in the driver.
#[derive(Debug, Default)]
struct NlLink {
    kind: String,
    link: Option<u32>,
    link_netnsid: Option<i32>,
    /// The id of the XDP program in native (driver) mode; 0 when none.
    xdp_drv_prog: u32,
}

/// `RTM_GETLINK` for interface `ifindex` in this namespace, or, with
/// `netnsid`, in the namespace that id names here.
fn link_info_nl(ifindex: u32, netnsid: Option<i32>) -> io::Result<NlLink> {
    // struct ifinfomsg: family, padding, type, index, flags, change.
    let mut req = nl_header(libc::RTM_GETLINK, 0);
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]);
    if let Some(id) = netnsid {
        req.extend_from_slice(&8u16.to_ne_bytes());
        req.extend_from_slice(&IFLA_TARGET_NETNSID.to_ne_bytes());
        req.extend_from_slice(&id.to_ne_bytes());
    }
    let mut info = NlLink::default();
    let u32_of = |p: &[u8]| {
        p.get(0..4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
    };
    nl_request(&mut req, false, |kind, body| {
        if kind != libc::RTM_NEWLINK || body.len() < 16 {
            return;
        }
        for (t, p) in nl_attrs(&body[16..]) {
            match t {
                IFLA_LINK => info.link = u32_of(p),
                IFLA_LINK_NETNSID => info.link_netnsid = u32_of(p).map(|v| v as i32),
                IFLA_LINKINFO => {
                    for (i, q) in nl_attrs(p) {
                        if i == IFLA_INFO_KIND {
                            info.kind = nl_string(q);
                        }
                    }
                }
                IFLA_XDP => {
                    for (x, q) in nl_attrs(p) {
                        if x == IFLA_XDP_DRV_PROG_ID {
                            info.xdp_drv_prog = u32_of(q).unwrap_or(0);
                        }
                    }
                }
                _ => {}
            }
        }
    })?;
    Ok(info)
}

/// For a veth (in the calling thread's namespace): whether its peer runs an
/// XDP program in native mode, wherever the peer lives. `None` when
/// `ifindex` is not a veth or its peer cannot be found. Frames a program
/// sends back with `XDP_TX` on a veth reach the peer only then.
pub fn veth_peer_has_native_xdp(ifindex: u32) -> io::Result<Option<bool>> {
    let me = link_info_nl(ifindex, None)?;
    let (true, Some(peer)) = (me.kind == "veth", me.link.filter(|p| *p != 0)) else {
        return Ok(None);
    };
    match link_info_nl(peer, me.link_netnsid) {
        Ok(p) => Ok(Some(p.xdp_drv_prog != 0)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The index of interface `name` in this network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// The Ethernet address of interface `name` in this network namespace.
pub fn mac_address(name: &str) -> Option<[u8; 6]> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|i| i.interface_name == name)
        .find_map(|i| i.address?.as_link_addr()?.addr())
}

/// An integer socket option of `fd` (4 or 8 bytes, as the kernel answers;
/// a 4-byte answer is sign-extended).
pub fn getsockopt_int(fd: RawFd, level: libc::c_int, opt: libc::c_int) -> io::Result<i64> {
    let mut v = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length are valid for the call.
    let rc = unsafe { libc::getsockopt(fd, level, opt, (&raw mut v).cast(), &raw mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if len as usize == size_of::<u32>() {
        i64::from(v as u32 as i32)
    } else {
        v as i64
    })
}
