//! `sluice capture`: the packets sluice saw on one interface, with the verdict
//! and reason of each, written as pcapng for tcpdump and Wireshark.

use std::{
    borrow::Cow,
    fs::File,
    io::{self, BufWriter, IsTerminal as _, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;
use pcap_file::{
    DataLink, Endianness, PcapError,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
            interface_statistics::{InterfaceStatisticsBlock, InterfaceStatisticsOption},
            section_header::{SectionHeaderBlock, SectionHeaderOption},
        },
    },
};
use sluice_common::{CAPTURE_SNAP, Verdict};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::dataplane::{
    DataplaneError, PinRoot, attach,
    capture::{Capture, CaptureError, CaptureLock, Filter, Packet, wall_clock_ns},
};

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// The interface (in the namespace -n selects) whose packets to capture.
    pub iface: String,
    /// Only packets with these verdicts; repeat or separate with commas
    /// (default: all).
    #[arg(
        long = "verdict",
        value_enum,
        value_delimiter = ',',
        value_name = "VERDICT"
    )]
    pub verdicts: Vec<VerdictArg>,
    /// Stop after N packets.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after SECS seconds (decimals allowed).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Bytes of each packet to keep, 1 to 2024 (the default).
    #[arg(long, value_name = "N")]
    pub snaplen: Option<u32>,
    /// Write pcapng to FILE; `-` writes to stdout.
    #[arg(short = 'w', long = "write", value_name = "FILE", required = true)]
    pub write: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictArg {
    Pass,
    Drop,
    Audit,
}

impl From<VerdictArg> for Verdict {
    fn from(v: VerdictArg) -> Self {
        match v {
            VerdictArg::Pass => Self::Pass,
            VerdictArg::Drop => Self::Drop,
            VerdictArg::Audit => Self::Audit,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureCommandError {
    #[error("--count must be at least 1")]
    ZeroCount,
    #[error("--duration must be a number of seconds above 0 (got {secs})")]
    BadDuration { secs: f64 },
    #[error("--snaplen must be from 1 to {max} bytes (got {snaplen})")]
    BadSnaplen { snaplen: u32, max: usize },
    #[error("refusing to write pcapng to a terminal: redirect stdout or give -w FILE")]
    Terminal,
    #[error("cannot write {path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting up the capture loop: {source}")]
    Runtime {
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// Why a capture ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stop {
    /// `--count` packets were written.
    Count,
    /// `--duration` elapsed.
    Duration,
    /// SIGINT, SIGTERM or SIGHUP.
    Signal,
    /// The reader of the output went away (a closed pipe).
    OutputClosed,
}

impl Stop {
    const fn describe(self) -> &'static str {
        match self {
            Self::Count => "--count reached",
            Self::Duration => "--duration elapsed",
            Self::Signal => "interrupted",
            Self::OutputClosed => "output closed",
        }
    }
}

/// What `--json` prints at the end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub interface: String,
    pub netns: String,
    pub ifindex: u32,
    pub file: String,
    pub verdicts: Vec<&'static str>,
    pub snaplen: u32,
    /// Packets written to the file.
    pub packets: u64,
    /// Packets the kernel could not capture because the ring was full.
    pub lost: u64,
    pub stopped: Stop,
}

/// Checked options.
struct Plan {
    verdicts: Vec<Verdict>,
    count: Option<u64>,
    duration: Option<Duration>,
    snaplen: u32,
}

fn plan(args: &CaptureArgs) -> Result<Plan, CaptureCommandError> {
    if args.count == Some(0) {
        return Err(CaptureCommandError::ZeroCount);
    }
    let duration = match args.duration {
        None => None,
        Some(secs) => Some(
            Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or(CaptureCommandError::BadDuration { secs })?,
        ),
    };
    let snaplen = args.snaplen.unwrap_or(CAPTURE_SNAP as u32);
    if snaplen == 0 || snaplen as usize > CAPTURE_SNAP {
        return Err(CaptureCommandError::BadSnaplen {
            snaplen,
            max: CAPTURE_SNAP,
        });
    }
    let mut verdicts: Vec<Verdict> = if args.verdicts.is_empty() {
        Verdict::ALL.to_vec()
    } else {
        args.verdicts.iter().map(|v| Verdict::from(*v)).collect()
    };
    verdicts.sort();
    verdicts.dedup();
    Ok(Plan {
        verdicts,
        count: args.count,
        duration,
        snaplen,
    })
}

/// Checks that sluice is attached to `iface` in this namespace and returns
/// its index here.
fn resolve(root: &PinRoot, iface: &str, netns: &str) -> Result<u32, DataplaneError> {
    let ifindex =
        nix::net::if_::if_nametoindex(iface).map_err(|_| DataplaneError::UnknownInterface {
            name: iface.to_string(),
            netns: netns.to_string(),
        })?;
    if !root.is_set_up() {
        return Err(DataplaneError::NotAttached {
            root: root.root.clone(),
        });
    }
    let status = attach::status(root)?;
    let attached = status
        .attachments
        .iter()
        .any(|a| a.interface == iface && a.netns == netns && a.ifindex == ifindex);
    if !attached {
        return Err(DataplaneError::NotAttachedTo {
            iface: iface.to_string(),
            netns: netns.to_string(),
        });
    }
    // Interface indexes are per namespace and the kernel filters by index
    // alone: say so when another attachment of this pin root shares it.
    for a in &status.attachments {
        if a.ifindex == ifindex && a.netns != netns {
            eprintln!(
                "sluice: note: {} in netns {} has the same interface index ({ifindex}); \
                 its packets are captured too",
                a.interface, a.netns
            );
        }
    }
    Ok(ifindex)
}

/// The pcapng stream: a section header, one interface, then packets.
struct PcapOut {
    writer: PcapNgWriter<BufWriter<Box<dyn Write>>>,
}

fn io_of(e: PcapError) -> io::Error {
    match e {
        PcapError::IoError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// pcap-file writes the 64-bit timestamps of statistics blocks as one
/// integer, while pcapng wants the high 32 bits first: in a little-endian
/// file that is the two halves swapped.
fn isb_time(ns: u64) -> u64 {
    ns.rotate_left(32)
}

impl PcapOut {
    fn new(out: Box<dyn Write>, iface: &str, netns: &str, plan: &Plan) -> Result<Self, io::Error> {
        let section = SectionHeaderBlock {
            endianness: Endianness::Little,
            options: vec![SectionHeaderOption::UserApplication(Cow::Owned(format!(
                "sluice {}",
                env!("CARGO_PKG_VERSION")
            )))],
            ..SectionHeaderBlock::default()
        };
        let mut writer =
            PcapNgWriter::with_section_header(BufWriter::new(out), section).map_err(io_of)?;
        let verdicts: Vec<&str> = plan.verdicts.iter().map(|v| v.name()).collect();
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: plan.snaplen,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Owned(iface.to_string())),
                InterfaceDescriptionOption::IfDescription(Cow::Owned(format!(
                    "sluice XDP ingress on {iface} (netns {netns}), verdicts {}",
                    verdicts.join(",")
                ))),
                // Timestamps in nanoseconds (the default would be µs).
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        writer.write_pcapng_block(idb).map_err(io_of)?;
        Ok(Self { writer })
    }

    fn packet(&mut self, p: &Packet) -> io::Result<()> {
        let epb = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_nanos(wall_clock_ns(p.ts_ns)),
            original_len: p.orig_len,
            data: Cow::Borrowed(&p.data),
            options: vec![
                EnhancedPacketOption::Comment(Cow::Owned(p.comment())),
                // epb_flags: direction inbound (XDP sees ingress only).
                EnhancedPacketOption::Flags(0b01),
            ],
        };
        self.writer.write_pcapng_block(epb).map_err(io_of)?;
        Ok(())
    }

    /// Statistics for Wireshark's capture file properties: packets
    /// delivered, and packets the kernel lost (ring full).
    fn statistics(
        &mut self,
        start_ns: u64,
        end_ns: u64,
        packets: u64,
        lost: u64,
    ) -> io::Result<()> {
        let isb = InterfaceStatisticsBlock {
            interface_id: 0,
            timestamp: isb_time(end_ns),
            options: vec![
                InterfaceStatisticsOption::IsbStartTime(isb_time(start_ns)),
                InterfaceStatisticsOption::IsbEndTime(isb_time(end_ns)),
                InterfaceStatisticsOption::IsbIfDrop(lost),
                InterfaceStatisticsOption::IsbUsrDeliv(packets),
            ],
        };
        self.writer.write_pcapng_block(isb).map_err(io_of)?;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.get_mut().flush()
    }
}

fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Packets handled per pass before signals and the deadline are looked at.
const BATCH: usize = 1024;

pub fn run(
    root: &PinRoot,
    args: &CaptureArgs,
    netns: &str,
    json: bool,
) -> Result<(), CaptureCommandError> {
    let plan = plan(args)?;
    let to_stdout = args.write.as_os_str() == "-";
    if to_stdout && io::stdout().is_terminal() {
        return Err(CaptureCommandError::Terminal);
    }
    let ifindex = resolve(root, &args.iface, netns)?;
    let lock = CaptureLock::acquire(root)?;
    let output: Box<dyn Write> = if to_stdout {
        Box::new(io::stdout())
    } else {
        Box::new(
            File::create(&args.write).map_err(|source| CaptureCommandError::Output {
                path: args.write.clone(),
                source,
            })?,
        )
    };
    // A closed pipe must end the capture through the code that switches it
    // off, not kill the process (main restores SIGPIPE's default).
    // SAFETY: changing one signal's disposition; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CaptureCommandError::Runtime { source })?;
    let result = rt.block_on(capture(root, args, netns, &plan, ifindex, lock, output));
    if let Err(CaptureCommandError::Capture(_) | CaptureCommandError::Runtime { .. }) = &result
        && !to_stdout
    {
        // Nothing was captured: leave no empty file behind.
        let _ = std::fs::remove_file(&args.write);
    }
    let summary = result?;
    if json {
        let text = serde_json::to_string_pretty(&summary).expect("summaries serialise");
        if to_stdout {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    } else {
        eprintln!(
            "{} packet{} written to {} ({})",
            summary.packets,
            if summary.packets == 1 { "" } else { "s" },
            summary.file,
            summary.stopped.describe()
        );
        eprintln!(
            "{} packet{} lost by the kernel (capture ring full)",
            summary.lost,
            if summary.lost == 1 { "" } else { "s" },
        );
    }
    Ok(())
}

fn write_err(path: &Path) -> impl Fn(io::Error) -> CaptureCommandError + '_ {
    move |source| CaptureCommandError::Output {
        path: path.to_path_buf(),
        source,
    }
}

async fn capture(
    root: &PinRoot,
    args: &CaptureArgs,
    netns: &str,
    plan: &Plan,
    ifindex: u32,
    lock: CaptureLock,
    output: Box<dyn Write>,
) -> Result<Summary, CaptureCommandError> {
    let runtime_err = |source| CaptureCommandError::Runtime { source };
    // Handlers first: a signal after capture is switched on must reach the
    // code that switches it off.
    let mut sigint = signal(SignalKind::interrupt()).map_err(runtime_err)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(runtime_err)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(runtime_err)?;
    let file = if args.write.as_os_str() == "-" {
        "stdout".to_string()
    } else {
        args.write.display().to_string()
    };
    let werr = write_err(&args.write);
    let filter = Filter {
        ifindex,
        verdict_mask: Filter::mask_of(&plan.verdicts),
        snaplen: plan.snaplen,
    };
    let capture = Capture::start(root, lock, filter)?;
    let start_ns = now_unix_ns();
    let deadline = plan.duration.map(|d| tokio::time::Instant::now() + d);
    // SAFETY: the fd is the ring's, which `Capture` owns and never replaces
    // or closes while it lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(capture, Interest::READABLE) }
        .map_err(|e| runtime_err(e.into_parts().1))?;
    let mut out = PcapOut::new(output, &args.iface, netns, plan).map_err(&werr)?;
    out.flush().map_err(&werr)?;
    let verdicts: Vec<&'static str> = plan.verdicts.iter().map(|v| v.name()).collect();
    eprintln!(
        "sluice: capturing on {} (netns {netns}, verdicts {}, snaplen {}) to {file}",
        args.iface,
        verdicts.join(","),
        plan.snaplen
    );
    let mut packets = 0u64;
    // A failed write to a closed pipe ends the capture; other errors fail it.
    let closed = |e: io::Error| -> Result<Stop, CaptureCommandError> {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Ok(Stop::OutputClosed)
        } else {
            Err(werr(e))
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let stopped = loop {
        let mut stop = None;
        // Records left after a full batch: come back without waiting.
        let mut more = true;
        {
            let cap = ring.get_mut();
            for _ in 0..BATCH {
                let Some(p) = cap.next_packet() else {
                    more = false;
                    break;
                };
                if let Err(e) = out.packet(&p) {
                    stop = Some(closed(e)?);
                    break;
                }
                packets += 1;
                if plan.count.is_some_and(|c| packets >= c) {
                    stop = Some(Stop::Count);
                    break;
                }
            }
        }
        if stop.is_none()
            && let Err(e) = out.flush()
        {
            stop = Some(closed(e)?);
        }
        if let Some(s) = stop {
            break s;
        }
        tokio::select! {
            biased;
            _ = sigint.recv() => break Stop::Signal,
            _ = sigterm.recv() => break Stop::Signal,
            _ = sighup.recv() => break Stop::Signal,
            () = until(deadline) => break Stop::Duration,
            () = std::future::ready(()), if more => {}
            ready = ring.readable_mut() => ready.map_err(runtime_err)?.clear_ready(),
            // A safety net should a wake-up ever be missed.
            _ = tick.tick() => {}
        }
    };
    let capture = ring.into_inner();
    let counts = capture.finish()?;
    let end_ns = now_unix_ns();
    if stopped != Stop::OutputClosed {
        let written = out
            .statistics(start_ns, end_ns, packets, counts.lost)
            .and_then(|()| out.flush());
        if let Err(e) = written {
            closed(e)?;
        }
    }
    Ok(Summary {
        interface: args.iface.clone(),
        netns: netns.to_string(),
        ifindex,
        file,
        verdicts,
        snaplen: plan.snaplen,
        packets,
        lost: counts.lost,
        stopped,
    })
}
