# Two entry points a newcomer needs: `make demo` and `make test`.
.PHONY: setup demo test lint unit cluster-tools

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/branchmerge demo --workdir runs/demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

test: setup lint
	bash scripts/test.sh
