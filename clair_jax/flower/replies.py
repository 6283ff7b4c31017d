"""Reading and checking the replies of a round, and the weighted FedAvg of arrays.

A reply that cannot be used (an error, a record layout unlike FedAvg's, missing
or extra keys, a shape unlike what was sent, NaN/Inf, a bad ``num-examples``)
rejects its node with the reason; the other replies go on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore import log

__all__ = ["Rejected", "read_weight", "read_arrays", "check_replies", "same_layout", "fedavg", "usable_contents"]


class Rejected(Exception):
    """A reply that cannot be used; the message is the reason."""


def read_weight(content: RecordDict, weighted_by_key: str) -> float:
    """The reply's one finite, positive ``weighted_by_key`` value of its one MetricRecord."""
    metric_records = list(content.metric_records.values())
    if len(metric_records) != 1:
        raise Rejected(f"expected one MetricRecord, got {len(metric_records)}")
    value = metric_records[0].get(weighted_by_key)
    if value is None:
        raise Rejected(f"MetricRecord has no {weighted_by_key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(f"{weighted_by_key!r} must be one number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise Rejected(f"{weighted_by_key!r} must be finite and > 0, got {value!r}")
    return float(value)


def read_arrays(content: RecordDict, arrayrecord_key: str) -> dict[str, np.ndarray]:
    """The reply's arrays as NumPy, each real and finite."""
    records = content.array_records
    if arrayrecord_key in records:
        record = records[arrayrecord_key]
    elif len(records) == 1:
        record = next(iter(records.values()))
    else:
        raise Rejected(f"expected one ArrayRecord (or one named {arrayrecord_key!r}), "
                       f"got {len(records)}: {sorted(records)}")
    out = {}
    for key, value in record.items():
        try:
            arr = value.numpy()
        except Exception as err:  # noqa: BLE001  (a foreign serialisation)
            raise Rejected(f"array {key!r} could not be read ({err})") from None
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise Rejected(f"array {key!r} has dtype {arr.dtype}, not a real number type")
        if not np.all(np.isfinite(arr)):
            raise Rejected(f"array {key!r} holds NaN or Inf")
        out[key] = arr
    if not out:
        raise Rejected("the ArrayRecord is empty")
    return out


def check_replies(replies: Iterable[Message], weighted_by_key: str, arrayrecord_key: str,
                  template: Mapping[str, tuple] | None):
    """Split the replies into valid ``{node: (arrays, weight, content)}`` and ``{node: reason}``.

    ``template`` maps each key to the shape that was sent; without one the
    majority's layout is the reference.
    """
    parsed, rejected = {}, {}
    for msg in replies:
        node_id = msg.metadata.src_node_id
        if node_id in parsed or node_id in rejected:
            log(WARNING, "aggregate_train: a second reply from node %d is ignored", node_id)
            continue
        try:
            if msg.has_error():
                raise Rejected(f"error reply: {msg.error.reason}")
            if not msg.has_content():
                raise Rejected("reply has no content")
            weight = read_weight(msg.content, weighted_by_key)
            parsed[node_id] = (read_arrays(msg.content, arrayrecord_key), weight, msg.content)
        except Rejected as why:
            rejected[node_id] = str(why)
    if template is not None:
        layout, source = dict(template), "what was sent"
    else:
        layout, source = _majority_layout([a for a, _, _ in parsed.values()]), "the majority's"
    for node_id, (arrays, _, _) in list(parsed.items()):
        missing = sorted(set(layout) - set(arrays))
        extra = sorted(set(arrays) - set(layout))
        wrong = [f"{k} {arrays[k].shape} (expected {layout[k]})" for k in sorted(set(layout) & set(arrays))
                 if tuple(arrays[k].shape) != tuple(layout[k])]
        problems = ([f"missing keys {_short(missing)}"] if missing else []) + \
            ([f"extra keys {_short(extra)}"] if extra else []) + \
            ([f"shapes unlike {source}: {_short(wrong)}"] if wrong else [])
        if problems:
            rejected[node_id] = "; ".join(problems)
            del parsed[node_id]
    return parsed, rejected


def usable_contents(replies: Iterable[Message], weighted_by_key: str) -> list[RecordDict]:
    """The contents of the replies that carry a usable weight; the others are logged and left out."""
    contents = []
    for msg in replies:
        try:
            if msg.has_error():
                raise Rejected(f"error reply: {msg.error.reason}")
            read_weight(msg.content, weighted_by_key)
            contents.append(msg.content)
        except Rejected as why:
            log(INFO, "aggregate_evaluate: reply of node %d left out: %s", msg.metadata.src_node_id, why)
    return contents


def same_layout(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> bool:
    """The same keys with the same shapes."""
    return set(arrays) == set(reference) and all(arrays[k].shape == reference[k].shape for k in reference)


def fedavg(all_arrays: list[Mapping[str, np.ndarray]], weights: list[float]) -> ArrayRecord:
    """The weighted per-key mean, in float64, returned in the first adapter's dtypes."""
    total = float(sum(weights))
    out = {}
    for arrays, w in zip(all_arrays, weights):
        for key, value in arrays.items():
            term = value.astype(np.float64) * (w / total)
            out[key] = out[key] + term if key in out else term
    return ArrayRecord({k: Array(np.ascontiguousarray(v.astype(all_arrays[0][k].dtype))) for k, v in out.items()})


def _majority_layout(all_arrays):
    if not all_arrays:
        return {}
    layouts = Counter(tuple(sorted((k, tuple(v.shape)) for k, v in a.items())) for a in all_arrays)
    return dict(layouts.most_common(1)[0][0])


def _short(items, limit=3):
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
