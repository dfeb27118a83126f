import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

from shared.data import (
    STRAY_LABEL_ROWS,
    STRAY_LABEL_SHARE,
    DataError,
    load_labelled_text,
    load_rotten_tomatoes,
    stray_labels,
)
from tests.conftest import make_rows, write_csv


def test_csv_jsonl_and_parquet_load_the_same_rows(tmp_path):
    rows = make_rows(20)
    csv = write_csv(tmp_path / "d.csv", rows)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    parquet = tmp_path / "d.parquet"
    pd.DataFrame(rows, columns=["text", "label"]).to_parquet(parquet)
    loaded = [load_labelled_text(p, labels=["rotten", "fresh"]) for p in (csv, jsonl, parquet)]
    for data in loaded:
        assert data.texts == loaded[0].texts
        assert data.label_names == ("rotten", "fresh")
        np.testing.assert_array_equal(data.labels, [1 if lab == "fresh" else 0 for _, lab in rows])


def test_labels_are_inferred_sorted_when_not_given(tmp_path):
    data = load_labelled_text(write_csv(tmp_path / "d.csv", [("a b", "2"), ("c d", "10"), ("e", "1")]))
    assert data.label_names == ("1", "2", "10")
    np.testing.assert_array_equal(data.labels, [1, 2, 0])


def test_custom_column_names(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("x y", "a"), ("z", "b")], header="review,stars")
    data = load_labelled_text(path, text_column="review", label_column="stars")
    assert data.texts == ("x y", "z")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing.csv", "data file not found"),
        (lambda p: p, "data path is not a file"),
        (lambda p: (p / "d.txt").write_text("x") and p / "d.txt", "must end in one of"),
        (lambda p: (p / "e.csv").write_text("") or p / "e.csv", "is empty"),
        (lambda p: (p / "h.csv").write_text("text,label\n") and p / "h.csv", "has no rows"),
        (
            lambda p: write_csv(p / "c.csv", [("a", "fresh")], header="body,label"),
            "text-column 'text' not found",
        ),
        (
            lambda p: write_csv(p / "c.csv", [("a", "fresh")], header="text,y"),
            "label-column 'label' not found",
        ),
        (lambda p: write_csv(p / "u.csv", [("a", "fresh"), ("b", "meh")]), "unknown label(s) ['meh']"),
        (lambda p: write_csv(p / "n.csv", [("a", "fresh"), ("b", "")]), "line 3 has no label"),
        (lambda p: write_csv(p / "t.csv", [("a", "fresh"), (" ", "rotten")]), "line 3 has an empty"),
    ],
)
def test_bad_data_file_is_a_clear_error(tmp_path, setup, message):
    with pytest.raises(DataError) as err:
        load_labelled_text(setup(tmp_path), labels=["rotten", "fresh"])
    assert message in str(err.value)


def test_a_single_label_is_an_error(tmp_path):
    with pytest.raises(DataError, match="needs at least 2 labels"):
        load_labelled_text(write_csv(tmp_path / "d.csv", [("a", "x"), ("b", "x")]))


def test_duplicate_declared_labels_are_an_error(tmp_path):
    with pytest.raises(DataError, match="has duplicates"):
        load_labelled_text(write_csv(tmp_path / "d.csv", [("a", "x")]), labels=["x", "x"])


def test_bundled_rotten_tomatoes_is_binary_fresh_vs_rotten():
    data = load_rotten_tomatoes()
    assert data.label_names == ("rotten", "fresh")
    assert len(data) == 7403 + 5405  # the 1,097 "plot" rows are not reviews
    assert int(data.labels.sum()) == 7403


def test_a_bad_row_is_named_by_its_line_in_the_file_as_an_editor_shows_it(tmp_path):
    # header = line 1; a quoted text spanning two lines pushes every later row one line down
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"one\nreview",fresh\nfine,rotten\nbad,\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 5 has no label in 'label'"):
        load_labelled_text(path, labels=["rotten", "fresh"])
    path.write_text("text,label\na,fresh\nb,meh\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown label\(s\) \['meh'\] in 'label' \(first on line 3\)"):
        load_labelled_text(path, labels=["rotten", "fresh"])


def test_a_bad_jsonl_or_parquet_row_is_named_by_line_or_1_based_row(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "fresh"}\n\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match="line 3 has no label"):
        load_labelled_text(jsonl, labels=["rotten", "fresh"])
    parquet = tmp_path / "d.parquet"
    pd.DataFrame([("a", "fresh"), ("", "rotten")], columns=["text", "label"]).to_parquet(parquet)
    with pytest.raises(DataError, match="row 2 has an empty"):
        load_labelled_text(parquet, labels=["rotten", "fresh"])


def test_a_jsonl_line_that_is_not_json_is_named_with_the_parsers_reason(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "fresh"}\n\n{"text": "b, "label": "rotten"}\n')

    with pytest.raises(DataError) as err:
        load_labelled_text(jsonl, labels=["rotten", "fresh"])

    assert str(err.value) == f"{jsonl}: line 3 is not valid JSON: Expecting ',' delimiter at column 15"


def test_a_file_that_is_not_utf8_names_the_line_and_the_encoding_to_convert_from(tmp_path):
    path = tmp_path / "win.csv"
    path.write_bytes("text,label\nfine,fresh\nit\u2019s great,fresh\n".encode("cp1252"))
    with pytest.raises(DataError) as err:
        load_labelled_text(path, labels=["rotten", "fresh"])
    message = str(err.value)
    assert "is not UTF-8" in message and "line 3" in message and "0x92" in message
    assert "iconv -f cp1252 -t utf-8 win.csv" in message


def stray_file(tmp_path, *, rows: int = 400, stray_at: tuple[int, ...] = (37, 250)):
    """``rows`` reviews labelled rotten/fresh, a 2-line quoted text first, and ``stray_at`` (0-based data rows)
    labelled 'frsh' instead; returns the file and the stray rows' lines as an editor shows them."""
    data = make_rows(rows)
    data[0] = ("first line\nsecond line", data[0][1])  # lines after it are one further down
    for i in stray_at:
        data[i] = (data[i][0], "frsh")
    return write_csv(tmp_path / "typo.csv", data), [f"line {i + 3}" for i in stray_at]


def stray_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "it becomes a class of its own" in r.getMessage()]


def test_a_stray_label_in_a_file_without_labels_is_warned_about_naming_its_lines_and_the_fix(tmp_path, caplog):
    path, lines = stray_file(tmp_path)

    with caplog.at_level(logging.WARNING, logger="privatune"):
        data = load_labelled_text(path, warn_stray=True)

    (warning,) = stray_warnings(caplog)
    assert data.label_names == ("fresh", "frsh", "rotten")  # still a class: warned, not dropped or refused
    assert f"label 'frsh' in 'label' is on only 2 of 400 rows ({lines[0]}, {lines[1]})" in warning
    beside = re.search(r"beside 'fresh' \((\d+) rows\), 'rotten' \((\d+) rows\): ", warning)
    assert beside is not None and int(beside[1]) + int(beside[2]) == 398
    assert "--set labels='\"fresh,rotten\"'" in warning
    with pytest.raises(DataError, match=f"unknown label\\(s\\) \\['frsh'\\] in 'label' \\(first on {lines[0]}\\)"):
        load_labelled_text(path, labels=["fresh", "rotten"])  # the fix it names: the row is then an error


def test_a_stray_label_warning_names_the_first_five_rows(tmp_path, caplog):
    path, lines = stray_file(tmp_path, rows=1000, stray_at=(5, 10, 20, 30, 40, 50, 60))

    with caplog.at_level(logging.WARNING, logger="privatune"):
        load_labelled_text(path, warn_stray=True)

    (warning,) = stray_warnings(caplog)
    assert f"on only 7 of 1000 rows ({', '.join(lines[:5])}, ...)" in warning


@pytest.mark.parametrize(
    ("counts", "stray"),
    [
        ({"neg": 500, "pos": 480, "pso": 1}, ["pso"]),
        ({"neg": 500, "pos": 480, "pso": 9, "x": 1}, ["x", "pso"]),  # rarest first
        ({"neg": 500, "pos": 480, "mixed": 10}, []),  # 10 rows: a small class, not a typo
        ({"neg": 50, "pos": 49, "pso": 1}, []),  # 100 rows: one row is 1%
        ({"neg": 5000, "pso": 3}, []),  # one common label: nothing to tell a typo from
        ({f"class-{i}": 5 for i in range(300)}, []),  # many small classes
    ],
)
def test_a_stray_label_is_rare_in_rows_and_share_beside_two_common_labels(counts, stray):
    keys = [label for label, n in counts.items() for _ in range(n)]

    assert stray_labels(keys) == stray


def test_no_stray_label_warning_with_labels_given_or_when_not_asked(tmp_path, caplog):
    path, _ = stray_file(tmp_path)

    with caplog.at_level(logging.WARNING, logger="privatune"):
        load_labelled_text(path)  # e.g. privatune evaluate: the adapter's labels are the classes
        with pytest.raises(DataError):
            load_labelled_text(path, labels=["fresh", "rotten"], warn_stray=True)

    assert stray_warnings(caplog) == []


def test_the_runs_data_is_checked_for_stray_labels(tmp_path, caplog):
    from shared.config import RunConfig
    from shared.federation import load_run_dataset

    path, lines = stray_file(tmp_path)

    with caplog.at_level(logging.WARNING, logger="privatune"):
        load_run_dataset(RunConfig(data_path=str(path)))

    (warning,) = stray_warnings(caplog)
    assert f"({lines[0]}, {lines[1]})" in warning


def test_the_labels_help_states_the_stray_label_rule():
    from dataclasses import fields

    from shared.config import RunConfig

    (labels,) = [f for f in fields(RunConfig) if f.name == "labels"]

    assert f"fewer than {STRAY_LABEL_ROWS} rows and under {STRAY_LABEL_SHARE:.0%}" in labels.metadata["help"]
