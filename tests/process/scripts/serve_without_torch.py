"""Run `resnet-serve` in a process where torch, torchvision and transformers cannot be
imported at all, then report whether any of them got into sys.modules. The engine and
front-end processes it spawns import this module first (as `__mp_main__`), so the block
holds in them too: an import there fails and the server never gets ready."""

import importlib.abc
import sys

BLOCKED = ("torch", "torchvision", "transformers", "onnxscript", "safetensors")


class BlockExportStack(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is blocked: the service must not import it")
        return None


sys.meta_path.insert(0, BlockExportStack())

if __name__ == "__main__":
    from service.cli import main

    code = main(sys.argv[1:])
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    print(f"export-stack modules loaded: {loaded}", flush=True)
    sys.exit(code)
