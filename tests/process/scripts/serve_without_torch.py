"""Run `resnet-serve` in a process where torch, torchvision and transformers cannot be
imported at all, then report whether any of them got into sys.modules."""

import importlib.abc
import sys

BLOCKED = ("torch", "torchvision", "transformers", "onnxscript", "safetensors")


class BlockExportStack(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is blocked: the service must not import it")
        return None


sys.meta_path.insert(0, BlockExportStack())

from service.cli import main  # noqa: E402

code = main(sys.argv[1:])
loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
print(f"export-stack modules loaded: {loaded}", flush=True)
sys.exit(code)
