# Each target sets up what it needs (a .venv with the right extras) first.
.PHONY: install serve test lint bench overload export clean

install:
	scripts/setup.sh

serve:
	scripts/serve.sh

test:
	scripts/test.sh

lint:
	scripts/lint.sh

bench:
	scripts/setup.sh
	.venv/bin/python -m loadtests $(BENCH_ARGS)

overload:
	scripts/setup.sh
	.venv/bin/python -m loadtests.overload $(OVERLOAD_ARGS)

clean:
	rm -rf .venv models loadtests/results .pytest_cache .ruff_cache .mypy_cache
