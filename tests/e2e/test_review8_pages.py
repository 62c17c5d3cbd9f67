"""Every page, every role, under the real Content-Security-Policy: headless Chromium signs in as a curator,
a reviewer, an engineer and an admin, then crawls the studio from the dashboard by following same-origin
links (GET only; never sign-out, downloads/exports or anything that changes state), up to PAGES_PER_ROLE
pages per role. On every page: no JavaScript error, no console error (a CSP violation is one: "Refused to
load/execute …"), every same-origin request the page made (the document, scripts, styles, images, the
HTMX partials fired on load) answered below 400, a non-empty <title> and exactly one non-empty <h1>.
One interaction is checked as well: selecting words on an example page fills the curator's "mark a
missed span" form (a static script, allowed by the policy). All problems are collected and reported
together at the end.

A little data comes first, made with the services and the ORM (no Celery worker): a base model, a dataset
with a few examples, an imported upload and two frozen versions, a finished and a queued training job, a
model line with a version, a finished evaluation run with comparisons (some voted, one opened by the
reviewer), a promotion request and a canary."""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from urllib.parse import urldefrag, urlsplit

import pytest
from conftest import TEST_PASSWORD, make_version
from django.urls import reverse
from django.utils import timezone
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from datasets_app.models import Example, Upload
from datasets_app.services import versions
from e2e.helpers import SELECT_WORD
from eval_app.models import Canary, Comparison, EvalRun, Generation, ModelVersion, RegisteredModel, Vote
from eval_app.services import gate, voting
from studio.roles import ADMIN, CURATOR, ENGINEER, REVIEWER
from training_app.models import BaseModel, TrainingJob

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PAGES_PER_ROLE = 60
QUERY_VARIANTS_PER_PATH = 2  # pagination / filter / sort links: a couple per page is enough
PAGES_PER_PATTERN = 3  # /datasets/examples/1/, /2/, …: the same template, a few are enough
TIMEOUT_MS = 20_000  # one page load, as in tests/e2e/conftest.py
SETTLE_MS = 4_000  # at most this long for the HTMX requests a page fires on load

# links never followed: signing out, downloads and exports, the API, and any URL that acts
SKIP = re.compile(
    r"/logout/|/export|\.jsonl$|\.json$|/rejected-lines/|/artifacts/|/download|^/v1/|^/admin/"
    r"|/(approve|reject|cancel|resume|revoke|deactivate|skip|merge|decide|decide-all|decide-type|rescan|"
    r"freeze|split|mark|drop|active|password|send|priority|status|request|rollback)/"
)


# --- data ----------------------------------------------------------------------------------------------


def make_world(make_user) -> dict:
    curator = make_user("cora", CURATOR, first_name="Cora")
    reviewer = make_user("rory", REVIEWER, first_name="Rory")
    engineer = make_user("eddie", ENGINEER, first_name="Eddie")
    admin = make_user("adele", ADMIN, first_name="Adele")
    other_reviewer = make_user("vic", REVIEWER)

    base = BaseModel.objects.create(
        name="tiny-base",
        source_kind=BaseModel.Source.LOCAL_DIR,
        source="/nonexistent/tiny-base",
        path="/nonexistent/tiny-base",
        context_length=512,
        parameters=135_000_000,
        architecture="LlamaForCausalLM",
        created_by=admin,
    )
    # a dataset of 6 examples frozen as version 1, one more example, frozen as version 2 (a diff to show)
    v1 = make_version(curator, name="support", train=4, eval_=2)
    dataset = v1.dataset
    Example.objects.create(
        dataset=dataset,
        position=6,
        messages=[
            {"role": "user", "content": "do you ship abroad"},
            {"role": "assistant", "content": "to most countries in europe"},
        ],
        split="train",
        content_hash=f"{6:064d}",
        token_count=20,
        tags=["shipping"],
        pii_status=Example.Pii.CLEAN,
    )
    v2 = versions.freeze(dataset, curator, changelog="one more shipping question")
    Upload.objects.create(
        dataset=dataset,
        uploaded_by=curator,
        original_name="support.jsonl",
        size=2048,
        sha256="a" * 64,
        format="openai",
        status=Upload.Status.IMPORTED,
        imported_count=6,
        rejected_count=1,
        report={"counts": {"invalid_json": 1}, "first": [{"line": 3, "code": "invalid_json"}]},
        started_at=timezone.now(),
        finished_at=timezone.now(),
    )

    config = {"lora_r": 8, "lora_alpha": 16, "learning_rate": 0.0002, "max_steps": 5}
    job = {"dataset_version": v2, "base_model": base, "method": "lora", "config": config}
    job.update(model_name="support", created_by=engineer)
    done = TrainingJob.objects.create(
        **job, state=TrainingJob.State.SUCCEEDED, started_at=timezone.now(), finished_at=timezone.now()
    )
    TrainingJob.objects.create(**job)  # queued: its page polls
    line = RegisteredModel.objects.create(name="support", created_by=engineer)
    version = ModelVersion.objects.create(
        registered_model=line,
        number=1,
        base_model=base,
        training_job=done,
        dataset_version=v2,
        dataset_sha256=v2.sha256,
        method="lora",
        config=config,
        metrics={"train_loss": 1.25},
        artifacts_dir="/nonexistent/artifacts/1",
        created_by=engineer,
    )
    run = EvalRun.objects.create(
        candidate=version,
        baseline_kind=EvalRun.BaselineKind.BASE,
        baseline_base_model=base,
        dataset_version=v2,
        split="eval",
        state=EvalRun.State.SUCCEEDED,
        metrics={"candidate": {"eval_loss": 1.1}, "baseline": {"eval_loss": 1.3}},
        progress=8,
        total=8,
        started_at=timezone.now(),
        finished_at=timezone.now(),
        created_by=engineer,
    )
    gens = Generation.objects.bulk_create(
        Generation(
            run=run,
            side=side,
            position=i,
            prompt=[{"role": "user", "content": f"where is my parcel {i}"}],
            reference="it ships tomorrow",
            output="it ships tomorrow" if side == "candidate" else "no idea",
        )
        for i in range(4)
        for side in ("candidate", "baseline")
    )
    comparisons = Comparison.objects.bulk_create(
        Comparison(
            run=run,
            position=i,
            candidate_generation=gens[2 * i],
            baseline_generation=gens[2 * i + 1],
            swapped=bool(i % 2),
            votes_count=1 if i < 2 else 0,
        )
        for i in range(4)
    )
    Vote.objects.bulk_create(
        Vote(comparison=c, reviewer=other_reviewer, choice="a", outcome="candidate") for c in comparisons[:2]
    )
    # the reviewer has opened a comparison (as "Start reviewing" does): the queue leads back to it
    assert voting.claim_next(reviewer, run) is not None
    gate.request_promotion(engineer, version, "production", eval_run=run, comment="ready")
    Canary.objects.create(value="canary-7731-zebra", label="planted", created_by=curator)
    first = Example.objects.filter(dataset=dataset).order_by("position").first()
    return {
        "curator": curator,
        "reviewer": reviewer,
        "engineer": engineer,
        "admin": admin,
        "example_url": reverse("datasets:example", args=[first.pk]),
    }


# --- one interaction under the policy: the example page's selection script (a static file) --------------


def mark_selection_works(example_url: str):
    """Selecting a word in a message fills the "mark a missed span" form and enables its button."""

    def check(page, note) -> None:
        page.goto(example_url)
        page.evaluate(SELECT_WORD, "parcel")
        try:
            expect(page.locator("#mark-selection")).to_have_text("Selected: “parcel”", timeout=5_000)
            expect(page.locator("#mark-button")).to_be_enabled(timeout=5_000)
        except AssertionError as exc:
            note(f"selecting a word on {example_url} does not fill the mark form: {str(exc).splitlines()[0]}")

    return check


# --- the crawl -----------------------------------------------------------------------------------------


def crawl(browser, base_url: str, role: str, user, then=None, on_page=None) -> tuple[list[str], list[str]]:
    """Sign in as `user` in a fresh context and visit up to PAGES_PER_ROLE pages: (visited, problems).
    `then(page, note)` runs at the end, still signed in; `on_page(page, url)` runs on every page checked
    (the sign-in page included), once the requests it fires on load have settled (tests/e2e/
    test_review8_a11y.py audits each page with it)."""
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900}, locale="en-US")
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    problems: list[str] = []
    current = {"url": "sign-in"}

    def note(text: str) -> None:
        problems.append(f"[{role}] {current['url']}: {text}")

    def same_origin(url: str) -> bool:
        return url.startswith(base_url + "/") or url == base_url

    page.on("pageerror", lambda exc: note(f"JavaScript error: {exc}"))
    page.on(
        "console",
        lambda msg: note(f"console {msg.type}: {msg.text}") if msg.type == "error" else None,
    )
    page.on(
        "response",
        lambda r: (
            note(f"{r.request.method} {r.url[len(base_url) :]} answered {r.status}")
            if r.status >= 400 and same_origin(r.url)
            else None
        ),
    )
    page.on(
        "requestfailed",
        lambda r: (
            note(f"{r.method} {r.url[len(base_url) :]} failed: {r.failure}")
            if same_origin(r.url) and "ERR_ABORTED" not in (r.failure or "")
            else None
        ),
    )

    def settle() -> None:
        """Wait for the requests the page fires on load (HTMX `load` triggers, polling's first tick)."""
        with contextlib.suppress(PlaywrightError):  # a page that keeps polling: what it fired is checked
            page.wait_for_load_state("networkidle", timeout=SETTLE_MS)

    def check_page() -> None:
        title = page.title().strip()
        if not title:
            note("empty <title>")
        h1 = page.locator("h1")
        count = h1.count()
        if count != 1:
            note(f"{count} <h1> elements (want exactly 1)")
        elif not h1.inner_text().strip():
            note("empty <h1>")
        if on_page is not None:
            on_page(page, current["url"])

    # the sign-in page is checked too (anonymous)
    login = reverse("login")
    current["url"] = login
    page.goto(login)
    settle()
    check_page()
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(TEST_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign in")).to_have_count(0)

    start = reverse("home")
    queue, seen, visited = [start], {start}, []
    budget: Counter[str] = Counter()  # pages queued per path (query variants) and per path pattern
    while queue and len(visited) < PAGES_PER_ROLE:
        path = queue.pop(0)
        current["url"] = path
        try:
            response = page.goto(path, wait_until="load")
        except PlaywrightError as exc:
            note(f"navigation failed: {str(exc).splitlines()[0]}")
            continue
        visited.append(path)
        settle()
        if response is None:
            note("no response")
            continue
        final = page.url[len(base_url) :] if same_origin(page.url) else page.url
        if urlsplit(final).path == login:
            note(f"redirected to sign-in ({final})")
            continue
        if not response.headers.get("content-security-policy"):
            note("no Content-Security-Policy header")
        check_page()
        hrefs = page.eval_on_selector_all("a[href]:not([download])", "els => els.map(e => e.href)")
        for href in hrefs:
            href, _ = urldefrag(href)
            if not same_origin(href):
                continue
            link = href[len(base_url) :] or "/"
            parts = urlsplit(link)
            if link in seen or SKIP.search(parts.path) or "download" in parts.query:
                continue
            seen.add(link)
            if parts.query:
                budget["?" + parts.path] += 1
                if budget["?" + parts.path] > QUERY_VARIANTS_PER_PATH:
                    continue
            else:
                pattern = re.sub(r"\d+", "N", parts.path)
                budget[pattern] += 1
                if budget[pattern] > PAGES_PER_PATTERN:
                    continue
            queue.append(link)
    if then is not None:
        current["url"] = "after the crawl"
        then(page, note)
    context.close()
    return visited, problems


def test_every_page_of_every_role_is_clean(browser, live_server, settings, make_user):
    settings.SESSION_COOKIE_SECURE = False  # the live server speaks plain HTTP
    settings.CSRF_COOKIE_SECURE = False
    assert "script-src" in settings.STUDIO_CSP  # the policy under test is on
    people = make_world(make_user)

    problems: list[str] = []
    coverage: dict[str, list[str]] = {}
    extra = {"curator": mark_selection_works(people["example_url"])}
    for role in ("curator", "reviewer", "engineer", "admin"):
        visited, found = crawl(browser, live_server.url, role, people[role], extra.get(role))
        coverage[role] = visited
        problems += found
    summary = "\n".join(f"{role}: {len(pages)} pages: {' '.join(pages)}" for role, pages in coverage.items())
    print(summary)
    unique = list(dict.fromkeys(problems))
    unique += [
        f"[{role}] the crawl reached almost nothing" for role, pages in coverage.items() if len(pages) < 3
    ]
    assert unique == [], f"{len(unique)} problems:\n" + "\n".join(unique) + f"\n\ncrawled:\n{summary}"
