"""WSGI entry point of the demo project: Django, behind the request body guard."""

import gc
import os

from django.core.wsgi import get_wsgi_application

from project.request_body import RequestBodyGuard

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_application = get_wsgi_application()


def _body_limit() -> int:
    """What the gateway reads at most: Django's upload limit and the quota estimator's."""
    from django.conf import settings

    from quotas.conf import quota_settings

    limit = quota_settings.MAX_BODY_BYTES
    return min(settings.DATA_UPLOAD_MAX_MEMORY_SIZE or limit, limit)


def _body_timeout() -> float:
    from django.conf import settings

    return float(settings.GATEWAY["BODY_TIMEOUT_SECONDS"])


application = RequestBodyGuard(django_application, limit=_body_limit, timeout=_body_timeout)

# Everything loaded so far lives as long as the worker: out of the collector's sight, a full
# collection no longer walks it (about 80 ms for the demo, the worker stalled meanwhile).
gc.freeze()
