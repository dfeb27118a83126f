"""Rows for causal-LM fine-tuning: prompt/response pairs, chat conversations or plain text, and their encoding.

A data file is JSON Lines (``.jsonl`` or ``.jsonl.gz``), one object per line in exactly one of three formats:

- ``{"prompt": str, "response": str}``: supervised fine-tuning; the loss is taken on the response only;
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` whose last message is the
  assistant's: rendered with the model's chat template, the loss taken on the last assistant turn only;
- ``{"text": str}``: continued pre-training; every token is a target.

Extra keys are ignored. Everything a file can get wrong is a :class:`shared.data.DataError` naming the file, the
line (1-based, as an editor shows it) and what is wrong, raised while loading: before any training starts.

Encoding (:func:`encode_causal`) is the one place where the prompt and the target meet the tokenizer: the prompt's
tokens get label ``-100`` (no loss), the target's tokens their ids, then the tokenizer's end-of-sequence token so
that generation learns to stop. :func:`encode_prompts` gives the same prompts, left-padded, for greedy generation.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from shared.data import DataError, json_syntax_error

if TYPE_CHECKING:
    import torch

    from shared.model import Encoded

Kind = Literal["prompt", "messages", "text"]
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".jsonl.gz")
MAX_STRATA = 32  # more distinct responses than this are not classes worth stratifying a split by
SHORT_ANSWER_CHARS = 64  # a response this short, on one line, is an answer whose exact match is worth reporting

BUILTIN_INSTRUCT = "builtin:rotten-tomatoes-instruct"
BUILTIN_TEXT = "builtin:rotten-tomatoes-text"
BUILTIN_DATA: dict[str, str] = {
    BUILTIN_INSTRUCT: "the bundled Rotten Tomatoes reviews as prompts answered ' fresh' or ' rotten'",
    BUILTIN_TEXT: "the bundled Rotten Tomatoes reviews as plain text, for continued pre-training",
}
INSTRUCT_PROMPT = "Is this movie review fresh or rotten?\n\nReview: {text}\n\nAnswer:"

# a message as stored: (role, content)
Message = tuple[str, str]


@dataclass(frozen=True)
class CausalRows:
    """Causal-LM rows, one DP record each; immutable, and ``subset`` keeps the order given.

    Per row: ``kinds[i]`` is its format; ``prompts[i]`` the prompt of a ``prompt`` row (``""`` otherwise);
    ``messages[i]`` the whole conversation of a ``messages`` row (``()`` otherwise); ``responses[i]`` the target
    text (the response, the last assistant message's content, or the whole text). ``strata`` is fixed when the
    rows are loaded, so that a subset's strata are the whole set's at those rows.
    """

    source: str
    kinds: tuple[Kind, ...]
    prompts: tuple[str, ...]
    messages: tuple[tuple[Message, ...], ...]
    responses: tuple[str, ...]
    strata: np.ndarray = field(compare=False)  # int64 per row, read-only; see response_strata

    def __post_init__(self) -> None:
        strata = np.array(self.strata, dtype=np.int64)  # a copy: the caller's array may change, this one cannot
        strata.flags.writeable = False
        object.__setattr__(self, "strata", strata)
        n = len(self.kinds)
        lengths = {len(self.prompts), len(self.messages), len(self.responses), len(self.strata)}
        if lengths != {n}:
            raise ValueError(
                f"CausalRows fields must have one entry per row: kinds {n}, prompts {len(self.prompts)}, "
                f"messages {len(self.messages)}, responses {len(self.responses)}, strata {len(self.strata)}"
            )

    @classmethod
    def of(
        cls,
        source: str,
        kinds: Sequence[Kind],
        prompts: Sequence[str],
        messages: Sequence[tuple[Message, ...]],
        responses: Sequence[str],
    ) -> CausalRows:
        """Rows with their strata computed from these rows (:func:`response_strata`)."""
        return cls(
            source=source,
            kinds=tuple(kinds),
            prompts=tuple(prompts),
            messages=tuple(messages),
            responses=tuple(responses),
            strata=response_strata(kinds, responses),
        )

    def __len__(self) -> int:
        return len(self.kinds)

    def subset(self, indices: Sequence[int] | np.ndarray) -> CausalRows:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return CausalRows(
            source=self.source,
            kinds=tuple(self.kinds[i] for i in idx),
            prompts=tuple(self.prompts[i] for i in idx),
            messages=tuple(self.messages[i] for i in idx),
            responses=tuple(self.responses[i] for i in idx),
            strata=self.strata[idx],
        )

    def rows(self) -> list[tuple[str, ...]]:
        """Each row as the fingerprint hashes it: ("prompt", p, r), ("messages", canonical JSON) or ("text", t)."""
        out: list[tuple[str, ...]] = []
        for kind, prompt, messages, response in zip(
            self.kinds, self.prompts, self.messages, self.responses, strict=True
        ):
            if kind == "prompt":
                out.append(("prompt", prompt, response))
            elif kind == "messages":
                out.append(("messages", canonical_messages(messages)))
            else:
                out.append(("text", response))
        return out


def canonical_messages(messages: Sequence[Message]) -> str:
    """One conversation as one string that two parties holding the same messages write identically."""
    return json.dumps(
        [{"role": role, "content": content} for role, content in messages],
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )


def response_strata(kinds: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Each row's response as a class, for stratified and label-skewed splits: the index of the row's response
    among the sorted distinct responses when every row has a prompt (prompt or messages rows) and there are at
    most :data:`MAX_STRATA` distinct responses (answers drawn from a few labels); all zeros otherwise."""
    n = len(responses)
    if n == 0 or any(kind == "text" for kind in kinds):
        return np.zeros(n, dtype=np.int64)
    distinct = sorted(set(responses))
    if len(distinct) > MAX_STRATA:
        return np.zeros(n, dtype=np.int64)
    index = {response: i for i, response in enumerate(distinct)}
    return np.asarray([index[r] for r in responses], dtype=np.int64)


def has_short_answers(rows: CausalRows) -> bool:
    """True when every row has a prompt and a response of one line of at most 64 characters (after ``strip()``):
    answers whose exact match under greedy generation the server reports."""
    return len(rows) > 0 and all(
        kind != "text" and "\n" not in response.strip() and len(response.strip()) <= SHORT_ANSWER_CHARS
        for kind, response in zip(rows.kinds, rows.responses, strict=True)
    )


def most_common_answer(rows: CausalRows) -> tuple[str, float] | None:
    """The most common response (stripped, case-folded) and its share of ``rows``, when every response is a short
    answer (:func:`has_short_answers`): the exact match of always giving it, what a model must beat; else None."""
    if not has_short_answers(rows):
        return None
    answer, count = Counter(r.strip().casefold() for r in rows.responses).most_common(1)[0]
    return answer, count / len(rows)


# -- loading ---------------------------------------------------------------------------------------------------


def load_causal_rows(path: str) -> CausalRows:
    """The rows of a ``.jsonl`` / ``.jsonl.gz`` file or of a builtin set (:data:`BUILTIN_DATA`), every row checked."""
    if str(path).startswith("builtin:"):
        return _load_builtin(str(path))
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"data file not found: {file}")
    if not file.is_file():
        raise DataError(f"data path is not a file: {file}")
    if not file.name.lower().endswith(SUFFIXES):
        raise DataError(
            f"causal-LM data file {file} must end in one of {list(SUFFIXES)} (JSON Lines of prompt/response, "
            f"messages or text objects), or be one of {sorted(BUILTIN_DATA)}"
        )
    text = _read_text(file)
    kinds: list[Kind] = []
    prompts: list[str] = []
    conversations: list[tuple[Message, ...]] = []
    responses: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        kind, prompt, messages, response = _parse_line(line, where=f"{file}: line {number}")
        kinds.append(kind)
        prompts.append(prompt)
        conversations.append(messages)
        responses.append(response)
    if not kinds:
        raise DataError(f"data file {file} is empty (no JSON objects)")
    return CausalRows.of(str(file), kinds, prompts, conversations, responses)


def _read_text(file: Path) -> str:
    """The file's text, gunzipped for ``.gz``; not UTF-8 is refused naming the line of the first bad byte."""
    try:
        raw = file.read_bytes()
        if file.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read data file {file}: {e}") from e
    if not raw.strip():
        raise DataError(f"data file {file} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{file} is not UTF-8: byte 0x{raw[e.start]:02x} on line {line} is not valid UTF-8; convert the file, "
            f"e.g. iconv -f cp1252 -t utf-8 {file.name} > utf8-{file.name}"
        ) from e


def _parse_line(line: str, *, where: str) -> tuple[Kind, str, tuple[Message, ...], str]:
    """One JSON line as (kind, prompt, messages, response); ``where`` names the line in errors."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise json_syntax_error(where, e) from e
    if not isinstance(obj, dict):
        raise DataError(f"{where} is a JSON {type(obj).__name__}, not an object")
    formats = [
        name
        for name, keys in (
            ("prompt/response", ("prompt", "response")),
            ("messages", ("messages",)),
            ("text", ("text",)),
        )
        if any(key in obj for key in keys)
    ]
    if not formats:
        raise DataError(
            f'{where} has none of the formats: needs {{"prompt", "response"}}, {{"messages"}} or {{"text"}}; '
            f"its keys are {sorted(obj)}"
        )
    if len(formats) > 1:
        raise DataError(f"{where} mixes formats {formats}: a row is exactly one of prompt/response, messages, text")
    if formats[0] == "prompt/response":
        for key in ("prompt", "response"):
            if key not in obj:
                raise DataError(f"{where} has {'response' if key == 'prompt' else 'prompt'!r} but no {key!r}")
            _check_string(obj[key], where=where, what=repr(key))
        _check_not_empty(obj["response"], where=where, what="'response'")
        return "prompt", obj["prompt"], (), obj["response"]
    if formats[0] == "text":
        _check_string(obj["text"], where=where, what="'text'")
        _check_not_empty(obj["text"], where=where, what="'text'")
        return "text", "", (), obj["text"]
    messages = _parse_messages(obj["messages"], where=where)
    return "messages", "", messages, messages[-1][1]


def _parse_messages(value: Any, *, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, got {value!r:.80}")
    messages: list[Message] = []
    for i, message in enumerate(value):
        what = f"'messages'[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {what} is a JSON {type(message).__name__}, not a {{role, content}} object")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {what} has role {role!r}; roles are {list(ROLES)}")
        if "content" not in message:
            raise DataError(f"{where}: {what} has no 'content'")
        _check_string(message["content"], where=where, what=f"{what} 'content'")
        messages.append((role, message["content"]))
    if messages[-1][0] != "assistant":
        raise DataError(
            f"{where}: the last message is the {messages[-1][0]!r}'s; it must be the 'assistant' answer that is "
            "trained on"
        )
    _check_not_empty(messages[-1][1], where=where, what="the last assistant message's 'content'")
    return tuple(messages)


def _check_string(value: Any, *, where: str, what: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__} {value!r:.80}")


def _check_not_empty(value: str, *, where: str, what: str) -> None:
    if not value.strip():
        raise DataError(f"{where}: {what} is empty: there is nothing to train on")


def _load_builtin(name: str) -> CausalRows:
    """The bundled Rotten Tomatoes reviews (:func:`shared.data.load_rotten_tomatoes`, fresh and rotten only)."""
    if name not in BUILTIN_DATA:
        raise DataError(f"unknown builtin data {name!r}; the causal-LM builtin sets are {sorted(BUILTIN_DATA)}")
    from shared.data import load_rotten_tomatoes

    reviews = load_rotten_tomatoes()
    n = len(reviews)
    if name == BUILTIN_TEXT:
        return CausalRows.of(name, ["text"] * n, [""] * n, [()] * n, reviews.texts)
    answers = [f" {reviews.label_names[label]}" for label in reviews.labels.tolist()]
    prompts = [INSTRUCT_PROMPT.format(text=text) for text in reviews.texts]
    return CausalRows.of(name, ["prompt"] * n, prompts, [()] * n, answers)


# -- encoding --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tokenized:
    """Per row: the prompt's token ids and the target's (EOS last); ``bos`` starts every row where the tokenizer
    uses one (kept apart so that truncating the prompt never cuts it)."""

    bos: list[int]  # [] or [the BOS id]
    prompts: list[list[int]]
    targets: list[list[int]]

    def prompt(self, i: int) -> list[int]:
        """Row ``i``'s input before its target: the BOS and the prompt; label -100 throughout."""
        return self.bos + self.prompts[i]


def encode_causal(tokenizer: Any, rows: CausalRows, *, max_length: int) -> Encoded:
    """The rows as training / loss-evaluation inputs, right-padded to the longest row (at most ``max_length``).

    ``labels`` has the shape of ``input_ids``: ``-100`` on the prompt (BOS included) and the padding, the token id
    on the target; labels[t] is the token at position t (the loss shifts). A row longer than ``max_length`` loses
    its prompt's oldest tokens first, so that the whole target is kept; a target longer than ``max_length`` alone
    is cut at its right (losing the EOS).
    """
    import torch

    from shared.model import Encoded

    tokenized = _fit(_tokenize(tokenizer, rows), max_length=max_length)
    n = len(rows)
    width = max((len(tokenized.prompt(i)) + len(tokenized.targets[i]) for i in range(n)), default=0)
    input_ids = np.full((n, width), pad_id(tokenizer), dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), -100, dtype=np.int64)
    for i in range(n):
        prompt, target = tokenized.prompt(i), tokenized.targets[i]
        length = len(prompt) + len(target)
        input_ids[i, :length] = prompt + target
        attention[i, :length] = 1
        labels[i, len(prompt) : length] = target
    return Encoded(torch.from_numpy(input_ids), torch.from_numpy(attention), torch.from_numpy(labels))


def encode_prompts(tokenizer: Any, rows: CausalRows, *, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' prompts exactly as :func:`encode_causal` feeds them (same rendering, same truncation),
    LEFT-padded so that every row's next token is generated at the last position: (input_ids, attention_mask).

    Text rows have no prompt and are refused, as is a prompt that encodes to no token at all (nothing to
    generate from)."""
    import torch

    for i, kind in enumerate(rows.kinds):
        if kind == "text":
            raise ValueError(f"{rows.source}: row {i} is a text row: it has no prompt to generate an answer from")
    tokenized = _fit(_tokenize(tokenizer, rows), max_length=max_length)
    prompts = [tokenized.prompt(i) for i in range(len(rows))]
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(
                f"{rows.source}: row {i}'s prompt has no token (empty, or cut away so that its answer fits "
                f"max_length {max_length}): nothing to generate from"
            )
    width = max((len(p) for p in prompts), default=0)
    n = len(rows)
    input_ids = np.full((n, width), pad_id(tokenizer), dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = prompt
        attention[i, width - len(prompt) :] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention)


def pad_id(tokenizer: Any) -> int:
    """The id padding is written with: the tokenizer's pad token, else its eos token, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id where the tokenizer itself starts a text with it (Llama's); None otherwise. A tokenizer that has
    a BOS token but never adds it (SmolLM2's is ``<|im_start|>``, only ever written by its chat template) and
    BERT's ``[CLS]`` (no BOS token) get none: the model sees its text as it was trained to."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids[:1] == [bos] else None


def _model_name(tokenizer: Any) -> str:
    """The model a tokenizer was loaded from, for messages (its class where it was built in memory)."""
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _render(tokenizer: Any, rows: CausalRows) -> tuple[list[str], list[str]]:
    """Each row's prompt text and target text. A messages row is rendered with the tokenizer's chat template:
    the prompt is the conversation before the answer with the template's generation prompt, the target the rest
    of the whole conversation's rendering (the answer and the template's end of turn)."""
    prompts: list[str] = []
    targets: list[str] = []
    for i, (kind, prompt, messages, response) in enumerate(
        zip(rows.kinds, rows.prompts, rows.messages, rows.responses, strict=True)
    ):
        if kind != "messages":
            prompts.append(prompt)  # "" for a text row
            targets.append(response)
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{rows.source}: row {i} is a chat ('messages') row, but the tokenizer of {_model_name(tokenizer)} "
                "has no chat template; use prompt/response rows or a model with a chat template"
            )
        conversation = [{"role": role, "content": content} for role, content in messages]
        head = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(conversation, tokenize=False)
        if not whole.startswith(head):
            raise DataError(
                f"{rows.source}: row {i}: the chat template of {_model_name(tokenizer)} does not render "
                "the conversation as its prompt followed by the answer; the answer cannot be told apart"
            )
        prompts.append(head)
        targets.append(whole[len(head) :])
    return prompts, targets


def _tokenize(tokenizer: Any, rows: CausalRows) -> _Tokenized:
    """Prompts and targets tokenized in one batched call each, without the tokenizer's own special tokens (no
    ``[CLS]``/``[SEP]``); the BOS where the tokenizer uses one (taken off a prompt that a chat template already
    started with it), and the EOS after a target that does not already hold it (a chat template's end of turn
    may be the EOS, as SmolLM2's ``<|im_end|>`` is; the target then ends there)."""
    prompt_texts, target_texts = _render(tokenizer, rows)
    prompt_ids = _ids(tokenizer, prompt_texts)
    target_ids = _ids(tokenizer, target_texts)
    bos = bos_id(tokenizer)
    eos = tokenizer.eos_token_id
    prompts = [ids[1:] if bos is not None and ids[:1] == [bos] else ids for ids in prompt_ids]
    if eos is None:
        targets = target_ids
    else:  # what a template writes after the EOS (SmolLM2's newline) is never generated: not a target
        targets = [ids[: ids.index(eos) + 1] if eos in ids else [*ids, int(eos)] for ids in target_ids]
    return _Tokenized([] if bos is None else [bos], prompts, targets)


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: no "longer than the model's maximum length" warning; truncation is done by _fit
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(map(int, ids)) for ids in encoded]


def _fit(tokenized: _Tokenized, *, max_length: int) -> _Tokenized:
    """Each row cut to ``max_length`` tokens, the BOS always kept: the prompt loses its oldest tokens so that the
    whole target fits; a target that does not fit even alone is cut at its right and keeps no prompt."""
    if max_length < len(tokenized.bos) + 1:
        raise ValueError(f"max_length must leave room for a target token, got {max_length}")
    room = max_length - len(tokenized.bos)
    prompts: list[list[int]] = []
    targets: list[list[int]] = []
    for prompt, target in zip(tokenized.prompts, tokenized.targets, strict=True):
        if len(prompt) + len(target) > room:
            keep = room - len(target)
            prompt, target = (prompt[len(prompt) - keep :], target) if keep > 0 else ([], target[:room])
        prompts.append(prompt)
        targets.append(target)
    return _Tokenized(tokenized.bos, prompts, targets)
