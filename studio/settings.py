"""Settings for the Fine-Tuning Studio, driven entirely by environment variables.

Defaults are the *embedded* mode used by `make run` and the test suite: an SQLite file and a
kombu filesystem broker under `var/`, no external service needed. Production sets `DATABASE_URL`
(PostgreSQL, psycopg 3) and `CELERY_BROKER_URL` (Redis); see docker-compose.yml and the README.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from studio.forking import available_cores

BASE_DIR = Path(__file__).resolve().parent.parent


# The env* helpers read os.environ, or `env` where given (the helpers below take one so that tests can
# evaluate them with other values without re-importing the settings).
def envstr(name: str, default: str = "", env: Mapping[str, str] | None = None) -> str:
    return (os.environ if env is None else env).get(name, default)


def envbool(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    value = (os.environ if env is None else env).get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r}: use true/false, yes/no, on/off or 1/0")


def envint(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    value = (os.environ if env is None else env).get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r}: expected a whole number")


def envfloat(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r}: expected a number")


VAR_DIR = Path(envstr("STUDIO_VAR_DIR", str(BASE_DIR / "var")))
DATA_DIR = Path(envstr("STUDIO_DATA_DIR", str(VAR_DIR / "data")))
LOG_DIR = Path(envstr("STUDIO_LOG_DIR", str(VAR_DIR / "log")))

DEBUG = envbool("DEBUG", False)


def _secret(name: str, file_name: str) -> str:
    """A secret from the environment, or (embedded mode only) one generated once under var/."""
    value = envstr(name)
    if value:
        return value
    if envbool("STUDIO_PRODUCTION", False):
        raise ImproperlyConfigured(f"{name} must be set in production (STUDIO_PRODUCTION=true)")
    path = VAR_DIR / file_name
    if path.exists():
        return path.read_text().strip()
    from cryptography.fernet import Fernet

    VAR_DIR.mkdir(parents=True, exist_ok=True)
    generated = Fernet.generate_key().decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(generated)
    return generated


SECRET_KEY = _secret("SECRET_KEY", "secret_key")
# Fernet key (urlsafe base64, 32 bytes) used to encrypt original uploads and rejected lines at rest.
# Several comma-separated keys are accepted: the first encrypts, all decrypt (key rotation).
STUDIO_ENCRYPTION_KEY = _secret("STUDIO_ENCRYPTION_KEY", "encryption_key")

ALLOWED_HOSTS = [h.strip() for h in envstr("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",") if h]
CSRF_TRUSTED_ORIGINS = [o.strip() for o in envstr("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "studio",
    "datasets_app",
    "training_app",
    "eval_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "studio.middleware.SecurityHeadersMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "studio.middleware.ServiceErrorMiddleware",
]

ROOT_URLCONF = "studio.urls"
WSGI_APPLICATION = "studio.wsgi.application"

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
                "studio.context_processors.navigation",
            ],
        },
    },
]


def is_web_server(argv: list[str] | None = None, modules: Mapping[str, object] | None = None) -> bool:
    """True in a process that answers web requests: gunicorn (master and workers have imported it before
    they load the application) or `manage.py runserver`. Celery workers, beat and other management
    commands (migrate, imports from the command line) are not."""
    argv = sys.argv if argv is None else argv
    modules = sys.modules if modules is None else modules
    return "gunicorn" in modules or argv[1:2] == ["runserver"]


def postgres_options(
    env: Mapping[str, str] | None = None, *, web: bool, current: Mapping | None = None
) -> dict:
    """libpq options of a PostgreSQL connection (merged over `current`, those from DATABASE_URL).

    A stopped or unreachable server must not hang a request or a worker for ever: connecting gives up
    after DATABASE_CONNECT_TIMEOUT seconds, and TCP keepalives notice a connection whose server has gone
    silent (black-holed network, dead host) after about idle + interval x count seconds. The web server's
    connections also get a server-side statement_timeout (STUDIO_DB_STATEMENT_TIMEOUT_MS, 0 = none): a
    statement running longer is cancelled, and the request gets the "temporarily unavailable" page
    (studio.middleware.ServiceErrorMiddleware). Workers and management commands run without it: their
    imports, scans and COPYs legitimately take longer than any page should."""

    def positive(name: str, default: int) -> int:
        value = envint(name, default, env)
        if value < 1:
            raise ImproperlyConfigured(f"{name}={value}: expected a whole number of at least 1")
        return value

    options = dict(current or {})
    options.update(
        connect_timeout=positive("DATABASE_CONNECT_TIMEOUT", 5),
        keepalives=1,
        keepalives_idle=positive("STUDIO_DB_KEEPALIVES_IDLE", 30),
        keepalives_interval=positive("STUDIO_DB_KEEPALIVES_INTERVAL", 10),
        keepalives_count=positive("STUDIO_DB_KEEPALIVES_COUNT", 3),
    )
    statement_timeout = envint("STUDIO_DB_STATEMENT_TIMEOUT_MS", 30000, env)
    if statement_timeout < 0:
        raise ImproperlyConfigured(f"STUDIO_DB_STATEMENT_TIMEOUT_MS={statement_timeout}: 0 (none) or more")
    if web and statement_timeout:
        # Sent in the connection's start-up packet: no extra round trip per connection or request.
        extra = f"-c statement_timeout={statement_timeout}"
        options["options"] = f"{options['options']} {extra}" if options.get("options") else extra
    return options


DATABASES = {
    "default": dj_database_url.parse(
        envstr("DATABASE_URL", f"sqlite:///{VAR_DIR / 'studio.sqlite3'}"),
        conn_max_age=envint("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (web + worker) share the file: wait for locks instead of failing at once.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        # page_size applies only to a new database file (before journal_mode writes its header):
        # 16 KiB pages hold several ~1 KB examples each, so a 100k-example import writes about a
        # third less (fewer pages and WAL frames); an existing file keeps its size.
        "init_command": "PRAGMA page_size=16384; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
        "PRAGMA secure_delete=ON;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # A file (not :memory:) so the worker processes started by integration tests share the test DB.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-studio-{os.getpid()}.sqlite3")}
else:
    DATABASES["default"]["OPTIONS"] = postgres_options(
        web=is_web_server(), current=DATABASES["default"].get("OPTIONS")
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = envstr("TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(envstr("STATIC_ROOT", str(VAR_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "studio" / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if envbool("STUDIO_MANIFEST_STATIC", False)
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}

# --- Uploads: streamed to disk, size-limited ---------------------------------------------------
STUDIO_UPLOAD_MAX_BYTES = envint("STUDIO_UPLOAD_MAX_BYTES", 200 * 1024 * 1024)
FILE_UPLOAD_HANDLERS = ["studio.uploads.LimitedTemporaryFileUploadHandler"]
FILE_UPLOAD_MAX_MEMORY_SIZE = 0  # never buffer an upload in memory
FILE_UPLOAD_TEMP_DIR = str(DATA_DIR / "tmp")
Path(FILE_UPLOAD_TEMP_DIR).mkdir(parents=True, exist_ok=True)
Path(STATIC_ROOT).mkdir(parents=True, exist_ok=True)
FILE_UPLOAD_PERMISSIONS = 0o600
DATA_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024  # non-file form fields
# What happens to an original upload once it has been imported: "encrypt" (Fernet) or "delete".
STUDIO_ORIGINAL_UPLOADS = envstr("STUDIO_ORIGINAL_UPLOADS", "encrypt")
if STUDIO_ORIGINAL_UPLOADS not in {"encrypt", "delete"}:
    raise ImproperlyConfigured("STUDIO_ORIGINAL_UPLOADS must be 'encrypt' or 'delete'")

# --- Curation -------------------------------------------------------------------------------------
STUDIO_NEAR_DUP_THRESHOLD = envfloat("STUDIO_NEAR_DUP_THRESHOLD", 0.85)
STUDIO_PII_BATCH = envint("STUDIO_PII_BATCH", 256)
# Processes a curation task spreads its CPU work over (a dataset's PII scan, the duplicate analysis's
# signatures): the worker process and forked helpers. Default: the CPU cores this process may use, at
# most 4. 1 keeps the work in the worker process.
STUDIO_CURATION_PROCESSES = envint("STUDIO_CURATION_PROCESSES", min(available_cores(), 4))
STUDIO_IMPORT_BATCH = envint("STUDIO_IMPORT_BATCH", 1000)
STUDIO_DEFAULT_BASE_MODEL = envstr("STUDIO_DEFAULT_BASE_MODEL", "SmolLM2-135M-Instruct")
STUDIO_MODELS_DIR = DATA_DIR / "models"
# Adding a base model by hub id only where a hub or mirror is reachable (HF_ENDPOINT for a mirror).
STUDIO_HUB_ENABLED = envbool("STUDIO_HUB_ENABLED", False)
# Training jobs: a running job beats every STUDIO_JOB_HEARTBEAT_SECONDS; the watchdog requeues one whose
# heartbeat is older than STUDIO_JOB_STALE_SECONDS, up to STUDIO_JOB_MAX_ATTEMPTS attempts in all (since the
# last manual resume). The same cap applies to evaluation runs and to PII scans whose worker keeps dying.
STUDIO_JOB_HEARTBEAT_SECONDS = envfloat("STUDIO_JOB_HEARTBEAT_SECONDS", 5.0)
STUDIO_JOB_STALE_SECONDS = envfloat("STUDIO_JOB_STALE_SECONDS", 90.0)
STUDIO_JOB_MAX_ATTEMPTS = envint("STUDIO_JOB_MAX_ATTEMPTS", 3)
STUDIO_JOB_LOG_LINES = envint("STUDIO_JOB_LOG_LINES", 50)

# --- Evaluation, voting, approval gate, serving ----------------------------------------------------------
STUDIO_EVAL_MAX_NEW_TOKENS = envint("STUDIO_EVAL_MAX_NEW_TOKENS", 128)
STUDIO_EVAL_BATCH_SIZE = envint("STUDIO_EVAL_BATCH_SIZE", 16)
STUDIO_MODEL_CACHE_SIZE = envint("STUDIO_MODEL_CACHE_SIZE", 2)  # loaded models kept per process
# Weights' dtype for evaluation and serving on a GPU (the CPU always uses float32). "auto": float32 for
# models of at most 1B parameters (their greedy answers do not depend on which prompts share a batch, and
# such a model is no slower in float32), bfloat16 above (float32 where the GPU has no bfloat16).
STUDIO_INFERENCE_DTYPE = envstr("STUDIO_INFERENCE_DTYPE", "auto")
if STUDIO_INFERENCE_DTYPE not in {"auto", "float32", "bfloat16", "float16"}:
    raise ImproperlyConfigured(
        "STUDIO_INFERENCE_DTYPE must be 'auto', 'float32', 'bfloat16' or 'float16', "
        f"not {STUDIO_INFERENCE_DTYPE!r}"
    )
STUDIO_VOTES_PER_COMPARISON = envint("STUDIO_VOTES_PER_COMPARISON", 1)  # K
STUDIO_VOTE_OVERLAP_SHARE = envfloat("STUDIO_VOTE_OVERLAP_SHARE", 0.2)  # share voted by two reviewers
STUDIO_VOTE_EXCLUDE_TRAINERS = envbool("STUDIO_VOTE_EXCLUDE_TRAINERS", True)  # no votes on own models
STUDIO_VOTE_CLAIM_MINUTES = envint("STUDIO_VOTE_CLAIM_MINUTES", 30)  # a claimed slot returns after this
STUDIO_GATE_MIN_VOTES = envint("STUDIO_GATE_MIN_VOTES", 30)
STUDIO_GATE_MIN_WIN_RATE_LOW = envfloat("STUDIO_GATE_MIN_WIN_RATE_LOW", 0.5)  # 95% interval lower bound
STUDIO_GATE_MAX_LOSS_REGRESSION = envfloat("STUDIO_GATE_MAX_LOSS_REGRESSION", 5.0)  # % vs production
STUDIO_WEBHOOK_URLS = [u for u in envstr("STUDIO_WEBHOOK_URLS", "").split(",") if u.strip()]
STUDIO_WEBHOOK_SECRET = envstr("STUDIO_WEBHOOK_SECRET", "")  # HMAC-SHA256 key; falls back to SECRET_KEY
STUDIO_WEBHOOK_MAX_ATTEMPTS = envint("STUDIO_WEBHOOK_MAX_ATTEMPTS", 8)
STUDIO_API_MAX_TOKENS = envint("STUDIO_API_MAX_TOKENS", 512)  # cap on max_tokens per API request
STUDIO_API_RATE_LIMIT = envint("STUDIO_API_RATE_LIMIT", 60)  # requests per minute per API key

# --- Login rate limit -------------------------------------------------------------------------------
STUDIO_LOGIN_MAX_ATTEMPTS = envint("STUDIO_LOGIN_MAX_ATTEMPTS", 5)
STUDIO_LOGIN_WINDOW_SECONDS = envint("STUDIO_LOGIN_WINDOW_SECONDS", 300)
# Per client address (default four times the per-username limit, so one person's typos do not lock out
# a whole office behind one NAT).
STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP = envint("STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP", 4 * STUDIO_LOGIN_MAX_ATTEMPTS)


def proxy_settings(env: Mapping[str, str] | None = None) -> tuple[bool, int]:
    """(STUDIO_BEHIND_PROXY, STUDIO_TRUSTED_PROXY_COUNT) from the environment.

    Headers a reverse proxy sets (X-Forwarded-Proto, X-Forwarded-For) can be sent by any client that
    reaches the web server directly, so they are trusted only when the deployment says that web is
    reachable through the proxy alone: STUDIO_BEHIND_PROXY=true, or a STUDIO_TRUSTED_PROXY_COUNT of 1 or
    more (which declares the proxies). Behind a proxy, one X-Forwarded-For hop is trusted unless
    STUDIO_TRUSTED_PROXY_COUNT says otherwise; STUDIO_BEHIND_PROXY=false with a count is refused."""
    count: int | None = None
    if envstr("STUDIO_TRUSTED_PROXY_COUNT", "", env).strip():
        count = envint("STUDIO_TRUSTED_PROXY_COUNT", 0, env)
        if count < 0:
            raise ImproperlyConfigured(f"STUDIO_TRUSTED_PROXY_COUNT={count}: expected 0 or more")
    behind = envbool("STUDIO_BEHIND_PROXY", bool(count), env)
    if count is None:
        count = 1 if behind else 0
    if count > 0 and not behind:
        raise ImproperlyConfigured(
            f"STUDIO_TRUSTED_PROXY_COUNT={count} trusts X-Forwarded-For, which only a reverse proxy may set, "
            "but STUDIO_BEHIND_PROXY=false: set STUDIO_BEHIND_PROXY=true (web reachable through the proxy "
            "only) or STUDIO_TRUSTED_PROXY_COUNT=0"
        )
    return behind, count


# Behind a reverse proxy (the TLS terminator), and only then: X-Forwarded-Proto: https marks a request
# secure (SECURE_PROXY_SSL_HEADER below), and the client's address is read from X-Forwarded-For, as
# appended by that many proxies (else every client has the proxy's address and shares one sign-in
# allowance).
STUDIO_BEHIND_PROXY, STUDIO_TRUSTED_PROXY_COUNT = proxy_settings()

# --- Cache (login throttling, task progress shared by web and worker processes) ------------------
REDIS_URL = envstr("REDIS_URL", "")
CELERY_BROKER_URL = envstr("CELERY_BROKER_URL", "filesystem://")
if not REDIS_URL and CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    REDIS_URL = CELERY_BROKER_URL
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": envstr("STUDIO_CACHE_PREFIX", "studio"),
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }

# --- Celery -------------------------------------------------------------------------------------------
BROKER_DIR = Path(envstr("STUDIO_BROKER_DIR", str(VAR_DIR / "broker")))
if CELERY_BROKER_URL == "filesystem://":
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "out"),
        "data_folder_out": str(BROKER_DIR / "out"),
        "control_folder": str(BROKER_DIR / "control"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "store_processed": False,
    }
    for _folder in ("out", "control", "processed"):
        (BROKER_DIR / _folder).mkdir(parents=True, exist_ok=True)
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": envint("CELERY_VISIBILITY_TIMEOUT", 6 * 3600)}
CELERY_TASK_ALWAYS_EAGER = envbool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "curation"
CELERY_TASK_ROUTES = {
    "datasets_app.tasks.*": {"queue": "curation"},
    "studio.tasks.*": {"queue": "curation"},
    "training_app.tasks.*": {"queue": "gpu"},
    "eval_app.tasks.deliver_webhooks": {"queue": "curation"},
    "eval_app.tasks.*": {"queue": "gpu"},
}
CELERY_BEAT_SCHEDULE = {
    "watchdog": {"task": "studio.tasks.watchdog", "schedule": envint("STUDIO_WATCHDOG_SECONDS", 30)},
    "webhooks": {
        "task": "eval_app.tasks.deliver_webhooks",
        "schedule": envint("STUDIO_WEBHOOK_POLL_SECONDS", 30),
    },
}

# --- Production hardening -------------------------------------------------------------------------------
STUDIO_PRODUCTION = envbool("STUDIO_PRODUCTION", False)
SESSION_COOKIE_HTTPONLY = True
# A sign-in lasts a working day, not Django's two weeks (STUDIO_SESSION_SECONDS; signing out ends it at once).
SESSION_COOKIE_AGE = envint("STUDIO_SESSION_SECONDS", 12 * 3600)
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
# Content-Security-Policy of every response (studio.middleware.SecurityHeadersMiddleware); empty: none.
# Everything from this origin only; scripts only from the studio's static files (no inline script or
# event handler anywhere), inline styles allowed (a few pages and HTMX's indicator style use them).
STUDIO_CSP = envstr(
    "STUDIO_CSP",
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; object-src 'none'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'none'",
)
# Trusted only behind the proxy (STUDIO_BEHIND_PROXY): a client reaching gunicorn directly could send
# the header itself and pass a plain-HTTP request off as HTTPS.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if STUDIO_BEHIND_PROXY else None
if STUDIO_PRODUCTION:
    SESSION_COOKIE_SECURE = envbool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = envbool("CSRF_COOKIE_SECURE", True)
    SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", False)  # usually done by the TLS proxy
    SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True

# --- Logging: ids and counts only, never message text ---------------------------------------------------
LOG_LEVEL = envstr("LOG_LEVEL", "INFO")
LOG_DIR.mkdir(parents=True, exist_ok=True)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(process)d %(name)s %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        "file": {
            "class": "logging.handlers.WatchedFileHandler",
            "filename": str(LOG_DIR / "studio.log"),
            "formatter": "plain",
        },
    },
    "root": {"handlers": ["console", "file"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # presidio logs the analysed text at DEBUG; keep it quiet whatever LOG_LEVEL says
        "presidio-analyzer": {"level": "WARNING"},
        "presidio-anonymizer": {"level": "WARNING"},
        # the embedded filesystem broker has no host: kombu warns "No hostname was supplied" on every send
        "kombu.connection": {"level": "ERROR"},
    },
}
