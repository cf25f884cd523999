#!/usr/bin/env bash
# sluice lab demo: builds a throwaway two-namespace lab joined by a veth pair,
# attaches the XDP firewall on namespace b's end and walks through the deny
# list, the allow list, an L4 rule, the counters and detaching, checking every
# outcome. Everything it creates is removed on any exit (also Ctrl-C/failure).
#
# Run it with `make demo` (which builds target/release/sluice first), as root.
# Exit status: 0 when everything behaved as expected, 1 otherwise.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SLUICE=${SLUICE:-$REPO/target/release/sluice}

NSA=sluice-demo-$$-a
NSB=sluice-demo-$$-b
VETHA=vetha # lives in $NSA
VETHB=vethb # lives in $NSB; the firewall is attached here
PIN_ROOT=/sys/fs/bpf/sluice-demo-$$
A4=198.18.0.1 B4=198.18.0.2
A6=2001:2::1 B6=2001:2::2
UDP_DROPPED_PORT=4444 UDP_OTHER_PORT=4445 UDP_PER_PORT=5 # datagrams per port and family

# --- output helpers -------------------------------------------------------------
if [ -t 1 ] && [ "${TERM:-dumb}" != dumb ] && [ -z "${NO_COLOR:-}" ]; then
    C_HEAD=$'\e[1;36m' C_CMD=$'\e[2m' C_OK=$'\e[32m' C_BAD=$'\e[1;31m' C_OFF=$'\e[0m'
else
    C_HEAD='' C_CMD='' C_OK='' C_BAD='' C_OFF=''
fi
STEP=0
FAILURES=0
step() { STEP=$((STEP + 1)); printf '\n%s== %d. %s%s\n' "$C_HEAD" "$STEP" "$*" "$C_OFF"; }
note() { printf '   %s\n' "$*"; }
show() { printf '%s%s$ %s%s\n' "$C_CMD" "$1" "${*:2}" "$C_OFF"; } # show PROMPT CMD...
good() { printf '   %s✓ %s%s\n' "$C_OK" "$*" "$C_OFF"; }
bad() { printf '   %s✗ UNEXPECTED: %s%s\n' "$C_BAD" "$*" "$C_OFF"; FAILURES=$((FAILURES + 1)); }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

# sluice, run against the lab (namespace b, private pin root), echoed first.
sl() {
    show "" "sluice $*"
    "$SLUICE" -n "$NSB" --pin-root "$PIN_ROOT" "$@"
}
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# --- preconditions -------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, XDP, bpffs); run: sudo make demo"
[ -x "$SLUICE" ] || die "$SLUICE not found; run \`make demo\` (it builds sluice first)"
for tool in ip ping python3 timeout mountpoint; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found; run \`make setup\`"
done
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# --- cleanup: runs on every exit ------------------------------------------------
TMP=$(mktemp -d /tmp/sluice-demo.XXXXXX)
ATTACHED=0
RECV_PID=
cleanup() {
    local rc=$?
    trap '' INT TERM
    trap - EXIT ERR
    set +e
    printf '\n%s== cleaning up the lab%s\n' "$C_HEAD" "$C_OFF"
    [ -n "$RECV_PID" ] && kill "$RECV_PID" 2>/dev/null && wait "$RECV_PID" 2>/dev/null
    if [ "$ATTACHED" = 1 ]; then
        "$SLUICE" -n "$NSB" --pin-root "$PIN_ROOT" detach "$VETHB" >/dev/null 2>&1
    fi
    ip netns del "$NSA" 2>/dev/null
    ip netns del "$NSB" 2>/dev/null
    rm -rf "$PIN_ROOT" "$TMP"
    note "removed namespaces $NSA, $NSB and pin root $PIN_ROOT"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'printf "demo: a command failed (line %s): %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

# --- traffic checks -------------------------------------------------------------
# ping_check NAME ADDR pass|block: 3 pings from a to ADDR (bounded: ~1.5 s, hard
# limit 10 s); shows ping's summary and whether the outcome was the expected one.
ping_check() {
    local name=$1 addr=$2 want=$3 out got
    show "$NSA" "ping -c 3 -i 0.2 -W 1 $addr"
    if out=$(in_ns "$NSA" timeout 10 ping -n -q -c 3 -i 0.2 -W 1 "$addr" 2>&1); then
        got=pass
    else
        got=block
    fi
    grep -E 'transmitted|rtt' <<<"$out" | sed 's/^/   /' || true
    case "$want:$got" in
        pass:pass) good "$name reachable" ;;
        block:block) good "$name blocked as expected" ;;
        pass:block) bad "$name should be reachable but was blocked" ;;
        block:pass) bad "$name should be blocked but got through" ;;
    esac
}

# Receives UDP in namespace b on both ports, v4 and v6, for a fixed time and
# prints "PORT=COUNT PORT=COUNT". Prints "ready" once bound.
UDP_RECEIVER='
import select, socket, sys, time
secs, addrs, ports = float(sys.argv[1]), sys.argv[2].split(","), [int(p) for p in sys.argv[3:]]
socks = {}
for addr in addrs:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    for port in ports:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((addr, port))
        socks[s] = port
counts = dict.fromkeys(ports, 0)
print("ready", flush=True)
end = time.monotonic() + secs
while (left := end - time.monotonic()) > 0:
    ready, _, _ = select.select(list(socks), [], [], left)
    for s in ready:
        s.recv(65535)
        counts[socks[s]] += 1
print(" ".join(f"{p}={counts[p]}" for p in ports), flush=True)
'

# udp_check: sends UDP_PER_PORT datagrams per family to each port from a
# (bash /dev/udp), counts what b received in 2 s, reports per port.
udp_check() {
    local out=$TMP/udp.out i counts port got sent=$((UDP_PER_PORT * 2))
    # Not through in_ns: $! must be `timeout` itself (ip netns exec execs it),
    # so that cleanup's kill reaches python3.
    ip netns exec "$NSB" timeout 10 python3 -c "$UDP_RECEIVER" 2 "$B4,$B6" \
        "$UDP_DROPPED_PORT" "$UDP_OTHER_PORT" >"$out" 2>&1 &
    RECV_PID=$!
    for ((i = 0; i < 30; i++)); do # wait up to 3 s for the receiver to bind
        grep -q ready "$out" 2>/dev/null && break
        sleep 0.1
    done
    grep -q ready "$out" || { cat "$out" >&2; die "UDP receiver in $NSB did not start"; }
    note "receiver in $NSB counts datagrams on ports $UDP_DROPPED_PORT and $UDP_OTHER_PORT (v4 and v6) for 2 s"
    for port in "$UDP_DROPPED_PORT" "$UDP_OTHER_PORT"; do
        show "$NSA" "for i in {1..$UDP_PER_PORT}; do echo hi >/dev/udp/$B4/$port; echo hi >/dev/udp/$B6/$port; done"
        # shellcheck disable=SC2016 # expanded by the inner bash
        in_ns "$NSA" timeout 5 bash -c '
            for ((i = 0; i < $1; i++)); do
                echo "sluice demo $i" >"/dev/udp/$2/$4" || true
                echo "sluice demo $i" >"/dev/udp/$3/$4" || true
            done' _ "$UDP_PER_PORT" "$B4" "$B6" "$port"
    done
    wait "$RECV_PID" || true
    RECV_PID=
    counts=$(tail -n 1 "$out")
    for port in "$UDP_DROPPED_PORT" "$UDP_OTHER_PORT"; do
        got=$(tr ' ' '\n' <<<"$counts" | sed -n "s/^$port=//p")
        got=${got:-0}
        note "udp port $port: sent $sent, received $got, dropped $((sent - got))"
        if [ "$port" = "$UDP_DROPPED_PORT" ]; then
            if [ "$got" -eq 0 ]; then
                good "port $port: all dropped by the rule"
            else
                bad "port $port: $got datagrams got through the drop rule"
            fi
        elif [ "$got" -eq "$sent" ]; then
            good "port $port: all passed"
        else
            bad "port $port: only $got of $sent datagrams arrived"
        fi
    done
}

# --- the lab ----------------------------------------------------------------------
step "Build the lab: namespaces $NSA and $NSB joined by a veth pair"
for ns in "$NSA" "$NSB"; do
    ip netns add "$ns"
    # No duplicate address detection, so link-local addresses (which IPv6
    # neighbour discovery uses) are usable at once rather than after ~2 s.
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
done
ip -n "$NSA" link add "$VETHA" type veth peer name "$VETHB" netns "$NSB"
ip -n "$NSA" addr add "$A4/24" dev "$VETHA"
ip -n "$NSB" addr add "$B4/24" dev "$VETHB"
ip -n "$NSA" -6 addr add "$A6/64" dev "$VETHA" nodad
ip -n "$NSB" -6 addr add "$B6/64" dev "$VETHB" nodad
for ns in "$NSA" "$NSB"; do ip -n "$ns" link set lo up; done
ip -n "$NSA" link set "$VETHA" up
ip -n "$NSB" link set "$VETHB" up
# A new veth pair takes up to a second to carry traffic: wait (bounded) until
# both families answer, so the checks below measure sluice, not link setup.
for ((i = 1; ; i++)); do
    if in_ns "$NSA" ping -n -q -c 1 -W 1 "$B4" >/dev/null 2>&1 &&
        in_ns "$NSA" ping -n -q -c 1 -W 1 "$B6" >/dev/null 2>&1; then
        break
    fi
    [ "$i" -lt 10 ] || die "the lab's veth pair does not carry traffic (checked for ~20 s)"
    sleep 0.2
done
note "$NSA: $VETHA $A4/24 $A6/64   <-->   $NSB: $VETHB $B4/24 $B6/64"
note "every sluice command below really runs as: sluice -n $NSB --pin-root $PIN_ROOT ..."

step "Attach the firewall to $VETHB (inside $NSB), native XDP if the driver supports it"
sl attach "$VETHB" --mode auto
ATTACHED=1
sl status

step "Nothing is denied yet: a can reach b over IPv4 and IPv6"
ping_check "IPv4 $A4 -> $B4" "$B4" pass
ping_check "IPv6 $A6 -> $B6" "$B6" pass

step "Deny a's addresses: packets from them are dropped at the driver"
sl deny add "$A4/32" "$A6/128"
ping_check "IPv4 $A4 -> $B4" "$B4" block
ping_check "IPv6 $A6 -> $B6" "$B6" block

step "Counters: every packet is counted by verdict and reason"
sl stats

step "The deny list"
sl deny list

step "The allow list wins over the deny list (only IPv4 is allowed here)"
sl allow add "$A4/32"
ping_check "IPv4 $A4 -> $B4 (allowed)" "$B4" pass
ping_check "IPv6 $A6 -> $B6 (still denied)" "$B6" block

step "Remove both entries: traffic flows again"
sl allow del "$A4/32"
sl deny del "$A4/32" "$A6/128"
ping_check "IPv4 $A4 -> $B4" "$B4" pass
ping_check "IPv6 $A6 -> $B6" "$B6" pass

step "An L4 rule: drop UDP to port $UDP_DROPPED_PORT (any address, both families)"
sl rule add drop udp dport "$UDP_DROPPED_PORT"
sl rule list
udp_check

step "Final counters"
sl stats

step "Detach: the program and its pins are removed"
sl detach "$VETHB"
ATTACHED=0
show "" "ls -A $PIN_ROOT"
if [ -d "$PIN_ROOT" ] && [ -n "$(ls -A "$PIN_ROOT")" ]; then
    find "$PIN_ROOT" -mindepth 1 | sed 's/^/   /'
    bad "pins are still present under $PIN_ROOT after detach"
else
    good "no pins left under $PIN_ROOT"
fi
if ip -n "$NSB" link show "$VETHB" | grep -q 'prog/xdp'; then
    bad "an XDP program is still attached to $VETHB"
else
    good "no XDP program on $VETHB"
fi

printf '\n'
if [ "$FAILURES" -eq 0 ]; then
    printf '%sdemo finished: everything behaved as expected%s\n' "$C_OK" "$C_OFF"
else
    printf '%sdemo finished with %d unexpected result(s)%s\n' "$C_BAD" "$FAILURES" "$C_OFF"
    exit 1
fi
