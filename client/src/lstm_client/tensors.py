"""float32 tensors as the API carries them, without numpy.

A ``lstm.v1.Tensor`` is ``shape`` plus ``data``: the values in row-major order as raw little-endian float32 bytes
(4 per value). ``make_tensor`` builds one from any iterable of floats, ``tensor_values`` reads one back as an
``array('f')`` (a sequence of Python floats; ``numpy.frombuffer(tensor.data, "<f4")`` does the same with numpy).
Both byteswap on big-endian hosts, so the bytes on the wire are little-endian everywhere.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Iterable, Sequence

from lstm.v1 import lstm_pb2 as pb

_BIG_ENDIAN = sys.byteorder == "big"

#: What ``Client.step`` accepts as h or c: a ``Tensor`` message, or plain ``(values, shape)``.
TensorLike = pb.Tensor | tuple[Iterable[float], Sequence[int]]


def make_tensor(values: Iterable[float], shape: Sequence[int] | None = None) -> pb.Tensor:
    """A ``Tensor`` holding ``values`` (row-major) with ``shape`` (default: one dimension of all the values).

    Raises ``ValueError`` when the shape does not hold exactly that many values."""
    floats = array("f", values)
    dims = (len(floats),) if shape is None else tuple(int(d) for d in shape)
    if any(d < 0 for d in dims) or math.prod(dims) != len(floats):
        raise ValueError(f"a tensor of shape {list(dims)} holds {math.prod(dims)} values, not {len(floats)}")
    if _BIG_ENDIAN:
        floats.byteswap()
    return pb.Tensor(shape=dims, data=floats.tobytes())


def tensor_shape(tensor: pb.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def tensor_values(tensor: pb.Tensor) -> array:
    """The values of ``tensor`` in row-major order, as ``array('f')`` in the host's byte order.

    An empty message (no shape, no data) has no values; otherwise ``data`` must hold exactly the product of
    ``shape`` float32 values (``ValueError`` if not)."""
    data = tensor.data
    if len(data) % 4:
        raise ValueError(f"tensor data of {len(data)} bytes is not a whole number of float32 values")
    floats = array("f")
    floats.frombytes(data)
    if _BIG_ENDIAN:
        floats.byteswap()
    if not tensor.shape and not floats:
        return floats
    expected = math.prod(tensor.shape)
    if any(d < 0 for d in tensor.shape) or expected != len(floats):
        shape = list(tensor.shape)
        raise ValueError(f"a tensor of shape {shape} needs {expected} values, its data holds {len(floats)}")
    return floats


def as_tensor(value: TensorLike) -> pb.Tensor:
    """A checked ``Tensor``: a message is validated as it is, a ``(values, shape)`` pair is encoded."""
    if isinstance(value, pb.Tensor):
        tensor_values(value)
        return value
    values, shape = value
    return make_tensor(values, shape)
