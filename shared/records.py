"""Conversions between named numpy tensors and Flower records, with the incoming side checked."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict


class MessageError(ValueError):
    """A message lacks a record or holds one of the wrong type or shape."""


def record_from_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def arrays_from_record(content: RecordDict, key: str) -> dict[str, np.ndarray]:
    record = content.array_records.get(key)
    if record is None:
        raise MessageError(f"message has no ArrayRecord {key!r}; it has {sorted(content.keys())}")
    return {name: array.numpy() for name, array in record.items()}


def config_value(content: RecordDict, record_key: str, key: str, kind: type) -> object:
    record = content.config_records.get(record_key)
    if record is None:
        raise MessageError(f"message has no ConfigRecord {record_key!r}; it has {sorted(content.keys())}")
    if key not in record:
        raise MessageError(f"ConfigRecord {record_key!r} has no {key!r}")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MessageError(f"ConfigRecord {record_key!r} key {key!r} must be {kind.__name__}, got {value!r}")
    return value
