"""Readiness of a headless group worker: is this pod connected to its leader?

A headless vLLM worker (or a Ray worker node) has no HTTP listener. What makes it
useful is its connection to the leader: the torch.distributed store on the leader's
master port (`mp`) or the Ray head's GCS port (`ray`). Exit 0 while this pod's network
namespace holds an established TCP connection to that port, 1 otherwise.

    python3 connected.py 29500

Standard library only; reads /proc/net/tcp and /proc/net/tcp6.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

TCP_ESTABLISHED = "01"
TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def established_remote_ports(lines: Iterable[str]) -> set[int]:
    """Remote ports of established connections in a /proc/net/tcp{,6} table."""
    ports: set[int] = set()
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[0] == "sl" or fields[3] != TCP_ESTABLISHED:
            continue
        _, _, port = fields[2].rpartition(":")
        try:
            ports.add(int(port, 16))
        except ValueError:
            continue
    return ports


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: connected.py PORT", file=sys.stderr)
        return 2
    port = int(args[0])
    ports: set[int] = set()
    for table in TABLES:
        try:
            with open(table, encoding="ascii") as handle:
                ports |= established_remote_ports(handle)
        except OSError:
            continue
    if port in ports:
        return 0
    print(f"no established connection to the leader's port {port}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
