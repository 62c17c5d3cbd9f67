"""Turn "a backing service is down" into a calm 503 page instead of a 500 with a traceback."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import InterfaceError
from django.db import OperationalError as DatabaseOperationalError
from django.http import HttpResponse
from django.template import loader

logger = logging.getLogger(__name__)


def _service_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [DatabaseOperationalError, InterfaceError]
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - redis is a dependency, but keep the page working without it
        pass
    else:
        errors += [RedisConnectionError, RedisTimeoutError]
    try:
        from kombu.exceptions import OperationalError as KombuOperationalError
    except ImportError:  # pragma: no cover
        pass
    else:
        errors.append(KombuOperationalError)
    return tuple(errors)


SERVICE_ERRORS = _service_errors()
RETRY_AFTER_SECONDS = 60


QUERY_CANCELED = "57014"  # PostgreSQL's SQLSTATE for a statement stopped by statement_timeout


def timed_out(exception: BaseException) -> bool:
    """Whether a database error is a statement the server stopped for running too long (the web
    server's STUDIO_DB_STATEMENT_TIMEOUT_MS), not a database that cannot be reached."""
    return getattr(exception.__cause__, "sqlstate", None) == QUERY_CANCELED


def service_unavailable_response(slow: bool = False) -> HttpResponse:
    """The 503 page. Rendered without a request: no context processor, no session, no database.
    ``slow``: the database answered, but too slowly (a statement timeout), which the page says."""
    body = loader.render_to_string("503.html", {"retry_after": RETRY_AFTER_SECONDS, "slow": slow})
    response = HttpResponse(body, status=503)
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    response["Cache-Control"] = "no-store"
    return response


class ServiceErrorMiddleware:
    """Catch database / broker / cache connection failures raised while handling a view.

    Only the exception's class and the view's name are logged: never the request's data, and not
    the exception's message either (a driver may quote connection details or SQL parameters).
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, SERVICE_ERRORS):
            return None
        match = getattr(request, "resolver_match", None)
        logger.error(
            "service unavailable: %s.%s in view %s",
            type(exception).__module__,
            type(exception).__qualname__,
            match.view_name if match else "-",
        )
        return service_unavailable_response(slow=timed_out(exception))


class SecurityHeadersMiddleware:
    """Headers Django 5.2's SecurityMiddleware does not set: the Content-Security-Policy (STUDIO_CSP;
    empty turns it off). A view that sets its own policy keeps it."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        policy = getattr(settings, "STUDIO_CSP", "")
        if policy:
            response.headers.setdefault("Content-Security-Policy", policy)
        return response
