"""A pymodbus server process holding register values a test wrote into a JSON spec.

The spec gives raw register words and bits per slave, so the test encodes values itself (with
``struct``, independent of the decoding under test). Addresses absent from the spec are invalid:
reading them draws an ILLEGAL_ADDRESS exception response.

    python modbus_server.py SPEC.json --tcp PORT
    python modbus_server.py SPEC.json --serial /path/to/pty

``--silent ID`` makes an RTU slave id never answer, as an absent device on the line would.
Prints ``ready`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable

from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


def _blocks(table: dict[str, list[int]], bits: bool) -> list[SimData]:
    if not table:  # pymodbus needs at least one block per table: park one far away
        table = {"65000": [0]}
    if bits:
        return [
            SimData(int(a), values=[bool(v) for v in vals], datatype=DataType.BITS)
            for a, vals in table.items()
        ]
    return [
        SimData(int(a), values=list(vals), datatype=DataType.REGISTERS) for a, vals in table.items()
    ]


def devices(spec: dict) -> list[SimDevice]:
    out = []
    for dev in spec["devices"]:
        out.append(
            SimDevice(
                id=dev["id"],
                simdata=(
                    _blocks(dev.get("co", {}), True),
                    _blocks(dev.get("di", {}), True),
                    _blocks(dev.get("hr", {}), False),
                    _blocks(dev.get("ir", {}), False),
                ),
            )
        )
    return out


def silence(ids: list[int]) -> Callable[[bool, bytes], bytes]:
    """Drop outgoing RTU frames of ``ids``: the first byte of a frame is the slave id."""

    def trace(sending: bool, frame: bytes) -> bytes:
        return b"" if sending and frame[:1] and frame[0] in ids else frame

    return trace


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--tcp", type=int)
    ap.add_argument("--serial")
    ap.add_argument(
        "--silent",
        type=int,
        action="append",
        default=[],
        help="RTU slave ids that never answer (an absent device on the line)",
    )
    args = ap.parse_args()
    with open(args.spec) as fh:
        devs = devices(json.load(fh))
    if args.tcp:
        server = ModbusTcpServer(devs, address=("127.0.0.1", args.tcp))
    else:
        server = ModbusSerialServer(
            devs,
            port=args.serial,
            framer=FramerType.RTU,
            baudrate=19200,
            trace_packet=silence(args.silent),
        )
    await server.serve_forever(background=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
