"""Settings, all from the environment, with defaults that make a fresh checkout just work.

Every variable is listed in the README. A malformed value stops start-up with a message that
names the variable, never a traceback deep inside Django.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from pythonjsonlogger.core import RESERVED_ATTRS

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {value!r}")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, not {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {number}")
    return number


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {value!r}") from None
    if not number >= minimum:  # also refuses NaN
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {value}")
    return number


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    # Never a public default outside DEBUG: django-q2 signs the pickled tasks it hands to
    # workers with this key, and Django signs sessions and password-reset links.
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set it to a long random value, the same for every web and "
            "worker process, e.g. SECRET_KEY=\"$(python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(50))')\"; ./scripts/serve, ./scripts/manage and "
            "./scripts/test make one for you, and DEBUG=1 runs with a development key."
        )
    SECRET_KEY = "insecure-development-key-for-DEBUG-only"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- HTTPS and security headers (Django's deployment checklist; README "Running in production")

# Clients reach the service over HTTPS only, directly or through a proxy that terminates TLS:
# plain HTTP is redirected, browsers are told to keep to HTTPS (HSTS), cookies never go over HTTP.
HTTPS_ONLY = env_bool("HTTPS_ONLY", False)
# Opt-in: only behind a proxy that sets this header to "https" and drops it from clients, or a
# client could forge it. (uvicorn and gunicorn already trust X-Forwarded-Proto from 127.0.0.1.)
_proxy_ssl_header = env_str("SECURE_PROXY_SSL_HEADER", "").strip()
if _proxy_ssl_header:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", _proxy_ssl_header):
        raise ImproperlyConfigured(
            f"SECURE_PROXY_SSL_HEADER must be a header name such as X-Forwarded-Proto, not {_proxy_ssl_header!r}"
        )
    _meta_name = _proxy_ssl_header.upper().replace("-", "_")
    SECURE_PROXY_SSL_HEADER = (_meta_name if _meta_name.startswith("HTTP_") else f"HTTP_{_meta_name}", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", HTTPS_ONLY)
# Load balancers probe, and Prometheus scrapes, over plain HTTP from inside the network: a
# redirect would fail them.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000 if HTTPS_ONLY else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", HTTPS_ONLY)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", HTTPS_ONLY)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", HTTPS_ONLY)
# Fixed: nothing this service serves is meant to be sniffed, framed or told where it came from.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# project/csp.py. Only this origin's scripts run, none inline: the admin has none, Swagger UI
# loads its set-up script from /v1/docs?script (drf-spectacular's split view), Redoc none.
# Inline styles stay allowed: Redoc writes <style> tags at run time (styled-components) and the
# pages set style attributes, which no nonce or hash can cover. Swagger UI's icons are data: SVGs;
# Redoc builds its search index in a worker made from a blob. (Redoc's sidebar credit loads a
# logo from cdn.redoc.ly: blocked, one console report, and Redoc hides the image.)
SECURE_CSP: dict[str, list[str]] = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'", "'unsafe-inline'"],
    "img-src": ["'self'", "data:"],
    "worker-src": ["'self'", "blob:"],
    "object-src": ["'none'"],
    "base-uri": ["'none'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}
SILENCED_SYSTEM_CHECKS = [
    # HSTS preload (check --deploy's W021) puts the whole domain and its subdomains on the
    # browsers' HTTPS-only list, which takes months to undo: the domain owner's decision, made
    # with SECURE_HSTS_PRELOAD=true, not a default of one service.
    "security.W021",
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework_api_key",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "messaging",
]

MIDDLEWARE = [
    "messaging.middleware.RequestIDMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "project.csp.ContentSecurityPolicyMiddleware",
    # Serves the admin's and Swagger UI/Redoc's static files from this process: no CDN, no
    # separate web server needed.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "project" / "templates"],
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

# --- Database -------------------------------------------------------------------------------

# Where the service keeps its files: the SQLite database and collected static files.
DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "var")))
DATA_DIR.mkdir(parents=True, exist_ok=True)
DATABASE_URL = env_str("DATABASE_URL", "")

if DATABASE_URL:
    try:
        _database = dj_database_url.parse(DATABASE_URL, conn_max_age=600, conn_health_checks=True)
    except Exception as exc:  # dj-database-url raises several kinds for a bad URL
        raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
else:
    _database = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DATA_DIR / "db.sqlite3",
        # Persistent connections: reconnecting per query costs django-q2's ORM broker
        # two orders of magnitude in enqueue rate.
        "CONN_MAX_AGE": 600,
    }

if _database["ENGINE"] == "django.db.backends.sqlite3":
    _database["OPTIONS"] = {
        # WAL lets readers run beside the one writer; IMMEDIATE takes the write lock at BEGIN,
        # so a transaction never fails half-way on a lock upgrade ("database is locked").
        "init_command": (
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;"
        ),
        "transaction_mode": "IMMEDIATE",
        "timeout": env_int("SQLITE_BUSY_TIMEOUT", 20),
    }
    _database["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
elif _database["ENGINE"] == "django.db.backends.postgresql" and sys.argv[1:2] != ["qcluster"]:
    # A pool, not persistent connections: under ASGI each request runs its sync code on a
    # thread of its own, so a per-thread persistent connection would be opened per request
    # and never reused. Django hands connections back to the pool at the end of a request.
    # Not for qcluster: it forks its workers after using the database, and psycopg's pool is
    # not fork-safe (a forked worker would talk over its parent's sockets); its single-threaded
    # workers keep persistent connections, which django-q2 closes before forking.
    _database["CONN_MAX_AGE"] = 0
    # psycopg's pool discards a connection that broke (a database restart) when it is returned.
    _database["CONN_HEALTH_CHECKS"] = False
    _database.setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("DATABASE_POOL_MIN_SIZE", 1, minimum=0),
        "max_size": env_int("DATABASE_POOL_MAX_SIZE", 10, minimum=1),
        "timeout": env_float("DATABASE_POOL_TIMEOUT", 10.0, minimum=0.1),
    }
elif not _database["ENGINE"]:
    raise ImproperlyConfigured(f"DATABASE_URL scheme is not supported: {DATABASE_URL!r}")

DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: the broker and the cache --------------------------------------------------------

REDIS_URL = env_str("REDIS_URL", "")
if REDIS_URL and urlsplit(REDIS_URL).scheme not in {"redis", "rediss", "unix"}:
    raise ImproperlyConfigured(f"REDIS_URL must be a redis:// URL, not {REDIS_URL!r}")

if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- The messaging service -------------------------------------------------------------------

# How long one message may run before it is stopped and marked failed.
MESSAGING_JOB_TIMEOUT = env_int("MESSAGING_JOB_TIMEOUT", 600, minimum=1)
# A running message renews its lease while it works; a lease that runs out means its worker
# died, and the message is taken up again.
MESSAGING_LEASE_SECONDS = env_float("MESSAGING_LEASE_SECONDS", 30.0, minimum=1.0)
# How often each worker looks for messages whose lease ran out.
MESSAGING_RECOVERY_INTERVAL = env_float("MESSAGING_RECOVERY_INTERVAL", 5.0, minimum=0.1)
# A message whose worker died this many times ends as `error` instead of looping.
MESSAGING_MAX_ATTEMPTS = env_int("MESSAGING_MAX_ATTEMPTS", 3, minimum=1)
# How often a running message checks for cancellation and flushes its events.
MESSAGING_CHECK_INTERVAL = env_float("MESSAGING_CHECK_INTERVAL", 0.25, minimum=0.01)
# Token deltas are written in small batches at most this far apart (stream: true).
MESSAGING_FLUSH_INTERVAL = env_float("MESSAGING_FLUSH_INTERVAL", 0.05, minimum=0.0)
# Streams: a comment line goes out after this many seconds of silence.
MESSAGING_PING_INTERVAL = env_float("MESSAGING_PING_INTERVAL", 15.0, minimum=0.1)
# SQLite has no notifications: each web process polls its watched messages this often.
MESSAGING_POLL_INTERVAL = env_float("MESSAGING_POLL_INTERVAL", 0.05, minimum=0.005)
# Messages one worker process runs at once (its slots). A message waiting on its model costs a
# few kilobytes, so this is bound by what the upstreams allow, not by this machine.
MESSAGING_CONCURRENCY = env_int("MESSAGING_CONCURRENCY", 256, minimum=1)
# Database connections (and threads) each process's runner uses for all its messages.
MESSAGING_DB_CONNECTIONS = env_int("MESSAGING_DB_CONNECTIONS", 4, minimum=1)
# On SIGTERM a worker stops claiming and lets its messages finish for this long, then hands the
# rest back to the queue. Give the process manager's stop timeout more than this.
MESSAGING_DRAIN_SECONDS = env_float("MESSAGING_DRAIN_SECONDS", 10.0, minimum=0.0)
# /readyz wants a worker heartbeat at most this old.
MESSAGING_WORKER_STALE_SECONDS = env_float("MESSAGING_WORKER_STALE_SECONDS", 30.0, minimum=1.0)
# The delay per word of the built-in `echo-slow` model.
MESSAGING_ECHO_SLOW_DELAY = env_float("MESSAGING_ECHO_SLOW_DELAY", 0.1)
MESSAGING_DEFAULT_MODEL = env_str("MESSAGING_DEFAULT_MODEL", "echo")
# A TOML file of models beyond the built-in echo ones (see messaging/catalog.py and README).
MESSAGING_MODELS_FILE = env_str("MESSAGING_MODELS_FILE", "")
# Bodies larger than this are refused with 413.
MESSAGING_MAX_BODY_BYTES = env_int("MESSAGING_MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024)
# Free-form JSON (tool inputs, schemas, tool_context) nested deeper than this is refused.
MESSAGING_MAX_JSON_DEPTH = env_int("MESSAGING_MAX_JSON_DEPTH", 64, minimum=4)
# A model's answer (text, thinking, tool input) longer than this fails the message: a bound
# on what one message can store, above any model's output limit today (~128k tokens).
MESSAGING_MAX_RESULT_CHARS = env_int("MESSAGING_MAX_RESULT_CHARS", 1_000_000, minimum=1000)
# The outbound policy for MCP servers: loopback, private, link-local and metadata addresses are
# refused unless MESSAGING_MCP_ALLOW_PRIVATE; when hosts are listed, only those (".example.com"
# for a domain and its subdomains).
MESSAGING_MCP_ALLOWED_HOSTS = env_list("MESSAGING_MCP_ALLOWED_HOSTS", [])
MESSAGING_MCP_ALLOW_PRIVATE = env_bool("MESSAGING_MCP_ALLOW_PRIVATE", False)
# Each MCP step (connecting and listing a server's tools, one tool call) gets this long.
MESSAGING_MCP_TIMEOUT = env_float("MESSAGING_MCP_TIMEOUT", 30.0, minimum=0.1)
# A tool's result larger than this (bytes on the wire, and as the result block's JSON) becomes
# an error result the model sees, rather than filling the message.
MESSAGING_MCP_MAX_RESULT_BYTES = env_int("MESSAGING_MCP_MAX_RESULT_BYTES", 1024 * 1024, minimum=1024)
# A message still pending this long after it was accepted ends as `expired` (like Anthropic's
# batches: a day); finished messages older than MESSAGING_RETENTION_DAYS are deleted with their
# events. Both run from a django-q2 schedule the service installs (messaging/maintenance.py).
MESSAGING_PENDING_TTL = env_float("MESSAGING_PENDING_TTL", 24 * 3600.0, minimum=1.0)
MESSAGING_RETENTION_DAYS = env_float("MESSAGING_RETENTION_DAYS", 30.0, minimum=0.0)
# Webhooks (messaging/webhooks.py): each POST may take this long; a failed one is tried again
# after MESSAGING_WEBHOOK_RETRY_BASE seconds, doubling up to an hour, until
# MESSAGING_WEBHOOK_GIVE_UP seconds after the event; workers look for due deliveries every
# MESSAGING_WEBHOOK_INTERVAL seconds (at once when one of their own messages ends).
MESSAGING_WEBHOOK_TIMEOUT = env_float("MESSAGING_WEBHOOK_TIMEOUT", 10.0, minimum=0.1)
MESSAGING_WEBHOOK_RETRY_BASE = env_float("MESSAGING_WEBHOOK_RETRY_BASE", 5.0, minimum=0.01)
MESSAGING_WEBHOOK_GIVE_UP = env_float("MESSAGING_WEBHOOK_GIVE_UP", 24 * 3600.0, minimum=1.0)
MESSAGING_WEBHOOK_INTERVAL = env_float("MESSAGING_WEBHOOK_INTERVAL", 1.0, minimum=0.01)
# Model turns that end in MCP tool calls, per message; past that it completes with
# stop_reason "pause_turn" and the client may send the result back to continue.
MESSAGING_MAX_TOOL_ROUNDS = env_int("MESSAGING_MAX_TOOL_ROUNDS", 10, minimum=1)

# Per-key limits (messaging/ratelimit.py); unset: no limit. An API key's own values (admin) win.
MESSAGING_RATE_LIMIT_RPM = env_int("MESSAGING_RATE_LIMIT_RPM", 0, minimum=1) or None
MESSAGING_MAX_UNFINISHED = env_int("MESSAGING_MAX_UNFINISHED", 0, minimum=1) or None

DATA_UPLOAD_MAX_MEMORY_SIZE = MESSAGING_MAX_BODY_BYTES

# --- Metrics (GET /metrics, messaging/metrics.py) ---------------------------------------------

# Each process keeps its counters and histograms in files of this directory (prometheus_client's
# multiprocess mode, which reads the variable when it is imported: hence here, before anything
# imports it) and a scrape adds up every file. One directory per machine, shared by its web and
# worker processes and emptied before they start (scripts/serve does): until then the counts of
# processes that ended still count.
PROMETHEUS_MULTIPROC_DIR = Path(env_str("PROMETHEUS_MULTIPROC_DIR", "") or DATA_DIR / "metrics")
PROMETHEUS_MULTIPROC_DIR.mkdir(parents=True, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(PROMETHEUS_MULTIPROC_DIR)
# Set: GET /metrics wants `Authorization: Bearer <METRICS_TOKEN>`. Unset: loopback clients only.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")

# --- django-q2 -------------------------------------------------------------------------------

MESSAGING_WORKERS = env_int("MESSAGING_WORKERS", 2, minimum=1)
# A token waits at most a recovery interval for a free slot, then claims in one query.
_q_timeout = int(MESSAGING_RECOVERY_INTERVAL) + 60

Q_CLUSTER = {
    "name": "messaging",
    "workers": MESSAGING_WORKERS,
    # Prefetch little: time in the prefetch queue counts against `retry`.
    "queue_limit": MESSAGING_WORKERS,
    "timeout": _q_timeout,
    # Must exceed the longest run, or the ORM broker hands the same task out twice.
    "retry": _q_timeout + 60,
    # A worker process holds hundreds of messages: never recycle it for having run many tokens
    # (django-q2's default is every 500).
    "recycle": 2**31,
    # Tasks are only tokens that claim a message; failures are ours to count, not django-q2's.
    "max_attempts": 1,
    "ack_failures": True,
    # MessageJob is the record of truth; saving every task's result would also prune
    # inside a write transaction per task.
    "save_limit": -1,
    "catch_up": False,
    # ORM broker: how long an idle cluster sleeps between looks at the queue. Shorter starts
    # messages sooner (bench_ttft) at the cost of more idle queries.
    "poll": env_float("MESSAGING_QUEUE_POLL", 0.02, minimum=0.005),
    "label": "Django Q2",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    # The ORM broker on the same database: storing a message and queuing it is one transaction.
    Q_CLUSTER["orm"] = "default"

# --- REST framework and OpenAPI --------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["messaging.auth.APIKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["messaging.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["messaging.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "messaging.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Messaging API",
    "DESCRIPTION": (
        "Run LLM chat completions as durable background jobs: submit, validate, follow, "
        "read and cancel messages."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Streams and the synchronous endpoint are async views DRF cannot host; documented here.
    "PREPROCESSING_HOOKS": ["messaging.schema.add_async_views"],
    # 429 and the x-ratelimit-* headers on every operation that needs a key (messaging/ratelimit.py).
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "messaging.schema.add_rate_limits"],
    # A component's description is its own serializer's docstring, not a shared base class's.
    "GET_LIB_DOC_EXCLUDES": "messaging.schema.lib_doc_excludes",
    "ENUM_NAME_OVERRIDES": {
        "MessageStatusEnum": "messaging.models.Status",
        "RoleEnum": ["user", "assistant"],
        "ImageMediaTypeEnum": "messaging.serializers.ImageSourceSerializer.IMAGE_TYPES",
    },
    # Our choices' labels are their values: "* `text` - text" would only be noise.
    "ENUM_GENERATE_CHOICE_DESCRIPTION": False,
}

# --- Static files, auth, logging -------------------------------------------------------------

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Tests and development need no collectstatic: WhiteNoise finds the files in the apps.
WHITENOISE_USE_FINDERS = True

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
    raise ImproperlyConfigured(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {LOG_LEVEL!r}")

# plain: a line of text per record; json: one JSON object per line, for a log pipeline.
LOG_FORMAT = (os.environ.get("LOG_FORMAT") or "plain").lower()
if LOG_FORMAT not in {"plain", "json"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, not {LOG_FORMAT!r}")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Every record gets request_id; a message's records its message_id and correlation_id too.
    "filters": {"request_id": {"()": "messaging.middleware.RequestIDLogFilter"}},
    "formatters": {
        "plain": {
            "()": "messaging.middleware.PlainLogFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s",
        },
        # python-json-logger: time, level, logger, process, message, then every field the
        # record carries (request_id, message_id, correlation_id, event, ...).
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(levelname)s %(name)s %(process)d %(message)s",
            "rename_fields": {"levelname": "level", "name": "logger"},
            "timestamp": "time",
            # uvicorn's lines repeat their message with terminal colours.
            "reserved_attrs": [*RESERVED_ATTRS, "color_message"],
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # One access line per request is the service's own (messaging.access, with owner and
        # request_id); uvicorn's would be a second. Its other lines take the service's format.
        "uvicorn": {"handlers": ["console"], "propagate": False},
        "uvicorn.access": {"level": "WARNING"},
        # 4xx answers are in the access line; Django would log each again as a warning.
        # Server errors (5xx) still log here, with their traceback.
        "django.request": {"level": "ERROR"},
        # django-q2 logs every enqueue at INFO; its start-up and worker deaths are WARNING and up.
        "django-q": {"level": env_str("Q_LOG_LEVEL", "WARNING").upper()},
        # httpx logs every request's URL at INFO: model providers' base URLs are the operator's
        # (internal hosts and ports), and the providers log their failures themselves.
        "httpx": {"level": "WARNING"},
        # The same for MCP servers' URLs (the mcp SDK's HTTP client), and the SDK's own chatter
        # (session ids, reconnects) is for debugging it.
        "httpx2": {"level": "WARNING"},
        # Below them, httpcore's DEBUG lines name hosts and ports and print response headers
        # (an MCP server's session id): never, whatever LOG_LEVEL says.
        "httpcore": {"level": "WARNING"},
        "httpcore2": {"level": "WARNING"},
        "mcp": {"level": "WARNING"},
    },
}
