"""MQTT source: readings that other processes publish on a local broker (Greengrass local
messaging, a mosquitto on the gateway, sensors on the LAN).

paho runs its network loop in its own thread and reconnects by itself (``reconnect_delay_set``);
messages cross to the asyncio side through ``call_soon_threadsafe``. QoS 1/2 messages are
acknowledged only after the runtime has written the batch they were in to the device log (the
generator resumes after that write), so with ``clean_session: false`` a crash between receive and
log makes the broker redeliver: at-least-once, never silently lost.

Payloads are JSON: a wide object ``{"temperature": 21.5}``, a narrow one ``{"metric": …,
"value": …, "ts": …}``, a list of these, or a bare number (named by `metric` or the last topic
level). Topic levels can fill the `device` column and tags. Anything else is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from collector.parsers import ParseError, Row, dotted_get, json_rows
from collector.plugin import Context, Model, Source, SourceConfig
from collector.sources.serial import ReconnectConfig
from collector.units import Duration


class TopicConfig(Model):
    """A topic filter and how its messages become readings."""

    filter: str = Field(description="Topic filter with `+`/`#` wildcards, e.g. `sensors/+/data`.")
    qos: Literal[0, 1, 2] = Field(default=1, description="Subscription QoS.")
    json_path: str | None = Field(
        default=None, description="Dotted path to the readings in the payload, e.g. `data.values`."
    )
    device_segment: int | None = Field(
        default=None,
        description="0-based topic level that names the device (`sensors/+/data` → 1).",
    )
    tags: dict[int, str] = Field(
        default_factory=dict, description="Topic level → tag column, e.g. `{0: site}`."
    )
    metric: str | None = Field(
        default=None, description="Name of a bare-number payload (default: the last topic level)."
    )
    rename: dict[str, str] = Field(default_factory=dict, description="Metric renames.")

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: str) -> str:
        levels = value.split("/")
        if not value or any(
            ("#" in lv and (lv != "#" or i != len(levels) - 1)) or ("+" in lv and lv != "+")
            for i, lv in enumerate(levels)
        ):
            raise ValueError(
                f"{value!r} is not a topic filter: `+` and `#` fill whole levels, `#` only last"
            )
        return value


def _bare_filter(value: Any) -> Any:
    """`"sensors/#"` is `{filter: "sensors/#"}` (the bare filters Telegraf and Vector take)."""
    return {"filter": value} if isinstance(value, str) else value


Topic = Annotated[
    TopicConfig, BeforeValidator(_bare_filter, json_schema_input_type=str | TopicConfig)
]


class TlsConfig(Model):
    """TLS to the broker; an empty block means TLS with the system CAs."""

    ca_certs: str | None = Field(default=None, description="CA bundle that signed the broker.")
    certfile: str | None = Field(default=None, description="Client certificate (mutual TLS).")
    keyfile: str | None = Field(default=None, description="Client private key.")
    insecure: bool = Field(
        default=False, description="Skip hostname verification (test setups only)."
    )


class MqttConfig(SourceConfig):
    """Broker address, credentials and the topics to subscribe to."""

    type: Literal["mqtt"] = Field(default="mqtt", description="Plugin name.")

    host: str = Field(default="localhost", description="Broker host.")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Broker port (default 1883, 8883 with `tls`)."
    )
    topics: list[Topic] = Field(
        min_length=1,
        description="Subscriptions: `{filter: …, qos: …}` entries, or bare filters "
        '(`["sensors/#"]`: QoS 1, every other setting at its default).',
    )
    client_id: str | None = Field(
        default=None, description="MQTT client id (required for a persistent session)."
    )
    clean_session: bool = Field(
        default=True,
        description="false: the broker keeps the subscription and queues QoS≥1 messages while "
        "the collector is away (needs `client_id`).",
    )
    username: str | None = Field(default=None, description="Broker user name.")
    password: SecretStr | None = Field(default=None, description="Broker password.")
    tls: TlsConfig | None = Field(default=None, description="Enable TLS (`tls: {}` for defaults).")
    keepalive: Duration = Field(default=60, gt=0, description="MQTT keepalive interval.")
    reconnect: ReconnectConfig = Field(
        default_factory=ReconnectConfig, description="Backoff between reconnect attempts."
    )
    max_queue: int = Field(
        default=100_000,
        gt=0,
        description="QoS 0 messages held before the log catches up; beyond it they are dropped "
        "and counted (QoS≥1 is flow-controlled by the broker instead).",
    )

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        if self.every is not None or self.cron is not None:
            raise ValueError("mqtt is a streaming source: remove `every`/`cron`")
        if not self.clean_session and not self.client_id:
            raise ValueError("clean_session: false needs a fixed `client_id`")
        if self.password is not None and self.username is None:
            raise ValueError("`password` needs `username`")
        for topic in self.topics:  # topic-level tags become declared tag columns
            for name in topic.tags.values():
                self.tags.setdefault(name, "")
        return self

    @property
    def broker_port(self) -> int:
        return self.port or (8883 if self.tls is not None else 1883)


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT filter matching (same rules as paho's ``topic_matches_sub``, no import needed)."""
    f_levels, t_levels = filter_.split("/"), topic.split("/")
    for i, lv in enumerate(f_levels):
        if lv == "#":
            return not (i == 0 and topic.startswith("$"))
        if i >= len(t_levels) or (lv != "+" and lv != t_levels[i]):
            return False
        if lv == "+" and i == 0 and topic.startswith("$"):
            return False
    return len(f_levels) == len(t_levels)


def message_rows(topic_cfg: TopicConfig, topic: str, payload: bytes) -> list[Row]:
    """Rows of one message, or ParseError with the reason."""
    levels = topic.split("/")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ParseError(f"not JSON: {exc}") from None
    rows = json_rows(
        dotted_get(doc, topic_cfg.json_path),
        rename=topic_cfg.rename,
        metric=topic_cfg.metric or levels[-1],
        keep=frozenset(topic_cfg.tags.values()),
    )
    fixed: dict[str, str] = {}
    for idx, name in topic_cfg.tags.items():
        try:
            fixed[name] = levels[idx]
        except IndexError:
            raise ParseError(f"topic {topic!r} has no level {idx} for tag {name!r}") from None
    if topic_cfg.device_segment is not None:
        try:
            fixed["device"] = levels[topic_cfg.device_segment]
        except IndexError:
            raise ParseError(f"topic {topic!r} has no level {topic_cfg.device_segment}") from None
    for row in rows:
        for key, value in fixed.items():
            row.setdefault(key, value)
    return rows


class MqttSource(Source):
    """Subscribes to topic filters and turns JSON payloads into readings."""

    Config: ClassVar[type[MqttConfig]] = MqttConfig
    description: ClassVar[str] = "Readings published to an MQTT broker (JSON payloads)."
    example: ClassVar[str] = """\
- name: lan-sensors
  type: mqtt
  host: localhost
  topics:
    - {filter: "sensors/+/telemetry", qos: 1, device_segment: 1}
    - {filter: "site/+/plc/#", json_path: data, tags: {1: site}}
"""
    requires: ClassVar[dict[str, str]] = {"paho": "devices"}
    long_lived: ClassVar[bool] = True

    def __init__(self, config: MqttConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._client: Any = None
        self._queue: asyncio.Queue[Any] | None = None
        self._connected = False
        self.subscribed = False
        """True once the broker acknowledged the subscriptions (logged; tests wait for it)."""

    async def open(self) -> None:
        import paho.mqtt.client as mqtt

        cfg = self.config
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queue = queue
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or "",
            clean_session=cfg.clean_session,
            manual_ack=True,
        )
        if cfg.username is not None:
            client.username_pw_set(
                cfg.username, cfg.password.get_secret_value() if cfg.password else None
            )
        if cfg.tls is not None:
            client.tls_set(
                ca_certs=cfg.tls.ca_certs, certfile=cfg.tls.certfile, keyfile=cfg.tls.keyfile
            )
            client.tls_insecure_set(cfg.tls.insecure)
        client.reconnect_delay_set(
            min_delay=max(1, round(cfg.reconnect.initial)),
            max_delay=max(1, round(cfg.reconnect.max)),
        )
        component = self.ctx.component

        def on_connect(cl: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                self.ctx.logger.warning("%s: broker refused the connection: %s", component, reason)
                return
            self._connected = True
            self.subscribed = False
            self.ctx.logger.info("%s: connected to %s:%s", component, cfg.host, cfg.broker_port)
            cl.subscribe([(t.filter, t.qos) for t in cfg.topics])

        def on_disconnect(cl: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if self._connected and cl is self._client:  # close() drops it first: not a loss
                self.ctx.counters.inc("mqtt_disconnects_total", component=component)
                self.ctx.logger.warning(
                    "%s: broker connection lost (%s); reconnecting", component, reason
                )
            self._connected = False

        def on_subscribe(_c: Any, _u: Any, _mid: Any, reasons: Any, _p: Any) -> None:
            refused = [t.filter for t, r in zip(cfg.topics, reasons, strict=False) if r.is_failure]
            if refused:
                self.ctx.logger.warning("%s: broker refused subscriptions %s", component, refused)
            self.subscribed = True
            self.ctx.logger.info(
                "%s: subscribed to %s", component, ", ".join(t.filter for t in cfg.topics)
            )

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            if msg.qos == 0 and queue.qsize() >= cfg.max_queue:
                self.ctx.counters.inc("mqtt_dropped_total", component=component)
                return
            # a loop closed during shutdown raises: the message stays unacked, so redelivered
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, msg)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.on_subscribe = on_subscribe
        self._client = client
        client.connect_async(cfg.host, cfg.broker_port, keepalive=round(cfg.keepalive))
        client.loop_start()

    async def close(self) -> None:
        client, self._client = self._client, None  # before disconnect(): on_disconnect reads it
        if client is not None:
            self._connected = False
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)

    def _handle(self, msg: Any) -> list[Row]:
        topic_cfg = next(
            (t for t in self.config.topics if topic_matches(t.filter, msg.topic)), None
        )
        if topic_cfg is None:  # a retained or overlapping subscription we did not ask for
            return []
        try:
            rows = message_rows(topic_cfg, msg.topic, msg.payload)
        except ParseError as exc:
            self.ctx.reject(msg.payload, f"{msg.topic}: {exc}")
            return []
        except Exception as exc:
            # A payload no parser check foresaw (a 400-digit integer, say) must cost only
            # itself: raising here would leave the batch unacked, restart the stream and have
            # the broker redeliver the same message forever.
            self.ctx.reject(msg.payload, f"{msg.topic}: unreadable: {exc!r}")
            return []
        now = self.ctx.clock()
        for row in rows:
            row.setdefault("ts", now)
        return rows

    def _handle_batch(self, batch: list[Any]) -> list[Row]:
        """Parse in a worker thread: dead-lettering fsyncs, which must not stall the loop."""
        return [row for msg in batch for row in self._handle(msg)]

    async def stream(self) -> Any:
        if self._client is None:
            await self.open()
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < 10_000:
                batch.append(queue.get_nowait())
            rows = await asyncio.to_thread(self._handle_batch, batch)
            self.ctx.counters.inc("mqtt_messages_total", len(batch), component=self.ctx.component)
            if rows:
                yield rows  # resumes once the runtime has logged the rows: ack only then
            client = self._client
            if client is not None:
                for msg in batch:
                    if msg.qos:
                        client.ack(msg.mid, msg.qos)
