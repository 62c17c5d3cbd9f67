"""Sign-in throttling kept in the Django cache (Redis in production, so every web process agrees).

Failures are counted in a fixed window per *client IP* and, separately, per *username*: an attacker
spraying one account from many addresses is stopped by the username counter, one address trying
many accounts by the IP counter. While either counter is at its limit the sign-in form answers 429
without checking the password. A successful sign-in clears the username's counter.

Settings: `STUDIO_LOGIN_MAX_ATTEMPTS` (per username), `STUDIO_LOGIN_WINDOW_SECONDS`, and optionally
`STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP` (default four times the per-username limit, so one person's typos
do not lock out a whole office behind the same NAT) and `STUDIO_TRUSTED_PROXY_COUNT` (how many
reverse proxies append to X-Forwarded-For; 0 = use REMOTE_ADDR).
"""

from __future__ import annotations

import hashlib
import math
import time
import unicodedata
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

_PREFIX = "studio:login"


def max_attempts() -> int:
    return max(1, int(settings.STUDIO_LOGIN_MAX_ATTEMPTS))


def max_attempts_per_ip() -> int:
    return max(1, int(getattr(settings, "STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP", 4 * max_attempts())))


def window_seconds() -> int:
    return max(1, int(settings.STUDIO_LOGIN_WINDOW_SECONDS))


def client_ip(request) -> str:
    """The client's address: REMOTE_ADDR, or the right X-Forwarded-For hop behind trusted proxies."""
    proxies = int(getattr(settings, "STUDIO_TRUSTED_PROXY_COUNT", 0))
    if proxies > 0:
        hops = [h.strip() for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
        if len(hops) >= proxies:
            return hops[-proxies]
    return request.META.get("REMOTE_ADDR", "") or "unknown"


def _key(kind: str, value: str) -> str:
    # Hash the value: usernames are user input (cache-key safety) and need not sit in Redis in clear.
    digest = hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:32]
    return f"{_PREFIX}:{kind}:{digest}"


def ip_key(request) -> str:
    return _key("ip", client_ip(request))


def username_key(username: str) -> str:
    # The sign-in form NFKC-normalises the username before authenticating ("ａｄａ" signs in as
    # "ada"), so the counter must too, or every look-alike spelling would get fresh guesses.
    return _key("user", unicodedata.normalize("NFKC", username or "").strip().casefold())


def _window_end(key: str, now: float) -> float | None:
    until = cache.get(f"{key}:until")
    if until is None or until <= now:
        return None
    return float(until)


def failures(key: str) -> tuple[int, float | None]:
    """(failures in the current window, when the window ends) for one counter."""
    now = time.time()
    until = _window_end(key, now)
    if until is None:
        return 0, None
    return int(cache.get(f"{key}:n", 0)), until


def _register(key: str) -> None:
    now = time.time()
    until = _window_end(key, now)
    if until is None:
        window = window_seconds()
        cache.set_many({f"{key}:until": now + window, f"{key}:n": 1}, timeout=window)
        return
    try:
        cache.incr(f"{key}:n")  # atomic on Redis; keeps the key's expiry
    except ValueError:  # the count expired or was evicted before the window's end
        cache.set(f"{key}:n", 1, timeout=max(1, math.ceil(until - now)))


@dataclass(frozen=True)
class Lockout:
    retry_after: int  # seconds

    @property
    def minutes(self) -> int:
        return max(1, math.ceil(self.retry_after / 60))

    @property
    def message(self) -> str:
        unit = "minute" if self.minutes == 1 else "minutes"
        return f"Too many sign-in attempts. Try again in {self.minutes} {unit}."


def check(request, username: str) -> Lockout | None:
    """A Lockout if this client or this username has used up its attempts, else None."""
    now = time.time()
    ends = []
    for key, limit in ((username_key(username), max_attempts()), (ip_key(request), max_attempts_per_ip())):
        count, until = failures(key)
        if until is not None and count >= limit:
            ends.append(until)
    if not ends:
        return None
    return Lockout(retry_after=max(1, math.ceil(max(ends) - now)))


def register_failure(request, username: str) -> None:
    _register(ip_key(request))
    _register(username_key(username))


def clear_username(username: str) -> None:
    key = username_key(username)
    cache.delete_many([f"{key}:n", f"{key}:until"])
