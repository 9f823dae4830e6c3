"""Esper settings: everything comes from the environment (see `.env.example`).

With nothing set you get the embedded default: SQLite and artifacts under `./.esper/`,
an in-process (`memory://`) broker and a Celery worker thread started by `manage.py serve`.
Set `DATABASE_URL` and `CELERY_BROKER_URL` for the served mode (Postgres + Redis).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from tezzeret.version import COMPILER_VERSION

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env")

ESPER_HOME = Path(env.str("ESPER_HOME", default=str(BASE_DIR / ".esper")))


def _number(name: str, default, *, low=None, high=None):
    """The environment variable `name` as a number of `default`'s type (int or float), or
    `default` when unset or empty. Parsed strictly (django-environ's `float` drops the
    characters it does not expect, so `0.5abc` read as 0.5); anything that is not a finite
    number within [low, high] stops startup with an error naming the variable."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    kind = type(default)
    what = f"{name} must be {'an integer' if kind is int else 'a number'}"
    if low is not None and high is not None:
        bounds = f" in [{low:g}, {high:g}]"
    else:
        bounds = f" >= {low:g}" if low is not None else ""
    try:
        value = kind(text)
    except ValueError:
        raise ImproperlyConfigured(f"{what}{bounds}, got {text!r}") from None
    if (
        not math.isfinite(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise ImproperlyConfigured(f"{what}{bounds}, got {text!r}")
    return value


_FLAG_WORDS = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}


def _flag(name: str, default: bool) -> bool:
    """The environment variable `name` as a boolean (1/0, true/false, yes/no, on/off, any
    case), or `default` when unset or empty. Strict like `_number`: anything else stops
    startup with an error naming the variable (django-environ reads a typo as False)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return _FLAG_WORDS[text.lower()]
    except KeyError:
        raise ImproperlyConfigured(
            f"{name} must be one of 1/0, true/false, yes/no, on/off, got {text!r}"
        ) from None


DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="esper-embedded-insecure-key-change-me-in-served-mode")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "esper_site.admin.EsperAdminConfig",  # django.contrib.admin, see esper_site/admin.py
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "urza",
    "tezzeret",
    "tamiyo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "esper_site.middleware.LengthRequiredMiddleware",  # chunked bodies: a JSON 411
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "esper_site.middleware.SlashCommonMiddleware",  # Django's, redirecting with 308
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "esper_site.urls"
WSGI_APPLICATION = "esper_site.wsgi.application"

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
            ]
        },
    }
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{ESPER_HOME / 'esper.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
# Persistent connections for servers (a new Postgres connection costs milliseconds per request).
_is_sqlite = DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
DATABASES["default"].setdefault(
    "CONN_MAX_AGE", _number("CONN_MAX_AGE", 0 if _is_sqlite else 60, low=0)
)
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The embedded default serves requests and runs a worker thread against one file.
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].setdefault("timeout", 30)
    DATABASES["default"]["OPTIONS"].setdefault(
        "init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
    )
    DATABASES["default"]["OPTIONS"].setdefault("transaction_mode", "IMMEDIATE")
    # A file, not :memory:, so worker threads see the same test database.
    DATABASES["default"].setdefault(
        "TEST", {"NAME": str(ESPER_HOME / f"test-{os.getpid()}.sqlite3")}
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Served mode runs `collectstatic` into STATIC_ROOT; without it WhiteNoise serves the apps' files.
STATIC_ROOT = env.str("STATIC_ROOT", default=None)
WHITENOISE_USE_FINDERS = STATIC_ROOT is None

# --- artifacts -------------------------------------------------------------------------
# Filesystem by default; an S3-compatible bucket is a settings change:
#   ESPER_STORAGE_BACKEND=storages.backends.s3.S3Storage plus the AWS_* variables.
ESPER_ARTIFACT_ROOT = Path(env.str("ESPER_ARTIFACT_ROOT", default=str(ESPER_HOME / "artifacts")))
ESPER_STORAGE_BACKEND = env.str(
    "ESPER_STORAGE_BACKEND", default="urza.storage.AtomicFileSystemStorage"
)
_artifact_options: dict = (
    {"location": str(ESPER_ARTIFACT_ROOT)}
    if ESPER_STORAGE_BACKEND == "urza.storage.AtomicFileSystemStorage"
    else {
        "bucket_name": env.str("AWS_STORAGE_BUCKET_NAME", default="esper-artifacts"),
        "endpoint_url": env.str("AWS_S3_ENDPOINT_URL", default=None),
        "file_overwrite": True,
    }
)
STORAGES = {
    "default": {"BACKEND": ESPER_STORAGE_BACKEND, "OPTIONS": _artifact_options},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
MEDIA_ROOT = str(ESPER_ARTIFACT_ROOT)

# --- API -------------------------------------------------------------------------------
# 1 MiB bodies at most: a blueprint IR or a health graph is a few KiB.
DATA_UPLOAD_MAX_MEMORY_SIZE = _number("ESPER_MAX_BODY_BYTES", 1024 * 1024, low=1)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["urza.api.parsers.BoundedJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "urza.api.pagination.BoundedLimitOffsetPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "urza.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Esper API",
    "DESCRIPTION": "Urza registry, Tezzeret compiler and Tamiyo controller.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "APPEND_COMPONENTS": {
        "securitySchemes": {
            "tokenAuth": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "`Token <key>`; create one with `manage.py esper_token USER`.",
            }
        }
    },
    "SECURITY": [{"tokenAuth": []}],
    "ENUM_NAME_OVERRIDES": {
        "BlueprintStatusEnum": "urza.models.Blueprint.Status",
        "KernelStatusEnum": "urza.models.Kernel.Status",
        "RunStatusEnum": "tamiyo.models.TrainingRun.Status",
    },
    # Swagger UI assets ship with the package: the docs page works offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Celery ----------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="memory://")
ESPER_EMBEDDED_BROKER = CELERY_BROKER_URL.startswith("memory://")
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "compile"
CELERY_TASK_ROUTES = {"tezzeret.*": {"queue": "compile"}, "tamiyo.*": {"queue": "train"}}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# With acks_late, a job whose worker died (no ack) is redelivered once the visibility
# timeout passes; it must exceed the longest task's hard time limit.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": _number("ESPER_VISIBILITY_TIMEOUT", 600, low=1),
    "unacked_restore_interval": _number("ESPER_UNACKED_RESTORE_INTERVAL", 10, low=1),
    "unacked_restore_throttle": _number("ESPER_UNACKED_RESTORE_THROTTLE", 10, low=0),
    # The lock a worker holds while it restores unacked jobs expires after this; a worker
    # killed while holding it (kombu's default, 300 s) would block redelivery that long.
    "unacked_mutex_expire": _number("ESPER_UNACKED_MUTEX_EXPIRE", 300, low=1),
}
if ESPER_EMBEDDED_BROKER:
    # The in-process broker is polled: poll often so jobs and pings are picked up quickly.
    CELERY_BROKER_TRANSPORT_OPTIONS["polling_interval"] = 0.05
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TIMEZONE = "UTC"

# --- Esper -----------------------------------------------------------------------------
ESPER_COMPILER_VERSION = COMPILER_VERSION
# urza may not import tezzeret; the IR and signature checks are plugged in by dotted path.
URZA_IR_VALIDATOR = "tezzeret.ir.validate_submission"
URZA_SIGNATURE_VALIDATOR = "tezzeret.services.signature_validate"
URZA_PARAM_COUNTER = "tezzeret.services.param_count"
URZA_COMPILE_TASK = "tezzeret.compile_kernel"
# Tamiyo trains a new policy each time this many new rewarded experiences arrive (0: off);
# `celery -A esper_site beat` also runs it on TAMIYO_TRAIN_SCHEDULE_S (seconds; 0: off).
TAMIYO_TRAIN_EVERY = _number("TAMIYO_TRAIN_EVERY", 200, low=0)
TAMIYO_TRAIN_SCHEDULE_S = _number("TAMIYO_TRAIN_SCHEDULE_S", 3600, low=0)
CELERY_BEAT_SCHEDULE = (
    {
        "train-policy": {
            "task": "tamiyo.train_policy",
            "schedule": float(TAMIYO_TRAIN_SCHEDULE_S),
            "options": {"queue": "train"},
        }
    }
    if TAMIYO_TRAIN_SCHEDULE_S
    else {}
)
# Policy training blends each graft's reward with how its run ended, by this weight
# (tamiyo.reward.terminal_credit, whose own default, TERMINAL_WEIGHT, is the same 0.5;
# settings do not import tamiyo, which pulls in torch. 0: the step reward alone).
TAMIYO_TERMINAL_WEIGHT = _number("TAMIYO_TERMINAL_WEIGHT", 0.5, low=0.0, high=1.0)
# Compile workers export tiny kernels once at start-up, in the background, so the first
# real compile of a fresh process is not the slow one (tezzeret.warmup; 0: off).
ESPER_COMPILE_WARMUP = _flag("ESPER_COMPILE_WARMUP", True)
ESPER_HEALTH_PING_TIMEOUT = _number("ESPER_HEALTH_PING_TIMEOUT", 0.5, low=0.01, high=60.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "()": "esper_site.logfmt.KeyValueFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
        }
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.server": {"level": "WARNING"}},
}
