"""Server detection, authentication, SigV4 and TLS of the elasticsearch sink, against the double."""

from __future__ import annotations

import base64
import importlib.util
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from collector.errors import MissingDependencyError, PermanentSinkError, TransientSinkError
from tests.sinks.es.certs import Pki, make_pki
from tests.sinks.es.conftest import SinkFactory
from tests.sinks.es.double import ElasticsearchDouble, SigV4Expectation
from tests.sinks.es.kit import deliver, readings


def _bulk_content_types(double: ElasticsearchDouble) -> set[str]:
    return {h.get("content-type", "") for _m, path, h, _b in double.requests
            if path.endswith("/_bulk")}


async def test_auto_detects_elasticsearch(es_double: ElasticsearchDouble,
                                          make_sink: SinkFactory) -> None:
    sink = make_sink(es_double)
    await sink.write(readings(3), "b1")
    assert sink.backend is not None and sink.backend.flavor == "elasticsearch"
    assert len(es_double.all_docs()) == 3
    # the official client (compatibility media type) did the bulk
    assert all("compatible-with=9" in c for c in _bulk_content_types(es_double))


async def test_auto_detects_opensearch_and_switches_client(
    os_double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    sink = make_sink(os_double)
    await sink.write(readings(3), "b1")
    assert sink.backend is not None and sink.backend.flavor == "opensearch"
    assert sorted(os_double.all_docs()) == ["b1:0", "b1:1", "b1:2"]
    assert "edge-collector-sensors" in os_double.templates
    assert not any("vnd.elasticsearch" in c for c in _bulk_content_types(os_double))


async def test_forcing_elasticsearch_against_opensearch_fails_clearly(
    os_double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    sink = make_sink(os_double, flavor="elasticsearch")
    with pytest.raises(PermanentSinkError, match="opensearch, not Elasticsearch"):
        await sink.open()
    assert os_double.all_docs() == {}


async def test_missing_opensearch_extra_names_the_pip_command(
    os_double: ElasticsearchDouble, make_sink: SinkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "opensearchpy" else real(name, *a))
    sink = make_sink(os_double)
    with pytest.raises(MissingDependencyError, match=r"edge-collector\[opensearch\]"):
        await sink.open()


async def test_unreachable_cluster_is_transient(make_sink: SinkFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = make_sink(f"http://127.0.0.1:{port}")
    with pytest.raises(TransientSinkError, match="no response"):
        await sink.write(readings(2), "b1")


AUTH_CASES: dict[str, tuple[dict[str, str], str, str]] = {
    # name: (config, Authorization header the server expects, the secret)
    "api_key": ({"api_key": "ZWRnZTpzM2NyM3Qta2V5"}, "ApiKey ZWRnZTpzM2NyM3Qta2V5",
                "ZWRnZTpzM2NyM3Qta2V5"),
    "basic": ({"username": "edge", "password": "pa55-w0rd"},
              "Basic " + base64.b64encode(b"edge:pa55-w0rd").decode(), "pa55-w0rd"),
    "bearer": ({"bearer_token": "tok-3f9a"}, "Bearer tok-3f9a", "tok-3f9a"),
}


@pytest.mark.parametrize("flavor", ["elasticsearch", "opensearch"])
@pytest.mark.parametrize("kind", sorted(AUTH_CASES))
async def test_auth_reaches_the_server_and_secrets_stay_out_of_logs(
    flavor: str, kind: str, make_sink: SinkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    config, header, secret = AUTH_CASES[kind]
    caplog.set_level(logging.DEBUG)
    with ElasticsearchDouble(flavor, authorization=header) as double:
        sink = make_sink(double, **config)
        await sink.write(readings(2), "b1")
        assert sorted(double.all_docs()) == ["b1:0", "b1:1"]

        wrong = {k: (v + "x" if k != "username" else v) for k, v in config.items()}
        bad = make_sink(double, **wrong)
        with pytest.raises(TransientSinkError, match="401") as err:
            await bad.open()
    assert "check the credentials" in str(err.value)
    for text in (caplog.text, str(err.value), repr(sink.config), str(sink.config),
                 sink.config.model_dump_json()):
        assert secret not in text


@pytest.fixture
def aws_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SigV4Expectation:
    expect = SigV4Expectation("AKIDEDGETEST", "edge/secret+key", "eu-west-1", "es")
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", expect.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", expect.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return expect


@pytest.mark.parametrize("service", ["es", "aoss"])
async def test_sigv4_signed_requests_are_accepted(
    aws_env: SigV4Expectation, make_sink: SinkFactory, service: str
) -> None:
    aws_env.service = service
    with ElasticsearchDouble("opensearch", sigv4=aws_env) as double:
        sink = make_sink(double, aws_sigv4={"region": "eu-west-1", "service": service})
        result = await deliver(sink, readings(3, bad_mean=(2,)), "b1")
        # every request, the bulk included, passed the signature check
        assert sorted(double.all_docs()) == ["b1:0", "b1:1"]
        assert list(result.dead_letter) == ["b1:2"]
        # Serverless has no `GET /`: the sink must not depend on it there
        assert (("GET", "/") in {(m, p) for m, p, _h, _b in double.requests}) == (service == "es")


async def test_sigv4_with_the_wrong_secret_is_refused(
    aws_env: SigV4Expectation, make_sink: SinkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with ElasticsearchDouble("opensearch", sigv4=aws_env) as double:
        sink = make_sink(double, aws_sigv4={"region": "eu-west-1"})
        with pytest.raises(TransientSinkError, match="403"):
            await sink.open()
        assert double.all_docs() == {}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


TLS_CASES: dict[str, tuple[bool, bool, dict[str, Any]]] = {
    # name: (server requires a client cert, delivery succeeds, sink config using the pki)
    "custom_ca": (False, True, {"ca_certs": "ca"}),
    "verification_on_by_default": (False, False, {}),
    "verification_off": (False, True, {"verify_certs": False}),
    "mutual_tls": (True, True, {"ca_certs": "ca", "client_cert": "client_cert",
                                "client_key": "client_key"}),
    "mutual_tls_without_client_cert": (True, False, {"ca_certs": "ca"}),
}


@pytest.mark.parametrize("flavor", ["elasticsearch", "opensearch"])
@pytest.mark.parametrize("case", sorted(TLS_CASES))
async def test_tls(flavor: str, case: str, pki: Pki, make_sink: SinkFactory) -> None:
    mutual, works, config = TLS_CASES[case]
    config = {k: (str(getattr(pki, v)) if isinstance(v, str) else v) for k, v in config.items()}
    with ElasticsearchDouble(flavor, tls=pki.server_context(mutual)) as double:
        sink = make_sink(double, flavor=flavor, **config)
        if works:
            await sink.write(readings(2), "b1")
            assert sorted(double.all_docs()) == ["b1:0", "b1:1"]
        else:
            with pytest.raises(TransientSinkError, match="no response"):
                await sink.write(readings(2), "b1")
            assert double.all_docs() == {}
