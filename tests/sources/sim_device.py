"""A simulated serial sensor, run as its own process on the far end of a socat pty pair.

Streaming mode prints ``T=<t> H=<h> SEQ=<n>`` lines at ``--rate`` per second (``SEQ`` lets a
test see which lines arrived); ``--burst FILE --burst-after K`` writes FILE's raw lines after
line K, in the same sequential stream, so garbage never interleaves with a valid line. When the
pty goes away (socat killed) it reopens the path until it is back, like a device that keeps
talking while the cable is out. ``--respond`` answers each ``READ`` line with one CSV line.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import tty


def _open(path: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        except OSError:
            time.sleep(0.05)
            continue
        tty.setraw(fd)
        return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def line(seq: int) -> bytes:
    """The reading with sequence number ``seq`` (tests recompute the expected values)."""
    return f"T={20 + (seq % 100) / 10:.1f} H={40 + seq % 7} SEQ={seq}\n".encode()


def stream(args: argparse.Namespace) -> None:
    fd = _open(args.port)
    burst = open(args.burst, "rb").read() if args.burst else b""  # noqa: SIM115
    counter = range(args.count) if args.count else itertools.count()
    for seq in counter:
        try:
            _write_all(fd, line(seq))
            if burst and seq == args.burst_after:
                _write_all(fd, burst)
                print("burst-done", flush=True)
        except OSError:
            os.close(fd)
            fd = _open(args.port)
        time.sleep(1 / args.rate)
    print("done", flush=True)
    time.sleep(3600)  # keep the pty open: closing it could drop unread lines


def respond(args: argparse.Namespace) -> None:
    fd = _open(args.port)
    buf = b""
    print("ready", flush=True)
    while True:
        buf += os.read(fd, 256)
        while b"\n" in buf:
            cmd, buf = buf.split(b"\n", 1)
            if cmd.strip() == b"READ":
                _write_all(fd, b"1.5,2.5,x,40\r\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port")
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--burst")
    ap.add_argument("--burst-after", type=int, default=0)
    ap.add_argument("--respond", action="store_true")
    args = ap.parse_args()
    respond(args) if args.respond else stream(args)


if __name__ == "__main__":
    sys.exit(main())
