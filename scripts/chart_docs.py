"""Write the values table of helm/resnet-serve/README.md from values.yaml.

A key preceded by a `# -- description` comment is documented (the helm-docs convention);
the keys under `config:` take their description from the service's own settings
(`service.config.Settings`), so the table names each one's environment variable.

    python scripts/chart_docs.py          # rewrite the table
    python scripts/chart_docs.py --check  # exit 1 when README.md is stale (CI)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, get_args

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "resnet-serve"
START, END = "<!-- values:start -->", "<!-- values:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?: |$)")


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def documented_keys(text: str) -> list[tuple[tuple[str, ...], str]]:
    """(path, description) for every documented key, in file order."""
    sys.path.insert(0, str(ROOT))
    from service.config import ENV_PREFIX, Settings

    keys: list[tuple[tuple[str, ...], str]] = []
    path: list[str] = []
    pending: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = stripped[4:].strip()
            continue
        match = KEY.match(line)
        if not match or stripped.startswith("-"):
            continue
        depth = len(match["indent"]) // 2
        path = [*path[:depth], match["key"]]
        if pending is not None:
            keys.append((tuple(path), pending))
        elif len(path) == 2 and path[0] == "config":
            field = Settings.model_fields.get(snake(path[1]))
            if field is None:
                description = "(not a service setting)"
            else:
                choices = ", ".join(str(choice) for choice in get_args(field.annotation))
                description = field.description or f"one of {choices}"
            env = ENV_PREFIX + snake(path[1]).upper()
            keys.append((tuple(path), f"`{env}`: {description}"))
        pending = None
    return keys


def lookup(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = values
    for part in path:
        node = node[part]
    return node


def table(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    rows = ["| Key | Default | Description |", "|---|---|---|"]
    for path, description in documented_keys(values_text):
        default = json.dumps(lookup(values, path), separators=(", ", ": "))
        cell = default.replace("|", "\\|")
        text = description.replace("|", "\\|")
        rows.append(f"| `{'.'.join(path)}` | `{cell}` | {text} |")
    return "\n".join(rows)


def render(readme: str, values_text: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(values_text)}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    args = parser.parse_args()
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    new = render(readme, (CHART / "values.yaml").read_text())
    if args.check:
        if new != readme:
            print("chart_docs: helm/resnet-serve/README.md is stale: run scripts/chart_docs.py")
            return 1
        return 0
    readme_path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
