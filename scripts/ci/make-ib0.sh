#!/usr/bin/env bash
# Create a network interface named ib0 for tests of `interface="ib0"` (as on an HPC
# cluster's InfiniBand network). Idempotent; run as root. Prints ib0's IPv4 address.
#
#   bash scripts/ci/make-ib0.sh            # prints 127.0.2.1
#
# ib0 is one end of a veth pair (the other end is ib0p), with the /32 address
# $IB0_ADDR (default 127.0.2.1). Every 127.0.0.0/8 address is local, so a server can bind
# to it and a client on this machine can connect to it, while it differs from 127.0.0.1:
# a test can tell "bound to ib0's address" from "bound to localhost". 127.0.1.1 is avoided
# because Debian's /etc/hosts often gives it to the hostname.
#
# Finding the address elsewhere:
#   shell:  ip -4 -o addr show dev ib0 | awk '{print $4}' | cut -d/ -f1
#   Python: tests/slurm_util.py interface_ipv4("ib0") (stdlib only; None if there is no ib0)
set -euo pipefail

IB0_ADDR=${IB0_ADDR:-127.0.2.1}
log() { printf 'make-ib0: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "ERROR: run as root"; exit 1; }
if ! command -v ip >/dev/null; then
    log "installing iproute2"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends iproute2 >/dev/null
fi

if ! ip link show dev ib0 >/dev/null 2>&1; then
    # A veth pair comes up only when both ends are up; fall back to a dummy interface on
    # kernels without veth.
    ip link add ib0 type veth peer name ib0p 2>/dev/null || ip link add ib0 type dummy
fi
if ! ip -4 -o addr show dev ib0 | grep -q " inet $IB0_ADDR/"; then
    ip addr add "$IB0_ADDR/32" dev ib0
fi
ip link set ib0 up
if ip link show dev ib0p >/dev/null 2>&1; then ip link set ib0p up; fi

# Check: a TCP server bound to the address accepts a connection from this machine.
python3 - "$IB0_ADDR" <<'PY'
import socket, sys
addr = sys.argv[1]
with socket.create_server((addr, 0)) as srv:
    port = srv.getsockname()[1]
    with socket.create_connection((addr, port), timeout=5) as cli:
        conn, peer = srv.accept()
        with conn:
            cli.sendall(b"ping")
            assert conn.recv(4) == b"ping"
PY
echo "$IB0_ADDR"
