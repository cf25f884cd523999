//! End-to-end tests of `sluice capture`: the real binary attached to a veth in
//! a network namespace, frames of known bytes sent from the peer namespace,
//! and the pcapng file read back with tcpdump and with pcap-file.
//!
//! Needs root, bpffs and tcpdump. The sending end is silenced first (no ARP,
//! no IPv6, so no neighbour discovery, MLD or router solicitations) and the
//! test frames go out through an AF_PACKET socket: every frame that reaches
//! sluice is one the test sent, so the captures can be checked exactly. The
//! frames' destination MAC is not B's, so B's stack ignores what sluice
//! passes and never answers.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::{sys::signal::Signal, unistd::Pid};
use pcap_file::{
    DataLink,
    pcapng::{
        Block, PcapNgReader,
        blocks::{
            enhanced_packet::EnhancedPacketOption,
            interface_description::InterfaceDescriptionOption,
            interface_statistics::InterfaceStatisticsOption,
        },
    },
};

use crate::support::{
    cli::{TempFile, expect_one_line_error, parse_json, sluice, sluice_cmd, sluice_output, stderr},
    frames::Frame,
    netns::{Child, Lab, Netns, PinRoot, output_with_timeout},
};

/// How long a capture may take to say it started, or to end once it should.
const START_LIMIT: Duration = Duration::from_secs(15);
const END_LIMIT: Duration = Duration::from_secs(20);
const UDP_DPORT: u16 = 29000;

// ---------------------------------------------------------------------------
// Lab set-up
// ---------------------------------------------------------------------------

/// A lab with sluice attached on B's end, the deny prefixes in place, and
/// A's end silenced.
fn lab_with_sluice(tag: &str) -> (Lab, PinRoot) {
    let lab = Lab::new(tag);
    let pin = PinRoot::new();
    sluice(&pin, &lab.b, &["attach", &lab.b_if, "--mode", "native"]);
    sluice(
        &pin,
        &lab.b,
        &[
            "deny",
            "add",
            &denied_prefix(&lab, false),
            &denied_prefix(&lab, true),
        ],
    );
    silence(&lab.a, &lab.a_if);
    (lab, pin)
}

/// The source prefix the tests deny: 198.18.X.64/26 and 2001:2:0:X::40/122,
/// inside the lab's subnet but holding none of its hosts.
fn denied_prefix(lab: &Lab, v6: bool) -> String {
    if v6 {
        format!("2001:2:0:{:x}::40/122", lab.x)
    } else {
        format!("198.18.{}.64/26", lab.x)
    }
}

/// A source inside the denied prefix.
fn denied_source(lab: &Lab, v6: bool) -> IpAddr {
    if v6 {
        format!("2001:2:0:{:x}::66", lab.x).parse().expect("IPv6")
    } else {
        format!("198.18.{}.66", lab.x).parse().expect("IPv4")
    }
}

/// Stops the kernel in `ns` from sending anything on `iface` by itself.
fn silence(ns: &Netns, iface: &str) {
    ns.exec_ok(["ip", "link", "set", "dev", iface, "arp", "off"]);
    ns.exec_ok([
        "sysctl",
        "-q",
        "-w",
        &format!("net.ipv6.conf.{iface}.disable_ipv6=1"),
    ]);
    // Let whatever the change itself sent (MLD leave reports) go by.
    thread::sleep(Duration::from_millis(300));
}

// ---------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------

/// One frame the test sends, and what a capture must say about it.
#[derive(Debug, Clone)]
struct Sent {
    bytes: Vec<u8>,
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    verdict: &'static str,
    reason: &'static str,
}

/// UDP to B from A's address (passed) and from a denied source (dropped), in
/// both families, `per_kind` of each, interleaved: pass v4, drop v4, pass v6,
/// drop v6, ... Source ports start at `base` and differ per frame.
fn traffic(lab: &Lab, base: u16, per_kind: u16) -> Vec<Sent> {
    let mut out = Vec::new();
    for i in 0..per_kind {
        for (k, (v6, denied)) in [(false, false), (false, true), (true, false), (true, true)]
            .into_iter()
            .enumerate()
        {
            let src = if denied {
                denied_source(lab, v6)
            } else {
                lab.a_addr(v6)
            };
            let dst = lab.b_addr(v6);
            let sport = base + i * 10 + u16::try_from(k).expect("small");
            let payload = format!("sluice capture test {sport}");
            out.push(Sent {
                bytes: Frame::ip(src, dst)
                    .udp(sport, UDP_DPORT)
                    .payload(payload.as_bytes())
                    .build(),
                v6,
                src,
                dst,
                sport,
                verdict: if denied { "drop" } else { "pass" },
                reason: if denied { "deny-list" } else { "default" },
            });
        }
    }
    out
}

/// Sends each frame once through an AF_PACKET socket on `iface` in `ns`.
fn send(ns: &Netns, iface: &str, frames: &[Sent]) {
    let iface = iface.to_owned();
    let frames: Vec<Vec<u8>> = frames.iter().map(|f| f.bytes.clone()).collect();
    ns.run(move || {
        let index = nix::net::if_::if_nametoindex(iface.as_str())
            .unwrap_or_else(|e| panic!("no interface {iface}: {e}"));
        // Protocol 0: this socket sends only and receives nothing.
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(
            raw >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = i32::try_from(index).expect("ifindex fits i32");
        addr.sll_halen = 6;
        for f in &frames {
            // SAFETY: the buffer and the address outlive the call.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const addr).cast(),
                    u32::try_from(size_of::<libc::sockaddr_ll>()).expect("small"),
                )
            };
            assert_eq!(
                n,
                isize::try_from(f.len()).expect("small"),
                "sendto on {iface}: {}",
                std::io::Error::last_os_error()
            );
            thread::sleep(Duration::from_millis(5));
        }
    });
}

// ---------------------------------------------------------------------------
// Running `sluice capture`
// ---------------------------------------------------------------------------

/// A running `sluice capture`, killed on drop if it is still running.
struct CaptureProc {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
    stdout: Option<JoinHandle<Vec<u8>>>,
}

struct Ended {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl CaptureProc {
    /// Starts `sluice capture args...` and waits until it says it captures.
    fn start(pin: &PinRoot, ns: &Netns, args: &[&str]) -> CaptureProc {
        let mut full = vec!["capture"];
        full.extend_from_slice(args);
        let mut cmd = sluice_cmd(pin, ns, &full);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = Child::spawn(&mut cmd);
        let err = child.stderr.take().expect("piped stderr");
        let mut out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdout = thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let mut p = CaptureProc {
            child,
            lines,
            stderr_seen: Vec::new(),
            stdout: Some(stdout),
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match p.lines.recv_timeout(left) {
                Ok(line) => {
                    let started = line.contains("capturing on");
                    p.stderr_seen.push(line);
                    if started {
                        return p;
                    }
                }
                Err(_) => panic!(
                    "sluice {full:?} did not start capturing within {START_LIMIT:?}; \
                     stderr so far: {:?}",
                    p.stderr_seen
                ),
            }
        }
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        nix::sys::signal::kill(pid, sig).expect("signal the capture");
    }

    /// Waits for it to exit by itself (panics after `END_LIMIT`).
    fn wait(mut self) -> Ended {
        let Some(status) = self.child.wait_timeout(END_LIMIT) else {
            panic!(
                "capture still running after {END_LIMIT:?}; stderr: {:?}",
                self.stderr_seen
            );
        };
        // The pipes close with the process: collect the rest.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stderr_seen.push(line);
        }
        let stdout = self
            .stdout
            .take()
            .expect("stdout reader")
            .join()
            .unwrap_or_default();
        Ended {
            status,
            stdout,
            stderr: self.stderr_seen.join("\n"),
        }
    }
}

fn assert_ended_ok(what: &str, e: &Ended) {
    assert!(
        e.status.success(),
        "{what} failed ({}): stderr: {}",
        e.status,
        e.stderr
    );
}

/// A unique path for a capture file, removed on drop; the file does not
/// exist until a capture makes it.
fn out_path(name: &str) -> TempFile {
    let f = TempFile::new(name, "");
    std::fs::remove_file(f.path()).expect("remove the placeholder");
    f
}

/// The pin root's `CAPTURE_CONFIG[0]`, read with the library.
fn capture_enabled(pin: &PinRoot) -> bool {
    let root = sluice::dataplane::PinRoot::new(pin.path());
    sluice::dataplane::runtime::capture_config(&root)
        .expect("read CAPTURE_CONFIG")
        .enabled
        != 0
}

fn lock_file(pin: &PinRoot) -> PathBuf {
    sluice::dataplane::capture::lock_path(pin.path())
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
}

// ---------------------------------------------------------------------------
// Reading capture files
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Packet {
    timestamp: Duration,
    original_len: u32,
    data: Vec<u8>,
    comments: Vec<String>,
    flags: Option<u32>,
}

#[derive(Debug, Default)]
struct PcapNg {
    interfaces: Vec<(DataLink, u32, Option<String>, Option<u8>)>,
    packets: Vec<Packet>,
    /// (isb_ifdrop, isb_usrdeliv) of the statistics block, if any.
    statistics: Option<(Option<u64>, Option<u64>)>,
}

fn parse_pcapng(bytes: &[u8]) -> PcapNg {
    let mut reader = PcapNgReader::new(bytes).expect("a pcapng section header");
    let mut out = PcapNg::default();
    while let Some(block) = reader.next_block() {
        match block.expect("a well-formed pcapng block") {
            Block::InterfaceDescription(idb) => {
                let mut name = None;
                let mut resol = None;
                for o in &idb.options {
                    match o {
                        InterfaceDescriptionOption::IfName(n) => name = Some(n.to_string()),
                        InterfaceDescriptionOption::IfTsResol(r) => resol = Some(*r),
                        _ => {}
                    }
                }
                out.interfaces
                    .push((idb.linktype, idb.snaplen, name, resol));
            }
            Block::EnhancedPacket(epb) => {
                assert_eq!(epb.interface_id, 0, "one interface per file");
                let mut comments = Vec::new();
                let mut flags = None;
                for o in &epb.options {
                    match o {
                        EnhancedPacketOption::Comment(c) => comments.push(c.to_string()),
                        EnhancedPacketOption::Flags(f) => flags = Some(*f),
                        _ => {}
                    }
                }
                out.packets.push(Packet {
                    timestamp: epb.timestamp,
                    original_len: epb.original_len,
                    data: epb.data.to_vec(),
                    comments,
                    flags,
                });
            }
            Block::InterfaceStatistics(isb) => {
                let mut drop = None;
                let mut deliv = None;
                for o in &isb.options {
                    match o {
                        InterfaceStatisticsOption::IsbIfDrop(n) => drop = Some(*n),
                        InterfaceStatisticsOption::IsbUsrDeliv(n) => deliv = Some(*n),
                        _ => {}
                    }
                }
                out.statistics = Some((drop, deliv));
            }
            _ => {}
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The file holds exactly `expected`, in order, each with its verdict and
/// reason, full length, a timestamp inside `[from, to]` (±1 s), and the
/// interface named `iface`.
fn assert_capture(file: &PcapNg, iface: &str, expected: &[Sent], from: Duration, to: Duration) {
    assert_eq!(file.interfaces.len(), 1, "one interface block: {file:?}");
    let (link, _, name, resol) = &file.interfaces[0];
    assert_eq!(*link, DataLink::ETHERNET);
    assert_eq!(
        name.as_deref(),
        Some(iface),
        "the interface block names {iface}"
    );
    assert_eq!(*resol, Some(9), "nanosecond timestamps are declared");
    let got: Vec<String> = file.packets.iter().map(|p| hex(&p.data)).collect();
    let want: Vec<String> = expected.iter().map(|s| hex(&s.bytes)).collect();
    assert_eq!(
        got, want,
        "captured frames (hex) differ from the frames sent, in order"
    );
    let slack = Duration::from_secs(1);
    for (p, s) in file.packets.iter().zip(expected) {
        assert_eq!(p.original_len as usize, s.bytes.len(), "original length");
        assert_eq!(
            p.comments,
            vec![format!("verdict={} reason={}", s.verdict, s.reason)],
            "comment of the frame from {}:{}",
            s.src,
            s.sport
        );
        assert_eq!(p.flags, Some(1), "direction inbound");
        assert!(
            p.timestamp + slack >= from && p.timestamp <= to + slack,
            "timestamp {:?} of the frame from {}:{} is outside {from:?}..{to:?}",
            p.timestamp,
            s.src,
            s.sport
        );
    }
    assert_eq!(
        file.statistics,
        Some((Some(0), Some(expected.len() as u64))),
        "statistics block: nothing lost, every packet delivered"
    );
}

/// `tcpdump -r FILE -nn -tt` reads the file and shows exactly `expected`.
fn assert_tcpdump(path: &Path, expected: &[Sent], from: Duration, to: Duration) {
    let out = output_with_timeout(
        std::process::Command::new("tcpdump")
            .args(["-r"])
            .arg(path)
            .args(["-nn", "-tt"]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "tcpdump -r {} failed ({}): {}",
        path.display(),
        out.status,
        stderr(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        expected.len(),
        "tcpdump shows one line per packet:\n{text}"
    );
    for (line, s) in lines.iter().zip(expected) {
        let family = if s.v6 { "IP6" } else { "IP" };
        let want = format!(
            "{family} {}.{} > {}.{UDP_DPORT}: UDP",
            s.src, s.sport, s.dst
        );
        assert!(
            line.contains(&want),
            "tcpdump line {line:?} should show {want:?}"
        );
        let secs: f64 = line
            .split_whitespace()
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("tcpdump line without a -tt timestamp: {line:?}"));
        assert!(
            secs >= from.as_secs_f64() - 1.0 && secs <= to.as_secs_f64() + 1.0,
            "tcpdump time {secs} outside {from:?}..{to:?}: {line:?}"
        );
    }
}

fn read(path: &Path) -> PcapNg {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    parse_pcapng(&bytes)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Passed and denied UDP over IPv4 and IPv6: every frame is in the file with
/// its verdict; `--verdict drop` keeps only the dropped ones; capture is off
/// again afterwards.
#[test]
fn capture_records_each_packet_with_its_verdict() {
    let (lab, pin) = lab_with_sluice("cap");

    // Everything, until --count.
    let file = out_path("all.pcapng");
    let sent = traffic(&lab, 40000, 3);
    let count = sent.len().to_string();
    let path = file.path().to_str().expect("UTF-8 path");
    let cap = CaptureProc::start(
        &pin,
        &lab.b,
        &["--json", &lab.b_if, "--count", &count, "-w", path],
    );
    assert!(capture_enabled(&pin), "capture is on while it runs");
    let from = unix_now();
    send(&lab.a, &lab.a_if, &sent);
    let to = unix_now();
    let ended = cap.wait();
    assert_ended_ok("capture --count", &ended);
    let summary = parse_json(
        "capture --json",
        &std::process::Output {
            status: ended.status,
            stdout: ended.stdout.clone(),
            stderr: Vec::new(),
        },
    );
    assert_eq!(summary["packets"], sent.len(), "summary: {summary}");
    assert_eq!(summary["lost"], 0, "summary: {summary}");
    assert_eq!(summary["stopped"], "count", "summary: {summary}");
    assert_eq!(
        summary["interface"],
        lab.b_if.as_str(),
        "summary: {summary}"
    );
    assert!(!capture_enabled(&pin), "capture is off after --count");
    assert!(!lock_file(&pin).exists(), "the capture lock is released");
    assert_capture(&read(file.path()), &lab.b_if, &sent, from, to);
    assert_tcpdump(file.path(), &sent, from, to);

    // Dropped packets only, until --duration.
    let file = out_path("drop.pcapng");
    let sent = traffic(&lab, 41000, 2);
    let dropped: Vec<Sent> = sent
        .iter()
        .filter(|s| s.verdict == "drop")
        .cloned()
        .collect();
    assert_eq!(dropped.len(), 4);
    let path = file.path().to_str().expect("UTF-8 path");
    let cap = CaptureProc::start(
        &pin,
        &lab.b,
        &[
            &lab.b_if,
            "--verdict",
            "drop",
            "--duration",
            "3",
            "-w",
            path,
        ],
    );
    let from = unix_now();
    send(&lab.a, &lab.a_if, &sent);
    let to = unix_now();
    let ended = cap.wait();
    assert_ended_ok("capture --verdict drop --duration 3", &ended);
    assert!(
        ended.stderr.contains("4 packets written") && ended.stderr.contains("0 packets lost"),
        "human summary on stderr: {}",
        ended.stderr
    );
    assert!(!capture_enabled(&pin), "capture is off after --duration");
    assert_capture(&read(file.path()), &lab.b_if, &dropped, from, to);
    assert_tcpdump(file.path(), &dropped, from, to);

    sluice(&pin, &lab.b, &["detach", &lab.b_if]);
}

/// `-w -` streams to stdout; `--snaplen` cuts frames but keeps their length;
/// `--verdict pass,audit` takes a list.
#[test]
fn capture_to_stdout_with_snaplen() {
    let (lab, pin) = lab_with_sluice("capout");
    let sent = traffic(&lab, 42000, 2);
    let passed: Vec<&Sent> = sent.iter().filter(|s| s.verdict == "pass").collect();
    let cap = CaptureProc::start(
        &pin,
        &lab.b,
        &[
            &lab.b_if,
            "--verdict",
            "pass,audit",
            "--snaplen",
            "42",
            "--count",
            "4",
            "-w",
            "-",
        ],
    );
    send(&lab.a, &lab.a_if, &sent);
    let ended = cap.wait();
    assert_ended_ok("capture -w -", &ended);
    let file = parse_pcapng(&ended.stdout);
    assert_eq!(
        file.interfaces[0].1, 42,
        "the interface block has the snaplen"
    );
    let got: Vec<(String, u32, Vec<String>)> = file
        .packets
        .iter()
        .map(|p| (hex(&p.data), p.original_len, p.comments.clone()))
        .collect();
    let want: Vec<(String, u32, Vec<String>)> = passed
        .iter()
        .map(|s| {
            (
                hex(&s.bytes[..42]),
                u32::try_from(s.bytes.len()).expect("small"),
                vec!["verdict=pass reason=default".to_string()],
            )
        })
        .collect();
    assert_eq!(got, want, "the first 42 bytes of each passed frame");
    assert!(!capture_enabled(&pin));
}

/// One capture per pin root: a second is refused and the first goes on; a
/// signal ends a capture cleanly; a capture killed with SIGKILL leaves
/// capture on, and the next capture resets it and skips the stale records.
#[test]
fn capture_is_exclusive_and_always_switched_off() {
    let (lab, pin) = lab_with_sluice("capex");

    let first = out_path("first.pcapng");
    let cap = CaptureProc::start(
        &pin,
        &lab.b,
        &[
            &lab.b_if,
            "--duration",
            "30",
            "-w",
            first.path().to_str().expect("UTF-8"),
        ],
    );
    let second = out_path("second.pcapng");
    let out = sluice_output(
        &pin,
        &lab.b,
        &[
            "capture",
            &lab.b_if,
            "-w",
            second.path().to_str().expect("UTF-8"),
        ],
    );
    let err = expect_one_line_error("a second capture", &out);
    assert!(
        err.starts_with("sluice: error: another capture is running")
            && err.contains(&pin.path().display().to_string()),
        "the error says another capture runs on this pin root: {err}"
    );
    assert!(!second.path().exists(), "the refused capture wrote no file");
    assert!(capture_enabled(&pin), "the first capture still runs");
    let sent = traffic(&lab, 43000, 1);
    send(&lab.a, &lab.a_if, &sent);
    cap.signal(Signal::SIGINT);
    let ended = cap.wait();
    assert_ended_ok("capture ended by SIGINT", &ended);
    assert!(ended.stderr.contains("(interrupted)"), "{}", ended.stderr);
    assert!(!capture_enabled(&pin), "capture is off after SIGINT");
    assert!(!lock_file(&pin).exists(), "the capture lock is released");
    assert_eq!(read(first.path()).packets.len(), sent.len());

    // SIGTERM too.
    let cap = CaptureProc::start(
        &pin,
        &lab.b,
        &[&lab.b_if, "-w", first.path().to_str().expect("UTF-8")],
    );
    cap.signal(Signal::SIGTERM);
    assert_ended_ok("capture ended by SIGTERM", &cap.wait());
    assert!(!capture_enabled(&pin), "capture is off after SIGTERM");

    // SIGKILL leaves capture on; what the kernel keeps copying is stale.
    let mut cap = CaptureProc::start(
        &pin,
        &lab.b,
        &[&lab.b_if, "-w", first.path().to_str().expect("UTF-8")],
    );
    cap.child.kill_and_wait();
    assert!(capture_enabled(&pin), "nothing could switch capture off");
    send(&lab.a, &lab.a_if, &traffic(&lab, 44000, 2));
    let fresh = traffic(&lab, 45000, 1);
    let file = out_path("fresh.pcapng");
    let cap = CaptureProc::start(
        &pin,
        &lab.b,
        &[
            &lab.b_if,
            "--count",
            &fresh.len().to_string(),
            "-w",
            file.path().to_str().expect("UTF-8"),
        ],
    );
    let from = unix_now();
    send(&lab.a, &lab.a_if, &fresh);
    let to = unix_now();
    assert_ended_ok("capture after a killed one", &cap.wait());
    assert_capture(&read(file.path()), &lab.b_if, &fresh, from, to);
    assert!(!capture_enabled(&pin));
}

/// Bad arguments, a missing interface, an unwritable file and a missing
/// dataplane: one error line each, no file, capture stays off.
#[test]
fn capture_errors() {
    let (lab, pin) = lab_with_sluice("caperr");
    let file = out_path("err.pcapng");
    let path = file.path().to_str().expect("UTF-8");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["nosuchif0", "-w", path],
            "interface nosuchif0 does not exist",
        ),
        (vec![&lab.b_if, "--count", "0", "-w", path], "--count"),
        (vec![&lab.b_if, "--snaplen", "0", "-w", path], "--snaplen"),
        (
            vec![&lab.b_if, "--snaplen", "5000", "-w", path],
            "--snaplen",
        ),
        (vec![&lab.b_if, "--duration", "0", "-w", path], "--duration"),
        (
            vec![&lab.b_if, "-w", "/nonexistent-sluice-dir/x.pcapng"],
            "cannot write /nonexistent-sluice-dir/x.pcapng",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["capture"];
        full.extend_from_slice(&args);
        let out = sluice_output(&pin, &lab.b, &full);
        let err = expect_one_line_error(&format!("sluice {full:?}"), &out);
        assert_eq!(out.status.code(), Some(1), "exit status 1: {err}");
        assert!(
            err.starts_with("sluice: error: ") && err.contains(needle),
            "sluice {full:?}: the error should mention {needle:?}: {err}"
        );
        assert!(!file.path().exists(), "sluice {full:?} wrote no file");
        assert!(!capture_enabled(&pin), "sluice {full:?} left capture off");
    }

    // An interface sluice is not attached to (A's end, in A).
    let out = sluice_output(&pin, &lab.a, &["capture", &lab.a_if, "-w", path]);
    let err = expect_one_line_error("capture on an interface without sluice", &out);
    assert!(err.contains("not attached"), "{err}");

    // A pin root with no dataplane.
    let empty = PinRoot::new();
    let out = sluice_output(&empty, &lab.b, &["capture", &lab.b_if, "-w", path]);
    let err = expect_one_line_error("capture without a dataplane", &out);
    assert!(err.contains("no sluice dataplane"), "{err}");
    assert!(!file.path().exists());
}
