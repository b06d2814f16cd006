"""The inference runtimes an engine can be built on, and whether each is installed.

Imports neither runtime: the supervisor asks before it starts anything (`resnet-serve
--runtime openvino` without the extra fails in one line), and the front-ends never load
a runtime at all.
"""

from __future__ import annotations

import importlib.util

from service.config import Runtime

ONNXRUNTIME: Runtime = "onnxruntime"
OPENVINO: Runtime = "openvino"
# The module each runtime imports, and the extra of this project that installs it.
_MODULES = {ONNXRUNTIME: "onnxruntime", OPENVINO: "openvino"}
_EXTRAS = {ONNXRUNTIME: "cpu] or [gpu", OPENVINO: "openvino"}


def missing(runtime: Runtime) -> str | None:
    """Why `runtime` cannot be used here (one line), or None when it is installed."""
    if importlib.util.find_spec(_MODULES[runtime]) is not None:
        return None
    return (
        f"--runtime {runtime} needs the {_MODULES[runtime]} package, which is not installed: "
        f"pip install 'resnet-serve[{_EXTRAS[runtime]}]'"
    )
