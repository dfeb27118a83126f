"""Sites' countersignatures of a roster: signed by the site's identity key over the roster's fingerprint, its
site id and whom its operator confirmed; verified only under the key the checker's own roster holds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.countersignature import (
    Countersignature,
    CountersignatureError,
    load_countersignatures,
    missing_countersignatures,
    verified_countersignatures,
    write_countersignatures,
)

ROSTER = "ab" * 32
OTHER_ROSTER = "cd" * 32


@pytest.fixture()
def keys() -> dict[str, Ed25519PrivateKey]:
    return {s: Ed25519PrivateKey.generate() for s in ("hospital-a", "clinic-b", "lab-c")}


def _sign(keys: dict[str, Ed25519PrivateKey], site: str, roster: str = ROSTER) -> Countersignature:
    others = sorted(set(keys) - {site})
    return Countersignature.make(site_id=site, roster_fingerprint=roster, confirmed=others, key=keys[site])


def _public(keys: dict[str, Ed25519PrivateKey]) -> dict:
    return {s: k.public_key() for s, k in keys.items()}


def test_a_countersignature_verifies_under_its_sites_key_only(keys):
    signed = _sign(keys, "clinic-b")

    assert signed.verify(keys["clinic-b"].public_key()) == signed
    with pytest.raises(CountersignatureError, match="of site 'clinic-b' does not verify under that site's key"):
        signed.verify(Ed25519PrivateKey.generate().public_key())  # a key the coordinator swapped in


@pytest.mark.parametrize(
    "change",
    [{"roster_fingerprint": OTHER_ROSTER}, {"confirmed": ("hospital-a",)}, {"site_id": "lab-c"}],
)
def test_a_countersignature_with_any_field_changed_does_not_verify(keys, change):
    altered = replace(_sign(keys, "clinic-b"), **change)

    with pytest.raises(CountersignatureError, match="does not verify"):
        altered.verify(keys["clinic-b"].public_key())


def test_a_set_of_countersignatures_reads_back_as_written(keys, tmp_path):
    signed = [_sign(keys, s) for s in keys]

    write_countersignatures(tmp_path / "set.json", signed)

    assert sorted(load_countersignatures(tmp_path / "set.json"), key=lambda c: c.site_id) == sorted(
        signed, key=lambda c: c.site_id
    )
    assert load_countersignatures(tmp_path / "none.json") == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (lambda good: "x", "must be a JSON object"),
        (lambda good: {"kind": good["kind"]}, "lacks"),
        (lambda good: {**good, "kind": "privatune-site-request"}, "is not a privatune-roster-countersignature v"),
        (lambda good: {**good, "confirmed": "hospital-a"}, "field 'confirmed' must be a list of site ids"),
    ],
)
def test_a_malformed_countersignature_is_refused(keys, tmp_path, entry, message):
    good = _sign(keys, "clinic-b").to_obj()
    (tmp_path / "set.json").write_text(
        json.dumps({"kind": "privatune-roster-countersignatures", "version": 1, "countersignatures": [entry(good)]})
    )

    with pytest.raises(CountersignatureError, match=message):
        load_countersignatures(tmp_path / "set.json")


def test_a_file_that_is_not_a_set_is_refused(tmp_path):
    (tmp_path / "set.json").write_text(json.dumps([]))

    with pytest.raises(CountersignatureError, match="is not a privatune-roster-countersignatures file"):
        load_countersignatures(tmp_path / "set.json")


def test_missing_countersignatures_say_why_each_is_missing(keys):
    forged = replace(_sign(keys, "lab-c"), signature=_sign(keys, "hospital-a").signature)
    held = [_sign(keys, "clinic-b", OTHER_ROSTER), forged, _sign(keys, "hospital-a")]

    missing = missing_countersignatures(
        held, roster_fingerprint=ROSTER, keys=_public(keys), required=("clinic-b", "lab-c", "hospital-a")
    )

    assert missing == {
        "clinic-b": f"it countersigned another roster, fingerprint {OTHER_ROSTER}",
        "lab-c": "its countersignature does not verify under its key in this roster",
    }
    assert missing_countersignatures([], roster_fingerprint=ROSTER, keys=_public(keys), required=("lab-c",)) == {
        "lab-c": "none received"
    }


def test_verified_countersignatures_keep_those_of_this_roster_and_refuse_a_bad_one(keys):
    held = [_sign(keys, "clinic-b"), _sign(keys, "lab-c", OTHER_ROSTER)]

    assert set(verified_countersignatures(held, roster_fingerprint=ROSTER, keys=_public(keys))) == {"clinic-b"}
    with pytest.raises(CountersignatureError, match="names site 'clinic-b', which is not in the roster"):
        verified_countersignatures(held, roster_fingerprint=ROSTER, keys={"lab-c": keys["lab-c"].public_key()})
    forged = replace(_sign(keys, "lab-c"), signature=_sign(keys, "clinic-b").signature)
    with pytest.raises(CountersignatureError, match="of site 'lab-c' does not verify"):
        verified_countersignatures([forged], roster_fingerprint=ROSTER, keys=_public(keys))
