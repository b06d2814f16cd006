"""The calibration's pieces on their own: the ranged reader and `mse` ranges."""

from __future__ import annotations

import numpy as np

from model_export.calibration import RangedReader, mse_range


def _histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    threshold = float(np.abs(values).max())
    return np.histogram(values, 2048, range=(-threshold, threshold))


def test_ranged_reader_reads_one_range_at_a_time() -> None:
    samples = np.arange(10 * 2, dtype=np.uint8).reshape(10, 2)
    reader = RangedReader("images", samples, batch_size=4)
    assert len(reader) == 3  # 4 + 4 + 2
    reader.set_range(1, 2)
    batch = reader.get_next()
    assert batch is not None
    np.testing.assert_array_equal(batch["images"], samples[4:8])
    assert reader.get_next() is None
    reader.set_range(2, 3)
    last = reader.get_next()
    assert last is not None
    assert len(last["images"]) == 2


def test_mse_range_keeps_a_uniform_tensor_whole() -> None:
    values = np.random.default_rng(0).uniform(0, 1, 100_000).astype(np.float32)
    hist, edges = _histogram(values)
    low, high = mse_range(hist, edges, float(values.min()), float(values.max()))
    assert low == 0.0  # a post-ReLU tensor: no code spent below zero
    assert high >= 0.97 * float(values.max())


def test_mse_range_clips_a_heavy_tail() -> None:
    # |Laplace|: the rarest, largest values cost less clipped than a coarser step for all.
    values = np.abs(np.random.default_rng(0).laplace(0, 1, 1_000_000)).astype(np.float32)
    hist, edges = _histogram(values)
    low, high = mse_range(hist, edges, float(values.min()), float(values.max()))
    assert low == 0.0
    assert 6.0 < high < 0.8 * float(values.max())


def test_mse_range_of_a_signed_tensor_spans_zero() -> None:
    values = np.random.default_rng(1).normal(0.5, 1, 100_000).astype(np.float32)
    hist, edges = _histogram(values)
    low, high = mse_range(hist, edges, float(values.min()), float(values.max()))
    assert low < 0 < high
    assert high <= float(values.max())
    assert low >= float(values.min())
