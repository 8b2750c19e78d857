"""Random-generator states as JSON, exactly: safe in a ``weights_only`` checkpoint (no pickles)."""

from __future__ import annotations

from typing import Any

import numpy as np


def encode(value: Any) -> Any:
    """Tuples, arrays and big ints (numpy's 128-bit generator states) made JSON-exact; :func:`decode` undoes it."""
    if isinstance(value, np.ndarray):
        return {"__array__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool):
        return {"__int__": str(value)}
    return value


def decode(value: Any) -> Any:
    """The value :func:`encode` was given (also reads states written with plain JSON numbers)."""
    if isinstance(value, dict):
        if "__array__" in value:
            return np.asarray(value["__array__"], dtype=value["dtype"])
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        if set(value) == {"__int__"}:
            return int(value["__int__"])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value
