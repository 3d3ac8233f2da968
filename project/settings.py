"""Settings of the demo project, read from environment variables.

REDIS_URL          Redis for quota windows and (by default) the Celery broker.
DATABASE_URL       the usage ledger; default SQLite under var/.
CELERY_BROKER_URL  default: REDIS_URL, under this instance's key prefix.
"""

import json
import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("SECRET_KEY", "demo-only-insecure-key-change-me")
DEBUG = os.environ.get("DEBUG", "0") == "1"
ALLOWED_HOSTS = os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    # OpenAPI: the schema at /api/schema/, Swagger UI at /api/docs/ (assets served locally).
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "quotas",
    "project.gateway",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (the admin's CSS and scripts) from STATIC_ROOT, filled by collectstatic:
    # WhiteNoise, in a form that does not send every ASGI request through a thread.
    "project.static_files.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "quotas.middleware.QuotaMiddleware",
]

if os.environ.get("DEMO_RUN_ID"):  # set by make run, to know its own server when it answers
    MIDDLEWARE.insert(0, "project.devtools.middleware.RunIdMiddleware")

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}",
        conn_max_age=int(os.environ.get("DB_CONN_MAX_AGE", "0")),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file (not :memory:) so Celery workers and servers started by tests share it.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 20

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "demo",
        "OPTIONS": {
            # Short timeouts: a dead Redis must never hang a request.
            "SOCKET_CONNECT_TIMEOUT": 0.25,
            "SOCKET_TIMEOUT": 0.25,
        },
    },
}

QUOTAS = {
    "CACHE_ALIAS": "default",
    "KEY_PREFIX": os.environ.get("QUOTAS_KEY_PREFIX", "quotas"),
    "WINDOW_SECONDS": int(os.environ.get("QUOTAS_WINDOW_SECONDS", "3600")),
    "BUCKET_SECONDS": float(os.environ.get("QUOTAS_BUCKET_SECONDS", "60")),
    "FAILURE_POLICY": os.environ.get("QUOTAS_FAILURE_POLICY", "open"),
    "LEDGER_BATCH_SECONDS": float(os.environ.get("QUOTAS_LEDGER_BATCH_SECONDS", "0.5")),
    "SETTLE_BATCH_SECONDS": float(os.environ.get("QUOTAS_SETTLE_BATCH_SECONDS", "0")),
    "SETTLE_AFTER_RESPONSE": os.environ.get("QUOTAS_SETTLE_AFTER_RESPONSE", "0") == "1",
    # The provider side (quotas.llm, used when the gateway forwards to an upstream).
    "LLM_CLIENT_FACTORY": "project.gateway.upstream.client_for_provider",
    # GET /metrics: staff users, or this bearer token (unset: staff only).
    "METRICS_TOKEN": os.environ.get("METRICS_TOKEN") or None,
    # Budget alert rules as JSON (a list of rules, see the README's "Budget alerts").
    "ALERTS": json.loads(os.environ.get("QUOTAS_ALERTS") or "[]"),
    "LLM_DEADLINE_SECONDS": float(os.environ.get("QUOTAS_LLM_DEADLINE_SECONDS", "60")),
    "LLM_ATTEMPT_TIMEOUT_SECONDS": float(
        os.environ.get("QUOTAS_LLM_ATTEMPT_TIMEOUT_SECONDS", "30")
    ),
    "LLM_DEGRADE_AFTER_SECONDS": float(os.environ.get("QUOTAS_LLM_DEGRADE_AFTER_SECONDS", "1")),
    "PROVIDER_BREAKER_RESET_SECONDS": float(
        os.environ.get("QUOTAS_PROVIDER_BREAKER_RESET_SECONDS", "10")
    ),
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "project.gateway.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "django-llm-quotas demo",
    "DESCRIPTION": "OpenAI-compatible chat completions under per-user token quotas, and the "
    "quota app's endpoints.",
    "VERSION": "1",
    # 3.1: nullable fields as JSON Schema types, so responses validate with plain jsonschema.
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",  # no CDN: drf-spectacular-sidecar's copy, as static files
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}


# The broker: by default the Redis of the windows, under this instance's own key prefix, so
# two demo instances on one Redis (other databases, or another QUOTAS_KEY_PREFIX) never take
# each other's tasks.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or REDIS_URL
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_TIMEOUT = 1.0
# A dead broker fails a publish at once (kombu would otherwise reconnect for up to
# CELERY_BROKER_CONNECTION_TIMEOUT); quotas then writes the usage row itself.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "socket_connect_timeout": 1,
    "socket_timeout": 1,
    "max_retries": 0,
    "global_keyprefix": f"{CACHES['default']['KEY_PREFIX']}:{QUOTAS['KEY_PREFIX']}:celery:",
}
CELERY_TASK_ALWAYS_EAGER = os.environ.get("CELERY_TASK_ALWAYS_EAGER", "0") == "1"
CELERY_BEAT_SCHEDULE = {
    # Writes the ledger rows waiting in Redis (and expires overdue reservations): how often
    # it runs is how fresh the ledger is, and how much usage a Redis that loses its data
    # without persistence could take with it.
    "quotas-flush-ledger": {
        "task": "quotas.tasks.flush_ledger",
        "schedule": 2.0,
    },
    "quotas-audit-windows": {
        "task": "quotas.tasks.audit_windows",
        "schedule": 300.0,
    },
    # Refusal counts (429s by limit) copied from Redis into the usage rollups.
    "quotas-roll-up-refusals": {
        "task": "quotas.tasks.roll_up_refusals",
        "schedule": 60.0,
    },
    # Ledger rows past QUOTAS["LEDGER_RETENTION_DAYS"] are deleted (rollups stay).
    "quotas-prune-ledger": {
        "task": "quotas.tasks.prune_ledger",
        "schedule": 3600.0,
    },
    # Deferred LLM jobs whose message was lost are queued again; late ones expire.
    "quotas-sweep-jobs": {
        "task": "quotas.tasks.sweep_jobs",
        "schedule": 60.0,
    },
}

# Demo gateway: the fake model, or an upstream OpenAI-compatible API.
GATEWAY = {
    "UPSTREAM_URL": os.environ.get("GATEWAY_UPSTREAM_URL", ""),
    "UPSTREAM_API_KEY": os.environ.get("GATEWAY_UPSTREAM_API_KEY", ""),
    # The name the upstream's learned limits and circuit breaker are shared under.
    "UPSTREAM_PROVIDER": os.environ.get("GATEWAY_UPSTREAM_PROVIDER", "upstream"),
    "FAKE_ANSWER_TOKENS": int(os.environ.get("GATEWAY_FAKE_ANSWER_TOKENS", "300")),
    # The fake model's streams take this long (a model generating); 0: at once. Under ASGI
    # the stream is an async generator (asyncio.sleep), under WSGI a sync one.
    "FAKE_STREAM_SECONDS": float(os.environ.get("GATEWAY_FAKE_STREAM_SECONDS", "0")),
    # Served under ASGI (project.asgi sets it): the chat view runs in a pool of this many
    # threads, and its streams on the event loop (project.gateway.threads).
    "ASGI": os.environ.get("GATEWAY_ASGI", "") == "1",
    "SYNC_THREADS": int(os.environ.get("GATEWAY_SYNC_THREADS", "4")),
    "ENFORCE_QUOTAS": os.environ.get("GATEWAY_ENFORCE_QUOTAS", "1") != "0",
    # A request body must arrive within this many seconds (project.request_body).
    "BODY_TIMEOUT_SECONDS": float(os.environ.get("GATEWAY_BODY_TIMEOUT_SECONDS", "15")),
}

AUTH_PASSWORD_VALIDATORS = []
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"  # manage.py collectstatic (make run does it); WhiteNoise serves
STATIC_ROOT.mkdir(exist_ok=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "quotas": {"handlers": ["console"], "level": "INFO"},
        # Every 500 with its traceback (Django only prints them with DEBUG on, else mails
        # ADMINS, of which the demo has none).
        "django.request": {"handlers": ["console"], "level": "ERROR", "propagate": False},
    },
}
