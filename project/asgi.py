"""ASGI entry point of the demo project (what ``make run`` serves, with uvicorn).

``GATEWAY_ASGI=1`` tells the gateway it is served under ASGI: its chat view then runs in a
bounded pool of threads and streams on the event loop (``project.gateway.threads``).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("GATEWAY_ASGI", "1")
application = get_asgi_application()
