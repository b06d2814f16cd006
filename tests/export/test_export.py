"""The export stage (`resnet-export`): parity with independent PyTorch / transformers
references on real photos, the package it writes, and how it fails on bad input.

Every reference here is rebuilt independently of `model_export` (torchvision's and
transformers' own modules and preprocessing), then compared with ONNX Runtime running the
exported graphs on the same uint8 pixels the service would produce.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn
from torchvision.transforms.functional import normalize

from model_export import graph, sources, variants, verify
from model_export.cli import main
from service.images.preprocess import ImagePreprocessor
from service.model_package import (
    Interpolation,
    Manifest,
    ModelPackage,
    Precision,
    PreprocessSpec,
)
from tests.support import cuda_usable

ROOT = Path(__file__).resolve().parents[2]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARITY_REL = 1e-4  # max |onnx - reference| / max |reference| for logits and embeddings
MAX_PIXELS = 50_000_000
ERROR_PREFIX = "resnet-export: error:"


# ------------------------------------------------------------------------------ helpers


def photo_pixels(bodies: list[bytes], spec: PreprocessSpec) -> np.ndarray:
    """[N, crop, crop, 3] uint8, exactly as the service preprocesses uploads."""
    preprocess = ImagePreprocessor(spec, max_pixels=MAX_PIXELS)
    return np.stack([preprocess(body) for body in bodies])


def normalised(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """torchvision's ToTensor + Normalize on NHWC uint8 pixels → NCHW float."""
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return normalize(tensor, list(mean), list(std))


def run_onnx(path: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    results = session.run(names, {session.get_inputs()[0].name: pixels})
    return dict(zip(names, results, strict=True))


def torchvision_reference(model: nn.Module, inputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embedding): the model's own forward, embedding = the input of `model.fc`."""
    captured: list[torch.Tensor] = []
    handle = model.fc.register_forward_hook(
        lambda _module, args, _output: captured.append(args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            logits = model(inputs)
    finally:
        handle.remove()
    return logits.numpy(), captured[0].flatten(1).numpy()


def rel_max_diff(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - reference)) / np.max(np.abs(reference)))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a64 * b64, axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def assert_parity(
    outputs: dict[str, np.ndarray], ref_logits: np.ndarray, ref_embedding: np.ndarray
) -> None:
    logits, embedding = outputs["logits"], outputs["embedding"]
    assert logits.shape == ref_logits.shape
    assert embedding.shape == ref_embedding.shape
    # The reference must say something, or agreeing with it proves nothing.
    assert not np.allclose(ref_logits[0], ref_logits[1])
    assert np.ptp(ref_logits[0]) > 0
    assert rel_max_diff(logits, ref_logits) < PARITY_REL
    np.testing.assert_array_equal(logits.argmax(axis=1), ref_logits.argmax(axis=1))
    np.testing.assert_allclose(
        embedding, ref_embedding, rtol=1e-4, atol=PARITY_REL * float(np.abs(ref_embedding).max())
    )


def assert_batch_independent(path: Path, pixels: np.ndarray) -> None:
    """Batch 1, image by image, gives what one batch of all images gives."""
    batched = run_onnx(path, pixels)
    singles = [run_onnx(path, pixels[index : index + 1]) for index in range(len(pixels))]
    for name in ("logits", "embedding"):
        stacked = np.concatenate([single[name] for single in singles])
        assert stacked.shape == batched[name].shape
        assert rel_max_diff(stacked, batched[name]) < 1e-5, name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_manifest(package: Path) -> Manifest:
    return Manifest.model_validate_json((package / "manifest.json").read_bytes())


def labels_of(package: Path) -> list[str]:
    return json.loads((package / "labels.json").read_text(encoding="utf-8"))


def perturb_batchnorm(model: nn.Module, seed: int) -> None:
    """Seeded non-trivial running statistics and affine parameters for every BatchNorm."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
                count += 1
    assert count > 0


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory`, with file contents: detects anything left behind."""
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else None
        for path in sorted(directory.rglob("*"))
    }


def staging_leftovers(directory: Path) -> list[Path]:
    return [
        path
        for path in directory.rglob(".*")
        if ".partial-" in path.name or ".previous-" in path.name
    ]


def error_line(stderr: str) -> str:
    """The single `resnet-export: error:` line, with no traceback around it."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, stderr
    return lines[0]


def export_ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI in-process; it must succeed. Returns stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.err


# ------------------------------------------------- 1. fused preprocessing == Normalize


@pytest.mark.parametrize(
    ("mean", "std"),
    [(IMAGENET_MEAN, IMAGENET_STD), ((0.1, 0.7, 0.3), (0.9, 0.15, 0.4))],
    ids=["imagenet", "custom"],
)
def test_fused_preprocess_matches_torchvision_normalize(
    tmp_path: Path,
    photo_pngs: list[bytes],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> None:
    path = tmp_path / "preprocess.onnx"
    example = torch.zeros((2, 224, 224, 3), dtype=torch.uint8)
    program = torch.onnx.export(
        graph.FusedPreprocess(mean, std).eval(),
        (example,),
        dynamo=True,
        input_names=["images"],
        output_names=["pixels"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
        external_data=False,
    )
    assert program is not None
    program.save(str(path), external_data=False)

    pixels = photo_pixels(photo_pngs, PreprocessSpec())
    assert pixels.dtype == np.uint8
    assert pixels.shape == (len(photo_pngs), 224, 224, 3)
    expected = normalised(pixels, mean, std).numpy()
    for batch in (pixels, pixels[:1]):  # the batch axis is dynamic
        (got,) = run_onnx(path, batch).values()
        assert got.dtype == np.float32
        assert got.shape == (len(batch), 3, 224, 224)
        assert float(np.max(np.abs(got - expected[: len(batch)]))) < 1e-5


# ------------------------------------------------ 2. ResNet-50 parity, torchvision source


@pytest.fixture(scope="module")
def resnet50_reference() -> nn.Module:
    # What sources.load_random_init does: torch.manual_seed(seed), then
    # torchvision.models.get_model(arch, weights=None, num_classes=1000).
    torch.manual_seed(0)
    return torchvision.models.resnet50(num_classes=1000).eval()


def test_resnet50_random_init_matches_torchvision(
    resnet50_package: Path, resnet50_reference: nn.Module, photo_pngs: list[bytes]
) -> None:
    pixels = photo_pixels(photo_pngs, PreprocessSpec())
    ref_logits, ref_embedding = torchvision_reference(
        resnet50_reference, normalised(pixels, IMAGENET_MEAN, IMAGENET_STD)
    )
    assert ref_embedding.shape == (len(pixels), 2048)
    model = resnet50_package / "model.onnx"
    assert_parity(run_onnx(model, pixels), ref_logits, ref_embedding)
    assert_batch_independent(model, pixels)


def test_resnet50_random_init_manifest(resnet50_package: Path) -> None:
    raw = json.loads((resnet50_package / "manifest.json").read_text(encoding="utf-8"))
    assert raw["trained"] is False
    assert raw["source"]["kind"] == "random-init"
    assert raw["source"]["seed"] == 0
    assert raw["arch"] == "resnet50"
    assert raw["num_classes"] == 1000
    assert raw["embedding_dim"] == 2048
    assert raw["inputs"] == [{"name": "images", "dtype": "uint8", "shape": ["batch", 224, 224, 3]}]
    assert [(o["name"], o["dtype"], o["shape"]) for o in raw["outputs"]] == [
        ("logits", "float32", ["batch", 1000]),
        ("embedding", "float32", ["batch", 2048]),
    ]
    assert raw["preprocessing"]["mean"] == list(IMAGENET_MEAN)
    assert raw["preprocessing"]["std"] == list(IMAGENET_STD)
    assert set(raw["variants"]) == {"fp32", "int8", "fp16"}
    files = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
    for precision, variant in raw["variants"].items():
        path = resnet50_package / variant["file"]
        assert variant["file"] == files[precision]
        assert variant["sha256"] == sha256(path)
        assert variant["bytes"] == path.stat().st_size
        assert variant["verification"]["passed"] is True
        assert variant["verification"]["checks"]
        assert all(check["passed"] is True for check in variant["verification"]["checks"])
    assert raw["variants"]["fp32"]["verification"]["reference"] == "pytorch"
    # The opset recorded is the graph's own.
    fp32 = onnx.load(str(resnet50_package / "model.onnx"), load_external_data=False)
    assert raw["opset"] in {entry.version for entry in fp32.opset_import if entry.domain == ""}

    labels = labels_of(resnet50_package)
    assert len(labels) == 1000
    assert labels[281] == "tabby"
    assert labels[0] == "tench"

    package = ModelPackage.load(resnet50_package)
    assert package.manifest.num_classes == 1000
    assert package.labels == labels
    assert package.variant_path(Precision.INT8) == resnet50_package / "model.int8.onnx"


# ---------------------------------------------- 3. ResNet-50 parity, Hugging Face source

HF_PREPROCESSOR = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
    "resample": 3,
    "size": {"shortest_edge": 224},
}


def hf_model(num_labels: int, seed: int, **config: Any) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    resnet_config = ResNetConfig(
        num_labels=num_labels,
        id2label={index: f"label {index}" for index in range(num_labels)},
        label2id={f"label {index}": index for index in range(num_labels)},
        **config,
    )
    torch.manual_seed(seed)
    model = ResNetForImageClassification(resnet_config).eval()
    perturb_batchnorm(model, seed + 100)
    return model


def save_hf_bin(model: Any, directory: Path) -> None:
    """The legacy `pytorch_model.bin` layout (transformers 5 can no longer write it itself)."""
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        model.save_pretrained(directory, safe_serialization=False)
    else:
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")


def hf_reference(model: Any, inputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits = model(inputs).logits
        embedding = model.resnet(inputs).pooler_output.flatten(1)
    return logits.numpy(), embedding.numpy()


@dataclass
class HfExport:
    checkpoint: Path
    package: Path
    model: Any


@pytest.fixture(scope="module")
def hf_resnet50(tmp_path_factory: pytest.TempPathFactory) -> HfExport:
    base = tmp_path_factory.mktemp("hf50")
    checkpoint, package = base / "resnet-50", base / "package"
    model = hf_model(1000, seed=1)  # ResNetConfig defaults: bottleneck, depths 3,4,6,3
    model.save_pretrained(checkpoint)
    assert (checkpoint / "model.safetensors").is_file()
    (checkpoint / "preprocessor_config.json").write_text(json.dumps(HF_PREPROCESSOR))
    code = main(["--hf-dir", str(checkpoint), "--out", str(package), "--quiet"])
    assert code == 0
    return HfExport(checkpoint, package, model)


def test_hf_resnet50_matches_transformers(hf_resnet50: HfExport, photo_pngs: list[bytes]) -> None:
    manifest = load_manifest(hf_resnet50.package)
    pixels = photo_pixels(photo_pngs, manifest.preprocessing)
    ref_logits, ref_embedding = hf_reference(
        hf_resnet50.model, normalised(pixels, IMAGENET_MEAN, IMAGENET_STD)
    )
    assert ref_embedding.shape == (len(pixels), 2048)
    model = hf_resnet50.package / "model.onnx"
    assert_parity(run_onnx(model, pixels), ref_logits, ref_embedding)
    assert_batch_independent(model, pixels)


def test_hf_resnet50_manifest(hf_resnet50: HfExport) -> None:
    manifest = load_manifest(hf_resnet50.package)
    assert manifest.preprocessing.resize == 256
    assert manifest.preprocessing.crop == 224
    assert manifest.preprocessing.interpolation is Interpolation.BICUBIC
    assert manifest.preprocessing.mean == IMAGENET_MEAN
    assert manifest.preprocessing.std == IMAGENET_STD
    assert manifest.arch == "resnet50"
    assert manifest.trained is True
    assert manifest.source.kind == "huggingface"
    assert manifest.source.sha256 == sha256(hf_resnet50.checkpoint / "model.safetensors")
    assert manifest.num_classes == 1000
    assert manifest.embedding_dim == 2048
    assert set(manifest.variants) == {Precision.FP32}
    assert labels_of(hf_resnet50.package) == [f"label {index}" for index in range(1000)]
    assert ModelPackage.load(hf_resnet50.package).labels[7] == "label 7"


def test_hf_pytorch_model_bin_checkpoint(
    tmp_path: Path, photo_pngs: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    model = hf_model(
        10, seed=5, layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]
    )
    checkpoint, package = tmp_path / "resnet-18", tmp_path / "package"
    save_hf_bin(model, checkpoint)
    assert (checkpoint / "pytorch_model.bin").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    export_ok(capsys, "--hf-dir", str(checkpoint), "--out", str(package), "--quiet")

    manifest = load_manifest(package)
    assert manifest.arch == "resnet18"
    assert manifest.source.kind == "huggingface"
    assert manifest.source.sha256 == sha256(checkpoint / "pytorch_model.bin")
    assert manifest.num_classes == 10
    assert manifest.embedding_dim == 512
    # No preprocessor_config.json: torchvision's ImageNet defaults.
    assert manifest.preprocessing == PreprocessSpec()
    assert labels_of(package) == [f"label {index}" for index in range(10)]
    pixels = photo_pixels(photo_pngs, manifest.preprocessing)
    ref_logits, ref_embedding = hf_reference(model, normalised(pixels, IMAGENET_MEAN, IMAGENET_STD))
    assert_parity(run_onnx(package / "model.onnx", pixels), ref_logits, ref_embedding)


# ------------------------------------------------------------- 4. state dict round trip


@dataclass
class StateDictFiles:
    model: nn.Module  # torchvision resnet18, 10 classes, perturbed BatchNorm
    pth: Path
    safetensors: Path
    wrapped: Path  # {"state_dict": {"module." + key: tensor}}
    labels: Path  # 10 names, one per line
    resnet50_keys: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> StateDictFiles:
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("weights")
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=10).eval()
    perturb_batchnorm(model, 33)
    state = {key: value.clone().contiguous() for key, value in model.state_dict().items()}
    files = StateDictFiles(
        model=model,
        pth=directory / "resnet18.pth",
        safetensors=directory / "resnet18.safetensors",
        wrapped=directory / "checkpoint.pt",
        labels=directory / "labels.txt",
        resnet50_keys=set(torchvision.models.resnet50(num_classes=10).state_dict()),
    )
    torch.save(state, files.pth)
    save_file(state, str(files.safetensors))
    torch.save(
        {"state_dict": {f"module.{key}": value for key, value in state.items()}}, files.wrapped
    )
    files.labels.write_text("".join(f"kind {index}\n" for index in range(10)), encoding="utf-8")
    return files


@pytest.mark.parametrize("case", ["pth", "safetensors", "wrapped-with-labels"])
def test_state_dict_round_trip(
    tmp_path: Path,
    resnet18_weights: StateDictFiles,
    photo_pngs: list[bytes],
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    weights = {
        "pth": resnet18_weights.pth,
        "safetensors": resnet18_weights.safetensors,
        "wrapped-with-labels": resnet18_weights.wrapped,
    }[case]
    extra = ["--labels", str(resnet18_weights.labels)] if case == "wrapped-with-labels" else []
    package = tmp_path / "package"
    export_ok(
        capsys,
        *("--arch", "resnet18", "--weights-file", str(weights), "--num-classes", "10"),
        *("--out", str(package), "--quiet", *extra),
    )

    manifest = load_manifest(package)
    assert manifest.arch == "resnet18"
    assert manifest.trained is True
    assert manifest.source.kind == "weights-file"
    assert manifest.source.sha256 == sha256(weights)
    assert manifest.num_classes == 10
    assert manifest.embedding_dim == 512
    expected_labels = (
        [f"kind {index}" for index in range(10)]
        if extra
        else [f"class_{index}" for index in range(10)]
    )
    assert labels_of(package) == expected_labels

    pixels = photo_pixels(photo_pngs, manifest.preprocessing)
    ref_logits, ref_embedding = torchvision_reference(
        resnet18_weights.model, normalised(pixels, IMAGENET_MEAN, IMAGENET_STD)
    )
    assert_parity(run_onnx(package / "model.onnx", pixels), ref_logits, ref_embedding)


# --------------------------------------------------------- 5. INT8 and FP16 fidelity


def _within(name: str, value: float, bound: float) -> bool:
    if not np.isfinite(value):
        return False
    return value <= bound if name == "logits_max_rel_diff" else value >= bound


def test_variant_checks_within_documented_tolerances(resnet50_package: Path) -> None:
    manifest = load_manifest(resnet50_package)
    for precision in (Precision.INT8, Precision.FP16):
        verification = manifest.variants[precision].verification
        assert verification.reference == "fp32-onnx"
        # INT8 is a CPU format; FP16 runs on CUDA where this host has a usable GPU.
        where = cuda_usable() if precision is Precision.FP16 else False
        assert verification.provider == (verify.CUDA if where else verify.CPU)
        bounds = verify.TOLERANCES[precision]
        assert verification.tolerances == bounds
        seen = {(check.inputs, check.batch_size) for check in verification.checks}
        assert seen == {("photos", 1), ("photos", 8), ("random", 1), ("random", 8)}
        for check in verification.checks:
            assert check.images > 0
            figures = check.model_dump()
            for name, bound in bounds[check.inputs].items():
                assert _within(name, figures[name], bound), (precision, check.inputs, name)


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.FP16])
def test_variant_outputs_close_to_fp32(
    resnet50_package: Path, photo_pngs: list[bytes], precision: Precision
) -> None:
    variant = resnet50_package / {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}[precision]
    session = ort.InferenceSession(str(variant), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("images", "tensor(uint8)")]
    assert [(o.name, o.type) for o in session.get_outputs()] == [
        ("logits", "tensor(float)"),
        ("embedding", "tensor(float)"),
    ]
    pixels = photo_pixels(photo_pngs, PreprocessSpec())
    reference = run_onnx(resnet50_package / "model.onnx", pixels)
    got = run_onnx(variant, pixels)
    assert got["logits"].dtype == np.float32
    assert got["embedding"].dtype == np.float32
    bound = verify.TOLERANCES[precision]["photos"]["embedding_min_cosine"]
    assert float(np.min(cosines(got["embedding"], reference["embedding"]))) >= bound
    logits_bound = verify.TOLERANCES[precision]["photos"]["logits_min_cosine"]
    assert float(np.min(cosines(got["logits"], reference["logits"]))) >= logits_bound
    # A lower precision that changes nothing was not really built.
    assert not np.array_equal(got["embedding"], reference["embedding"])


def test_int8_graph_is_quantised(resnet50_package: Path) -> None:
    path = resnet50_package / "model.int8.onnx"
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert len(convs) == 53  # ResNet-50
    # The stem and the first stage (10 convolutions, and stage 2's first 1x1 convolution,
    # which runs at stage 1's resolution) stay in float; every other convolution's weight is
    # int8, dequantised in the graph.
    float_convs, int8_convs = convs[:12], convs[12:]
    for conv in float_convs:
        assert initializers[conv.input[1]].data_type == onnx.TensorProto.FLOAT
    for conv in int8_convs:
        dequantize = producers[conv.input[1]]
        assert dequantize.op_type == "DequantizeLinear"
        assert initializers[dequantize.input[0]].data_type == onnx.TensorProto.INT8
    fp32_bytes = (resnet50_package / "model.onnx").stat().st_size
    assert path.stat().st_size < 0.4 * fp32_bytes


def test_fp16_graph_has_float16_weights(resnet50_package: Path) -> None:
    model = onnx.load(str(resnet50_package / "model.fp16.onnx"))
    types = {init.name: init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types.values()
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert len(convs) == 53
    assert all(types[conv.input[1]] == onnx.TensorProto.FLOAT16 for conv in convs)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.UINT8]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT,
    ]


# ----------------------------------------------------------------------- 6. bad input


@dataclass
class BadInput:
    argv: list[str]
    expect: list[str]  # substrings of the error line
    out: Path
    before_loading: bool = False  # must fail before any model is loaded


Setup = Callable[[Path, StateDictFiles], BadInput]


def _missing_weights(tmp: Path, _w: StateDictFiles) -> BadInput:
    missing = tmp / "nope.pth"
    argv = ["--arch", "resnet18", "--weights-file", str(missing)]
    return BadInput(argv, ["does not exist", str(missing)], tmp / "pkg")


def _corrupt(suffix: str) -> Setup:
    def setup(tmp: Path, _w: StateDictFiles) -> BadInput:
        path = tmp / f"corrupt{suffix}"
        path.write_bytes(np.random.default_rng(11).bytes(4096))
        argv = ["--arch", "resnet18", "--weights-file", str(path)]
        return BadInput(argv, ["cannot read weights file", str(path)], tmp / "pkg")

    return setup


def _arch_mismatch(tmp: Path, weights: StateDictFiles) -> BadInput:
    resnet18_keys = set(weights.model.state_dict())
    missing = sorted(weights.resnet50_keys - resnet18_keys)
    unexpected = sorted(resnet18_keys - weights.resnet50_keys)
    assert missing
    argv = ["--arch", "resnet50", "--weights-file", str(weights.pth)]
    expect = [
        "does not match resnet50",
        f"{len(missing)} missing keys",
        f"{len(unexpected)} unexpected keys",
        *missing[:5],
    ]
    return BadInput(argv, expect, tmp / "pkg")


def _num_classes_mismatch(tmp: Path, weights: StateDictFiles) -> BadInput:
    argv = ["--arch", "resnet18", "--weights-file", str(weights.pth), "--num-classes", "1000"]
    return BadInput(
        argv, ["num_classes mismatch", "10 classes", "--num-classes is 1000"], tmp / "p"
    )


def _hf_without_weights(tmp: Path, _w: StateDictFiles) -> BadInput:
    checkpoint = tmp / "hf"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "resnet", "num_labels": 3}))
    expect = ["has no weights", "model.safetensors", "pytorch_model.bin"]
    return BadInput(["--hf-dir", str(checkpoint)], expect, tmp / "pkg")


def _hf_missing_dir(tmp: Path, _w: StateDictFiles) -> BadInput:
    checkpoint = tmp / "no-such-checkpoint"
    return BadInput(["--hf-dir", str(checkpoint)], ["does not exist", str(checkpoint)], tmp / "pkg")


def _empty_calibration(tmp: Path, _w: StateDictFiles) -> BadInput:
    photos = tmp / "photos"
    photos.mkdir()
    (photos / "notes.txt").write_text("not an image")
    argv = ["--random-init", "--arch", "resnet18", "--precision", "int8"]
    argv += ["--calibration-dir", str(photos)]
    return BadInput(argv, ["holds no images", str(photos)], tmp / "pkg", before_loading=True)


def _missing_calibration(tmp: Path, _w: StateDictFiles) -> BadInput:
    photos = tmp / "no-photos"
    argv = ["--random-init", "--arch", "resnet18", "--precision", "int8"]
    argv += ["--calibration-dir", str(photos)]
    return BadInput(argv, ["does not exist", str(photos)], tmp / "pkg", before_loading=True)


def _unwritable_out(tmp: Path, _w: StateDictFiles) -> BadInput:
    blocker = tmp / "file.txt"
    blocker.write_text("a regular file")
    out = blocker / "out"
    argv = ["--random-init", "--arch", "resnet18"]
    return BadInput(argv, [str(blocker)], out, before_loading=True)


def _existing_out(tmp: Path, _w: StateDictFiles) -> BadInput:
    out = tmp / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["--random-init", "--arch", "resnet18"]
    return BadInput(argv, ["already exists", str(out), "--force"], out, before_loading=True)


def _wrong_label_count(tmp: Path, weights: StateDictFiles) -> BadInput:
    labels = tmp / "labels.txt"
    labels.write_text("".join(f"name {index}\n" for index in range(9)))
    argv = ["--arch", "resnet18", "--weights-file", str(weights.pth), "--num-classes", "10"]
    argv += ["--labels", str(labels)]
    expect = [str(labels), "has 9 names", "10 classes"]
    return BadInput(argv, expect, tmp / "pkg", before_loading=True)


BAD_INPUTS: dict[str, Setup] = {
    "missing-weights-file": _missing_weights,
    "corrupt-pth": _corrupt(".pth"),
    "corrupt-safetensors": _corrupt(".safetensors"),
    "arch-mismatch": _arch_mismatch,
    "num-classes-mismatch": _num_classes_mismatch,
    "hf-dir-without-weights": _hf_without_weights,
    "hf-dir-missing": _hf_missing_dir,
    "empty-calibration-dir": _empty_calibration,
    "missing-calibration-dir": _missing_calibration,
    "out-parent-is-a-file": _unwritable_out,
    "existing-out-without-force": _existing_out,
    "labels-wrong-count": _wrong_label_count,
}


def _tripwire(name: str) -> Callable[..., Any]:
    def fail(*_args: object, **_kwargs: object) -> Any:
        raise AssertionError(f"{name} was called, but the input should have been rejected first")

    return fail


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(
    tmp_path: Path,
    resnet18_weights: StateDictFiles,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    bad = BAD_INPUTS[case](tmp_path, resnet18_weights)
    monkeypatch.setattr(graph, "export_onnx", _tripwire("export_onnx"))
    if bad.before_loading:
        for loader in ("load_random_init", "load_weights_file", "load_huggingface"):
            monkeypatch.setattr(sources, loader, _tripwire(loader))
    before = snapshot(tmp_path)
    out_existed = bad.out.exists()

    code = main([*bad.argv, "--out", str(bad.out), "--quiet"])

    captured = capsys.readouterr()
    assert code == 2
    line = error_line(captured.err)
    # --quiet: the error is all there is to read.
    assert captured.err.strip().splitlines() == [line]
    for expected in bad.expect:
        assert expected in line
    assert captured.out == ""
    assert bad.out.exists() is out_existed
    assert snapshot(tmp_path) == before  # nothing written, nothing removed
    assert staging_leftovers(tmp_path) == []


def test_unknown_arch_is_an_argparse_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pkg"
    with pytest.raises(SystemExit) as exited:
        main(["--random-init", "--arch", "resnet99", "--out", str(out)])
    assert exited.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert "--arch" in line
    assert "resnet99" in line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ 7. verification failure


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-out", "force-over-package"])
def test_verification_failure_exits_3_and_leaves_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    existing: bool,
) -> None:
    fp32 = verify.TOLERANCES[Precision.FP32]
    impossible = {name: {**bounds, "logits_min_cosine": 1.1} for name, bounds in fp32.items()}
    monkeypatch.setitem(verify.TOLERANCES, Precision.FP32, impossible)
    out = tmp_path / "pkg"
    argv = ["--random-init", "--arch", "resnet18", "--out", str(out)]
    if existing:  # --force must not touch the old package unless the new one verifies
        out.mkdir()
        (out / "manifest.json").write_text('{"old": true}')
        (out / "model.onnx").write_bytes(b"old graph")
        argv.append("--force")
    before = snapshot(tmp_path)

    code = main(argv)

    captured = capsys.readouterr()
    assert code == 3
    line = error_line(captured.err)
    assert "fp32" in line
    assert "logits_min_cosine" in line
    assert ">= 1.1" in line
    assert "OUT OF TOLERANCE" in captured.err  # the per-check report says which check broke
    assert out.exists() is existing
    assert snapshot(tmp_path) == before
    assert staging_leftovers(tmp_path) == []


# ------------------------------------------------------------- 8. --force, --precision


def test_force_replaces_package_and_builds_each_variant_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "stale.txt").write_text("from the old package")
    (out / "manifest.json").write_text('{"old": true}')
    (out / "model.fp16.onnx").write_bytes(b"old fp16 graph")
    calls: dict[str, int] = {"to_int8": 0, "to_fp16": 0}

    def counting(name: str) -> Callable[..., Any]:
        original = getattr(variants, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(variants, name, counting(name))

    stderr = export_ok(
        capsys,
        *("--random-init", "--arch", "resnet18", "--out", str(out), "--force"),
        *("--precision", "fp32", "--precision", "int8", "--precision", "int8"),
    )

    assert calls == {"to_int8": 1, "to_fp16": 0}
    assert stderr.count("verifying int8 against fp32-onnx ...") == 1
    assert stderr.count("verifying fp32 against pytorch ...") == 1
    assert sorted(path.name for path in out.iterdir()) == [
        "labels.json",
        "manifest.json",
        "model.int8.onnx",
        "model.onnx",
    ]
    package = ModelPackage.load(out)
    assert set(package.manifest.variants) == {Precision.FP32, Precision.INT8}
    assert package.manifest.arch == "resnet18"
    for variant in package.manifest.variants.values():
        assert variant.sha256 == sha256(out / variant.file)
    assert staging_leftovers(tmp_path) == []
    assert [path.name for path in tmp_path.iterdir()] == ["pkg"]


# --------------------------------------------------------------------------- 9. --help


def test_module_help_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "model_export", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--weights-file", "--hf-dir", "--random-init", "--precision", "--calibration-dir"):
        assert flag in result.stdout
