"""The ONNX Runtime engine on a real exported package: outputs, sessions, variant choice."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.engine.onnx_engine import (
    EngineOptions,
    InferenceEngine,
    choose_variant,
)
from service.engine.policy import warmup_sizes
from service.model_package import ModelPackage, Precision


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)


def reference(path: Path, batch: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits", "embedding"], {"images": batch})


def test_run_equals_a_plain_session(resnet18_package: Path) -> None:
    path = resnet18_package / "model.onnx"
    engine = InferenceEngine(path, EngineOptions(providers=["CPUExecutionProvider"]))
    assert (engine.num_classes, engine.embedding_dim) == (1000, 512)
    assert engine.input_shape == (224, 224, 3)
    assert engine.device == "cpu"
    assert engine.providers == ["CPUExecutionProvider"]
    batch = pixels(3)
    logits, embedding = engine.run(batch)
    expected_logits, expected_embedding = reference(path, batch)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embedding, expected_embedding, rtol=1e-5, atol=1e-5)


def test_overlapping_runs_take_their_own_instances_and_agree(resnet18_package: Path) -> None:
    path = resnet18_package / "model.onnx"
    options = EngineOptions(
        providers=["CPUExecutionProvider"], instances=2, intra_op_threads=1, solo_threads=2
    )
    engine = InferenceEngine(path, options)
    assert engine.sessions == 3  # two instances and the all-CPU session for lone batches
    used: list[str] = []
    run_on = engine._run_on
    names = {id(engine._solo): "solo"} | {
        id(s): f"instance{i}" for i, s in enumerate(engine._instances)
    }

    def recording_run_on(session: ort.InferenceSession, batch: np.ndarray) -> tuple:
        used.append(names[id(session)])
        return run_on(session, batch)

    engine._run_on = recording_run_on  # type: ignore[method-assign]
    assert engine.has_solo_session
    engine.run(pixels(1), alone=True)
    assert used == ["solo"], "a batch that runs alone gets every CPU"
    engine.run(pixels(1))
    assert used == ["solo", "instance0"], "a batch that may have company takes an instance"
    batches = [pixels(2, seed) for seed in range(6)]
    expected = [reference(path, batch) for batch in batches]
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    start = threading.Barrier(3)

    def worker(indices: range) -> None:
        start.wait(10)
        for index in indices:
            results[index] = engine.run(batches[index])

    threads = [threading.Thread(target=worker, args=(range(i, 6, 3),)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for index, (logits, embedding) in results.items():
        np.testing.assert_allclose(logits, expected[index][0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(embedding, expected[index][1], rtol=1e-4, atol=1e-4)
    assert sorted(results) == list(range(6))
    assert "solo" not in used[2:], "a batch that did not run alone took the solo session"
    assert {id(s) for s in engine._free} == {id(s) for s in engine._instances}, "all given back"
    assert len(engine._free) == 2


def test_one_instance_needs_no_second_session(resnet18_package: Path) -> None:
    engine = InferenceEngine(
        resnet18_package / "model.onnx",
        EngineOptions(providers=["CPUExecutionProvider"], intra_op_threads=2, solo_threads=2),
    )
    assert engine.sessions == 1
    assert not engine.has_solo_session


def test_graph_without_the_expected_interface_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "identity.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
        str(path),
    )
    with pytest.raises(ValueError, match="uint8"):
        InferenceEngine(path, EngineOptions(providers=["CPUExecutionProvider"]))


def test_variants(resnet18_package: Path) -> None:
    """Which variant for which providers (`auto` and fallbacks: tests/engine/test_providers.py)."""
    package = ModelPackage.load(resnet18_package)  # fp32 + int8
    cpu = ["CPUExecutionProvider"]
    assert choose_variant(package, Precision.INT8, cpu)[:2] == (
        Precision.INT8,
        resnet18_package / "model.int8.onnx",
    )
    precision, path, warnings = choose_variant(package, Precision.FP16, cpu)
    assert (precision, path.name) == (Precision.FP32, "model.onnx")
    assert len(warnings) == 1
    assert "no GPU execution provider" in warnings[0]
    precision, _, warnings = choose_variant(package, Precision.FP16, ["CUDAExecutionProvider"])
    assert precision is Precision.FP32
    assert "has no fp16 variant" in warnings[0]


def test_default_warmup_sizes() -> None:
    assert warmup_sizes(8, on_cpu=True) == [1, 2, 4, 8]
    assert warmup_sizes(6, on_cpu=True) == [1, 2, 4, 6]
    assert warmup_sizes(1, on_cpu=True) == [1]
    assert warmup_sizes(4, on_cpu=False) == [1, 2, 3, 4]
