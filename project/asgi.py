"""ASGI entry point of the demo project (what ``make run`` serves, with uvicorn).

``GATEWAY_ASGI=1`` tells the gateway it is served under ASGI: its chat view then runs in a
bounded pool of threads and streams on the event loop (``project.gateway.threads``).
"""

import os
import warnings

from django.core.asgi import get_asgi_application

# WhiteNoise answers the admin's static files with sync file iterators, which Django reads
# whole under ASGI (and warns each time): harmless for those few small files. (Serve static
# files from a proxy or CDN in production.)
warnings.filterwarnings(
    "ignore", message="StreamingHttpResponse must consume synchronous iterators"
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("GATEWAY_ASGI", "1")
application = get_asgi_application()
