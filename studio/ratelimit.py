"""Sign-in throttling kept in the Django cache (Redis in production, so every web process agrees).

Failures are counted in a fixed window per *client IP* and, separately, per *username*: an attacker
spraying one account from many addresses is stopped by the username counter, one address trying
many accounts by the IP counter. Each attempt is counted *before* its password is checked (an atomic
increment), so a burst of parallel requests cannot all pass the check; while either counter is at its
limit the sign-in form answers 429 without checking the password. A successful sign-in clears the
username's counter and gives its address's attempt back.

Settings: `STUDIO_LOGIN_MAX_ATTEMPTS` (per username), `STUDIO_LOGIN_WINDOW_SECONDS`, and optionally
`STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP` (default four times the per-username limit, so one person's typos
do not lock out a whole office behind the same NAT) and `STUDIO_TRUSTED_PROXY_COUNT` (how many
reverse proxies append to X-Forwarded-For; 0 = use REMOTE_ADDR).

The embedded mode's file-based cache (and the database cache) has no atomic add/incr: Django
implements them as a read, then a write, and incr/decr rewrite the entry with the cache's default
timeout instead of the window. On those caches every read-modify-write here runs under an exclusive
lock (a lock file in the cache folder) and writes the count with the window's remaining time.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
import time
import unicodedata
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.filebased import FileBasedCache
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache
from django.core.files import locks

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


def _count_key(key: str, until: float) -> str:
    # One count per window: a new window never has to reset (and so can never lose) a count.
    return f"{key}:n:{round(until * 1000)}"


def failures(key: str) -> tuple[int, float | None]:
    """(attempts counted in the current window, when the window ends) for one counter."""
    now = time.time()
    until = _window_end(key, now)
    if until is None:
        return 0, None
    return int(cache.get(_count_key(key, until), 0)), until


_ATOMIC_BACKENDS = (RedisCache, LocMemCache)  # add() and incr() are atomic and keep the expiry
_THREAD_LOCK = threading.Lock()


def _backend():
    return caches["default"]  # what `cache` stands for, to tell its kind


@contextlib.contextmanager
def _serialised():
    """Nothing on atomic caches; elsewhere one read-modify-write at a time: a lock file in the file
    cache's folder (shared by every process using that cache), else a lock in this process."""
    backend = _backend()
    if isinstance(backend, _ATOMIC_BACKENDS):
        yield
        return
    with _THREAD_LOCK:
        if not isinstance(backend, FileBasedCache):
            yield
            return
        os.makedirs(backend._dir, exist_ok=True)
        with open(os.path.join(backend._dir, "studio-login.lock"), "a+b") as handle:
            locks.lock(handle, locks.LOCK_EX)
            try:
                yield
            finally:
                locks.unlock(handle)


def _add_count(count_key: str, delta: int, timeout: int) -> int:
    """Add `delta` to a count. Atomic caches: incr() (ValueError when the count is missing). Others
    (called under _serialised): read and write, keeping the window's expiry rather than the default."""
    if isinstance(_backend(), _ATOMIC_BACKENDS):
        return int(cache.incr(count_key, delta))
    value = cache.get(count_key)
    if value is None:
        raise ValueError(count_key)
    value = int(value) + delta
    cache.set(count_key, value, timeout=timeout)
    return value


def _register(key: str) -> int:
    """Count one attempt on a counter and return the count, atomically (Redis and local memory by
    themselves, other caches under a lock): parallel attempts each get their own number, so no burst
    can slip past the limit."""
    with _serialised():
        return _register_unlocked(key)


def _register_unlocked(key: str) -> int:
    now = time.time()
    until = _window_end(key, now)
    if until is None:
        window = window_seconds()
        # add() only sets a missing key: of two attempts opening a window at once, one opens it.
        if cache.add(f"{key}:until", now + window, timeout=window):
            until = now + window
        else:
            until = _window_end(key, now)
            if until is None:  # a stale window key outlived its end
                until = now + window
                cache.set(f"{key}:until", until, timeout=window)
    count_key = _count_key(key, until)
    timeout = max(1, math.ceil(until - now))
    cache.add(count_key, 0, timeout=timeout)
    try:
        return _add_count(count_key, 1, timeout)
    except ValueError:  # evicted between add() and incr()
        cache.set(count_key, 1, timeout=timeout)
        return 1


def _give_back(key: str) -> None:
    with _serialised():
        count, until = failures(key)
        if until is None or count <= 0:
            return
        timeout = max(1, math.ceil(until - time.time()))
        with contextlib.suppress(ValueError):  # expired meanwhile: nothing to give back
            _add_count(_count_key(key, until), -1, timeout)


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


def reserve(request, username: str) -> Lockout | None:
    """Count this attempt *before* its password is checked; a Lockout when it is over either limit.

    Checking the counters and counting the failure only after the password was checked let a burst
    of parallel requests all pass the check before any of them was counted. An attempt that succeeds
    gives its address's count back (`succeeded`); a failed one stays counted."""
    over_ip = _register(ip_key(request)) > max_attempts_per_ip()
    over_user = _register(username_key(username)) > max_attempts()
    if over_ip or over_user:
        return check(request, username) or Lockout(retry_after=window_seconds())
    return None


def succeeded(request, username: str) -> None:
    """A good sign-in: clear the username's counter and give back the address's reserved attempt."""
    _give_back(ip_key(request))
    clear_username(username)


def clear_username(username: str) -> None:
    key = username_key(username)
    _, until = failures(key)
    doomed = [f"{key}:until"]
    if until is not None:
        doomed.append(_count_key(key, until))
    cache.delete_many(doomed)
