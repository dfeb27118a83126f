"""``privatune evaluate`` of a causal-LM adapter: loss, perplexity and, when every response is a short answer,
exact match on a JSONL file, next to always giving the most common answer, with the warnings a run gives about
its model. The entry for every task is :mod:`shared.evaluation`.

The numbers are the server's held-out evaluation (:func:`shared.causal_model.held_out_evaluator`) on the user's
rows: read as training reads a file (:mod:`shared.causal_data`: prompt/response, chat messages rendered with the
base tokenizer's template, or plain text), encoded to the adapter's ``max_length`` (its card ``privatune.json``),
and the adapter loaded the plain way, as ``privatune generate`` loads it (:func:`shared.generate.load_causal_adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.outputs import MODEL_CARD
from shared.causal_data import SHORT_ANSWER_CHARS, load_causal_rows, most_common_answer
from shared.causal_model import answer_warnings, held_out_evaluator
from shared.generate import load_causal_adapter, read_causal_card
from shared.predict import AdapterError
from shared.tasks.presets import CAUSAL_LM


@dataclass(frozen=True)
class CausalEvaluation:
    """A causal-LM adapter on a JSONL file (a :class:`shared.tasks.base.AdapterEvaluation`)."""

    adapter_dir: str
    data: str
    rows: int
    # loss, perplexity; with short answers exact_match, top_answer, top_answer_share (shared.causal_model)
    metrics: dict[str, float]
    most_common: tuple[str, float] | None  # (answer, its share): always giving it; None unless short answers
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        common = None
        if self.most_common is not None:
            common = {"answer": self.most_common[0], "exact_match": self.most_common[1]}
        return {
            "adapter": self.adapter_dir,
            "task": CAUSAL_LM,
            "data": self.data,
            "rows": self.rows,
            "metrics": self.metrics,
            "most_common_answer": common,
            "warnings": self.warnings,
        }

    def report(self) -> str:
        m = self.metrics
        line = f"loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}"
        lines = [f"adapter {self.adapter_dir} on {self.data} ({self.rows} rows)"]
        if self.most_common is None:
            lines += [
                line,
                "exact match not scored: not every row is a prompt with a short answer (one line of at most "
                f"{SHORT_ANSWER_CHARS} characters)",
            ]
        else:
            answer, share = self.most_common
            lines += [
                f"{line}  exact match {m['exact_match']:.4f}",
                f"most common answer baseline (always {answer!r}): exact match {share:.4f}",
            ]
        lines += [f"WARNING: the model {w}" for w in self.warnings]
        return "\n".join(lines)


def evaluate_causal(
    adapter_dir: str | Path,
    data_path: str | Path,
    *,
    base_model: str | None = None,
    max_rows: int | None = None,
) -> CausalEvaluation:
    """Score the adapter on every row of ``data_path`` (the first ``max_rows``): each row's mean response-token
    loss, the perplexity, and exact match of greedy answers when every response is a short answer. The file is
    read before any model is loaded: a bad one fails in a second."""
    adapter_dir = Path(adapter_dir).expanduser()
    card = read_causal_card(adapter_dir)
    if card.max_length is None:
        raise AdapterError(
            f"{adapter_dir / MODEL_CARD}: max_length is not recorded: evaluation encodes rows to the length training "
            "did"
        )
    rows = load_causal_rows(str(data_path))
    if max_rows is not None:
        rows = rows.subset(np.arange(min(max_rows, len(rows))))
    model, tokenizer, _ = load_causal_adapter(adapter_dir, base_model=base_model)
    metrics = held_out_evaluator(tokenizer, rows, max_length=card.max_length)(model)
    return CausalEvaluation(
        adapter_dir=str(adapter_dir),
        data=rows.source,
        rows=len(rows),
        metrics=metrics,
        most_common=most_common_answer(rows),
        warnings=answer_warnings(metrics, rows),
    )
