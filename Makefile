# Developer entry points. Everything runs inside .venv; Redis is found (or started) by
# project/devtools/with_redis.py, so `make run` and `make test` work on a bare machine.

PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WITH_REDIS := $(VPY) -m project.devtools.with_redis
PYTEST_ARGS ?=
MUTATE_ARGS ?=

.PHONY: venv run test lint bench mutate clean

venv: $(STAMP)

# Reinstall only when the pinned requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -r requirements.txt
	$(VPY) -m pip install -e . --no-deps
	touch $(STAMP)

# Migrate and seed under the same Redis as the servers: saving plans drops cached limits there.
run: venv
	$(WITH_REDIS) sh -c '$(VPY) manage.py migrate --noinput && $(VPY) manage.py seed_demo && exec $(VPY) -m project.devtools.run'

test: venv
	$(WITH_REDIS) $(VPY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy quotas

bench: venv
	$(WITH_REDIS) $(VPY) bench/run_all.py

# Plant each deliberate bug of tools/mutations.py and check the fast tests catch it.
mutate: venv
	$(WITH_REDIS) $(VPY) tools/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
	rm -rf var/redis-embedded var/celerybeat-schedule* var/test-db.sqlite3* var/mutate
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
