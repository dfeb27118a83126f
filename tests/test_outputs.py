"""What a run writes: a non-finite number in the metrics is refused with the place it is in."""

import json

import pytest

from server.outputs import write_json_atomic


def test_a_nan_in_the_metrics_is_refused_naming_where_it_is(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"rounds": []})
    payload = {"rounds": [{"round": 1, "clients": {"site-2": {"epsilon": 1.0, "train_loss": float("nan")}}}]}
    where = r"\$\['rounds'\]\[0\]\['clients'\]\['site-2'\]\['train_loss'\] = nan"
    with pytest.raises(ValueError, match=rf"metrics.json: {where} is not a JSON number"):
        write_json_atomic(path, payload)
    assert json.loads(path.read_text()) == {"rounds": []}  # the previous file is untouched
