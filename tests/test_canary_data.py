"""Canary mode's hooks: the client's rows with its canaries, the server's scores with the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.audit.canary import CanaryError, make_canaries
from shared.audit.cli import canary_section
from shared.canary_data import CanaryScorer, add_site_canaries, per_example_losses
from shared.data import LabelledText
from shared.site import site_from_node_config

ROWS = LabelledText(
    texts=("a good film", "a dull film"), labels=np.array([1, 0]), label_names=("rotten", "fresh"), source="test"
)


def _simulated_site(tmp_path, partition_id: int = 1, num_partitions: int = 3):
    return site_from_node_config({"partition-id": partition_id, "num-partitions": num_partitions}, sim_dir=tmp_path)


def test_a_site_gets_its_included_canaries_appended(tmp_path):
    canaries = make_canaries(60, num_sites=3, num_labels=2, seed=5)
    mine = [c for c in canaries if c.site == 1 and c.included]

    rows = add_site_canaries(ROWS, canaries=60, seed=5, site=_simulated_site(tmp_path))

    assert rows.texts == ROWS.texts + tuple(c.text for c in mine)
    assert rows.labels.tolist() == [1, 0] + [c.label for c in mine]
    assert rows.label_names == ROWS.label_names and "canaries" in rows.source


def test_no_canaries_leaves_the_rows_alone(tmp_path):
    assert add_site_canaries(ROWS, canaries=0, seed=5, site=_simulated_site(tmp_path)) is ROWS


def test_canaries_at_a_deployed_site_are_refused(tmp_path):
    site = site_from_node_config(
        {
            "site-id": "hospital-a",
            "site-dir": str(tmp_path),
            "data-path": "x.csv",
            "delta": 1e-5,
            "accountant": "prv",
            "labels": "rotten,fresh",
        },
        sim_dir=tmp_path,
    )

    with pytest.raises(CanaryError, match="canary mode is for simulations only; site 'hospital-a' is a deployed"):
        add_site_canaries(ROWS, canaries=10, seed=0, site=site)


@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from shared.model import encode, load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return model, lambda texts, labels: encode(tokenizer, texts, labels, max_length=16)


def test_per_example_losses_average_to_the_evaluation_loss(tiny):
    from shared.metrics import predict

    model, encode_rows = tiny
    data = encode_rows(["a good film", "a dull film", "the plot was flat"], np.array([1, 0, 0]))

    losses = per_example_losses(model, data, batch_size=2)

    assert losses.shape == (3,)
    assert losses.mean() == pytest.approx(predict(model, data)[1], rel=1e-5)


def test_scorer_writes_what_the_audit_reads(tiny, tmp_path):
    import torch

    model, encode_rows = tiny
    scorer = CanaryScorer.start(model, encode_rows, canaries=40, seed=3, num_sites=2, num_labels=2)
    assert scorer is not None and len(scorer.losses_before) == 40
    with torch.no_grad():
        model.classifier.bias.add_(0.5)  # "training": any change of the model

    path = scorer.finish(model, tmp_path, run_id="9", seed=3, delta=1e-5)
    scores = json.loads(path.read_text())
    section, _ = canary_section({**scores, "claimed_epsilon": 2.0}, run_id="9", sites={}, confidence=0.95, where=path)

    assert {c["site"] for c in scores["canaries"]} <= {"site-0", "site-1"}
    assert [c["included"] for c in scores["canaries"]] == [c.included for c in scorer.canaries]
    assert section["canaries"] == 40 and section["epsilon_lower"] < 2.0


def test_no_scorer_without_canaries(tiny):
    model, encode_rows = tiny

    assert CanaryScorer.start(model, encode_rows, canaries=0, seed=3, num_sites=2, num_labels=2) is None
