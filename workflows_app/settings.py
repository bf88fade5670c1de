"""Saga Desk settings: one file, every deployment knob read from the environment.

Unset variables mean the embedded default (SQLite under ``var/``, a filesystem
Celery broker), never a crash. See README "Configuration" for the full list.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from datetime import timedelta
from pathlib import Path

import dj_database_url
import django_stubs_ext

# Lets admin and form classes be subscripted (ModelAdmin[Model]) for mypy.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SAGA_DESK_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [
        item.strip()
        for item in os.environ.get(name, default).split(",")
        if item.strip()
    ]


def _secret_key() -> str:
    """Use SECRET_KEY, or a random key persisted under var/ for the embedded default."""
    if os.environ.get("SECRET_KEY"):
        return os.environ["SECRET_KEY"]
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
SITE_URL = os.environ.get("SITE_URL", "http://localhost:8000").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "django_filters",
    "template_partials",
    # Serves the OpenAPI docs UI's assets locally (no CDN).
    "ninja",
    # Failed logins are counted; too many lock the username from that address.
    "axes",
    "workflows_app",
]
# The demo (its definitions, participants and their ledger table, commands)
# and the benchmarks, which run the demo's definitions and activities: apps
# of their own, installed only when asked for. SAGA_DEMO=1 installs them; by
# default they are there with DEBUG on and under pytest, never otherwise.
# `manage.py demo` turns it on for itself and the processes it starts.
SAGA_DEMO = env_bool("SAGA_DEMO", DEBUG or "pytest" in sys.modules)
if SAGA_DEMO:
    INSTALLED_APPS += ["workflows_app.demo", "workflows_app.bench"]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Pages for a signed-in user are never stored by browsers or proxies.
    "workflows_app.middleware.NoStoreWhenSignedInMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "workflows_app.middleware.ContentSecurityPolicyMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # A view that cannot reach the database answers 503 + Retry-After.
    "workflows_app.middleware.DatabaseUnavailableMiddleware",
    # Last, as django-axes asks: answers a locked-out login with its page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "workflows_app.urls"
WSGI_APPLICATION = "workflows_app.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

# --- Database -------------------------------------------------------------
# PostgreSQL when DATABASE_URL is set; otherwise SQLite in WAL mode with a busy
# timeout and IMMEDIATE transactions, so that the web server, the worker and
# beat can share one file without "database is locked" on lock upgrades.
if os.environ.get("DATABASE_URL"):
    _database = dj_database_url.parse(
        os.environ["DATABASE_URL"],
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "60")),
        conn_health_checks=True,
    )
    if _database["ENGINE"] == "django.db.backends.postgresql":
        # Django's own, able to send a transaction's BEGIN with its first
        # statement (workflows_app/postgres/base.py).
        _database["ENGINE"] = "workflows_app.postgres"
    if _database["ENGINE"].endswith((".postgresql", ".postgis", ".postgres")):
        # After a failover (or a host cut off and healed) the old primary's
        # sockets are half-open: an idle connection waits for a reply that
        # never comes until the kernel's keepalive ends it, after 2 hours by
        # default. These libpq options end it within about a minute, and give
        # up a connection attempt to an unreachable server after 10 s rather
        # than the kernel's 2 minutes of SYN retries. A query string in
        # DATABASE_URL (?keepalives_idle=60) still wins.
        _database["OPTIONS"] = {
            "keepalives": int(os.environ.get("DATABASE_KEEPALIVES", "1")),
            "keepalives_idle": int(os.environ.get("DATABASE_KEEPALIVES_IDLE", "30")),
            "keepalives_interval": int(
                os.environ.get("DATABASE_KEEPALIVES_INTERVAL", "10")
            ),
            "keepalives_count": int(os.environ.get("DATABASE_KEEPALIVES_COUNT", "3")),
            "connect_timeout": int(os.environ.get("DATABASE_CONNECT_TIMEOUT", "10")),
            **_database.get("OPTIONS", {}),
        }
    DATABASES = {"default": _database}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(VAR_DIR / "saga_desk.sqlite3"),
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTHENTICATION_BACKENDS = [
    # Refuses a login while its username and address are locked out.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Login throttling (django-axes, attempts stored in the database): after
# AXES_FAILURE_LIMIT failed logins for one username from one address, that
# pair is locked for AXES_COOLOFF_MINUTES; a success resets the count.
AXES_FAILURE_LIMIT = int(os.environ.get("AXES_FAILURE_LIMIT", "5"))
AXES_COOLOFF_TIME = timedelta(
    minutes=float(os.environ.get("AXES_COOLOFF_MINUTES", "15"))
)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
# Behind a reverse proxy the client address comes from X-Forwarded-For.
AXES_IPWARE_PROXY_COUNT = int(os.environ.get("AXES_PROXY_COUNT", "0")) or None
AXES_IPWARE_META_PRECEDENCE_ORDER = (
    ["HTTP_X_FORWARDED_FOR", "REMOTE_ADDR"]
    if os.environ.get("AXES_PROXY_COUNT")
    else ["REMOTE_ADDR"]
)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns about a missing root

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
# Dashboard: seconds between HTMX refreshes of the live parts of a page.
SAGA_DASHBOARD_POLL_SECONDS = float(os.environ.get("SAGA_DASHBOARD_POLL_SECONDS", "5"))
# Lists count their rows exactly up to this many; above, the planner estimates.
SAGA_EXACT_COUNT_UP_TO = int(os.environ.get("SAGA_EXACT_COUNT_UP_TO", "10000"))
# Production: STATIC_MANIFEST=1 and `manage.py collectstatic` give hashed,
# compressed, far-future-cached files. Otherwise whitenoise serves the files
# straight from the source folders (demo, tests, development).
STATIC_MANIFEST = env_bool("STATIC_MANIFEST")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if STATIC_MANIFEST
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not STATIC_MANIFEST
# Largest request body accepted by the API (bytes); larger bodies get a 413.
SAGA_API_MAX_BODY = int(os.environ.get("SAGA_API_MAX_BODY", str(256 * 1024)))
DATA_UPLOAD_MAX_MEMORY_SIZE = max(SAGA_API_MAX_BODY, 2_621_440)

# --- Security -------------------------------------------------------------
# SECURE_HTTPS=1 is the production switch: TLS-only cookies, HSTS, redirects.
SECURE_HTTPS = env_bool("SECURE_HTTPS")
SESSION_COOKIE_SECURE = SECURE_HTTPS
CSRF_COOKIE_SECURE = SECURE_HTTPS
SECURE_SSL_REDIRECT = SECURE_HTTPS
SECURE_HSTS_SECONDS = 31536000 if SECURE_HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HTTPS
SECURE_HSTS_PRELOAD = SECURE_HTTPS
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("TRUST_X_FORWARDED_PROTO") else None
)
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")


# --- Email ----------------------------------------------------------------
def _email_url() -> dict[str, str | int | bool]:
    """EMAIL_URL=smtp://user:password@host:587?tls=1 (or smtps:// for SSL)."""
    from urllib.parse import parse_qs, unquote, urlparse

    url = urlparse(os.environ["EMAIL_URL"])
    query = parse_qs(url.query)
    return {
        "host": url.hostname or "localhost",
        "port": url.port or (465 if url.scheme == "smtps" else 25),
        "user": unquote(url.username or ""),
        "password": unquote(url.password or ""),
        "tls": query.get("tls", ["0"])[0] in {"1", "true", "yes"},
        "ssl": url.scheme == "smtps",
    }


_email = _email_url() if os.environ.get("EMAIL_URL") else {}
EMAIL_HOST = str(_email.get("host") or os.environ.get("EMAIL_HOST", "localhost"))
EMAIL_PORT = int(_email.get("port") or os.environ.get("EMAIL_PORT", "25"))
EMAIL_HOST_USER = str(_email.get("user") or os.environ.get("EMAIL_HOST_USER", ""))
EMAIL_HOST_PASSWORD = str(
    _email.get("password") or os.environ.get("EMAIL_HOST_PASSWORD", "")
)
EMAIL_USE_TLS = bool(_email.get("tls")) or env_bool("EMAIL_USE_TLS")
EMAIL_USE_SSL = bool(_email.get("ssl")) or env_bool("EMAIL_USE_SSL")
EMAIL_TIMEOUT = int(os.environ.get("EMAIL_TIMEOUT", "10"))
# With no SMTP server configured, mail is written to files under var/mail.
EMAIL_BACKEND = os.environ.get(
    "EMAIL_BACKEND",
    "django.core.mail.backends.smtp.EmailBackend"
    if _email or os.environ.get("EMAIL_HOST")
    else "django.core.mail.backends.filebased.EmailBackend",
)
EMAIL_FILE_PATH = VAR_DIR / "mail"
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "saga-desk@localhost")

# --- Alerts -----------------------------------------------------------------
# Who gets an alert when the definition names no recipients.
SAGA_ONCALL_EMAIL = os.environ.get("SAGA_ONCALL_EMAIL", "oncall@localhost")
# Where an alert goes when nobody acknowledged it in time (empty: no escalation).
SAGA_ESCALATION_EMAIL = os.environ.get("SAGA_ESCALATION_EMAIL", "")
SAGA_ALERT_ESCALATE_AFTER = float(os.environ.get("SAGA_ALERT_ESCALATE_AFTER", "1800"))
# Alerts wait this long before the first mail so a burst lands in one digest...
SAGA_ALERT_GATHER = float(os.environ.get("SAGA_ALERT_GATHER", "10"))
# ...sent when a definition has at least this many alerts due together.
SAGA_ALERT_DIGEST_MIN = int(os.environ.get("SAGA_ALERT_DIGEST_MIN", "5"))
SAGA_ALERT_INTERVAL = float(os.environ.get("SAGA_ALERT_INTERVAL", "10"))
# Every alert (and digest) also goes to this chat or webhook URL, as "slack"
# ({"text": ...}) or "json" (signed); definitions may add their own targets.
SAGA_ALERT_WEBHOOK_URL = os.environ.get("SAGA_ALERT_WEBHOOK_URL", "")
# Another value makes every delivery to it fail, visibly, on the alerts page.
SAGA_ALERT_WEBHOOK_FORMAT = os.environ.get("SAGA_ALERT_WEBHOOK_FORMAT", "slack")
# Key of the HMAC-SHA256 signature on every webhook (required for "json").
SAGA_WEBHOOK_SECRET = os.environ.get("SAGA_WEBHOOK_SECRET", "")
# Seconds one webhook POST may take; how often queued webhooks are sent.
SAGA_WEBHOOK_TIMEOUT = float(os.environ.get("SAGA_WEBHOOK_TIMEOUT", "10"))
SAGA_WEBHOOK_INTERVAL = float(os.environ.get("SAGA_WEBHOOK_INTERVAL", "5"))

# --- Celery ---------------------------------------------------------------
# The database is the source of truth; the broker is only transport. Late
# acknowledgement plus reject-on-worker-lost means a killed worker's message is
# redelivered; the attempt claim in the database turns that into a no-op, and
# the sweeper recovers anything the broker loses.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://")
_broker_dir = VAR_DIR / "broker"
if CELERY_BROKER_URL.startswith("filesystem://"):
    (_broker_dir / "queue").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "processed").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "control").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        # Broadcast (worker control) messages; kombu's default is ./control.
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
else:
    # Must exceed the longest step timeout plus the longest retry backoff:
    # Redis re-delivers unacknowledged messages after this many seconds.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "3600"))
    }
# A broker that restarts while a host is cut off leaves that host's sockets
# half-open: nothing ever answers on them and no error comes. Without a
# timeout a worker reconnecting after the cut waits forever reading a reply
# on such a socket (kombu drains its pending BRPOP) and takes no more work.
BROKER_SOCKET_TIMEOUT = float(os.environ.get("CELERY_BROKER_SOCKET_TIMEOUT", "10"))
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    CELERY_BROKER_TRANSPORT_OPTIONS.update(
        socket_timeout=BROKER_SOCKET_TIMEOUT or None,
        socket_connect_timeout=BROKER_SOCKET_TIMEOUT or None,
        # An idle connection whose peer is gone is found within about a
        # minute (also one that a firewall or NAT dropped silently).
        socket_keepalive=True,
        socket_keepalive_options={
            getattr(socket, option): value
            for option, value in (
                ("TCP_KEEPIDLE", 30),
                ("TCP_KEEPINTVL", 10),
                ("TCP_KEEPCNT", 3),
            )
            if hasattr(socket, option)  # Linux names; macOS lacks TCP_KEEPIDLE
        },
    )
# AMQP (RabbitMQ): a worker whose connection went half-open notices when
# two heartbeats go unanswered, not after Celery's default of 2 x 120 s.
CELERY_BROKER_HEARTBEAT = float(os.environ.get("CELERY_BROKER_HEARTBEAT", "10"))
# Deployments (or benchmarks) sharing one broker keep apart by queue name.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("SAGA_CELERY_QUEUE", "celery")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ALWAYS_EAGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TIMEZONE = "UTC"
# Celery's Django fixup closes the database connection before and after every
# task unless this is set, so each task would open a new PostgreSQL session.
# Connections are recycled the way Django does it per request instead
# (workflows_app.celery: CONN_MAX_AGE, CONN_HEALTH_CHECKS); this only keeps
# the fixup's forced close out of the way.
CELERY_DB_REUSE_MAX = 2**31

SAGA_SWEEP_INTERVAL = float(os.environ.get("SAGA_SWEEP_INTERVAL", "5"))
# An attempt dispatched this long ago but never claimed is re-dispatched.
SAGA_REDISPATCH_AFTER = float(os.environ.get("SAGA_REDISPATCH_AFTER", "30"))
# Grace added to a step timeout before Celery's hard time limit kills the task.
SAGA_HARD_TIMEOUT_GRACE = float(os.environ.get("SAGA_HARD_TIMEOUT_GRACE", "5"))
# Seconds a worker may keep running an instance's next attempts in the same
# task (no broker round trip) before handing them back to the broker.
SAGA_INLINE_BUDGET = float(os.environ.get("SAGA_INLINE_BUDGET", "60"))
# An instance's last-progress time (and its stuck clock) is kept to within
# this many seconds (and a hundredth of its stuck rule): a transition this
# soon after the recorded progress leaves both as they are.
SAGA_PROGRESS_RESOLUTION = float(os.environ.get("SAGA_PROGRESS_RESOLUTION", "1"))
# The engine's hot statements are server-side prepared statements on
# PostgreSQL. Turn off behind a pooler in transaction mode (PgBouncer),
# where a session's next transaction may run on another server connection.
SAGA_PREPARED_STATEMENTS = os.environ.get("SAGA_PREPARED_STATEMENTS", "1") == "1"
# One sweep works through due rows in turns, kind after kind (engine/
# sweeps.work_due): every kind has one turn whatever the time, then more,
# round robin, until SAGA_SWEEP_SECONDS are spent or SAGA_SWEEP_BATCH rows of
# a kind are done; the rest stays due for the next sweep. A turn takes up to
# SAGA_SWEEP_CHUNK rows of set-based work (one statement for all of them) or
# SAGA_SWEEP_MIN_ACTS rows of work done one instance at a time (time-outs,
# timers, deadline holds: an engine command each).
SAGA_SWEEP_BATCH = int(os.environ.get("SAGA_SWEEP_BATCH", "500"))
SAGA_SWEEP_SECONDS = float(os.environ.get("SAGA_SWEEP_SECONDS", "0.25"))
SAGA_SWEEP_CHUNK = int(os.environ.get("SAGA_SWEEP_CHUNK", "50"))
SAGA_SWEEP_MIN_ACTS = int(os.environ.get("SAGA_SWEEP_MIN_ACTS", "10"))
# Bulk jobs: the most instances one job may act on, how long a runner's lease
# lasts (a killed runner's job is taken over after it), and how long one task
# works before handing the job back to the broker.
SAGA_BULK_MAX_ITEMS = int(os.environ.get("SAGA_BULK_MAX_ITEMS", "50000"))
SAGA_BULK_LEASE = float(os.environ.get("SAGA_BULK_LEASE", "60"))
SAGA_BULK_TASK_BUDGET = float(os.environ.get("SAGA_BULK_TASK_BUDGET", "20"))
# Optionally a queue of their own, so that a long job never queues ahead of
# step attempts (then start workers with -Q celery,<queue>).
SAGA_BULK_QUEUE = os.environ.get("SAGA_BULK_QUEUE", "")
# Retention (see README "Retention and archive"): where finished instances
# are archived (JSON Lines, gzip) before they are purged; empty: no archive,
# and definitions that ask for one are not purged. Instances per purge batch
# (one short transaction each; halved while a batch takes longer than
# SAGA_RETENTION_BATCH_SECONDS), seconds of purging per sweep, and how often
# a sweeper process purges when no backlog is left.
SAGA_ARCHIVE_DIR = os.environ.get("SAGA_ARCHIVE_DIR", "")
SAGA_RETENTION_BATCH = int(os.environ.get("SAGA_RETENTION_BATCH", "500"))
SAGA_RETENTION_BATCH_SECONDS = float(
    os.environ.get("SAGA_RETENTION_BATCH_SECONDS", "0.25")
)
SAGA_RETENTION_SWEEP_SECONDS = float(
    os.environ.get("SAGA_RETENTION_SWEEP_SECONDS", "2")
)
SAGA_RETENTION_EVERY = float(os.environ.get("SAGA_RETENTION_EVERY", "300"))
# Extra modules that register activities (dotted paths, comma separated).
SAGA_ACTIVITY_MODULES = env_list("SAGA_ACTIVITY_MODULES")

# --- The HTTP activity --------------------------------------------------------
# Hosts http.request may call (host, host:port, *.domain, or * for any),
# checked when a definition is saved and before every call; empty: none.
SAGA_HTTP_ALLOWED_HOSTS = env_list("SAGA_HTTP_ALLOWED_HOSTS")
# Where ``secret:NAME`` header references are read from (one file per secret).
SAGA_HTTP_SECRETS_DIR = os.environ.get("SAGA_HTTP_SECRETS_DIR", "/run/secrets")
# A larger response is an error (never a cut string); bytes.
SAGA_HTTP_MAX_RESPONSE_BYTES = int(
    os.environ.get("SAGA_HTTP_MAX_RESPONSE_BYTES", str(1_000_000))
)
# A participant's Retry-After is honoured up to this many seconds.
SAGA_HTTP_MAX_RETRY_AFTER = float(os.environ.get("SAGA_HTTP_MAX_RETRY_AFTER", "3600"))
# The callback URL participants receive is built on this base.
SAGA_HTTP_CALLBACK_BASE_URL = os.environ.get(
    "SAGA_HTTP_CALLBACK_BASE_URL", SITE_URL
).rstrip("/")
# What each attempt sent and received: the first bytes of each body, JSON
# fields always blanked, and how long / how many exchanges per step are kept.
SAGA_HTTP_EXCHANGE_BODY_BYTES = int(
    os.environ.get("SAGA_HTTP_EXCHANGE_BODY_BYTES", "4096")
)
SAGA_HTTP_REDACT_FIELDS = env_list(
    "SAGA_HTTP_REDACT_FIELDS", "password,secret,card_number,cvv,iban,api_key"
)
SAGA_HTTP_EXCHANGE_KEEP_DAYS = float(
    os.environ.get("SAGA_HTTP_EXCHANGE_KEEP_DAYS", "14")
)
SAGA_HTTP_EXCHANGES_PER_STEP = int(os.environ.get("SAGA_HTTP_EXCHANGES_PER_STEP", "20"))

# --- Metrics (GET /metrics, Prometheus) ---------------------------------------
# A scraper must send "Authorization: Bearer <token>" when this is set.
SAGA_METRICS_TOKEN = os.environ.get("SAGA_METRICS_TOKEN", "")
# Seconds a process reuses the gauges it read from the database.
SAGA_METRICS_CACHE_SECONDS = float(os.environ.get("SAGA_METRICS_CACHE_SECONDS", "10"))
# Seconds between full recounts of finished instances (between them only the
# newly finished are counted); a retention purge shows within this time.
SAGA_METRICS_BASE_SECONDS = float(os.environ.get("SAGA_METRICS_BASE_SECONDS", "600"))
# host:port where a Celery worker's main process serves its machine's
# counters (for worker machines without a web process); empty: none.
SAGA_METRICS_WORKER_BIND = os.environ.get("SAGA_METRICS_WORKER_BIND", "")
# Every process of a machine (gunicorn workers, Celery pool children, beat)
# writes its counters into this folder and a scrape adds them up. Set here,
# into the environment, because prometheus-client reads it when first
# imported, and child processes inherit it. Empty it when the services start.
PROMETHEUS_MULTIPROC_DIR = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", str(VAR_DIR / "prometheus")
)
Path(PROMETHEUS_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)

CELERY_BEAT_SCHEDULE = {
    "saga-sweep": {"task": "workflows.sweep", "schedule": SAGA_SWEEP_INTERVAL},
    "saga-alerts": {"task": "workflows.send_alerts", "schedule": SAGA_ALERT_INTERVAL},
    "saga-webhooks": {
        "task": "workflows.send_webhooks",
        "schedule": SAGA_WEBHOOK_INTERVAL,
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "workflows_app.log_format.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            # LOG_FORMAT=json: one JSON object per line for log shippers.
            "formatter": "json" if os.environ.get("LOG_FORMAT") == "json" else "plain",
        }
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
