"""The model function extract calls: uint8 batches in, preprocessing on the device, batches kept in flight.

``Forward`` compiles one function per model: the decoded (B, H, W, 3) uint8 batch goes to the
device as it is (a quarter of the float32 bytes), the family's preprocess_input runs inside the
compiled call (``imgfeat.backbones.preprocess``), and the features come back as float32. On JAX
it is a jitted ``stateless_call``; on TensorFlow a ``tf.function`` with one fixed input signature;
on other backends an eager call under no-grad. Shapes are fixed (batches are zero-padded to the
batch size), so nothing is traced twice.

``in_flight`` drives it: each batch is submitted before the oldest result is fetched, so the
device never idles while the host waits for a result, copies it back or writes a shard. On a
CPU-only host a call runs to its end before it returns and the depth changes nothing; on a GPU
(JAX, TensorFlow and PyTorch all dispatch asynchronously) it keeps ``depth`` batches queued.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgfeat.backbones.preprocess import ops_preprocess
from imgfeat.extract.batches import Batch

DEFAULT_DEPTH = 2  # batches submitted to the device and not yet fetched


class Forward:
    """A built feature model as one compiled function of uint8 batches of a fixed shape."""

    def __init__(self, model: Any, family: str, batch_shape: tuple[int, int, int, int]) -> None:
        import keras

        self.backend = keras.backend.backend()
        self.batch_shape = tuple(int(v) for v in batch_shape)
        preprocess = ops_preprocess(family)
        maker = {"jax": _jax_call, "tensorflow": _tf_call}.get(self.backend, _eager_call)
        self._submit, self._fetch = maker(model, preprocess, self.batch_shape)

    def submit(self, raw: Any) -> Any:
        """Start the model on one (B, H, W, 3) uint8 batch (host or device array); a handle back."""
        if tuple(raw.shape) != self.batch_shape:
            raise ValueError(f"batch of shape {tuple(raw.shape)}, the model function takes {self.batch_shape}")
        return self._submit(raw)

    def fetch(self, handle: Any) -> np.ndarray:
        """Wait for a submitted batch and bring its features to the host: (B, dim) float32."""
        return np.asarray(self._fetch(handle), dtype=np.float32)

    def __call__(self, raw: Any) -> np.ndarray:
        return self.fetch(self.submit(raw))


def _jax_call(model: Any, preprocess, shape):
    import jax

    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def call(trainable, frozen, x):
        y, _ = model.stateless_call(trainable, frozen, preprocess(x), training=False)
        return y.astype("float32")

    def submit(raw):
        return call(trainable, frozen, jax.device_put(raw))  # dispatched, not waited for

    return submit, np.asarray


def _tf_call(model: Any, preprocess, shape):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.uint8)], autograph=False)
    def call(x):
        return tf.cast(model(preprocess(x), training=False), tf.float32)

    return call, lambda out: out.numpy()


def _eager_call(model: Any, preprocess, shape):
    import contextlib

    import keras
    from keras import ops

    guard = contextlib.nullcontext
    if keras.backend.backend() == "torch":
        import torch

        guard = torch.inference_mode

    def submit(raw):
        with guard():
            return ops.cast(model(preprocess(ops.convert_to_tensor(raw)), training=False), "float32")

    return submit, ops.convert_to_numpy


# ------------------------------------------------------------------------------------- in flight


@dataclass
class Landed:
    """One batch back from the model, in submit order: its features (None for a batch of only
    errors), the seconds the host spent in the model calls, and the seconds it waited for the batch."""

    batch: Batch
    features: np.ndarray | None
    model_seconds: float
    input_wait_seconds: float


@dataclass
class _Flight:
    batch: Batch
    handle: Any
    wait: float
    submit_seconds: float


def in_flight(forward: Forward, batches: Iterable[Batch], depth: int = DEFAULT_DEPTH) -> Generator[Landed]:
    """Run ``forward`` over ``batches``, up to ``depth`` submitted before the oldest is fetched.

    Results come back in batch order. A batch's ``release`` (a decode buffer going back to its
    pool) is called once its features are on the host, never before: a device may read the host
    buffer until then.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    pending: collections.deque[_Flight] = collections.deque()
    it = iter(batches)
    try:
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            waited = time.perf_counter() - t0
            if batch is None:
                break
            t1 = time.perf_counter()
            handle = forward.submit(batch.raw) if batch.ids else None
            pending.append(_Flight(batch, handle, waited, time.perf_counter() - t1))
            # Batches of only error rows never reach the model and do not count towards the depth.
            while pending and (pending[0].handle is None or _submitted(pending) >= depth):
                yield _land(forward, pending.popleft())
        while pending:
            yield _land(forward, pending.popleft())
    finally:
        for flight in pending:  # stopped early: nothing more is fetched, buffers go back
            _release(flight.batch)
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _submitted(pending: collections.deque[_Flight]) -> int:
    return sum(f.handle is not None for f in pending)


def _land(forward: Forward, flight: _Flight) -> Landed:
    t0 = time.perf_counter()
    features = None
    if flight.handle is not None:
        features = forward.fetch(flight.handle)[: len(flight.batch.ids)]
    seconds = flight.submit_seconds + time.perf_counter() - t0
    _release(flight.batch)
    return Landed(flight.batch, features, seconds, flight.wait)


def _release(batch: Batch) -> None:
    release = getattr(batch, "release", None)
    if release is not None:
        release()
