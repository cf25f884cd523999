//! The benchmark-only XDP programs (sluice-ebpf/src/bench.rs): the ceiling,
//! the hand-written reference lookup and the live-frames traffic generator.
//! Loaded without pins; everything goes away when the [`aya::Ebpf`] drops.

use std::{os::fd::AsFd as _, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode, links::FdLink},
};
use ipnet::{Ipv4Net, Ipv6Net};
use sluice::dataplane::{BENCH_OBJECT, sys};

pub const DROP_ALL: &str = "bench_drop_all";
pub const REFERENCE: &str = "bench_reference";
pub const TRAFFICGEN: &str = "bench_trafficgen";

fn load_object(gen_sources: Option<u32>) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    if let Some(n) = gen_sources.as_ref() {
        loader.override_global("GEN_SOURCES", n, true);
    }
    loader
        .load(BENCH_OBJECT)
        .map_err(|e| anyhow!("loading the benchmark object: {e:#}"))
}

fn load_xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("{name} missing from the benchmark object"))?
        .try_into()?;
    prog.load()
        .map_err(|e| anyhow!("loading {name}: {e}: {:?}", std::error::Error::source(&e)))?;
    Ok(prog)
}

fn map_data(ebpf: &mut Ebpf, name: &str) -> Result<MapData> {
    match ebpf.take_map(name) {
        Some(Map::LpmTrie(d) | Map::PerCpuArray(d) | Map::Array(d) | Map::HashMap(d)) => Ok(d),
        Some(_) => bail!("map {name} has an unexpected type"),
        None => bail!("map {name} missing from the benchmark object"),
    }
}

/// Runs an XDP program `repeat` times on `frame` (BPF_PROG_TEST_RUN):
/// returns (action, kernel-measured ns per run).
pub fn test_run(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = repeat;
    let r = prog
        .test_run(opts)
        .map_err(|e| anyhow!("test_run: {e}: {:?}", std::error::Error::source(&e)))?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// `bench_reference` with its two LPM tries filled.
pub struct Reference {
    ebpf: Ebpf,
    v4: MapData,
    v6: MapData,
}

impl Reference {
    pub fn new() -> Result<Self> {
        let mut ebpf = load_object(None)?;
        load_xdp(&mut ebpf, REFERENCE)?;
        let v4 = map_data(&mut ebpf, "REF_V4")?;
        let v6 = map_data(&mut ebpf, "REF_V6")?;
        Ok(Self { ebpf, v4, v6 })
    }

    pub fn prog(&self) -> &Xdp {
        self.ebpf
            .program(REFERENCE)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("loaded in new()")
    }

    /// Inserts the prefixes with batched updates (value 1).
    pub fn fill(&mut self, v4: &[Ipv4Net], v6: &[Ipv6Net]) -> Result<()> {
        // aya's LPM key layout: u32 prefix length, then the address bytes (packed).
        let mut k4 = Vec::with_capacity(v4.len() * 8);
        for n in v4 {
            k4.extend_from_slice(&u32::from(n.prefix_len()).to_ne_bytes());
            k4.extend_from_slice(&n.network().octets());
        }
        let mut k6 = Vec::with_capacity(v6.len() * 20);
        for n in v6 {
            k6.extend_from_slice(&u32::from(n.prefix_len()).to_ne_bytes());
            k6.extend_from_slice(&n.network().octets());
        }
        for (map, keys, count, name) in [
            (&self.v4, &k4, v4.len(), "REF_V4"),
            (&self.v6, &k6, v6.len(), "REF_V6"),
        ] {
            if count == 0 {
                continue;
            }
            let values = [1u8, 0, 0, 0].repeat(count);
            sys::map_update_batch(map.fd().as_fd(), keys, &values, count)
                .map_err(|(n, e)| anyhow!("batch update of {name} failed after {n}: {e}"))?;
        }
        Ok(())
    }
}

/// A program attached to an interface (in the namespace of the thread that
/// attached it); detached when dropped.
pub struct Attached {
    _link: FdLink,
    _ebpf: Ebpf,
}

/// Loads `bench_drop_all` and attaches it natively to `ifindex` (the calling
/// thread must be in the interface's namespace).
pub fn attach_drop_all(ifindex: u32) -> Result<Attached> {
    let mut ebpf = load_object(None)?;
    let prog = load_xdp(&mut ebpf, DROP_ALL)?;
    let id = prog
        .attach_to_if_index(ifindex, XdpMode::Driver)
        .map_err(|e| {
            anyhow!(
                "attaching {DROP_ALL}: {e}: {:?}",
                std::error::Error::source(&e)
            )
        })?;
    let link = prog.take_link(id)?;
    let link = FdLink::try_from(link).map_err(|e| anyhow!("not a bpf_link: {e}"))?;
    Ok(Attached {
        _link: link,
        _ebpf: ebpf,
    })
}

/// How the generators send: BPF_F_TEST_XDP_LIVE_FRAMES where the kernel
/// allows it, else an AF_PACKET socket (see [`crate::pktgen`]). Decided
/// once per process by [`probe_live_frames`].
#[derive(Debug, Clone)]
pub enum GenMode {
    LiveFrames,
    /// The kernel refused live frames; the reason it gave.
    PacketSocket(String),
}

static GEN_MODE: std::sync::OnceLock<GenMode> = std::sync::OnceLock::new();

/// Whether this kernel runs XDP programs with live frames: one frame of
/// `bench_drop_all` injected on the loopback device (dropped at once, so
/// nothing is sent). Probed once; later calls return the first answer.
pub fn probe_live_frames() -> &'static GenMode {
    GEN_MODE.get_or_init(|| match probe() {
        Ok(()) => GenMode::LiveFrames,
        Err(e) => GenMode::PacketSocket(format!("{e:#}")),
    })
}

fn probe() -> Result<()> {
    let mut ebpf = load_object(None)?;
    let prog = load_xdp(&mut ebpf, DROP_ALL)?;
    let frame = [0u8; 64];
    let md = XdpMd {
        data_end: frame.len() as u32,
        ingress_ifindex: 1, // lo: every namespace has it, ifindex 1
        ..XdpMd::default()
    };
    live_run(prog, &frame, &md, 1).map(|_| ())
}

/// What the method texts say about the generator in use.
pub fn gen_description() -> String {
    match probe_live_frames() {
        GenMode::LiveFrames => format!(
            "bench_trafficgen run with BPF_PROG_TEST_RUN + BPF_F_TEST_XDP_LIVE_FRAMES (as xdp-trafficgen does), batches of {GEN_BATCH}"
        ),
        GenMode::PacketSocket(why) => format!(
            "an AF_PACKET socket per thread (PACKET_QDISC_BYPASS, sendmmsg batches of 64) sending the frames bench_trafficgen would make, \
             because this kernel refuses live frames ({why}); such a generator offers fewer frames per second than live frames would"
        ),
    }
}

fn live_run(prog: &Xdp, frame: &[u8], md: &XdpMd, count: u32) -> Result<Duration> {
    // SAFETY: XdpMd is repr(C) plain data.
    let ctx =
        unsafe { std::slice::from_raw_parts((&raw const *md).cast::<u8>(), size_of::<XdpMd>()) };
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(ctx);
    opts.repeat = count;
    opts.attrs = TestRunAttrs::new().xdp_live_frames(GEN_BATCH);
    let r = prog
        .test_run(opts)
        .map_err(|e| anyhow!("live test_run: {e}: {:?}", std::error::Error::source(&e)))?;
    Ok(r.duration)
}

/// The traffic generator: `bench_trafficgen` run with BPF_PROG_TEST_RUN and
/// BPF_F_TEST_XDP_LIVE_FRAMES, so every frame it returns XDP_TX for is
/// really transmitted out of the injecting interface; or, where the kernel
/// refuses live frames, an AF_PACKET socket sending the same frames.
pub enum Generator {
    Live(Ebpf),
    Packet {
        socket: Option<crate::pktgen::PacketGen>,
        sources: u32,
    },
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it in `ctx_in`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct XdpMd {
    pub data: u32,
    pub data_end: u32,
    pub data_meta: u32,
    pub ingress_ifindex: u32,
    pub rx_queue_index: u32,
    pub egress_ifindex: u32,
}

/// Frames one generator call sends in one kernel batch (the kernel's
/// maximum is 256; 64 is its default, NAPI's budget).
pub const GEN_BATCH: u32 = 64;

impl Generator {
    /// `sources`: how many distinct IPv4 sources frames cycle through.
    pub fn new(sources: u32) -> Result<Self> {
        if let GenMode::PacketSocket(_) = probe_live_frames() {
            return Ok(Self::Packet {
                socket: None,
                sources,
            });
        }
        let mut ebpf = load_object(Some(sources))?;
        load_xdp(&mut ebpf, TRAFFICGEN)?;
        Ok(Self::Live(ebpf))
    }

    /// Sends `count` copies of `frame` (sources varied) as if received on
    /// `ifindex` (live frames: the program's XDP_TX sends them out of it)
    /// or out of `ifindex` (packet socket), which must be in the calling
    /// thread's namespace. Returns the time per frame (the kernel's, for
    /// live frames).
    pub fn send(&mut self, frame: &[u8], ifindex: u32, count: u32) -> Result<Duration> {
        match self {
            Self::Live(ebpf) => {
                let prog: &Xdp = ebpf
                    .program(TRAFFICGEN)
                    .and_then(|p| <&Xdp>::try_from(p).ok())
                    .expect("loaded in new()");
                let md = XdpMd {
                    data_end: frame.len() as u32,
                    ingress_ifindex: ifindex,
                    ..XdpMd::default()
                };
                live_run(prog, frame, &md, count)
            }
            Self::Packet { socket, sources } => {
                if socket.is_none() {
                    *socket = Some(crate::pktgen::PacketGen::new(ifindex, *sources)?);
                }
                socket.as_mut().expect("set above").send(frame, count)
            }
        }
    }
}
