"""What a run leaves on disk: the PEFT adapter, the run's metrics JSON, written atomically."""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from shared.model import SNIPPET_WARNING_FILTER

ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "adapter-best"  # the adapter of the round with the best macro-F1 on the server's test set
METRICS_FILE = "metrics.json"
MODEL_CARD = "privatune.json"


def _non_finite(payload: Any, where: str = "$") -> str | None:
    """The JSON path of the first NaN or infinite float in ``payload``, or None."""
    if isinstance(payload, float) and not math.isfinite(payload):
        return f"{where} = {payload}"
    items = payload.items() if isinstance(payload, dict) else enumerate(payload) if isinstance(payload, list) else ()
    for key, value in items:
        found = _non_finite(value, f"{where}[{key!r}]" if isinstance(key, str) else f"{where}[{key}]")
        if found is not None:
            return found
    return None


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write to a temp file, fsync, rename: a crash leaves the old file or the new one, never half of one.

    NaN and infinity are not JSON: a payload holding one is refused, naming where, before anything is written.
    """
    bad = _non_finite(payload)
    if bad is not None:
        raise ValueError(f"{path.name}: {bad} is not a JSON number (NaN and infinity are not written)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(model: nn.Module, run_dir: Path, *, card: dict[str, Any], name: str = ADAPTER_DIR) -> Path:
    """Save the adapter in PEFT format (adapter_config.json + adapter_model.safetensors) and a small card
    saying how to load it (base model, label names, max length) in ``run_dir / name``."""
    out = run_dir / name
    model.save_pretrained(str(out))  # type: ignore[operator]
    write_json_atomic(out / MODEL_CARD, card)
    return out


# -- an export that plain transformers code loads, and the model card -----------------------------------------
# Kept apart from save_adapter: the PEFT adapter needs this project's base model (for the default mean-pooling
# head); the export beside it needs nothing but torch, transformers and safetensors.

EXPORT_DIR = "merged"  # adapter/merged/: the base model with the adapter merged in, and the tokenizer
HEAD_FILE = "head.safetensors"  # adapter/merged/head.safetensors: the mean-pooling head (weight, bias)
README_FILE = "README.md"  # adapter/README.md: the model card
BUILTIN_PREFIX = "builtin:"


def public_name(path: str) -> str:
    """How a model or data path is named in what a run publishes: a ``builtin:`` name as it is, a local path
    by its last component only (the directories above it say who ran it where, nothing about the model)."""
    if path.startswith(BUILTIN_PREFIX):
        return path
    return Path(path).expanduser().name or path


def scrub_adapter_config(adapter_dir: Path, *, base_model: str) -> None:
    """Set ``base_model_name_or_path`` in PEFT's ``adapter_config.json`` to :func:`public_name` of the base
    model: PEFT writes the absolute local path the base was loaded from, which no reader can use."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = public_name(base_model)
    write_json_atomic(path, config)


def export_merged(
    model: nn.Module, adapter_dir: Path, *, tokenizer: Any, label_names: Sequence[str], pooling: str
) -> Path:
    """Write ``adapter_dir/merged/``: the base model with the LoRA weights merged in, its tokenizer, and for
    the mean-pooling head the head's ``weight`` and ``bias`` in ``head.safetensors`` (the feature center must
    already be folded into the bias, as :func:`shared.model.fold_feature_center` does).

    ``pooling="cls"`` gives a plain ``AutoModelForSequenceClassification`` directory; ``"mean"`` an
    ``AutoModel`` directory plus the head: the model card shows the six lines that apply it.
    """
    import torch
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    out = Path(adapter_dir) / EXPORT_DIR
    merged: Any = copy.deepcopy(model)
    if hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()  # LoRA into the weights; the trained head replaces the original one
    merged.eval()
    id2label = dict(enumerate(label_names))
    merged.config.id2label, merged.config.label2id = id2label, {v: k for k, v in id2label.items()}
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" is not a line for the run's output
    try:
        if pooling == "cls":
            merged.save_pretrained(str(out))
        else:
            merged.transformer.save_pretrained(str(out))
            head = merged.classifier
            state = {"weight": head.weight.detach(), "bias": head.bias.detach()}
            save_file(
                {k: v.to(torch.float32).cpu().contiguous().clone() for k, v in state.items()}, str(out / HEAD_FILE)
            )
        tokenizer.save_pretrained(str(out))
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "not recorded" if value is None else str(value)
    return "inf" if math.isinf(value) else f"{value:.{digits}g}" if abs(value) < 1e-3 else f"{value:.{digits}f}"


def majority_baseline(history: Mapping[str, Any]) -> float | None:
    """The accuracy of always predicting the test set's most frequent label, if the run recorded it
    (``majority_baseline`` in metrics.json: a number, or an object with ``accuracy``)."""
    for where in (history, (history.get("rounds") or [{}])[-1].get("test") or {}):
        value = where.get("majority_baseline") if isinstance(where, Mapping) else None
        if isinstance(value, Mapping):
            value = value.get("accuracy")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def attested_privacy(run_records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per site, from the run ledger's signed attestations: the last cumulative epsilon it attested, its delta
    and accountant, in how many training rounds it attested a release (``rounds``: round 1 on, as metrics.json's
    ``rounds`` and the card's "rounds" count them), and whether it attested round 0, the classifier's centering
    query (``centering_query``): a release of its own, in its epsilon, but no training round."""
    sites: dict[str, dict[str, Any]] = {}
    for record in run_records:
        for site, att in (record.get("attestations") or {}).items():
            row = sites.setdefault(str(site), {"rounds": 0, "centering_query": False})
            row.update(
                epsilon=float(att["epsilon"]),
                delta=float(att["delta"]),
                accountant=str(att.get("accountant", "")),
                last_round=int(record["round"]),
            )
            if int(record["round"]) == 0:
                row["centering_query"] = True
            else:
                row["rounds"] += 1
    return dict(sorted(sites.items()))


def privacy_section(run_records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The model card's "Privacy, per site" section (Markdown lines), the same for every task: each site's
    attested epsilon, delta, accountant, training rounds and centering query (:func:`attested_privacy`), or that
    none attested a release."""
    lines = ["## Privacy, per site (signed attestations in the run ledger)", ""]
    privacy = attested_privacy(run_records)
    if not privacy:
        return lines + ["No site attested a release in this run."]
    centering = any(p["centering_query"] for p in privacy.values())
    head = "| site | epsilon (cumulative) | delta | accountant | training rounds attested |"
    lines += [head + (" centering query (round 0) |" if centering else ""), "|---" * (6 if centering else 5) + "|"]
    lines += [
        f"| {site} | {_fmt(p['epsilon'], 3)} | {p['delta']:g} | {p['accountant']} | {p['rounds']} |"
        + ((" attested |" if p["centering_query"] else " no |") if centering else "")
        for site, p in privacy.items()
    ]
    return lines + [
        "",
        "Epsilon is each site's own, composed over every release of its data it recorded"
        + (" (the training rounds and the round-0 centering query, a noisy mean of the features)" if centering else "")
        + ", also in earlier runs; `privatune audit` re-verifies it from the sites' ledgers.",
    ]


def recall_section(test: Mapping[str, Any], history: Mapping[str, Any], labels: Sequence[str]) -> list[str]:
    """The model card's recall of each label (Markdown lines, empty where ``test`` has no ``per_class``) next to
    what the majority-class baseline finds, and the warnings about this adapter's test metrics
    (:func:`shared.metrics.quality_warnings`, :func:`shared.metrics.divergence_warnings`)."""
    from shared.metrics import divergence_warnings, quality_warnings

    per_class = test.get("per_class")
    if not isinstance(per_class, Mapping) or not per_class:
        return []
    majority = history.get("majority_baseline")
    majority = majority if isinstance(majority, Mapping) and "accuracy" in majority else None
    always = labels[int(majority["class"])] if majority and 0 <= int(majority.get("class", -1)) < len(labels) else None
    lines = [
        "",
        "Recall per label: of each label's test rows, how many this adapter gives that label"
        + (
            f" (the majority-class baseline, always {always!r}, finds every {always!r} row and no other)."
            if always
            else "."
        ),
        "",
        "| label | test rows | found | recall |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {c['rows']} | {c['found']} | {_fmt(c['recall'])} |" for name, c in per_class.items()]
    initial = history.get("initial_test")
    warnings = quality_warnings(test, majority, labels)
    if isinstance(initial, Mapping):
        warnings += divergence_warnings(dict(test), dict(initial))
    return lines + (["", *(f"**Warning:** this adapter {w}." for w in warnings)] if warnings else [])


def model_card(
    *,
    card: Mapping[str, Any],
    history: Mapping[str, Any],
    run_records: Sequence[Mapping[str, Any]],
    data_path: str,
    exported: bool,
) -> str:
    """The adapter's README.md: what it is, what it was trained on (by name, never content), the privacy each
    site attested, how good it is, and how to load it with or without this project."""
    config = history.get("config") or {}
    base = public_name(str(card["base_model"]))
    labels = list(card["label_names"])
    pooling, max_length = card["classifier_pooling"], int(card["max_length"])
    rounds = history.get("rounds") or []
    # this adapter's own metrics (privatune.json's test: the final or the best round's), else the last round's
    final = (
        card.get("test")
        or card.get("final_test")
        or (rounds[-1].get("test") if rounds else None)
        or history.get("initial_test")
        or {}
    )
    baseline = majority_baseline(history)
    dp = bool(config.get("dp", True))
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [privatune, federated-learning, differential-privacy, lora]",
        "---",
        "",
        f"# PrivaTune adapter of run {history.get('run_id', '?')}",
        "",
        f"A text classifier ({', '.join(labels)}) fine-tuned with federated LoRA"
        + (
            " under record-level differential privacy (DP-SGD at every site)"
            if dp
            else ", WITHOUT differential privacy"
        )
        + (", with secure aggregation." if config.get("secure-aggregation") else "."),
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` (head on {'the mean of the token states' if pooling == 'mean' else '[CLS]'}) |",
        f"| labels (index order) | {', '.join(f'{i}: {name}' for i, name in enumerate(labels))} |",
        f"| max length | {max_length} tokens |",
        f"| data | `{public_name(data_path)}` (name only; no row left any site) |",
        f"| rounds | {len(rounds)} of {config.get('num-server-rounds', '?')} planned |",
        f"| LoRA | {config.get('lora-mode', '?')}, rank {config.get('lora-r', '?')}, "
        f"modules {config.get('lora-target-modules', '?')} |",
        f"| this adapter | round {card.get('round', '?')} ({card.get('adapter', 'final')}) |",
        "",
        *privacy_section(run_records),
    ]
    lines += [
        "",
        "## Test metrics (the server's held-out set, this adapter)",
        "",
        "| accuracy | macro-F1 | loss | majority-class baseline (accuracy) |",
        "|---|---|---|---|",
        f"| {_fmt(final.get('accuracy'))} | {_fmt(final.get('macro_f1'))} | {_fmt(final.get('loss'))} "
        f"| {_fmt(baseline)} |",
        *recall_section(final, history, labels),
        "",
        "## Load it",
        "",
    ]
    if exported and pooling == "mean":
        lines += [
            "Without PrivaTune (torch, transformers and safetensors only): `merged/` holds the base model with the "
            "adapter merged in, its tokenizer, and the head (`head.safetensors`) that reads the mean of the "
            "token states:",
            "",
            "```python",
            "import torch",
            "from safetensors.torch import load_file",
            "from transformers import AutoModel, AutoTokenizer",
            'path = "merged"  # this directory\'s merged/',
            "tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()",
            'head = load_file(f"{path}/head.safetensors")',
            f'batch = tokenizer(["a sharp, moving film"], padding=True, truncation=True, max_length={max_length}, '
            'return_tensors="pt")',
            "with torch.no_grad():",
            "    hidden = encoder(**batch).last_hidden_state",
            '    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)',
            "    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)",
            '    logits = pooled @ head["weight"].T + head["bias"]',
            "print([encoder.config.id2label[i] for i in logits.argmax(-1).tolist()])",
            "```",
            "",
        ]
    elif exported:
        lines += [
            "Without PrivaTune (transformers only): `merged/` is a plain sequence classifier with the adapter merged "
            "in, and its tokenizer:",
            "",
            "```python",
            "from transformers import pipeline",
            'classify = pipeline("text-classification", model="merged")  # this directory\'s merged/',
            'print(classify("a sharp, moving film"))',
            "```",
            "",
        ]
    lines += [
        "With PrivaTune (`privatune predict --adapter DIR --text ...`, or in Python):",
        "",
        "```python",
        *(["import warnings"] if pooling == "cls" else []),
        "from peft import PeftModel",
        "from shared.model import load_base_model",
        *(SNIPPET_WARNING_FILTER if pooling == "cls" else ()),  # a transformers model (mean: PrivaTune's own)
        f'base = load_base_model("{base}", num_labels={len(labels)}, pooling="{pooling}")'
        + ("  # your local copy of the base model" if not base.startswith(BUILTIN_PREFIX) else ""),
        'model = PeftModel.from_pretrained(base, "DIR")  # DIR: this directory',
        "```",
        "",
        "`adapter_config.json` names the base model as above (a local base model by its directory name only).",
        "",
    ]
    return "\n".join(lines)


def write_model_card(adapter_dir: Path, text: str) -> Path:
    """Replace PEFT's blank README.md template with ``text``, atomically."""
    path = Path(adapter_dir) / README_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def publish_adapter(
    adapter_dir: Path,
    model: nn.Module,
    *,
    history: Mapping[str, Any],
    run_records: Sequence[Mapping[str, Any]],
    data_path: str,
    tokenizer: Any,
) -> None:
    """Make a saved adapter directory usable without this project: no local path in ``adapter_config.json``,
    the merged export in ``merged/``, and the model card in ``README.md``. ``model`` is what was saved (with
    the feature center folded in); the card is the ``privatune.json`` that :func:`save_adapter` wrote."""
    adapter_dir = Path(adapter_dir)
    card = json.loads((adapter_dir / MODEL_CARD).read_text(encoding="utf-8"))
    scrub_adapter_config(adapter_dir, base_model=str(card["base_model"]))
    export_merged(
        model, adapter_dir, tokenizer=tokenizer, label_names=card["label_names"], pooling=card["classifier_pooling"]
    )
    text = model_card(card=card, history=history, run_records=run_records, data_path=data_path, exported=True)
    write_model_card(adapter_dir, text)
