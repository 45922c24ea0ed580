"""Real peers for the mqtt sink tests: certificates made by `openssl`, a mosquitto with mutual
TLS (`require_certificate true`), and a subscriber that keeps every message it receives."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.sources.peers import Mosquitto, wait_for


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path

    def client(self, name: str) -> tuple[Path, Path]:
        folder = self.ca.parent
        return folder / f"{name}.pem", folder / f"{name}.key"


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _leaf(folder: Path, name: str, subject: str, ext: str) -> None:
    (folder / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-sha256",
             "-extfile", f"{name}.ext", cwd=folder)


def make_certs(folder: Path, clients: tuple[str, ...] = ("edge-01", "reader")) -> Certs:
    """A CA, a server certificate for 127.0.0.1 and one client certificate per name (its CN)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (make test installs it)")
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-sha256",
             "-subj", "/CN=test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    _leaf(folder, "server", "/CN=localhost",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    for name in clients:
        _leaf(folder, name, f"/CN={name}", "extendedKeyUsage=clientAuth\n")
    return Certs(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def tls_broker(folder: Path, certs: Certs, acl: str | None = None, extra: str = "") -> Mosquitto:
    """mosquitto on TLS that requires a client certificate (its CN is the user name) and keeps
    sessions and queued messages across a restart (`persistence`)."""
    (folder / "db").mkdir(exist_ok=True)
    settings = (
        f"cafile {certs.ca}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n"
        "require_certificate true\nuse_identity_as_username true\n"
        f"persistence true\npersistence_location {folder / 'db'}/\n{extra}"
    )
    if acl is not None:
        (folder / "acl").write_text(acl)
        settings += f"acl_file {folder / 'acl'}\n"
    return Mosquitto(folder, settings)


class Subscriber:
    """Subscribes to ``filter_`` (QoS 1, persistent session) and keeps (topic, payload, props)."""

    def __init__(self, port: int, certs: Certs | None = None, name: str = "reader",
                 filter_: str = "#") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name,
                                  protocol=mqtt.MQTTv5)
        if certs is not None:
            cert, key = certs.client(name)
            self.client.tls_set(ca_certs=str(certs.ca), certfile=str(cert), keyfile=str(key))
        self.client.reconnect_delay_set(1, 1)

        def on_connect(cl: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if not reason.is_failure:
                cl.subscribe(filter_, qos=1)

        def on_subscribe(*_: Any) -> None:
            self.subscribed.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            props = {}
            if msg.properties is not None and hasattr(msg.properties, "ContentType"):
                props["content_type"] = msg.properties.ContentType
            with self.lock:
                self.messages.append((msg.topic, msg.payload, props))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, 15, "subscription")

    def rows(self) -> list[dict[str, Any]]:
        """Every reading received, from NDJSON or JSON-array payloads, with its topic."""
        with self.lock:
            msgs = list(self.messages)
        out = []
        for topic, payload, _ in msgs:
            text = payload.decode()
            docs = json.loads(text) if text.startswith("[") else [
                json.loads(line) for line in text.splitlines()
            ]
            out += [{**d, "_topic": topic} for d in docs]
        return out

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
