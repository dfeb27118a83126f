"""The causal-LM task through the whole stack on a tiny Llama: Flower's simulation runtime (Ray), 3 sites x 2
rounds, Opacus DP-SGD at every site, secure aggregation, the site ledgers, the audit, and the saved adapter
reloaded with plain transformers + peft."""

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from shared.audit.cli import audit_main
from shared.config import RunConfig
from shared.ledger import SiteLedger
from shared.simulation import run_simulation, summary
from shared.tasks import get_task

pytestmark = pytest.mark.slow

CAUSAL_KEYS = ("task", "lora-target-modules", "max-length", "batch-size", "local-steps", "max-test-examples")


def test_three_causal_sites_two_rounds_with_secure_aggregation_end_to_end(tiny_causal_config, tmp_path, capsys):
    flat = tiny_causal_config.to_flower()
    overrides = {
        **{k: flat[k] for k in (*CAUSAL_KEYS, "model-path", "data-path", "learning-rate", "output-dir")},
        "num-server-rounds": 2,
        "secure-aggregation": True,
        "sim-dir": str(tmp_path / "federation"),
    }
    run_dir = run_simulation(overrides, num_clients=3)
    metrics = json.loads((run_dir / "metrics.json").read_text())

    assert metrics["config"]["task"] == "causal-lm"
    assert "feature_centering" not in metrics or metrics["feature_centering"] is None
    keys = {"loss", "perplexity", "exact_match", "top_answer", "top_answer_share"}
    assert set(metrics["initial_test"]) == keys
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        assert sorted(r["survivors"]) == ["site-0", "site-1", "site-2"]
        assert not r["aborted"] and r["secure_aggregation"] is True
        assert set(r["test"]) == keys
        assert math.isfinite(r["test"]["loss"]) and 0.0 <= r["test"]["exact_match"] <= 1.0
    assert metrics["rounds"][-1]["test"] != metrics["initial_test"]  # the aggregate moved the model
    eps = [[c["epsilon"] for c in r["clients"].values()] for r in metrics["rounds"]]
    assert all(0 < a < b for a, b in zip(eps[0], eps[1], strict=True))  # cumulative over the rounds
    assert max(eps[1]) == pytest.approx(8.0, rel=0.02)
    fed = tmp_path / "federation" / "sites"
    for i in range(3):
        ledger = SiteLedger(fed / f"site-{i}" / "privacy_ledger.jsonl", site_id=f"site-{i}")
        assert [e.round for e in ledger.entries()] == [1, 2]  # no centering query: the causal LM has no head

    # the final adapter loads with plain transformers + peft, and gives the server's final test loss
    cfg = RunConfig.from_flower({**RunConfig().to_flower(), **overrides})
    task = get_task(cfg)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_causal_config.model_path), local_files_only=True)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    from shared.federation import server_test_set

    held_out = server_test_set(cfg, task.load_run_rows(cfg), 3)
    model.eval()
    with torch.no_grad():
        reloaded = float(task.loss(model, task.encode(cfg, held_out)))
    assert reloaded == pytest.approx(metrics["rounds"][-1]["test"]["loss"], rel=1e-4)
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert str(tmp_path) not in json.dumps(adapter_config)
    assert (run_dir / "adapter" / "README.md").is_file()

    out = capsys.readouterr().out
    assert "round 1/2 | test loss" in out and " ppl " in out and " exact " in out
    assert "final test (round 2)" in summary(run_dir)

    status = audit_main(
        ["--sim-dir", str(tmp_path / "federation"), "--run-dir", str(run_dir), "--out", str(tmp_path / "audit")]
    )
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert status == 0, capsys.readouterr().err
    assert all(r["verified"] for r in report["runs"])
    for site in report["sites"]:
        assert all(e["matches"] for e in site["entries"])
