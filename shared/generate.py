"""Text from a saved causal-LM adapter: what ``privatune generate`` prints.

An adapter directory is what a causal-LM run leaves in ``runs/run-<id>/adapter/``: a plain PEFT adapter
(``adapter_config.json`` with ``task_type`` CAUSAL_LM) and the card ``privatune.json`` (base model, token limit).
The adapter is loaded the plain way (``AutoModelForCausalLM`` + ``PeftModel.from_pretrained``), as anyone without
this project would, and decoded greedily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.outputs import MODEL_CARD
from shared.causal_data import bos_id
from shared.causal_model import greedy_generate, load_causal_base, load_causal_tokenizer
from shared.predict import ADAPTER_CONFIG, AdapterError, check_adapter_dir, read_json_object

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class CausalAdapterCard:
    """What generation needs from an adapter directory: the base model and the prompt's token limit."""

    base_model: str
    max_length: int | None


def read_causal_card(adapter_dir: Path) -> CausalAdapterCard:
    """The card of a causal-LM adapter directory; an :class:`AdapterError` naming the file for anything else (a
    missing directory or file, a classifier's adapter, a card without a base model)."""
    adapter_dir = check_adapter_dir(adapter_dir)
    task_type = read_json_object(adapter_dir / ADAPTER_CONFIG).get("task_type")
    if task_type != "CAUSAL_LM":
        raise AdapterError(
            f"{adapter_dir / ADAPTER_CONFIG}: task_type is {task_type!r}, not 'CAUSAL_LM': a classifier's adapter "
            "is used with privatune predict"
        )
    card = read_json_object(adapter_dir / MODEL_CARD)
    base, max_length = card.get("base_model"), card.get("max_length")
    if not isinstance(base, str) or not base:
        raise AdapterError(f"{adapter_dir / MODEL_CARD}: base_model must be a model path, got {base!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise AdapterError(f"{adapter_dir / MODEL_CARD}: max_length must be a positive integer, got {max_length!r}")
    return CausalAdapterCard(base, max_length)


def load_causal_adapter(
    adapter_dir: Path, *, base_model: str | None = None
) -> tuple[nn.Module, Any, CausalAdapterCard]:
    """The base model with the adapter applied (eval mode), its tokenizer, and the card. ``base_model`` replaces
    the card's (which may name a directory on the machine that trained it)."""
    from peft import PeftModel

    from shared.causal_model import _quiet_transformers

    card = read_causal_card(adapter_dir)
    base_path = base_model or card.base_model
    base = load_causal_base(base_path)
    with _quiet_transformers():
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, load_causal_tokenizer(base_path), card


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool = False, max_length: int | None = None) -> torch.Tensor:
    """One prompt's ids as training encoded a prompt row: the prompt's tokens without special tokens, after the
    BOS where the tokenizer itself adds one (:func:`shared.causal_data.bos_id`, the rule training rows were
    encoded by); with ``chat``, one user message in the tokenizer's chat template with the assistant's turn
    opened (the template writes its own BOS). Cut from the left to ``max_length`` tokens (the end of a prompt is
    what the answer follows)."""
    bos = bos_id(tokenizer)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat needs a tokenizer with a chat template; this base model's has none")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    if max_length is not None:
        ids = ids[-max_length:]
    if not ids:
        raise ValueError("the prompt is empty: give --prompt some text")
    return torch.tensor([ids], dtype=torch.long)


def generate_text(
    adapter_dir: Path,
    prompt: str,
    *,
    base_model: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool = False,
    device: str = "cpu",
) -> str:
    """The adapter's greedy continuation of ``prompt`` (special tokens dropped)."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    model, tokenizer, card = load_causal_adapter(adapter_dir, base_model=base_model)
    ids = encode_prompt(tokenizer, prompt, chat=chat, max_length=card.max_length)
    model.to(device)
    (text,) = greedy_generate(
        model, ids, torch.ones_like(ids), tokenizer=tokenizer, max_new_tokens=max_new_tokens, device=device
    )
    return text
