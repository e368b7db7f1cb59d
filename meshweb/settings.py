"""meshweb settings, all from the environment (see the README's configuration table).

With nothing set, meshweb runs embedded: SQLite in `MESH_DATA_DIR` (default
`./.data`), in-process change notification and background tasks, no Redis.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url

from meshweb.env import env_addr, env_bool, env_choice, env_int, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("MESH_DATA_DIR", str(BASE_DIR / ".data"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)  # keys and tokens live here


def _secret_key() -> str:
    """The key from the environment, else one generated once and kept in the data dir."""
    key = env_str("MESH_SECRET_KEY")
    if key:
        return key
    path = DATA_DIR / "secret-key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("MESH_DEBUG", False)
ALLOWED_HOSTS = [h for h in env_str("MESH_ALLOWED_HOSTS", "*").split(",") if h]

# The URL hosts reach this control plane by (a load balancer, a TLS proxy), as the
# agent install script names it; unset: the URL the script was fetched from.
MESH_PUBLIC_URL = env_str("MESH_PUBLIC_URL").rstrip("/")
MESH_DC = env_str("MESH_DC", "dc1")
MESH_NODE_NAME = env_str("MESH_NODE_NAME", "mesh-server")
MESH_HTTP_ADDR = env_addr("MESH_HTTP_ADDR", "127.0.0.1:8500")
# Cluster peering: the addresses (host:port or URLs) a peer reaches this
# cluster's API at, put in peering tokens (default: MESH_HTTP_ADDR).
MESH_PEERING_ADDRESSES = env_str("MESH_PEERING_ADDRESSES", "")
MESH_DNS_ADDR = (
    env_addr("MESH_DNS_ADDR", "127.0.0.1:8600") if env_str("MESH_DNS_ADDR", "x") else None
)
# The agent protocol (gRPC over TLS, registry.grpc); "" disables it.
MESH_GRPC_ADDR = (
    env_addr("MESH_GRPC_ADDR", "127.0.0.1:8502") if env_str("MESH_GRPC_ADDR", "x") else None
)
# The agent-protocol address hosts outside reach (a layer-4 load balancer in front of
# several servers), named by `mesh join-token create` and the install script; unset:
# MESH_GRPC_ADDR, or for a wildcard listener the host name the request came by.
MESH_GRPC_ADVERTISE_ADDR = (
    env_addr("MESH_GRPC_ADVERTISE_ADDR", "") if env_str("MESH_GRPC_ADVERTISE_ADDR") else None
)
MESH_DNS_DOMAIN = env_str("MESH_DNS_DOMAIN", "consul").strip(".")
MESH_DNS_SERVICE_TTL = env_int("MESH_DNS_SERVICE_TTL", 0, minimum=0)
MESH_ACL_ENABLED = env_bool("MESH_ACL_ENABLED", True)
MESH_ACL_DEFAULT_POLICY = env_choice("MESH_ACL_DEFAULT_POLICY", "deny", ("allow", "deny"))
MESH_ACL_INITIAL_MANAGEMENT_TOKEN = env_str("MESH_ACL_INITIAL_MANAGEMENT_TOKEN")
MESH_ACL_BOOTSTRAP_ON_START = env_bool("MESH_ACL_BOOTSTRAP_ON_START", True)
# The token DNS answers with (Consul's acl.tokens.dns); unset: the one `mesh server`
# made at bootstrap (data dir `dns-token`), else the anonymous token.
MESH_ACL_DNS_TOKEN = env_str("MESH_ACL_DNS_TOKEN")
# Bounds on a token's ExpirationTTL / ExpirationTime (Consul's acl.token_min/max_expiration_ttl).
MESH_ACL_TOKEN_MIN_EXPIRATION_SECONDS = env_int(
    "MESH_ACL_TOKEN_MIN_EXPIRATION_SECONDS", 60, minimum=1
)
MESH_ACL_TOKEN_MAX_EXPIRATION_SECONDS = env_int(
    "MESH_ACL_TOKEN_MAX_EXPIRATION_SECONDS", 24 * 3600, minimum=1
)
# KV values under these prefixes never reach the audit log, not even as a size or
# digest (every other value is recorded only as its size and a digest).
MESH_AUDIT_SENSITIVE_KV_PREFIXES = tuple(
    p.strip()
    for p in env_str("MESH_AUDIT_SENSITIVE_KV_PREFIXES", "secret/,vault/").split(",")
    if p.strip()
)
MESH_MAX_WAIT_SECONDS = env_int("MESH_MAX_WAIT_SECONDS", 600, minimum=1)
MESH_KV_MAX_VALUE_SIZE = env_int("MESH_KV_MAX_VALUE_SIZE", 512 * 1024, minimum=1)
MESH_SESSION_TTL_MIN = float(env_str("MESH_SESSION_TTL_MIN", "10s").removesuffix("s") or "10")
# Consul's limits on `PUT /v1/txn`: operations per transaction, bytes per request.
MESH_TXN_MAX_OPS = env_int("MESH_TXN_MAX_OPS", 128, minimum=1)
MESH_TXN_MAX_REQ_LEN = env_int("MESH_TXN_MAX_REQ_LEN", 512 * 1024, minimum=1024)
# User events: the largest payload (Consul's 512 bytes) and the events kept per datacenter.
MESH_EVENT_MAX_PAYLOAD = env_int("MESH_EVENT_MAX_PAYLOAD", 512, minimum=1)
MESH_EVENT_BUFFER = env_int("MESH_EVENT_BUFFER", 256, minimum=1)
# The largest snapshot `PUT /v1/snapshot` takes (bytes, compressed).
MESH_SNAPSHOT_MAX_SIZE = env_int("MESH_SNAPSHOT_MAX_SIZE", 256 * 1024 * 1024, minimum=1024)
MESH_MAX_BODY_SIZE = env_int("MESH_MAX_BODY_SIZE", 4 * 1024 * 1024, minimum=1024)
MESH_DB_THREADS = env_int("MESH_DB_THREADS", 8, minimum=1)
# Threads serving the REST API, docs and UI (sync Django views).
MESH_API_THREADS = env_int("MESH_API_THREADS", 8, minimum=1)
MESH_TASK_TICK_SECONDS = float(env_str("MESH_TASK_TICK_SECONDS", "1") or "1")
# Connect CA: key(s) encrypting root private keys at rest (Fernet, comma-separated, first
# encrypts; unset: derived from SECRET_KEY with HKDF), CSR signing rate limit, leaf TTL override.
MESH_ENCRYPTION_KEY = env_str("MESH_ENCRYPTION_KEY")
MESH_CA_CSR_RATE = env_str("MESH_CA_CSR_RATE", "50")  # per second; checked by registry.ca
MESH_CA_CSR_MAX_CONCURRENT = env_int("MESH_CA_CSR_MAX_CONCURRENT", 50, minimum=0)
# An agent node not heard from (sync, check update, leaf, config stream) for this
# many seconds gets a critical serfHealth check (registry.domain.enrollment).
MESH_NODE_LIVENESS_TIMEOUT = env_int("MESH_NODE_LIVENESS_TIMEOUT", 60, minimum=2)
# Join attempts with a bad token, per source address: a bucket of this many,
# refilled one every MESH_JOIN_FAILURE_REFILL_SECONDS (then RESOURCE_EXHAUSTED).
MESH_JOIN_FAILURE_BURST = env_int("MESH_JOIN_FAILURE_BURST", 10, minimum=1)
MESH_JOIN_FAILURE_REFILL_SECONDS = env_int("MESH_JOIN_FAILURE_REFILL_SECONDS", 6, minimum=1)
MESH_CA_LEAF_TTL = env_str("MESH_CA_LEAF_TTL")  # a Go duration ("5s"); checked by registry.ca

# Cloud accounts (clouds/): attempts per cloud API call (throttling and transient errors
# are retried with exponential backoff and jitter), how long a sync may hold its
# account before another may take it over, how often due accounts are looked for.
MESH_CLOUD_MAX_ATTEMPTS = env_int("MESH_CLOUD_MAX_ATTEMPTS", 5, minimum=1)
MESH_CLOUD_SYNC_LEASE_SECONDS = env_int("MESH_CLOUD_SYNC_LEASE_SECONDS", 900, minimum=10)
MESH_CLOUD_TICK_SECONDS = env_int("MESH_CLOUD_TICK_SECONDS", 15, minimum=1)

REDIS_URL = env_str("REDIS_URL")
# Tasks run in-process unless a broker is configured (or asked for explicitly).
MESH_TASKS = env_choice(
    "MESH_TASKS", "celery" if REDIS_URL else "inprocess", ("celery", "inprocess")
)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "registry",
    "frontend",
    "clouds",
]

MIDDLEWARE = [
    # First: `?token=` leaves the query before anything can copy it into a link.
    "registry.api.middleware.TokenQueryMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # The web UI's response headers: CSP, frame-ancestors, no-store (see the module).
    "frontend.middleware.UISecurityHeadersMiddleware",
    # Static files (the admin's, Swagger UI's and Redoc's) served by the ASGI
    # app itself: an async-capable wrapper around WhiteNoise (see the module).
    "meshweb.staticfiles.AsyncWhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "meshweb.urls"

# The web UI signs in with an ACL token kept in the server-side (database)
# session; its cookies are Secure, HttpOnly and SameSite=Strict. Set
# MESH_UI_SECURE_COOKIES=false only to serve the UI over plain HTTP to a
# browser that refuses Secure cookies from a non-local address.
SESSION_ENGINE = "django.contrib.sessions.backends.db"
SESSION_COOKIE_AGE = env_int("MESH_UI_SESSION_SECONDS", 3600, minimum=60)
SESSION_COOKIE_SECURE = env_bool("MESH_UI_SECURE_COOKIES", True)
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Strict"
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
CSRF_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Strict"
X_FRAME_OPTIONS = "DENY"
ASGI_APPLICATION = "meshweb.asgi.application"
APPEND_SLASH = False

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

_default_db = f"sqlite:///{DATA_DIR / 'mesh.sqlite3'}"
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", _default_db), conn_max_age=None, conn_health_checks=True
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers run beside the single writer; IMMEDIATE takes the write
    # lock at BEGIN so two writers queue instead of failing mid-transaction.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS: list[dict] = []
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
# WhiteNoise indexes the apps' static files (finders) at start-up, so `mesh
# server` needs no collectstatic step; files collected into STATIC_ROOT are
# served too.
WHITENOISE_USE_FINDERS = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "registry.api.auth.MeshTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["registry.api.auth.MeshPermission"],
    # JSON through meshproto.registration.decode.parse_json (bounded depth, no NaN); the browsable
    # API's form and multipart parsers as DRF has them.
    "DEFAULT_PARSER_CLASSES": [
        "registry.api.parsers.MeshJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "registry.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "meshweb API",
    "DESCRIPTION": "The product REST API of the meshweb control plane.",
    "VERSION": "0.1.0",
    # Swagger UI and Redoc from the bundled drf-spectacular-sidecar assets, never a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": "/api/",
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_INCLUDE_SCHEMA": False,
}

CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = REDIS_URL or None
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
CELERY_TASK_IGNORE_RESULT = False
CELERY_BEAT_SCHEDULE = {
    "tick": {
        "task": "registry.tasks.tick",
        "schedule": MESH_TASK_TICK_SECONDS,
        # A tick that waited longer than a few periods is stale: the next one
        # does the same work. Beat's ticks need no stored result.
        "options": {"expires": max(5.0, 5 * MESH_TASK_TICK_SECONDS), "ignore_result": True},
    },
    # Cloud accounts that are due get a sync run (clouds.tasks).
    "cloud-sync-schedule": {
        "task": "clouds.tasks.schedule",
        "schedule": MESH_CLOUD_TICK_SECONDS,
        "options": {"expires": 5 * MESH_CLOUD_TICK_SECONDS, "ignore_result": True},
    },
}
# Workers and beat of one deployment share a queue; MESH_CELERY_QUEUE separates
# deployments (or test runs) that share a Redis.
CELERY_TASK_DEFAULT_QUEUE = env_str("MESH_CELERY_QUEUE", "celery")
CELERY_RESULT_EXPIRES = 600
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Probe threads per process for HTTP/TCP/gRPC checks (each may hold a DB connection).
MESH_CHECK_CONCURRENCY = env_int("MESH_CHECK_CONCURRENCY", 8, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("MESH_LOG_LEVEL", "INFO").upper()},
    "loggers": {"django.request": {"level": "ERROR"}},
}
