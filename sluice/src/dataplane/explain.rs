//! `sluice explain`'s kernel half: runs the pinned XDP program — the one
//! packets get — on one frame with `BPF_PROG_TEST_RUN`, an `ExplainMeta`
//! block in the frame's XDP metadata, and reads back what the pipeline
//! wrote there (verdict, reason, rule or list entry, backend). No second
//! implementation of the verdict: the program decides, as for a packet.
//!
//! The frame is a packet to the program in every way: it is counted,
//! may be sampled as a flow record or captured, spends rate-limit credit
//! and, to a VIP, opens a connection entry. It is never sent: a test run
//! transmits nothing, whatever the program returns.

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;
use sluice_common::{EXPLAIN_MAGIC, ExplainMeta};

use super::{DataplaneError, PinRoot};

const META_LEN: usize = size_of::<ExplainMeta>();

/// What the program did with the frame.
#[derive(Debug, Clone)]
pub struct Run {
    /// The XDP action it returned (`XDP_DROP` 1, `XDP_PASS` 2, `XDP_TX` 3,
    /// `XDP_REDIRECT` 4).
    pub action: u32,
    /// What the pipeline wrote into the metadata.
    pub meta: ExplainMeta,
    /// The frame as the program left it (a NAT rewrite, a SYN challenge).
    pub frame: Vec<u8>,
}

/// `struct xdp_md` as the test run's context: the metadata is the first
/// `META_LEN` bytes of the input, the frame the rest.
fn xdp_md(total: usize, ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    let words = [META_LEN as u32, total as u32, 0, ifindex, 0, 0];
    for (i, w) in words.iter().enumerate() {
        ctx[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    ctx
}

fn run_once(prog: &Xdp, frame: &[u8], ifindex: u32) -> Result<Run, std::io::Error> {
    let meta = ExplainMeta {
        magic: EXPLAIN_MAGIC,
        ..ExplainMeta::default()
    };
    let mut input = Vec::with_capacity(META_LEN + frame.len());
    // SAFETY: ExplainMeta is repr(C) plain integers without padding holes.
    input.extend_from_slice(unsafe {
        std::slice::from_raw_parts((&raw const meta).cast::<u8>(), META_LEN)
    });
    input.extend_from_slice(frame);
    let ctx_in = xdp_md(input.len(), ifindex);
    let mut ctx_out = [0u8; 24];
    let mut out = vec![0u8; input.len() + 512];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&input);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx_in);
    opts.ctx_out = Some(&mut ctx_out);
    let r = prog.test_run(opts).map_err(|e| {
        let errno = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .and_then(std::io::Error::raw_os_error);
        match errno {
            Some(n) => std::io::Error::from_raw_os_error(n),
            None => std::io::Error::other(e.to_string()),
        }
    })?;
    out.truncate(r.data_size_out as usize);
    // The output starts at the metadata; xdp_md.data is its length then.
    let meta_len = u32::from_ne_bytes([ctx_out[0], ctx_out[1], ctx_out[2], ctx_out[3]]) as usize;
    if meta_len < META_LEN || out.len() < meta_len {
        return Err(std::io::Error::other(format!(
            "the test run returned {} bytes with {meta_len} bytes of metadata",
            out.len()
        )));
    }
    // SAFETY: at least META_LEN bytes; ExplainMeta is plain integers.
    let meta = unsafe { std::ptr::read_unaligned(out.as_ptr().cast::<ExplainMeta>()) };
    Ok(Run {
        action: r.return_value,
        meta,
        frame: out[meta_len..].to_vec(),
    })
}

/// Runs the pinned program on `frame` as if received on `ifindex` (in the
/// caller's network namespace; every device has the receive queue a test
/// run needs, whatever its XDP mode).
pub fn run(root: &PinRoot, frame: &[u8], ifindex: u32) -> Result<Run, DataplaneError> {
    if !root.prog().exists() {
        return Err(DataplaneError::NotAttached {
            root: root.root.clone(),
        });
    }
    let prog = Xdp::from_pin(root.prog(), XdpAttachType::Interface).map_err(|e| {
        DataplaneError::PinnedMap {
            path: root.prog(),
            source: e.into(),
        }
    })?;
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            DataplaneError::Permission {
                what: "running the XDP program (BPF_PROG_TEST_RUN)".into(),
            }
        } else {
            DataplaneError::Io {
                what: "running the XDP program on the frame (BPF_PROG_TEST_RUN)".into(),
                source: e,
            }
        }
    };
    run_once(&prog, frame, ifindex).map_err(io)
}
