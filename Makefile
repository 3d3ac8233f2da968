# Developer entry points. Everything runs inside .venv; Redis is found (or started) by
# project/devtools/with_redis.py, so `make run` and `make test` work on a bare machine.

PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WITH_REDIS := $(VPY) -m project.devtools.with_redis
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
MUTATE_ARGS ?=

.PHONY: venv run test matrix dist lint bench mutate clean

venv: $(STAMP)

# Reinstall only when the pinned requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -r requirements.txt
	$(VPY) -m pip install -e . --no-deps
	touch $(STAMP)

# PORT (default 8000) is checked first: taken, make run stops at once. Migrating, seeding
# (under the same Redis as the servers: saving plans drops cached limits there) and
# collectstatic happen in project.devtools.run.
run: venv
	$(VPY) -m project.devtools.run --check-port
	$(WITH_REDIS) $(VPY) -m project.devtools.run

# Two pytest processes (pytest-xdist; each test file runs whole in one of them), so the tests
# that wait on servers and workers overlap; PYTEST_WORKERS=0 runs the suite in one process.
test: venv
	$(WITH_REDIS) $(VPY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Every other cell of the supported-versions matrix (noxfile.py): CI's (tag ci) and the rest.
matrix: venv
	$(VENV)/bin/nox --tags ci more

# The sdist and the wheel, in dist/ (tests/test_wheel.py checks what they carry).
dist: venv
	rm -rf dist
	$(VPY) -m build --outdir dist .
	$(VPY) -m twine check --strict dist/*

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy quotas
	$(VENV)/bin/lint-imports

bench: venv
	$(WITH_REDIS) $(VPY) bench/run_all.py

# Plant each deliberate bug of tools/mutations.py and check the fast tests catch it.
mutate: venv
	$(WITH_REDIS) $(VPY) tools/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) .nox build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
	rm -rf var/redis-embedded var/celerybeat-schedule* var/test-db.sqlite3* var/static var/mutate
	rm -rf var/prometheus
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
