"""A pymodbus server process holding register values a test wrote into a JSON spec.

The spec gives raw register words and bits per slave, so the test encodes values itself (with
``struct``, independent of the decoding under test). Addresses absent from the spec are invalid:
reading them draws an ILLEGAL_ADDRESS exception response.

    python modbus_server.py SPEC.json --tcp PORT
    python modbus_server.py SPEC.json --serial /path/to/pty

Prints ``ready`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


def _blocks(table: dict[str, list[int]], bits: bool) -> list[SimData]:
    if not table:  # pymodbus needs at least one block per table: park one far away
        table = {"65000": [0]}
    if bits:
        return [SimData(int(a), values=[bool(v) for v in vals], datatype=DataType.BITS)
                for a, vals in table.items()]
    return [SimData(int(a), values=list(vals), datatype=DataType.REGISTERS)
            for a, vals in table.items()]


def devices(spec: dict) -> list[SimDevice]:
    out = []
    for dev in spec["devices"]:
        out.append(SimDevice(
            id=dev["id"],
            simdata=(
                _blocks(dev.get("co", {}), True),
                _blocks(dev.get("di", {}), True),
                _blocks(dev.get("hr", {}), False),
                _blocks(dev.get("ir", {}), False),
            ),
        ))
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--tcp", type=int)
    ap.add_argument("--serial")
    args = ap.parse_args()
    with open(args.spec) as fh:
        devs = devices(json.load(fh))
    if args.tcp:
        server = ModbusTcpServer(devs, address=("127.0.0.1", args.tcp))
    else:
        server = ModbusSerialServer(devs, port=args.serial, framer=FramerType.RTU,
                                    baudrate=19200)
    await server.serve_forever(background=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
