"""Settings of the demo project for the end-to-end benchmark's servers.

The demo's settings, with every Redis key the servers write (quota windows, cache, Celery
broker messages) under the run's ``BENCH_PREFIX``, so the run's clean-up finds them all and a
shared Redis is left as it was. ``GATEWAY_ENFORCE_QUOTAS`` (read by the demo settings) turns
the quota throttle off for the baseline run.
"""

import os

from project.settings import *  # noqa: F403
from project.settings import CACHES, CELERY_BROKER_TRANSPORT_OPTIONS, MIDDLEWARE, QUOTAS

PREFIX = os.environ["BENCH_PREFIX"]

CACHES = {"default": {**CACHES["default"], "KEY_PREFIX": PREFIX}}
QUOTAS = {**QUOTAS, "KEY_PREFIX": f"{PREFIX}:q"}
# Nothing consumes the ledger tasks during the run: keep them under the prefix (the clean-up
# deletes them) rather than in a queue some other worker on this Redis may be reading.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    **CELERY_BROKER_TRANSPORT_OPTIONS,
    "global_keyprefix": f"{PREFIX}:celery:",
}

# A reference point instead of the quotas (see e2e_peers): "ping" or "drf".
PEER = os.environ.get("BENCH_E2E_PEER", "")
if PEER:
    peer = {"ping": "PingPerRequest", "drf": "DRFThrottlePerRequest"}[PEER]
    MIDDLEWARE = [*MIDDLEWARE, f"e2e_peers.{peer}"]

# The latency server answers every mode from one process (see e2e_urls).
if os.environ.get("BENCH_E2E_ROUTES"):
    ROOT_URLCONF = "e2e_urls"
