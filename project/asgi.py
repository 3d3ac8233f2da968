"""ASGI entry point of the demo project (what ``make run`` serves, with uvicorn).

``GATEWAY_ASGI=1`` tells the gateway it is served under ASGI: its chat view then runs in a
bounded pool of threads and streams on the event loop (``project.gateway.threads``).
``GATEWAY_ADMISSION_LIMIT`` (8) requests are admitted at a time (``project.admission``).
"""

import gc
import os
import sys
import warnings

import django

# WhiteNoise answers the admin's static files with sync file iterators, which Django reads
# whole under ASGI (and warns each time): harmless for those few small files. (Serve static
# files from a proxy or CDN in production.)
warnings.filterwarnings(
    "ignore", message="StreamingHttpResponse must consume synchronous iterators"
)

# The event loop shares the GIL with the threads sync views run in: a thread holds it for at
# most this long before the loop gets it back (Python's default is 5 ms).
sys.setswitchinterval(0.001)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("GATEWAY_ASGI", "1")
django.setup(set_prefix=False)

from project.handler import PooledASGIHandler  # noqa: E402

# Django's handler, without a thread started per request (see project.handler).
django_application = PooledASGIHandler()

from project.admission import AdmissionLimit  # noqa: E402

# Requests admitted at once (started, headers not yet sent; see project.admission).
application = AdmissionLimit(
    django_application, int(os.environ.get("GATEWAY_ADMISSION_LIMIT", "8"))
)

# Everything loaded so far lives as long as the process: out of the collector's sight, a full
# collection no longer walks it (about 80 ms for the demo, the event loop stalled meanwhile).
gc.freeze()
