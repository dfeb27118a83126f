"""``privatune serve`` against a real HTTP client: the started service on loopback, a tiny adapter, API keys."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from server.monitoring import MetricsEndpoint
from server.outputs import save_adapter
from server.serving.app import ENDPOINTS, PREDICT_PATH, ServeLimits, create_app
from server.serving.keys import KeyStore, create_key, revoke_key
from server.serving.metrics import ServeMetrics
from server.serving.service import running
from shared.config import RunConfig
from shared.model import build_model, fold_feature_center, get_feature_center, get_trainable, set_feature_center
from shared.model import set_trainable as set_trainable_tensors
from shared.predict import AdapterError, load_classifier, read_card

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["rotten", "fresh"]
TEXTS = ["a charming and sharp film", "dull, tedious and flat", "the plot was really quite messy and boring"]
JSON = {"Content-Type": "application/json"}
SECRET_TEXT = "patient 4711 reports chest pain"  # what must never reach a log


def make_tiny_adapter(model_dir: Path, out: Path) -> tuple[Path, torch.nn.Module]:
    """A trained-looking adapter on the tiny BERT (random B and head, a centered head folded on export), and the
    live model it was exported from."""
    cfg = RunConfig(model_path=str(model_dir), max_length=16)
    model = build_model(cfg, num_labels=2)
    rng = np.random.default_rng(3)
    set_trainable_tensors(
        model, {k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in get_trainable(model).items()}
    )
    set_feature_center(model, rng.normal(0, 1.0, get_feature_center(model).shape).astype(np.float32))
    card = {"base_model": str(model_dir), "classifier_pooling": "mean", "label_names": LABELS, "max_length": 16}
    return save_adapter(fold_feature_center(model), out, card=card), model


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("run"))[0]


@pytest.fixture(scope="module")
def classifier(adapter):
    return load_classifier(adapter)


@pytest.fixture()
def keys(tmp_path):
    path = tmp_path / "keys.json"
    return path, create_key(path, "triage-app")


def start(classifier, key_file: Path, **limits):
    metrics = ServeMetrics(endpoints=ENDPOINTS, labels=classifier.label_names)
    app = create_app(classifier, KeyStore(key_file), limits=ServeLimits(**limits), metrics=metrics)
    return running(app), metrics


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_valid_key_gets_one_prediction_per_text(classifier, keys):
    key_file, token = keys
    service, _ = start(classifier, key_file)
    with service as url:
        response = httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token))
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == [LABELS[p["index"]] for p in predictions]
    assert all(set(p["scores"]) == set(LABELS) and sum(p["scores"].values()) == pytest.approx(1.0) for p in predictions)
    assert len({round(p["scores"]["fresh"], 6) for p in predictions}) == 3  # the texts are told apart


@pytest.mark.parametrize(
    ("headers", "case"),
    [
        ({}, "no key"),
        ({"Authorization": "Bearer ptk_not-a-key"}, "wrong key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "another scheme"),
        ({"Authorization": "Bearer " + "x" * 5000}, "an overlong key"),
    ],
)
def test_requests_without_a_valid_key_are_refused_with_401(classifier, keys, headers, case):
    key_file, _ = keys
    service, _ = start(classifier, key_file)
    with service as url:
        response = httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=headers)
    assert response.status_code == 401, case
    assert response.headers["www-authenticate"] == "Bearer"
    assert "predictions" not in response.text


def test_a_revoked_key_is_refused_by_the_running_service_without_a_restart(classifier, keys):
    key_file, token = keys
    other = create_key(key_file, "billing")
    service, _ = start(classifier, key_file)
    with service as url:
        before = httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token))
        revoke_key(key_file, "triage-app")
        after = httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token))
        still = httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(other))
    assert (before.status_code, after.status_code, still.status_code) == (200, 401, 200)


def test_a_key_over_its_rate_is_refused_with_429_and_others_are_not(classifier, keys):
    key_file, token = keys
    other = create_key(key_file, "billing")
    service, _ = start(classifier, key_file, rate=0.01, burst=2)
    with service as url, httpx.Client(base_url=url) as http:
        first = [http.post(PREDICT_PATH, json={"texts": TEXTS[:1]}, headers=bearer(token)) for _ in range(3)]
        other_key = http.post(PREDICT_PATH, json={"texts": TEXTS[:1]}, headers=bearer(other))
    assert [r.status_code for r in first] == [200, 200, 429]
    assert int(first[2].headers["retry-after"]) >= 1
    assert other_key.status_code == 200  # one bucket per key


@pytest.mark.parametrize(
    ("method", "path", "headers", "answer"),
    [
        ("POST", PREDICT_PATH, {"Authorization": "Bearer ptk_guess"}, 401),  # guessing keys
        ("POST", PREDICT_PATH, {}, 401),  # no key
        ("GET", "/health", {}, 200),  # an endpoint that needs no key
    ],
)
def test_requests_without_a_valid_key_are_rate_limited_per_client_address(
    classifier, keys, method, path, headers, answer
):
    key_file, token = keys
    service, _ = start(classifier, key_file, rate=0.01, burst=2)
    body = {"texts": TEXTS[:1]} if method == "POST" else None
    with service as url, httpx.Client(base_url=url) as http:
        tries = [http.request(method, path, json=body, headers=headers) for _ in range(3)]
        with_key = http.post(PREDICT_PATH, json={"texts": TEXTS[:1]}, headers=bearer(token))
    assert [r.status_code for r in tries] == [answer, answer, 429]
    assert int(tries[2].headers["retry-after"]) >= 1
    assert "predictions" not in tries[2].text
    assert with_key.status_code == 200  # a valid key from the same address has its own bucket


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(classifier, keys):
    key_file, token = keys
    service, metrics = start(classifier, key_file, max_body_bytes=1000)
    body = json.dumps({"texts": ["word " * 400]})
    with service as url:
        declared = httpx.post(url + PREDICT_PATH, content=body, headers={**bearer(token), **JSON})
        chunked = httpx.post(  # no Content-Length: counted as it arrives
            url + PREDICT_PATH,
            content=(chunk.encode() for chunk in [body[:600], body[600:]]),
            headers={**bearer(token), **JSON},
        )
    assert declared.status_code == 413 and chunked.status_code == 413
    assert "over 1000 bytes" in declared.json()["detail"]
    assert metrics.texts._value.get() == 0  # nothing was classified


def test_a_batch_over_the_limit_is_refused_with_413(classifier, keys):
    key_file, token = keys
    service, _ = start(classifier, key_file, max_batch=2)
    with service as url:
        response = httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token))
    assert response.status_code == 413
    assert response.json()["detail"] == "batch of 3 texts; at most 2"


@pytest.mark.parametrize(
    ("payload", "status"), [({"texts": []}, 422), ({"texts": "one string"}, 422), ({"txt": ["a"]}, 422)]
)
def test_malformed_requests_are_422(classifier, keys, payload, status):
    key_file, token = keys
    service, _ = start(classifier, key_file)
    with service as url:
        assert httpx.post(url + PREDICT_PATH, json=payload, headers=bearer(token)).status_code == status


def test_health_and_openapi_docs_need_no_key_and_document_the_bearer_scheme(classifier, keys):
    key_file, _ = keys
    service, _ = start(classifier, key_file)
    with service as url:
        health = httpx.get(url + "/health")
        schema = httpx.get(url + "/openapi.json").json()
        docs = httpx.get(url + "/docs")
        script = httpx.get(url + "/docs-static/swagger-ui-bundle.js")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "http://" not in docs.text and "https://" not in docs.text  # the page needs no CDN: served offline
    assert script.status_code == 200 and len(script.content) > 100_000
    assert PREDICT_PATH in schema["paths"]
    assert any(s.get("scheme") == "bearer" for s in schema["components"]["securitySchemes"].values())


def test_a_corrupted_key_file_fails_closed_with_503(classifier, keys):
    key_file, token = keys
    service, _ = start(classifier, key_file)
    with service as url:
        key_file.write_text("{ not json")
        refused = httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token))
        health = httpx.get(url + "/health")
    assert (refused.status_code, health.status_code) == (503, 503)


def test_every_request_is_logged_with_key_name_size_and_latency_never_the_text(classifier, keys):
    key_file, token = keys
    body = json.dumps({"texts": [SECRET_TEXT, "fine"]})
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    access = logging.getLogger("privatune.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    service, _ = start(classifier, key_file)
    try:
        with service as url:
            httpx.post(url + PREDICT_PATH, content=body, headers={**bearer(token), **JSON})
            httpx.post(url + PREDICT_PATH, content=body, headers={**bearer("ptk_wrong"), **JSON})
    finally:
        access.removeHandler(handler)
    assert len(records) == 2
    ok, refused = records
    assert "key=triage-app POST /v1/predict status=200" in ok and "texts=2" in ok and "latency_ms=" in ok
    assert "key=- POST /v1/predict status=401" in refused and "texts=0" in refused
    assert [int(line.split("bytes=")[1].split()[0]) for line in records] == [len(body)] * 2
    assert all(SECRET_TEXT not in line and "4711" not in line and token not in line for line in records)


def test_metrics_count_requests_by_status_and_latency_over_http(classifier, keys):
    key_file, token = keys
    service, metrics = start(classifier, key_file)
    with service as url:
        httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token))
        httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer("ptk_wrong"))
        httpx.get(url + "/no/such/path/" + "x" * 50)
    endpoint = MetricsEndpoint(metrics.registry, port=0)
    try:
        text = httpx.get(f"http://127.0.0.1:{endpoint.port}/metrics").text
    finally:
        endpoint.close()
    assert 'privatune_serve_requests_total{endpoint="/v1/predict",status="200"} 1.0' in text
    assert 'privatune_serve_requests_total{endpoint="/v1/predict",status="401"} 1.0' in text
    assert 'privatune_serve_requests_total{endpoint="other",status="404"} 1.0' in text  # no label per path
    assert 'privatune_serve_errors_total{status="401"} 1.0' in text
    assert 'privatune_serve_request_seconds_count{endpoint="/v1/predict"} 2.0' in text
    assert "privatune_serve_texts_total 3.0" in text
    assert SECRET_TEXT not in text and "x" * 50 not in text


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_with_a_certificate_the_service_speaks_only_tls(classifier, keys, tmp_path):
    import ssl

    key_file, token = keys
    cert, key = _self_signed(tmp_path)
    app = create_app(classifier, KeyStore(key_file), limits=ServeLimits())
    with running(app, tls_cert=cert, tls_key=key) as url:
        assert url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(cert))
        response = httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token), verify=trusted)
        with pytest.raises(httpx.HTTPError):
            httpx.post(url.replace("https", "http") + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token))
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is not accepted by default
            httpx.get(url + "/health")
    assert response.status_code == 200


def test_a_certificate_that_is_not_one_is_refused_before_listening(classifier, keys, tmp_path):
    key_file, _ = keys
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    app = create_app(classifier, KeyStore(key_file), limits=ServeLimits())
    with pytest.raises(ValueError, match="cannot be loaded"), running(app, tls_cert=cert, tls_key=key):
        pass
    with pytest.raises(ValueError, match="TLS needs both a certificate"), running(app, tls_cert=cert):
        pass


def test_service_predictions_equal_the_privatune_predict_command(classifier, adapter, keys):
    key_file, token = keys
    service, _ = start(classifier, key_file)
    with service as url:
        served = httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token)).json()
    command = [sys.executable, "-m", "shared.cli", "predict", "--adapter", str(adapter)]
    for text in TEXTS:
        command += ["--text", text]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_child_env())
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert [p["label"] for p in printed["predictions"]] == [p["label"] for p in served["predictions"]]
    for ours, theirs in zip(printed["predictions"], served["predictions"], strict=True):
        assert ours["index"] == theirs["index"]
        for label in LABELS:
            assert ours["scores"][label] == pytest.approx(theirs["scores"][label], abs=1e-6)


def _child_env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_predictions_match_the_model_a_run_trained(tiny_model_dir, tmp_path):
    """The adapter on its base model gives the probabilities of the live (centered) model it was exported from."""
    from shared.model import encode, load_tokenizer

    adapter_dir, model = make_tiny_adapter(tiny_model_dir, tmp_path)
    data = encode(load_tokenizer(str(tiny_model_dir)), TEXTS, np.zeros(len(TEXTS)), max_length=16)
    model.eval()
    with torch.no_grad():
        live = torch.softmax(model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits, -1)
    served = load_classifier(adapter_dir).predict(TEXTS)
    np.testing.assert_allclose([[p["scores"][lab] for lab in LABELS] for p in served], live.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label_names": ["only"]}, "label_names must be a list of two or more label names"),
        ({"label_names": ["a", "a"]}, "label_names must be distinct names"),
        ({"classifier_pooling": "max"}, "classifier_pooling must be 'mean' or 'cls', got 'max'"),
        ({"max_length": 0}, "max_length must be a positive integer, got 0"),
        ({"base_model": ""}, "base_model must be a model path"),
    ],
)
def test_a_bad_model_card_is_a_clear_error(adapter, tmp_path, change, message):
    import shutil

    copy = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    card = json.loads((copy / "privatune.json").read_text())
    (copy / "privatune.json").write_text(json.dumps({**card, **change}))
    with pytest.raises(AdapterError, match=re.escape(message)):
        read_card(copy)


def test_a_directory_without_an_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        read_card(tmp_path)
    with pytest.raises(AdapterError, match="does not exist"):
        read_card(tmp_path / "missing")


def test_bad_limits_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="max-batch must be an integer >= 1, got 0"):
        ServeLimits(max_batch=0)
    with pytest.raises(ValueError, match="rate-limit must be a finite number"):
        replace(ServeLimits(), rate=float("inf"))


@pytest.mark.slow
def test_the_serve_command_end_to_end_with_a_key_from_the_cli(adapter, tmp_path):
    from simulations.benchmark_serving import ServeProcess

    key_file = tmp_path / "keys.json"
    made = subprocess.run(
        [sys.executable, "-m", "shared.cli", "serve-keys", "create", "ops", "--keys", str(key_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("ptk_") and token not in key_file.read_text()
    with ServeProcess(adapter, key_file, "--max-batch", "4") as service:
        ok = httpx.post(service.url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token))
        refused = httpx.post(service.url + PREDICT_PATH, json={"texts": TEXTS})
        too_many = httpx.post(service.url + PREDICT_PATH, json={"texts": TEXTS * 2}, headers=bearer(token))
    assert (ok.status_code, refused.status_code, too_many.status_code) == (200, 401, 413)
    assert service.process.returncode is not None  # terminated: nothing left running
    assert any("key=ops POST /v1/predict status=200" in line for line in service.lines)


@pytest.mark.slow
def test_the_load_benchmark_is_bounded_and_reports_throughput_and_p99(adapter, tmp_path):
    from simulations.benchmark_serving import ServeProcess, run_load

    key_file = tmp_path / "keys.json"
    token = create_key(key_file, "load")
    with ServeProcess(adapter, key_file, "--rate-limit", "1e9", "--burst", "1000000") as service:
        result = run_load(service.url, token, clients=3, max_requests=60, max_seconds=60.0)
        timed = run_load(service.url, token, clients=2, max_requests=10**6, max_seconds=1.0)
    assert result.requests == 60 and result.statuses == {200: 60}
    assert 0 < result.percentile_ms(50) <= result.percentile_ms(99) <= result.percentile_ms(100)
    assert "requests/s" in result.summary() and "p99" in result.summary()
    assert timed.seconds < 10.0 and 0 < timed.requests < 10**6  # stopped by time, not by count


@pytest.mark.slow
@pytest.mark.integration
def test_the_shipped_minilm_adapter_is_served_as_predict_answers(tmp_path):
    from simulations.benchmark_serving import untrained_adapter

    adapter_dir = untrained_adapter(tmp_path)  # the default run config's adapter on builtin:all-minilm-l6-v2
    classifier = load_classifier(adapter_dir)
    key_file = tmp_path / "keys.json"
    token = create_key(key_file, "ops")
    app = create_app(classifier, KeyStore(key_file), limits=ServeLimits())
    with running(app) as url:
        served = httpx.post(url + PREDICT_PATH, json={"texts": TEXTS}, headers=bearer(token)).json()
    assert read_card(adapter_dir).base_model == "builtin:all-minilm-l6-v2"
    assert served == {"predictions": classifier.predict(TEXTS)}
