"""Modbus source (the Greengrass "Modbus-RTU Protocol Adapter"): RTU over serial, or TCP.

A register map names each value (address, function, type, byte/word order, scale, offset, unit).
On every tick the map is read in as few requests as it allows: registers of one slave and
function whose addresses are contiguous (or at most `max_gap` apart) share one request, up to 125
registers or 2000 bits. A slave that answers a grouped read with an exception is asked register
by register from then on, so one unmapped address costs only its own reading. Exceptions and
timeouts are counted per register in ``modbus_errors_total``; they never stop the source.

Decoding uses pymodbus' own ``convert_from_registers`` (word order); byte order within a register
is swapped before it, as that helper has no byte-order option.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from collector.errors import SourceError
from collector.plugin import Context, Model, Source, SourceConfig
from collector.units import Duration

Function = Literal["holding", "input", "coil", "discrete"]
ValueType = Literal[
    "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool"
]
_WIDTH = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
    "bool": 1,
}
_BIT_FUNCTIONS = ("coil", "discrete")
_READ_METHOD = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}


class Register(Model):
    """One named value in a device's register map."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]+$", description="Metric name of the value.")
    address: int = Field(
        ge=0, le=65535, description="0-based address (manuals often count from 1: subtract one)."
    )
    function: Function = Field(
        default="holding",
        description="Register table: holding (FC3), input (FC4), coil (FC1), discrete (FC2).",
    )
    type: ValueType = Field(
        default="uint16",
        description="Value type; 32/64-bit types span 2/4 registers; coils and discrete "
        "inputs are `bool`.",
    )
    byte_order: Literal["big", "little"] = Field(
        default="big", description="Byte order inside each 16-bit register."
    )
    word_order: Literal["big", "little"] = Field(
        default="big", description="Register order of 32/64-bit values (`little`: low word first)."
    )
    scale: float = Field(default=1.0, description="value = raw * scale + offset.")
    offset: float = Field(default=0.0, description="value = raw * scale + offset.")
    unit: str | None = Field(default=None, description="Unit of the scaled value.")

    @model_validator(mode="after")
    def _type_fits_function(self) -> Register:
        bits = self.function in _BIT_FUNCTIONS
        if bits and "type" not in self.model_fields_set:
            self.type = "bool"
        if bits and self.type != "bool":
            raise ValueError(f"a {self.function} is a single bit: its type is `bool`")
        if not bits and self.type == "bool":
            raise ValueError("`bool` is for coil/discrete; registers hold int/uint/float types")
        if self.address + self.width > 65536:
            raise ValueError(f"a {self.type} at {self.address} runs past address 65535")
        return self

    @property
    def width(self) -> int:
        """Registers (or bits) the value occupies."""
        return _WIDTH[self.type]


class Slave(Model):
    """One unit id on the bus and the registers read from it."""

    id: int = Field(ge=0, le=255, description="Modbus unit/slave id (1-247 on RTU).")
    device: str | None = Field(
        default=None,
        description="Value of the `device` column for this slave (default: the gateway's device).",
    )
    registers: list[Register] | None = Field(
        default=None, description="This slave's map (default: the source's `registers`)."
    )


class RegisterFile(Model):
    """The shape of a `registers_file`."""

    registers: list[Register] = Field(description="The register map.")


class ModbusConfig(SourceConfig):
    """A Modbus RTU bus or TCP server, its slaves and their register maps."""

    type: Literal["modbus"] = Field(default="modbus", description="Plugin name.")

    transport: Literal["tcp", "rtu"] = Field(
        default="tcp", description="`tcp` (Modbus TCP) or `rtu` (serial line)."
    )
    host: str | None = Field(default=None, description="TCP server address (transport tcp).")
    port: int | str | None = Field(
        default=None,
        description="TCP port (default 502) or, for rtu, the serial device such as `/dev/ttyUSB0`.",
    )
    baudrate: int = Field(default=19200, gt=0, description="RTU line speed.")
    parity: Literal["N", "E", "O"] = Field(default="N", description="RTU parity.")
    bytesize: Literal[7, 8] = Field(default=8, description="RTU data bits.")
    stopbits: Literal[1, 2] = Field(default=1, description="RTU stop bits.")
    timeout: Duration = Field(default=1.0, gt=0, description="Wait for one response.")
    retries: int = Field(default=1, ge=0, description="pymodbus retries of a request.")
    max_gap: int = Field(
        default=0,
        ge=0,
        le=124,
        description="Unmapped registers a grouped read may span; 0 groups contiguous only.",
    )
    max_registers: int = Field(
        default=125, ge=1, le=125, description="Registers per request (Modbus maximum 125)."
    )
    max_bits: int = Field(
        default=2000, ge=1, le=2000, description="Coils/inputs per request (Modbus maximum 2000)."
    )
    registers: list[Register] = Field(
        default_factory=list, description="Register map shared by slaves that have none."
    )
    registers_file: str | None = Field(
        default=None,
        description="YAML file with `registers: [...]`, appended to `registers` "
        "(see sample_data/modbus-registers.yaml).",
    )
    slaves: list[Slave] = Field(
        default_factory=lambda: [Slave(id=1)],
        description="Unit ids to read; each uses its own `registers` or the shared map.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_every(cls, data: Any) -> Any:
        if isinstance(data, dict) and not (data.get("every") or data.get("cron")):
            data = {**data, "every": "5s"}
        return data

    @model_validator(mode="after")
    def _resolve(self) -> ModbusConfig:
        if self.transport == "tcp":
            if not self.host:
                raise ValueError("transport tcp needs `host`")
            if self.port is None:
                self.port = 502
            if not isinstance(self.port, int):
                raise ValueError("transport tcp: `port` is a TCP port number")
        elif not isinstance(self.port, str) or not self.port:
            raise ValueError("transport rtu: `port` is the serial device, e.g. /dev/ttyUSB0")
        shared = list(self.registers)
        if self.registers_file:
            shared += _load_register_file(self.registers_file)
        resolved: list[Slave] = []
        seen: set[tuple[str | None, str]] = set()
        for slave in self.slaves:
            regs = slave.registers if slave.registers is not None else shared
            if not regs:
                raise ValueError(f"slave {slave.id} has no registers")
            for reg in regs:
                key = (slave.device, reg.name)
                if key in seen:
                    raise ValueError(
                        f"register {reg.name!r} appears twice for device "
                        f"{slave.device or '(default)'}: give slaves a `device` or rename it"
                    )
                seen.add(key)
            resolved.append(slave.model_copy(update={"registers": list(regs)}))
        self.slaves = resolved
        self.registers, self.registers_file = shared, None
        return self


def _load_register_file(path: str) -> list[Register]:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"registers_file: cannot read {path}: {exc}") from None
    try:
        return RegisterFile.model_validate(doc).registers
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"registers_file {path}: {where}: {first['msg']}") from None


@dataclass
class ReadGroup:
    """One request: a run of registers of one slave and function."""

    slave: Slave
    function: Function
    address: int
    count: int
    registers: list[Register] = field(default_factory=list)


def plan_reads(slave: Slave, *, max_registers: int, max_bits: int, max_gap: int) -> list[ReadGroup]:
    """Group a slave's map into as few requests as the limits and gaps allow."""
    groups: list[ReadGroup] = []
    regs = sorted(slave.registers or [], key=lambda r: (r.function, r.address, r.width))
    current: ReadGroup | None = None
    for reg in regs:
        limit = max_bits if reg.function in _BIT_FUNCTIONS else max_registers
        end = reg.address + reg.width
        if (
            current is not None
            and current.function == reg.function
            and reg.address - (current.address + current.count) <= max_gap
            and max(end, current.address + current.count) - current.address <= limit
        ):
            current.count = max(end, current.address + current.count) - current.address
            current.registers.append(reg)
            continue
        current = ReadGroup(slave, reg.function, reg.address, reg.width, [reg])
        groups.append(current)
    return groups


def decode(reg: Register, words: Sequence[int]) -> float:
    """Scaled value of ``reg`` from its raw registers (as received, big-endian bytes)."""
    from pymodbus.client.mixin import ModbusClientMixin

    if reg.byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    dtype = ModbusClientMixin.DATATYPE[reg.type.upper()]
    raw = ModbusClientMixin.convert_from_registers(list(words), dtype, word_order=reg.word_order)
    return float(raw) * reg.scale + reg.offset  # type: ignore[arg-type]


class ModbusSource(Source):
    """Polls Modbus slaves over RTU or TCP."""

    Config: ClassVar[type[ModbusConfig]] = ModbusConfig
    description: ClassVar[str] = "Modbus RTU/TCP register maps, read in grouped requests."
    example: ClassVar[str] = """\
- name: meter
  type: modbus
  transport: tcp
  host: 192.168.1.50
  every: 5s
  slaves: [{id: 1, device: meter-1}]
  registers:
    - {name: voltage, address: 0, function: input, type: float32, unit: V}
    - {name: energy, address: 2, function: input, type: uint32, scale: 0.01, unit: kWh}
    - {name: relay, address: 0, function: coil}
"""
    requires: ClassVar[dict[str, str]] = {"pymodbus": "devices", "serial": "devices"}

    def __init__(self, config: ModbusConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._client: Any = None
        self._plan: list[ReadGroup] = [
            g
            for slave in config.slaves
            for g in plan_reads(
                slave,
                max_registers=config.max_registers,
                max_bits=config.max_bits,
                max_gap=config.max_gap,
            )
        ]

    @property
    def plan(self) -> list[ReadGroup]:
        """The current requests (groups that drew an exception are split into singles)."""
        return list(self._plan)

    def _make_client(self) -> Any:
        cfg = self.config
        if cfg.transport == "tcp":
            from pymodbus.client import AsyncModbusTcpClient

            return AsyncModbusTcpClient(
                cfg.host,
                port=cfg.port,
                timeout=cfg.timeout,
                retries=cfg.retries,
                reconnect_delay=0,
                name=self.ctx.component,
            )
        from pymodbus import FramerType
        from pymodbus.client import AsyncModbusSerialClient

        return AsyncModbusSerialClient(
            cfg.port,
            framer=FramerType.RTU,
            baudrate=cfg.baudrate,
            parity=cfg.parity,
            bytesize=cfg.bytesize,
            stopbits=cfg.stopbits,
            timeout=cfg.timeout,
            retries=cfg.retries,
            reconnect_delay=0,
            name=self.ctx.component,
        )

    async def open(self) -> None:
        self._client = self._make_client()
        try:
            await self._client.connect()
        except Exception as exc:  # first attempt only; read() reconnects
            self.ctx.logger.warning("%s: modbus connect failed: %s", self.ctx.component, exc)

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def read(self) -> list[dict[str, Any]]:
        if self._client is None:
            self._client = self._make_client()
        if not self._client.connected and not await self._client.connect():
            self.ctx.counters.inc("modbus_connect_errors_total", component=self.ctx.component)
            raise SourceError(f"modbus {self._where()}: cannot connect")
        now = self.ctx.clock()
        rows: list[dict[str, Any]] = []
        for group in list(self._plan):
            rows += await self._read_group(group, now)
        return rows

    def _where(self) -> str:
        cfg = self.config
        return f"{cfg.host}:{cfg.port}" if cfg.transport == "tcp" else str(cfg.port)

    def _count(self, group: ReadGroup, regs: list[Register], kind: str) -> None:
        for reg in regs:
            self.ctx.counters.inc(
                "modbus_errors_total",
                component=self.ctx.component,
                slave=str(group.slave.id),
                register=reg.name,
                kind=kind,
            )

    async def _read_group(self, group: ReadGroup, now: Any) -> list[dict[str, Any]]:
        from pymodbus.constants import ExcCodes
        from pymodbus.exceptions import ConnectionException, ModbusException

        method = getattr(self._client, _READ_METHOD[group.function])
        try:
            resp = await method(group.address, count=group.count, device_id=group.slave.id)
        except ConnectionException as exc:
            self._count(group, group.registers, "connection")
            raise SourceError(f"modbus {self._where()}: {exc}") from exc
        except ModbusException as exc:  # no (valid) answer within timeout and retries
            self._count(group, group.registers, "timeout")
            self.ctx.logger.debug("%s: %s", self.ctx.component, exc)
            return []
        if resp.isError():
            if len(group.registers) > 1:
                return await self._split(group, now)
            code = getattr(resp, "exception_code", 0)
            try:
                kind = ExcCodes(code).name.lower()
            except ValueError:
                kind = f"exception_{code}"
            self._count(group, group.registers, kind)
            return []
        return self._rows(group, resp, now)

    async def _split(self, group: ReadGroup, now: Any) -> list[dict[str, Any]]:
        """Replace a group that drew an exception by one request per register, and read them."""
        singles = [
            ReadGroup(group.slave, group.function, r.address, r.width, [r]) for r in group.registers
        ]
        idx = self._plan.index(group)
        self._plan[idx : idx + 1] = singles
        self.ctx.logger.info(
            "%s: slave %s refused a grouped read at %s+%s; reading its %s registers one by one",
            self.ctx.component,
            group.slave.id,
            group.address,
            group.count,
            len(singles),
        )
        rows: list[dict[str, Any]] = []
        for single in singles:
            rows += await self._read_group(single, now)
        return rows

    def _rows(self, group: ReadGroup, resp: Any, now: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for reg in group.registers:
            start = reg.address - group.address
            try:
                if group.function in _BIT_FUNCTIONS:
                    value = float(bool(resp.bits[start])) * reg.scale + reg.offset
                else:
                    value = decode(reg, resp.registers[start : start + reg.width])
            except Exception as exc:  # a short or odd answer costs this register, not the tick
                self._count(group, [reg], "decode")
                words = getattr(resp, "registers", None) or getattr(resp, "bits", None)
                self.ctx.reject(
                    json.dumps({"slave": group.slave.id, "register": reg.name, "raw": str(words)}),
                    f"cannot decode {reg.type} at {reg.address}: {exc!r}",
                )
                continue
            row: dict[str, Any] = {"metric": reg.name, "value": value, "ts": now}
            if reg.unit is not None:
                row["unit"] = reg.unit
            if group.slave.device:
                row["device"] = group.slave.device
            rows.append(row)
        return rows
