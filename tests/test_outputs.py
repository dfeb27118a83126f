"""What a run writes: a non-finite number in the metrics is refused with the place it is in."""

import json

import pytest

from server.outputs import model_card, privacy_section, write_json_atomic


def test_a_nan_in_the_metrics_is_refused_naming_where_it_is(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"rounds": []})
    payload = {"rounds": [{"round": 1, "clients": {"site-2": {"epsilon": 1.0, "train_loss": float("nan")}}}]}
    where = r"\$\['rounds'\]\[0\]\['clients'\]\['site-2'\]\['train_loss'\] = nan"
    with pytest.raises(ValueError, match=rf"metrics.json: {where} is not a JSON number"):
        write_json_atomic(path, payload)
    assert json.loads(path.read_text()) == {"rounds": []}  # the previous file is untouched


def attestation(epsilon: float) -> dict:
    return {"epsilon": epsilon, "delta": 1e-5, "accountant": "prv"}


def run_records(*, centering: bool) -> list[dict]:
    """A run ledger's records: round 0 (the centering query) if ``centering``, then 3 training rounds; site-1
    was not among round 2's survivors."""
    records = [{"round": 0, "attestations": {s: attestation(0.7) for s in ("site-0", "site-1")}}] if centering else []
    for r in (1, 2, 3):
        sites = ("site-0",) if r == 2 else ("site-0", "site-1")
        records.append({"round": r, "attestations": {s: attestation(0.7 + 2.4 * r) for s in sites}})
    return records


def card_privacy_rows(text: str) -> dict[str, list[str]]:
    section = text.split("## Privacy, per site")[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()]
    return {row[0]: row[1:] for row in rows if not row[0].startswith("---")}


def test_the_model_card_counts_training_rounds_as_the_run_does_and_the_centering_query_apart():
    history = {"run_id": "7", "config": {"num-server-rounds": 3}, "rounds": [{"round": r} for r in (1, 2, 3)]}
    card = {"base_model": "builtin:all-minilm-l6-v2", "label_names": ["neg", "pos"], "classifier_pooling": "mean"}

    text = model_card(
        card={**card, "max_length": 128},
        history=history,
        run_records=run_records(centering=True),
        data_path="reviews.csv",
        exported=False,
    )

    assert "| rounds | 3 of 3 planned |" in text
    rows = card_privacy_rows(text)
    assert rows["site"][-2:] == ["training rounds attested", "centering query (round 0)"]
    assert rows["site-0"][-2:] == ["3", "attested"] and rows["site-1"][-2:] == ["2", "attested"]
    assert rows["site-0"][0] == "7.900"  # the last cumulative epsilon, the query's release included


def test_without_a_centering_query_the_card_has_no_column_for_it():
    rows = card_privacy_rows("\n".join(privacy_section(run_records(centering=False))))

    assert rows["site"][-1] == "training rounds attested" and len(rows["site"]) == 4
    assert rows["site-0"][-1] == "3" and rows["site-1"][-1] == "2"


def test_the_readme_lists_every_file_a_run_writes_in_its_run_dir():
    from pathlib import Path

    from server.checkpoint import CHECKPOINT_FILE
    from server.outputs import ADAPTER_DIR, BEST_ADAPTER_DIR, METRICS_FILE
    from shared.canary_data import CANARY_FILE
    from shared.ledger import RUN_LEDGER_FILE

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    outputs = readme.split("Its outputs go to `runs/run-<id>/`:")[1].split("\n\n")[0]

    for name in (ADAPTER_DIR, BEST_ADAPTER_DIR, METRICS_FILE, RUN_LEDGER_FILE, CHECKPOINT_FILE, CANARY_FILE):
        assert f"`{name}" in outputs, name
    assert "`checkpoint-r<k>.npz`" in outputs and "`federation/`" in outputs


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_classifier_cards_peft_snippet_loads_the_adapter_without_pefts_futurewarning(
    tiny_model_dir, tmp_path, pooling
):
    import warnings

    from server.outputs import save_adapter
    from shared.config import RunConfig
    from shared.model import PEFT_DEPRECATION, build_model

    cfg = RunConfig(model_path=str(tiny_model_dir), max_length=16, classifier_pooling=pooling, center_features=False)
    card = {"base_model": str(tiny_model_dir), "label_names": ["neg", "pos"], "classifier_pooling": pooling}
    adapter = save_adapter(build_model(cfg, num_labels=2), tmp_path, card={**card, "max_length": 16})
    text = model_card(card={**card, "max_length": 16}, history={}, run_records=[], data_path="d.csv", exported=False)
    snippet = text.split("With PrivaTune")[1].split("```python\n")[1].split("```")[0]
    code = snippet.replace(f'"{tiny_model_dir.name}"', repr(str(tiny_model_dir))).replace('"DIR"', repr(str(adapter)))
    scope: dict = {}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), scope)

    assert type(scope["model"]).__name__ == "PeftModelForSequenceClassification"
    assert [w for w in caught if PEFT_DEPRECATION in str(w.message)] == []
    assert ("filterwarnings" in snippet) == (pooling == "cls")  # only a transformers base model warns
