"""Causal-LM fine-tuning (instruction tuning, chat, continued pre-training) of a local Hugging Face model.

Rows are JSONL records, one DP record each: ``prompt``/``response``, chat ``messages`` or plain ``text``
(:mod:`shared.causal_data`); the loss is each row's mean negative log-likelihood of its response tokens (the
prompt is masked), averaged over rows, so that Opacus's per-sample gradients are each row's own
(:func:`shared.causal_model.row_mean_nll`). The model is any local causal LM directory, or the offline default
SmolLM2-135M-Instruct (:mod:`shared.causal_model`), with LoRA on the attention projections (FFA-LoRA by default,
as for the classifier). The server evaluates on its held-out rows every round: loss and perplexity, and, when
every response is a short answer (a label), exact-match accuracy of greedy generation against always giving the
most common answer. The best round is the one with the lowest held-out loss. The adapter is a plain PEFT adapter:
``AutoModelForCausalLM.from_pretrained(base)`` + ``PeftModel.from_pretrained`` load it (``privatune generate``);
``privatune evaluate`` scores it on a user's JSONL file as the server scores its held-out rows
(:mod:`shared.causal_evaluation`).

It has none of the optional capabilities: no head to center, no canary audit, no site evaluation release.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from shared.tasks.base import Metrics
from shared.tasks.presets import CAUSAL_LM, TASK_PRESETS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from shared.causal_data import CausalRows
    from shared.causal_evaluation import CausalEvaluation
    from shared.config import RunConfig
    from shared.model import Encoded
    from shared.site import Site
    from shared.tasks.base import Rows

# torch and transformers are imported inside the methods: get_task("causal-lm") must stay cheap to call.


def _causal(rows: Rows) -> CausalRows:
    from shared.causal_data import CausalRows

    if not isinstance(rows, CausalRows):
        raise TypeError(f"the causal LM's rows are CausalRows, got {type(rows).__name__}")
    return rows


def _load(path: str) -> CausalRows:
    """``load_causal_rows``, cached per process while the file is unchanged (a simulated site re-reads the run's
    rows every round)."""
    file = Path(path).expanduser()
    stamp = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
    return _load_cached(path, stamp)


@lru_cache(maxsize=4)
def _load_cached(path: str, _stamp: tuple[int, int] | None) -> CausalRows:
    from shared.causal_data import load_causal_rows

    return load_causal_rows(path)


def most_common_answer(rows: Rows) -> tuple[str, float] | None:
    """The most common response and its share of ``rows``, when every response is a short answer; else None
    (:func:`shared.causal_data.most_common_answer`)."""
    from shared.causal_data import most_common_answer as common

    return common(_causal(rows))


class CausalLMTask:
    """Causal-LM fine-tuning (run config ``task = "causal-lm"``)."""

    name: ClassVar[str] = CAUSAL_LM
    presets: ClassVar[Mapping[str, Any]] = TASK_PRESETS[CAUSAL_LM]
    best_by: ClassVar[str] = "loss"  # the lowest loss on the server's held-out rows (score is its negation)

    centering: None = None
    canary_audit: None = None
    site_evaluation: None = None

    # -- rows --------------------------------------------------------------------------------------------------
    def load_run_rows(self, cfg: RunConfig) -> CausalRows:
        return _load(cfg.data_path)

    def load_eval_rows(self, cfg: RunConfig) -> CausalRows:
        return _load(cfg.eval_data_path)

    def load_site_rows(self, site: Site) -> CausalRows:
        from shared.data import DataError

        if site.data_path is None:
            raise DataError(f"site {site.site_id!r}: the causal LM reads a deployed site's data-path (JSONL)")
        return _load(str(site.data_path))

    # -- model ---------------------------------------------------------------------------------------------------
    def check_model(self, cfg: RunConfig) -> None:
        from shared.causal_model import check_causal_model

        check_causal_model(cfg.model_path)

    def fresh_model(self, cfg: RunConfig, rows: Rows) -> nn.Module:
        from shared.causal_model import fresh_causal_model

        return fresh_causal_model(cfg)

    def encode(self, cfg: RunConfig, rows: Rows) -> Encoded:
        from shared.causal_data import encode_causal
        from shared.causal_model import load_causal_tokenizer

        return encode_causal(load_causal_tokenizer(cfg.model_path), _causal(rows), max_length=cfg.max_length)

    def loss(self, model: nn.Module, batch: Encoded) -> torch.Tensor:
        from shared.causal_model import row_mean_nll

        return row_mean_nll(model, batch)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluator(self, cfg: RunConfig, rows: Rows, *, device: str = "cpu") -> Callable[[nn.Module], Metrics]:
        from shared.causal_model import held_out_evaluator, load_causal_tokenizer

        tokenizer = load_causal_tokenizer(cfg.model_path)
        return held_out_evaluator(tokenizer, _causal(rows), max_length=cfg.max_length, device=device)

    def reference(self, rows: Rows) -> Metrics:
        common = most_common_answer(rows)
        return {} if common is None else {"exact_match": common[1]}

    def history_fields(self, rows: Rows, reference: Metrics) -> dict[str, Any]:
        common = most_common_answer(rows)
        if common is None:
            return {"most_common_answer": None}
        return {"most_common_answer": {"answer": common[0], "exact_match": common[1]}}

    def score(self, metrics: Metrics) -> float:
        return -float(metrics[self.best_by])

    def describe(self, metrics: Metrics, reference: Metrics) -> str:
        line = f"test loss {metrics['loss']:.4f} ppl {metrics['perplexity']:.2f}"
        if "exact_match" in metrics:
            line += f" exact {metrics['exact_match']:.4f}"
            if "exact_match" in reference:
                line += f" (most common answer {reference['exact_match']:.4f})"
        return line

    def warnings(self, metrics: Metrics, reference: Metrics, rows: Rows) -> list[str]:
        from shared.causal_model import answer_warnings

        return answer_warnings(metrics, _causal(rows))

    def evaluate_adapter(
        self,
        adapter_dir: Path,
        data_path: Path,
        *,
        base_model: str | None = None,
        max_rows: int | None = None,
        columns: Mapping[str, str] | None = None,
    ) -> CausalEvaluation:
        from shared.causal_evaluation import evaluate_causal

        if columns:
            named = ", ".join(f"--{role}-column" for role in columns)
            raise ValueError(
                f"{named}: a causal-LM file has no columns to name; each line is a prompt/response, messages or text "
                "object (docs/causal-lm.md)"
            )
        return evaluate_causal(adapter_dir, data_path, base_model=base_model, max_rows=max_rows)

    # -- output ------------------------------------------------------------------------------------------------
    def save_adapter(self, model: nn.Module, directory: Path, *, card: Mapping[str, Any]) -> Path:
        from shared.causal_model import save_causal_adapter

        return save_causal_adapter(model, Path(directory), card={**card, "task": CAUSAL_LM})

    def publish(
        self,
        adapter_dir: Path,
        model: nn.Module,
        *,
        cfg: RunConfig,
        history: Mapping[str, Any],
        run_records: Sequence[Mapping[str, Any]],
    ) -> None:
        from shared.causal_model import publish_causal_adapter

        publish_causal_adapter(Path(adapter_dir), cfg=cfg, history=history, run_records=run_records)


if TYPE_CHECKING:  # mypy holds the class to the interface
    from shared.tasks.base import Task

    _: Task = CausalLMTask()
