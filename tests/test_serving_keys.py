"""The service's API keys (hashed, named, revocable, 0600) and its per-key token bucket."""

from __future__ import annotations

import hashlib
import json
import re
import stat

import pytest

from server.serving.keys import (
    KeyFileError,
    KeyStore,
    create_key,
    describe,
    read_keys,
    revoke_key,
)
from server.serving.ratelimit import RateLimiter
from shared.cli import main


def test_a_created_key_is_stored_only_as_its_sha256_in_a_0600_file(tmp_path):
    path = tmp_path / "keys.json"

    token = create_key(path, "triage-app")

    assert token.startswith("ptk_") and len(token) >= 4 + 43  # 32 random bytes, URL-safe base64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text()
    [key] = read_keys(path)
    assert (key.name, key.sha256, key.active) == ("triage-app", hashlib.sha256(token.encode()).hexdigest(), True)


def test_each_key_is_fresh_randomness(tmp_path):
    path = tmp_path / "keys.json"
    assert create_key(path, "a") != create_key(path, "b")


def test_authenticate_names_the_key_and_refuses_others(tmp_path):
    path = tmp_path / "keys.json"
    token_a, token_b = create_key(path, "a"), create_key(path, "b")
    store = KeyStore(path)

    assert (store.authenticate(token_a), store.authenticate(token_b)) == ("a", "b")
    assert store.authenticate(token_a + "x") is None
    assert store.authenticate(hashlib.sha256(token_a.encode()).hexdigest()) is None  # the stored hash is no key
    assert store.authenticate("") is None and store.authenticate(None) is None


def test_a_revoked_key_stays_on_record_and_stops_authenticating_at_once(tmp_path):
    path = tmp_path / "keys.json"
    token = create_key(path, "a")
    store = KeyStore(path)
    assert store.authenticate(token) == "a"

    revoked = revoke_key(path, "a")

    assert store.authenticate(token) is None  # the store re-reads the changed file
    assert revoked.revoked is not None
    assert [row["state"] for row in describe(read_keys(path))] == ["revoked"]
    again = create_key(path, "a")  # the name may be reused; the old record stays
    assert [k.active for k in read_keys(path)] == [False, True] and store.authenticate(again) == "a"


@pytest.mark.parametrize("name", ["", "-lead", "has space", "x" * 65, "semi;colon", "../up"])
def test_bad_key_names_are_refused(tmp_path, name):
    with pytest.raises(KeyFileError, match="key name must be 1-64 characters"):
        create_key(tmp_path / "keys.json", name)


def test_a_second_active_key_of_one_name_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, "a")
    with pytest.raises(KeyFileError, match="an active key named 'a' exists"):
        create_key(path, "a")


def test_revoking_an_unknown_key_is_a_clear_error(tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, "a")
    with pytest.raises(KeyFileError, match="no active key named 'b'"):
        revoke_key(path, "b")


def test_a_key_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, "a")
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="has mode 0644; it must be 0600"):
        KeyStore(path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("not json", "is not readable JSON"),
        (json.dumps({"kind": "other", "version": 1, "keys": []}), "is not a PrivaTune key file"),
        (json.dumps({"kind": "privatune-serve-keys", "version": 9, "keys": []}), "has version 9"),
        (
            json.dumps(
                {
                    "kind": "privatune-serve-keys",
                    "version": 1,
                    "keys": [{"name": "a", "sha256": "abc", "created": "t", "revoked": None}],
                }
            ),
            "entry 0 (a) has no SHA-256 hex digest",
        ),
        (
            json.dumps({"kind": "privatune-serve-keys", "version": 1, "keys": [{"name": "a", "token": "ptk_x"}]}),
            "entry 0 must have exactly name, sha256, created, revoked",
        ),
    ],
)
def test_a_malformed_key_file_is_refused_naming_what_is_wrong(tmp_path, payload, message):
    path = tmp_path / "keys.json"
    path.write_text(payload)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=re.escape(message)):
        read_keys(path)


def test_a_missing_key_file_refuses_to_start(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist; create a key: privatune serve-keys create NAME"):
        KeyStore(tmp_path / "none.json")


def test_serve_keys_cli_creates_lists_and_revokes(tmp_path, capsys):
    path = str(tmp_path / "keys.json")

    assert main(["serve-keys", "create", "ops", "--keys", path]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["serve-keys", "list", "--keys", path]) == 0
    listed = capsys.readouterr().out
    assert main(["serve-keys", "revoke", "ops", "--keys", path]) == 0
    assert main(["serve-keys", "revoke", "ops", "--keys", path]) == 2  # already revoked: an error, not a crash
    assert main(["serve-keys", "list", "--keys", path]) == 0
    out = capsys.readouterr()

    assert token.startswith("ptk_") and "ops" in listed and "active" in listed
    assert "no active key named 'ops'" in out.err
    assert "revoked" in out.out.splitlines()[-1]
    assert token not in listed + out.out and hashlib.sha256(token.encode()).hexdigest() not in listed + out.out


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_allows_a_burst_then_refuses_until_it_refills():
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)

    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)  # one token takes 1/rate seconds
    clock.now += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0


def test_the_bucket_never_holds_more_than_its_burst():
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    limiter.take("a")
    clock.now += 1000.0
    assert [limiter.take("a") == 0.0 for _ in range(3)] == [True, True, False]


def test_each_key_has_its_own_bucket():
    limiter = RateLimiter(rate=1.0, burst=1, clock=FakeClock())
    assert (limiter.take("a"), limiter.take("b")) == (0.0, 0.0)
    assert limiter.take("a") > 0


def test_buckets_that_refilled_are_dropped_so_many_addresses_cannot_grow_the_table():
    from server.serving.ratelimit import PRUNE_AT

    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    limiter.take("address:10.0.0.1")
    limiter.take("address:10.0.0.1")  # empty: it must be kept
    for i in range(PRUNE_AT - 1):  # PRUNE_AT buckets in all
        limiter.take(f"address:10.1.{i // 256}.{i % 256}")
    clock.now += 1.5  # the others refilled (1 + 1.5 >= 2); the empty one holds 1.5

    limiter.take("address:10.2.0.1")

    assert len(limiter) == 2
    assert limiter.take("address:10.0.0.1") == 0.0 and limiter.take("address:10.0.0.1") > 0  # its state was kept


@pytest.mark.parametrize(
    ("host", "bucket"),
    [
        ("192.0.2.7", "address:192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "address:2001:db8:1:2::/64"),  # a host's /64 is one client
        ("::ffff:192.0.2.7", "address:192.0.2.7"),
        (None, "address:unknown"),
    ],
)
def test_a_request_without_a_valid_key_is_limited_by_its_client_address(host, bucket):
    from server.serving.app import client_address

    assert client_address({"client": None if host is None else (host, 5555)}) == bucket


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [(0.0, 1, "rate limit must be"), (float("nan"), 1, "rate limit must be"), (1.0, 0, "burst must be")],
)
def test_bad_rate_limits_are_refused(rate, burst, message):
    with pytest.raises(ValueError, match=message):
        RateLimiter(rate=rate, burst=burst)
