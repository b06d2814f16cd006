"""Schema-driven fuzzing: schemathesis generates requests from the live server's OpenAPI
document (every operation: valid and invalid bodies in each documented media type, odd
query strings, wrong methods) and checks every answer. No request may get a 5xx; answers
must use the documented status codes, content types and response schemas.

The engine is a `FakeEngine` (the fuzzer exercises the HTTP layer, payload parsing and
decoding, which are all real); the model package is the real ResNet-18 one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from service.config import Settings
from service.frontend.app import create_app
from service.model_package import ModelPackage
from tests.frontend.hostile import LIMITS
from tests.support import FakeEngine, metric_value, running_server

# Examples per operation and phase: about 800 requests, ~12 s on 2 cores (quiet machine).
MAX_EXAMPLES = int(os.environ.get("RESNET_FUZZ_EXAMPLES", "300"))
SEED = int(os.environ.get("RESNET_FUZZ_SEED", "7"))
TIME_LIMIT_S = 180

# Not run: `negative_data_rejection` (the service accepts `"top_k": null` as "the default",
# where the schema says integer) and `positive_data_acceptance` (a schema-valid body may be
# an undecodable image, or carry more images than the limit: a documented 400/413). Both are
# statements about the schema's precision, not server faults.
CONFIG = """
workers = 1
request-timeout = 20

[generation]
max-examples = {max_examples}
database = "none"

[checks]
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_headers_conformance.enabled = true
response_schema_conformance.enabled = true
unsupported_method.enabled = true
negative_data_rejection.enabled = false
positive_data_acceptance.enabled = false
"""


def interactions(report: Path) -> list[dict]:
    """Every request schemathesis sent, with its response, from its NDJSON event log."""
    found = []
    for line in report.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished and finished.get("recorder"):
            found += finished["recorder"].get("interactions", {}).values()
    return found


def test_fuzzing_the_openapi_document_finds_no_server_error(
    resnet18_package: Path, tmp_path: Path
) -> None:
    engine = FakeEngine(num_classes=ModelPackage.load(resnet18_package).manifest.num_classes)
    settings = Settings(model_dir=resnet18_package, **LIMITS)
    app = create_app(settings, engine_factory=engine.factory)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(max_examples=MAX_EXAMPLES))
    report = tmp_path / "events.ndjson"
    with running_server(app) as url:
        command = [
            *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run"),
            f"{url}/openapi.json",
            *("--seed", str(SEED), "--no-color"),
            *("--report", "ndjson", "--report-ndjson-path", str(report)),
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=TIME_LIMIT_S, cwd=tmp_path
        )
        metrics = app.state.metrics.render().decode()
    sent = interactions(report) if report.exists() else []
    statuses = [item["response"]["status_code"] for item in sent if item.get("response")]
    per_operation = Counter(
        f"{item['request']['method']} {urlsplit(item['request']['uri']).path}" for item in sent
    )
    print(
        f"\nschemathesis: {len(sent)} requests over {len(per_operation)} method+path pairs "
        f"(seed {SEED}, {MAX_EXAMPLES} examples a phase): {dict(per_operation.most_common())}"
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert len(sent) >= 100, result.stdout[-3000:]
    assert [status for status in statuses if status >= 500] == []
    documented = {"POST /predict", "POST /embed", "GET /healthz", "GET /readyz", "GET /info"}
    assert documented | {"GET /metrics"} <= set(per_operation)
    for line in metrics.splitlines():
        if line.startswith("resnet_requests_total{") and 'status="5' in line:
            assert float(line.rpartition(" ")[2]) == 0, line
    assert metric_value(metrics, "resnet_rejections_total", {"reason": "internal"}) == 0
