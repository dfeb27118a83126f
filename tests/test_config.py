import tomllib
from pathlib import Path

import pytest

from shared.config import ConfigError, RunConfig, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_is_exactly_the_dataclass_defaults():
    flower = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_flower(flower) == RunConfig()
    assert RunConfig().to_flower() == flower


def test_from_flower_converts_kebab_case_and_numbers():
    cfg = RunConfig.from_flower({"local-steps": 3, "learning-rate": 1, "lora-mode": "lora"})
    assert (cfg.local_steps, cfg.learning_rate, cfg.lora_mode) == (3, 1.0, "lora")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"no-such-key": 1}, "unknown run-config key 'no-such-key'"),
        ({"local-steps": "4"}, "local-steps must be an integer, got '4'"),
        ({"dp": "yes"}, "dp must be true or false, got 'yes'"),
        ({"lora-mode": "qlora"}, "lora-mode must be one of ['ffa', 'lora'], got 'qlora'"),
        ({"partitioning": "shards"}, "partitioning must be one of ['iid', 'dirichlet'], got 'shards'"),
        ({"delta": 1.5}, "delta must be in (0, 1), got 1.5"),
        ({"delta": 0.0}, "delta must be in (0, 1), got 0.0"),
        ({"max-grad-norm": 0}, "max-grad-norm must be > 0, got 0.0"),
        ({"fraction-train": 0}, "fraction-train must be in (0, 1], got 0.0"),
        ({"num-server-rounds": 0}, "num-server-rounds must be >= 1, got 0"),
        ({"test-fraction": 1.0}, "test-fraction must be in (0, 1), got 1.0"),
        ({"accountant": "gdp"}, "accountant must be one of ['prv', 'rdp'], got 'gdp'"),
        ({"lora-target-modules": " , "}, "lora-target-modules must be a non-empty list"),
        ({"noise-multiplier": 1.0}, "set either target-epsilon"),
        ({"target-epsilon": 0.0}, "with dp = true, set target-epsilon > 0 or noise-multiplier > 0"),
        ({"noise-multiplier": -1.0, "target-epsilon": 0.0}, "noise-multiplier must be >= 0"),
        ({"canaries": -1}, "canaries must be >= 0"),
        ({"canaries": 10, "roster-path": "/r.json"}, "simulation only"),
        ({"canaries": 10, "dp": False}, "canary-kind = 'gradient' audits local DP-SGD: it needs dp = true"),
        ({"canary-kind": "black-box"}, "canary-kind must be one of"),
        ({"classifier-pooling": "cls"}, "center-features = true needs classifier-pooling = 'mean'"),
        ({"center-noise-multiplier": 0.0}, "center-noise-multiplier = 0 with dp = true releases"),
        ({"center-noise-multiplier": -1.0}, "center-noise-multiplier must be finite and >= 0"),
        ({"center-clip-norm": 0.0}, "center-clip-norm must be > 0"),
    ],
)
def test_bad_run_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower(overrides)
    assert message in str(err.value)


def test_non_private_baseline_needs_no_noise_setting():
    cfg = RunConfig.from_flower({"dp": False, "target-epsilon": 0.0})
    assert cfg.dp is False


def test_simulation_dir_is_inside_the_run_unless_set(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path))
    assert cfg.simulation_dir(7) == tmp_path.resolve() / "run-7" / "federation"
    assert RunConfig(sim_dir=str(tmp_path / "fed")).simulation_dir(7) == (tmp_path / "fed").resolve()


def test_docs_configuration_table_is_the_dataclass():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    hint = "regenerate it: python -c 'import shared.config as c; print(c.markdown_table())'"
    assert markdown_table() in doc, hint


def test_cls_pooling_and_an_exact_mean_are_fine_once_asked_for_explicitly():
    assert RunConfig.from_flower({"classifier-pooling": "cls", "center-features": False}).classifier_pooling == "cls"
    assert RunConfig.from_flower({"dp": False, "center-noise-multiplier": 0.0}).center_noise_multiplier == 0.0


@pytest.mark.parametrize("port", [-1, 65536])
def test_metrics_port_must_be_a_port_or_zero(port):
    with pytest.raises(ConfigError, match=f"metrics-port must be in 0..65535 \\(0 = off\\), got {port}"):
        RunConfig.from_flower({"metrics-port": port})


def test_metrics_port_is_off_by_default_and_takes_an_integer():
    assert RunConfig().metrics_port == 0
    assert RunConfig.from_flower({"metrics-port": 9100}).metrics_port == 9100
    with pytest.raises(ConfigError, match="metrics-port must be an integer, got '9100'"):
        RunConfig.from_flower({"metrics-port": "9100"})


@pytest.mark.parametrize("device", ["gpu", "cuda:", "CPU", "cuda:x"])
def test_server_device_must_name_a_torch_device(device):
    with pytest.raises(ConfigError, match=f"server-device must be cpu, cuda, cuda:N or mps, got '{device}'"):
        RunConfig.from_flower({"server-device": device})
