"""One place that decides between a full page and an HTMX fragment (NetBox's utilities/htmx.py)."""

from __future__ import annotations

from django.shortcuts import render
from django.utils.cache import patch_vary_headers


def is_htmx_partial(request) -> bool:
    """True for an HTMX request that wants a fragment. Boosted links and forms want whole pages."""
    htmx = getattr(request, "htmx", None)
    return bool(htmx) and not htmx.boosted


def render_htmx(
    request, full_template: str, partial_template: str, context: dict | None = None, status: int = 200
):
    """Render `partial_template` for HTMX requests, `full_template` otherwise.

    The full template normally `{% include %}`s the partial, so both share one source. The response
    varies on HX-Request so a cache never serves a fragment for a page load or the other way round.
    """
    template = partial_template if is_htmx_partial(request) else full_template
    response = render(request, template, context or {}, status=status)
    patch_vary_headers(response, ("HX-Request",))
    return response
