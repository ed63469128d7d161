"""The TCP sockets processes listen on, by PID, read from /proc (Linux): what ``ss -ltnp`` shows for those PIDs."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"
"""TCP state LISTEN in /proc/net/tcp{,6}."""


def _listening_inodes() -> dict[str, str]:
    """Socket inode → 'address:port' of every listening TCP socket on this machine."""
    found = {}
    for name, width in (("tcp", 4), ("tcp6", 16)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != LISTEN:
                continue
            hex_address, hex_port = local.split(":")
            raw = bytes.fromhex(hex_address)
            # /proc prints the address as 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(raw) if width == 4 else ipaddress.IPv6Address(raw)
            if width == 16 and address.ipv4_mapped is not None:  # a v6 socket bound to ::ffff:a.b.c.d
                address = address.ipv4_mapped
            found[inode] = f"{address}:{int(hex_port, 16)}" if width == 4 else f"[{address}]:{int(hex_port, 16)}"
    return found


def listening_sockets(pids) -> list[tuple[int, str]]:
    """(pid, 'address:port') of every listening TCP socket a process of ``pids`` holds open."""
    inodes = _listening_inodes()
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.append((pid, inodes[target[8:-1]]))
    return found
