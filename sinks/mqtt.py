"""MQTT: readings packed into few messages, published to AWS IoT Core, a Greengrass v2 core's
local broker or any MQTT broker (paho-mqtt 2.x).

The talk's devices publish one JSON message per reading and IoT rules fan them out. IoT Core
meters messages in 5 KB increments (an 8 KB message counts as two) and refuses payloads over
128 KB, so this sink packs a batch's readings into as few messages as possible per topic, each
just under a multiple of 5 KB (``payload_target_bytes``), as NDJSON lines (or a JSON array), every
line carrying ``record_id``. Same idea as the Firehose packing (``sinks.firehose``).

Delivery: with QoS 1 a batch leaves the spool only when every message of it has its PUBACK. A
broker that is down or silent raises ``TransientSinkError`` (the spool keeps the batch); a
connection lost mid-batch re-sends only the rows of the messages not acknowledged. A broker that
refuses a message (MQTT 5 PUBACK reason code >= 0x80: not authorized, packet too large, topic
invalid) sends that message's rows to the dead letter with the reason; quota exceeded is
retried. At least once: a PUBACK lost with the connection means the message is sent again, so
readers dedupe on ``record_id``.

Topic templates take row values (``dt/{device}/{source}/{metric}``) and are checked by
``collector check`` against IoT Core's limits (256 bytes, 7 slashes not counting the Basic Ingest
prefix ``$aws/rules/<rule>/``, QoS 0 or 1) when the endpoint is IoT Core.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import string
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import polars as pl
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from collector.errors import PartialWriteError, TransientSinkError
from collector.plugin import BatchConfig, Context, Sink, SinkConfig, SinkLimits
from collector.sources.mqtt import TlsConfig
from collector.units import Duration, Size
from sinks.firehose import ndjson_lines, pack

IOT_MAX_PAYLOAD = 128 * 1024
"""IoT Core refuses a PUBLISH payload over 128 KB (we read KiB: 131,072 bytes)."""
IOT_MAX_TOPIC_BYTES = 256
IOT_MAX_SLASHES = 7
METERING_INCREMENT = 5 * 1024
"""IoT Core meters messages in 5 KB increments; 5 KiB is the pessimistic reading."""
DEFAULT_PAYLOAD_TARGET = 124_900
"""Just under 25 x 5,000 bytes (and under 25 x 5,120): 25 metered units in either reading of
"5 KB", and under 128 KB with room for the JSON array's brackets."""
MQTT_MAX_PAYLOAD = 268_435_455 - 65_535 - 16
"""MQTT's packet limit minus the longest topic and header: the most any broker can take."""
MQTT_MAX_TOPIC_BYTES = 65_535
DEFAULT_BATCH_AGE = 60.0
"""Seconds; a minute of readings per batch gives messages worth packing at little latency."""
BASIC_INGEST = re.compile(r"^\$aws/rules/([A-Za-z0-9_]{1,128})/")
IOT_HOST = re.compile(r"(^|\.)iot\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$", re.IGNORECASE)
RETRY_CODES = frozenset({0x91, 0x97})
"""PUBACK reason codes that mean "later": packet identifier in use, quota exceeded."""
_UNSAFE = re.compile(r"[/+#\x00]")


def is_iot_core(host: str) -> bool:
    """True for an AWS IoT Core data endpoint (``<prefix>-ats.iot.<region>.amazonaws.com``)."""
    return bool(IOT_HOST.search(host.strip().rstrip(".")))


def template_fields(template: str) -> list[str]:
    """Column names a topic template uses; ValueError for anything but plain ``{column}``."""
    names: list[str] = []
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"topic {template!r}: {exc} (write a literal brace as {{{{ or }}}})"
        ) from None
    for _text, name, spec, conv in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(
                f"topic {template!r}: placeholders are column names like {{device}}, "
                f"got {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
            )
        names.append(name)
    return names


def _static(template: str) -> str:
    return "".join(text for text, *_ in string.Formatter().parse(template))


def check_topic(template: str, iot_core: bool) -> None:
    """Raise ValueError when no row could ever give a valid topic from ``template``."""
    fields = template_fields(template)
    static = _static(template)
    if not template:
        raise ValueError("topic is empty")
    if any(c in static for c in "+#\x00"):
        raise ValueError(f"topic {template!r}: `+`, `#` and NUL are not allowed in a topic name")
    ingest = BASIC_INGEST.match(template) if template.startswith("$") else None
    if template.startswith("$") and ingest is None:
        raise ValueError(
            f"topic {template!r}: topics starting with `$` are reserved; the only one a device "
            "publishes to is AWS IoT Basic Ingest, `$aws/rules/<rule_name>/<topic>`"
        )
    limit = IOT_MAX_TOPIC_BYTES if iot_core else MQTT_MAX_TOPIC_BYTES
    least = len(static.encode()) + len(fields)  # every placeholder gives at least one byte
    if least > limit:
        raise ValueError(
            f"topic {template!r} is at least {least} bytes; "
            + ("AWS IoT Core takes at most 256" if iot_core else f"MQTT takes at most {limit}")
        )
    if iot_core:
        slashes = static.count("/") - (3 if ingest else 0)
        if slashes > IOT_MAX_SLASHES:
            raise ValueError(
                f"topic {template!r} has {slashes} slashes"
                + (" after the Basic Ingest prefix" if ingest else "")
                + f"; AWS IoT Core allows at most {IOT_MAX_SLASHES} (8 levels)"
            )


class MqttSinkConfig(SinkConfig):
    """Broker, topic template, packing and acknowledgement of the `mqtt` sink."""

    host: str = Field(
        default="localhost",
        description="Broker host: the IoT Core data endpoint (`…-ats.iot.<region>.amazonaws.com`"
        ", `aws iot describe-endpoint --endpoint-type iot:Data-ATS`), a Greengrass core, or any "
        "broker.",
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Broker port (default 1883, 8883 with `tls`)."
    )
    aws_iot: bool | None = Field(
        default=None,
        description="Apply AWS IoT Core's limits (topic 256 bytes and 7 slashes, payload 128 KB, "
        "QoS 0/1). Default: when `host` is an `*.iot.*.amazonaws.com` endpoint; set `true` for "
        "a custom domain or a Greengrass core whose bridge forwards these topics to IoT Core.",
    )
    qos: Literal[0, 1, 2] = Field(
        default=1,
        description="1 (default): a batch leaves the spool when every message is acknowledged. "
        "0: no acknowledgement, at most once. 2: brokers other than IoT Core only.",
    )
    topic: str = Field(
        default="dt/{device}/{source}/{metric}",
        description="Topic template; `{column}` takes each row's value (`/`, `+`, `#` in values "
        "become `_`). Rows are packed per topic; a template without placeholders sends a batch "
        "to one topic. `$aws/rules/<rule>/…` publishes with IoT Core Basic Ingest (no messaging "
        "charge).",
    )
    format: Literal["ndjson", "json"] = Field(
        default="ndjson",
        description="Payload: `ndjson` (one JSON object per line, what the `firehose` sink "
        "writes) or `json` (one JSON array of objects). Every reading carries `record_id`.",
    )
    payload_target_bytes: Size = Field(
        default=DEFAULT_PAYLOAD_TARGET,
        gt=2,
        description="Pack readings into one message up to this size; keep it just under a "
        "multiple of 5 KB (IoT Core's metering increment). At most `max_payload_bytes`.",
    )
    max_payload_bytes: Size = Field(
        default=IOT_MAX_PAYLOAD,
        gt=2,
        description="Largest message payload the broker takes (IoT Core and Greengrass: 128 KiB);"
        " a single reading larger than this goes to the dead letter.",
    )
    client_id: str | None = Field(
        default=None,
        description="MQTT client id (default: the config's `device`); IoT Core policies usually "
        "require the thing name.",
    )
    username: str | None = Field(default=None, description="Broker user name (not IoT Core).")
    password: SecretStr | None = Field(default=None, description="Broker password.")
    tls: TlsConfig | None = Field(
        default=None,
        description="TLS; `{ca_certs, certfile, keyfile}` is mutual TLS with an X.509 client "
        "certificate, how IoT Core and Greengrass authenticate devices. `tls: {}` uses the system "
        "CAs. On port 443 the ALPN protocol `x-amzn-mqtt-ca` is offered (IoT Core).",
    )
    protocol: Literal["v5", "v311"] = Field(
        default="v5",
        description="MQTT version. `v5` reports why a broker refuses a message (PUBACK reason "
        "codes); `v311` for brokers without MQTT 5 (Greengrass' Moquette), where a refused "
        "message cannot be told from a delivered one.",
    )
    clean_session: bool = Field(
        default=True,
        description="false: a persistent session (MQTT 5: clean start off, `session_expiry`).",
    )
    session_expiry: Duration = Field(
        default=3600, ge=0, description="MQTT 5 session expiry of a persistent session."
    )
    keepalive: Duration = Field(
        default=60, ge=5, le=65535, description="MQTT keepalive (IoT Core: 30 s to 1200 s)."
    )
    connect_timeout: Duration = Field(default=10.0, gt=0, description="TCP+TLS+CONNACK timeout.")
    ack_timeout: Duration = Field(
        default=30.0,
        gt=0,
        description="No acknowledgement for this long: the unacknowledged messages' rows stay in "
        "the spool and the connection is opened afresh.",
    )
    max_inflight: int = Field(
        default=20, ge=1, le=65535, description="Unacknowledged messages in flight at once."
    )
    batch: BatchConfig = Field(
        default_factory=lambda: BatchConfig(max_age=DEFAULT_BATCH_AGE),
        description="Batch cutting. Default `max_age: 1m`: packing only packs within a batch "
        "(`collector check --estimate` shows messages and metered units per day).",
    )

    @property
    def iot_core(self) -> bool:
        return self.aws_iot if self.aws_iot is not None else is_iot_core(self.host)

    @property
    def broker_port(self) -> int:
        return self.port or (8883 if self.tls is not None else 1883)

    @field_validator("qos")
    @classmethod
    def _iot_qos(cls, value: int, info: ValidationInfo) -> int:
        if value == 2 and _iot(info):
            raise ValueError(
                "AWS IoT Core does not support QoS 2 (it never acknowledges a QoS 2 "
                "publish): use qos: 1, acknowledged with PUBACK"
            )
        return value

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str, info: ValidationInfo) -> str:
        check_topic(value, _iot(info))
        return value

    @field_validator("max_payload_bytes")
    @classmethod
    def _payload_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = IOT_MAX_PAYLOAD if _iot(info) else MQTT_MAX_PAYLOAD
        if value > limit:
            what = "AWS IoT Core takes at most 128 KiB" if _iot(info) else "MQTT's limit"
            raise ValueError(f"max_payload_bytes {value} is over {what} ({limit} bytes)")
        return value

    @model_validator(mode="after")
    def _rules(self) -> MqttSinkConfig:
        if self.payload_target_bytes > self.max_payload_bytes:
            raise ValueError(
                f"payload_target_bytes ({self.payload_target_bytes}) cannot exceed "
                f"max_payload_bytes ({self.max_payload_bytes})"
            )
        if self.password is not None and self.username is None:
            raise ValueError("`password` needs `username`")
        return self


def _iot(info: ValidationInfo) -> bool:
    """IoT Core limits apply (from the fields validated before: host, aws_iot)."""
    data = info.data
    if data.get("aws_iot") is not None:
        return bool(data["aws_iot"])
    return is_iot_core(str(data.get("host") or ""))


# -- packing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One PUBLISH: its topic, payload and the table rows it holds."""

    topic: str
    payload: bytes
    rows: list[int]


@dataclass
class Plan:
    """A batch cut into messages, and the rows that can never be sent (with why)."""

    messages: list[Message]
    rejected: list[int]
    reasons: list[str]


def metered_units(payload_bytes: int, increment: int = METERING_INCREMENT) -> int:
    """IoT Core messages metered for one payload (5 KB increments, at least one)."""
    return max(1, -(-payload_bytes // increment))


def topics(frame: pl.DataFrame, template: str) -> tuple[list[str | None], str | None]:
    """Each row's topic (values with `/`, `+`, `#`, NUL made `_`, null or empty as `_`), or
    all None and the reason when the template names a column the batch lacks."""
    fields = template_fields(template)
    missing = sorted(set(fields) - set(frame.columns))
    if missing:
        return [None] * frame.height, (
            f"topic {template!r} names column(s) {', '.join(missing)} the rows do not have"
        )
    if not fields:
        return [template.replace("{{", "{").replace("}}", "}")] * frame.height, None
    cols = {
        name: [
            _UNSAFE.sub("_", str(v)) if v is not None and str(v) != "" else "_"
            for v in frame.get_column(name).to_list()
        ]
        for name in set(fields)
    }
    return [
        template.format_map({name: cols[name][i] for name in cols}) for i in range(frame.height)
    ], None


def encode(lines: Sequence[bytes], fmt: str) -> bytes:
    """NDJSON lines (newline-terminated) as one payload of ``fmt``."""
    if fmt == "json":
        return b"[" + b",".join(line.rstrip(b"\n") for line in lines) + b"]"
    return b"".join(lines)


def plan(frame: pl.DataFrame, config: MqttSinkConfig) -> Plan:
    """Pack ``frame`` into messages: per topic (first appearance order), rows in order,
    greedily up to ``payload_target_bytes``. Rows without a valid topic, or whose reading alone
    is over ``max_payload_bytes``, are rejected."""
    lines = ndjson_lines(frame)
    row_topics, why = topics(frame, config.topic)
    limit = IOT_MAX_TOPIC_BYTES if config.iot_core else MQTT_MAX_TOPIC_BYTES
    extra = 1 if config.format == "json" else 0  # "[…]" replaces the newlines with commas
    rejected: list[int] = []
    reasons: list[str] = []
    groups: dict[str, list[int]] = {}
    for i, topic in enumerate(row_topics):
        if topic is None:
            rejected.append(i)
            reasons.append(why or "no topic")
        elif len(topic.encode()) > limit:
            rejected.append(i)
            reasons.append(f"topic is {len(topic.encode())} bytes, over {limit}: {topic[:80]}…")
        elif len(lines[i]) + extra > config.max_payload_bytes:
            rejected.append(i)
            reasons.append(
                f"reading is {len(lines[i]) + extra} bytes, over max_payload_bytes "
                f"({config.max_payload_bytes})"
            )
        else:
            groups.setdefault(topic, []).append(i)
    messages: list[Message] = []
    for topic, rows in groups.items():
        for p in pack([lines[i] for i in rows], config.payload_target_bytes - extra):
            picked = [rows[r] for r in p.rows]
            messages.append(Message(topic, encode([lines[i] for i in picked], config.format),
                                    picked))
    return Plan(messages, rejected, reasons)



# -- the sink --------------------------------------------------------------------------------


def _reason_value(reason: Any) -> int:
    value = getattr(reason, "value", reason)
    return int(value) if isinstance(value, int) else 0


class MqttSink(Sink):
    """Packed readings published with QoS 1; a batch is done when every PUBACK is in."""

    Config = MqttSinkConfig
    description = "MQTT / AWS IoT Core: readings packed into few messages, acknowledged by PUBACK."
    example = """\
- name: iot
  type: mqtt
  host: a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com
  port: 8883
  topic: "dt/{device}/{source}/{metric}"
  tls:
    ca_certs: /greengrass/v2/rootCA.pem
    certfile: /greengrass/v2/thingCert.crt
    keyfile: /greengrass/v2/privKey.key
"""
    requires: ClassVar[dict[str, str]] = {"paho": "devices"}
    limits = SinkLimits(max_record_bytes=IOT_MAX_PAYLOAD)

    def __init__(self, config: MqttSinkConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.config: MqttSinkConfig = config
        self._client: Any = None
        self._broken = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._connected: asyncio.Future[None] | None = None
        self._max_packet: int | None = None
        """The broker's Maximum Packet Size (MQTT 5 CONNACK), when it announces one."""

    @property
    def deadline(self) -> float:
        """Seconds the runtime lets one ``write`` take (plus its transfer time)."""
        return self.config.connect_timeout + 2 * self.config.ack_timeout + 10

    @property
    def where(self) -> str:
        return f"mqtt {self.config.host}:{self.config.broker_port}"

    # -- connection ------------------------------------------------------------------------

    def _tls_context(self) -> Any:
        import ssl

        tls = self.config.tls
        assert tls is not None
        ctx = ssl.create_default_context(cafile=tls.ca_certs)
        if tls.certfile:
            ctx.load_cert_chain(tls.certfile, tls.keyfile)
        if tls.insecure:
            ctx.check_hostname = False
        if self.config.broker_port == 443:
            ctx.set_alpn_protocols(["x-amzn-mqtt-ca"])  # IoT Core's MQTT over 443
        return ctx

    async def open(self) -> None:
        await self._connect()

    async def _connect(self) -> None:
        if self._client is not None and not self._broken:
            return
        await self._drop()
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        cfg = self.config
        loop = asyncio.get_running_loop()
        self._loop = loop
        v5 = cfg.protocol == "v5"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or self.ctx.device,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else cfg.clean_session,
        )
        client.connect_timeout = cfg.connect_timeout
        client.max_inflight_messages_set(cfg.max_inflight)
        client.reconnect_delay_set(1, 30)
        if cfg.username is not None:
            client.username_pw_set(
                cfg.username, cfg.password.get_secret_value() if cfg.password else None
            )
        try:
            if cfg.tls is not None:
                client.tls_set_context(self._tls_context())
        except (OSError, ValueError) as exc:
            raise TransientSinkError(f"{self.where}: TLS files: {exc}") from exc
        connected: asyncio.Future[None] = loop.create_future()
        self._connected = connected

        def on_connect(cl: Any, _u: Any, _f: Any, reason: Any, props: Any) -> None:
            limit = getattr(props, "MaximumPacketSize", None) if props is not None else None
            loop.call_soon_threadsafe(self._on_connect, cl, reason, limit)

        def on_disconnect(cl: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            loop.call_soon_threadsafe(self._on_disconnect, cl, reason)

        def on_publish(cl: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
            loop.call_soon_threadsafe(self._on_publish, cl, mid, reason)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        props = None
        if v5 and not cfg.clean_session:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(cfg.session_expiry)
        self._client, self._broken = client, False
        try:
            await asyncio.to_thread(
                client.connect,
                cfg.host,
                cfg.broker_port,
                keepalive=int(cfg.keepalive),
                clean_start=cfg.clean_session if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
            client.loop_start()
            await asyncio.wait_for(asyncio.shield(connected), cfg.connect_timeout)
        except (OSError, TimeoutError, TransientSinkError, ValueError) as exc:
            await self._drop()
            if isinstance(exc, TransientSinkError):
                raise
            what = "no CONNACK" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}"
            raise TransientSinkError(f"{self.where}: cannot connect: {what}: {exc}") from exc
        self.ctx.logger.info("%s: connected to %s", self.ctx.component, self.where)

    def _on_connect(self, client: Any, reason: Any, max_packet: int | None) -> None:
        if client is not self._client or self._connected is None:
            return
        self._max_packet = max_packet if isinstance(max_packet, int) else None
        if self._connected.done():
            return
        if getattr(reason, "is_failure", False):
            self._connected.set_exception(
                TransientSinkError(f"{self.where}: the broker refused the connection: {reason}")
            )
        else:
            self._connected.set_result(None)

    def _on_disconnect(self, client: Any, reason: Any) -> None:
        if client is not self._client:
            return
        self._broken = True
        err = TransientSinkError(f"{self.where}: connection lost ({reason})")
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(err)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self.ctx.counters.inc("mqtt_disconnects_total", component=self.ctx.component)

    def _on_publish(self, client: Any, mid: int, reason: Any) -> None:
        if client is not self._client:
            return
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason)

    async def _drop(self) -> None:
        """Forget the client and everything paho still queues for it (a failed write's
        messages are re-sent from the spool, never piled up in memory during an outage)."""
        client, self._client = self._client, None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TransientSinkError(f"{self.where}: connection closed"))
        self._pending.clear()
        if client is None:
            return

        def stop() -> None:
            with contextlib.suppress(Exception):
                client.disconnect()
            with contextlib.suppress(Exception):
                client.loop_stop()

        thread = threading.Thread(target=stop, daemon=True)
        thread.start()
        await asyncio.to_thread(thread.join, self.config.connect_timeout + 5)

    async def close(self) -> None:
        await self._drop()

    # -- writing ---------------------------------------------------------------------------

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        if frame.height == 0:
            return
        cfg = self.config
        p = plan(frame, cfg)
        if p.messages:
            await self._connect()
        outcomes = await self._publish(p.messages) if p.messages else []
        retry: list[int] = []
        retry_why: list[str] = []
        rejected, why = list(p.rejected), list(p.reasons)
        sent_rows = 0
        for msg, (kind, reason) in zip(p.messages, outcomes, strict=True):
            if kind == "ok":
                sent_rows += len(msg.rows)
                self.ctx.counters.inc("mqtt_messages_total", component=self.ctx.component)
                self.ctx.counters.inc(
                    "mqtt_metered_units_total", metered_units(len(msg.payload)),
                    component=self.ctx.component,
                )
            elif kind == "reject":
                rejected += msg.rows
                why += [reason] * len(msg.rows)
            else:
                retry += msg.rows
                retry_why.append(reason)
        self.ctx.counters.inc("mqtt_rows_sent_total", sent_rows, component=self.ctx.component)
        if retry:
            self._broken = True  # paho may still hold them: start afresh next time
        if not retry and not rejected:
            return
        if retry and not sent_rows and not rejected:
            raise TransientSinkError(retry_why[0])  # nothing landed: the batch stays as is
        order = sorted(range(len(rejected)), key=rejected.__getitem__)
        raise PartialWriteError(
            retry_rows=frame[sorted(retry)] if retry else None,
            rejected_rows=frame[[rejected[i] for i in order]] if rejected else None,
            reasons=[why[i] for i in order],
            message=f"{self.where}: {len(retry)} rows to retry, {len(rejected)} rejected"
            + (f" ({'; '.join(sorted(set(retry_why + why))[:3])})" if retry_why or why else ""),
        )

    async def _publish(self, messages: list[Message]) -> list[tuple[str, str]]:
        """Publish every message; ("ok" | "reject" | "retry", reason) for each."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        cfg = self.config
        client = self._client
        assert self._loop is not None and client is not None
        props = None
        if cfg.protocol == "v5":
            props = Properties(PacketTypes.PUBLISH)
            props.PayloadFormatIndicator = 1
            props.ContentType = (
                "application/json" if cfg.format == "json" else "application/x-ndjson"
            )
        futures: list[asyncio.Future[Any] | None] = []
        outcomes: list[tuple[str, str]] = [("retry", "")] * len(messages)
        overhead = 5 + 2 + (2 if cfg.qos else 0) + (len(props.pack()) if props else 0)
        for n, msg in enumerate(messages):
            size = overhead + len(msg.topic.encode()) + len(msg.payload)
            if self._max_packet is not None and size > self._max_packet:
                # the broker announced it would close the connection on such a packet
                outcomes[n] = (
                    "reject",
                    f"{self.where}: a {size}-byte PUBLISH is over the broker's maximum packet "
                    f"size ({self._max_packet} bytes); lower payload_target_bytes/"
                    "max_payload_bytes",
                )
                futures.append(None)
                continue
            if self._broken:
                outcomes[n] = ("retry", f"{self.where}: connection lost")
                futures.append(None)
                continue
            # no await between publish() and registering its mid: paho's on_publish reaches
            # the event loop through call_soon_threadsafe, so it always finds the future
            info = client.publish(msg.topic, msg.payload, qos=cfg.qos, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                outcomes[n] = ("retry", f"{self.where}: publish: {mqtt.error_string(info.rc)}")
                futures.append(None)
                self._broken = True
                continue
            fut = self._loop.create_future()
            self._pending[info.mid] = fut
            futures.append(fut)
        waiting = {f for f in futures if f is not None}
        while waiting:
            done, waiting = await asyncio.wait(
                waiting, timeout=cfg.ack_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
        for n, fut in enumerate(futures):
            if fut is None:
                continue
            if not fut.done():
                fut.cancel()
                outcomes[n] = (
                    "retry", f"{self.where}: no acknowledgement for {cfg.ack_timeout:.0f} s"
                )
                self._broken = True
            elif fut.exception() is not None:
                outcomes[n] = ("retry", str(fut.exception()))
            else:
                outcomes[n] = self._classify(fut.result())
        return outcomes

    def _classify(self, reason: Any) -> tuple[str, str]:
        code = _reason_value(reason)
        if code < 0x80:
            return ("ok", "")  # 0x00 success, 0x10 no matching subscribers
        text = f"{self.where} refused the message: {reason} (0x{code:02X})"
        if code in RETRY_CODES:
            return ("retry", text)
        return ("reject", text)
