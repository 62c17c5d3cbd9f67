"""Accessibility essentials (WCAG 2.1 A/AA) on every page of every role: the crawl of
tests/e2e/test_review8_pages.py (same data, same pages: the sign-in page and up to PAGES_PER_ROLE pages
per role) runs an in-page audit on each page once the requests it fires on load have settled, so markup
built by HTMX partials and by the studio's scripts is audited too. The audit is plain JavaScript run with
`page.evaluate` (no npm package, no network). It reports:

- form controls (input other than hidden/submit/button/reset/image, select, textarea) without an
  accessible name: a non-empty <label for>, a wrapping <label>, aria-label or aria-labelledby;
- buttons and links without an accessible name: no text, no aria-label/aria-labelledby, no title, no
  <img alt> inside (an <input type=button> is named by its value; an <input type=submit> without one
  is named "Submit" by the browser);
- <img> without an alt attribute; <svg> that is not aria-hidden="true" and lacks role="img" plus a
  name (aria-label, aria-labelledby or a <title> child);
- <html> without a lang attribute; id attributes used more than once;
- heading levels that skip on the way down (an h1 followed directly by an h3);
- tables with data cells but no <th> (role="presentation"/"none" tables excepted);
- elements with a positive tabindex.

The crawl's data is topped up with what makes a few more templates render their tables and forms (a
pending personal-data finding, a duplicate group, a finished job's artifact files), and, after each
role's crawl, pages no link leads to are audited as well: a 404 page, and for the reviewer the page
shown once a vote is stored (a vote cast with a click).

Every problem of every role and page is collected; the assertion lists each distinct problem once, with
how many pages show it and a few of them, so one run shows everything."""

from __future__ import annotations

from collections import defaultdict
from urllib.parse import urlsplit

import pytest
from django.urls import reverse
from playwright.sync_api import Error as PlaywrightError

from datasets_app.models import DuplicateGroup, Example, PiiFinding
from e2e.test_review8_pages import crawl, make_world
from eval_app.services import voting
from training_app.models import TrainingJob

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

EXAMPLES_PER_PROBLEM = 3  # pages named for a problem seen on many pages (a shared template)

AUDIT = r"""() => {
  const problems = [];
  const text = (el) => (el ? (el.textContent || "").replace(/\s+/g, " ").trim() : "");
  const attr = (el, name) => (el.getAttribute(name) || "").trim();
  const describe = (el) => {
    let d = el.tagName.toLowerCase();
    if (el.id) d += "#" + el.id;
    for (const name of ["name", "type", "href", "class"]) {
      const v = el.getAttribute(name);
      if (v) d += `[${name}="${v.length > 60 ? v.slice(0, 57) + "..." : v}"]`;
    }
    return d;
  };
  const report = (kind, el, extra) => problems.push(`${kind}: ${describe(el)}${extra ? " " + extra : ""}`);
  const labelledBy = (el) => {
    const ids = attr(el, "aria-labelledby").split(/\s+/).filter(Boolean);
    return ids.some((id) => text(document.getElementById(id)));
  };
  const hiddenFromAT = (el) => !!el.closest('[aria-hidden="true"]');

  // <html lang>
  if (!attr(document.documentElement, "lang")) problems.push("<html> without a lang attribute");

  // duplicate ids
  const ids = new Map();
  for (const el of document.querySelectorAll("[id]")) {
    ids.set(el.id, (ids.get(el.id) || 0) + 1);
  }
  for (const [id, n] of ids) if (n > 1) problems.push(`duplicate id: "${id}" used ${n} times`);

  // form controls
  const controls = document.querySelectorAll(
    'input:not([type="hidden" i]):not([type="submit" i]):not([type="button" i]):not([type="reset" i]):not([type="image" i]), select, textarea'
  );
  for (const el of controls) {
    const byFor = el.id && Array.from(document.querySelectorAll("label[for]")).some(
      (l) => l.htmlFor === el.id && text(l)
    );
    const wrapped = el.closest("label") && text(el.closest("label"));
    if (!(byFor || wrapped || attr(el, "aria-label") || labelledBy(el))) {
      report("form control without an accessible name", el);
    }
  }

  // buttons and links
  const named = (el) =>
    text(el) || attr(el, "aria-label") || labelledBy(el) || attr(el, "title") ||
    Array.from(el.querySelectorAll("img[alt]")).some((img) => attr(img, "alt"));
  for (const el of document.querySelectorAll('button, a[href], [role="button"], [role="link"]')) {
    if (hiddenFromAT(el)) continue;
    if (!named(el)) report(el.matches("a") ? "link without an accessible name" : "button without an accessible name", el);
  }
  // (an <input type=submit> without a value is named "Submit" by the browser)
  for (const el of document.querySelectorAll('input[type="button" i]')) {
    if (!(attr(el, "value") || attr(el, "aria-label") || labelledBy(el) || attr(el, "title"))) {
      report("button without an accessible name", el);
    }
  }

  // images and charts
  for (const el of document.querySelectorAll("img:not([alt])")) report("<img> without alt", el, `src="${el.getAttribute("src") || ""}"`.slice(0, 80));
  for (const el of document.querySelectorAll("svg")) {
    if (hiddenFromAT(el)) continue;
    if (el.parentElement && el.parentElement.closest("svg")) continue;  // nested <svg>: its outer one counts
    const title = Array.from(el.children).find((c) => c.tagName.toLowerCase() === "title");
    const hasName = attr(el, "aria-label") || labelledBy(el) || text(title);
    if (attr(el, "role") !== "img" || !hasName) {
      report('<svg> without role="img" and an accessible name (nor aria-hidden="true")', el);
    }
  }

  // heading order
  let previous = null;
  for (const el of document.querySelectorAll("h1, h2, h3, h4, h5, h6")) {
    const level = Number(el.tagName[1]);
    if (previous && level > previous.level + 1) {
      problems.push(`heading level skips: <h${previous.level}> "${previous.text.slice(0, 40)}" then <h${level}> "${text(el).slice(0, 40)}"`);
    }
    previous = { level, text: text(el) };
  }

  // data tables without header cells
  for (const el of document.querySelectorAll("table")) {
    if (["presentation", "none"].includes(attr(el, "role"))) continue;
    const hasData = Array.from(el.querySelectorAll("td")).some((td) => text(td));
    if (hasData && !el.querySelector("th")) report("table with data but no <th>", el);
  }

  // positive tabindex
  for (const el of document.querySelectorAll("[tabindex]")) {
    if (Number(el.getAttribute("tabindex")) > 0) report("positive tabindex", el, `tabindex="${el.getAttribute("tabindex")}"`);
  }
  return problems;
}"""


def top_up(tmp_path) -> None:
    """More of the studio's markup to audit: a pending finding (the personal-data review's tables), a
    duplicate group (its members' table) and artifact files for the finished job (their table)."""
    examples = list(Example.objects.order_by("position")[:3])
    first = examples[0]
    first.pii_status = Example.Pii.PENDING
    first.save(update_fields=["pii_status"])
    PiiFinding.objects.create(
        example=first, dataset=first.dataset, segment=0, start=0, end=5, entity_type="PERSON", source="test"
    )
    group = DuplicateGroup.objects.create(
        dataset=first.dataset, kind=DuplicateGroup.Kind.NEAR, similarity=0.9
    )
    Example.objects.filter(pk__in=[e.pk for e in examples[1:]]).update(duplicate_group=group)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "adapter_config.json").write_text("{}")
    (artifacts / "README.md").write_text("model card")
    TrainingJob.objects.filter(state=TrainingJob.State.SUCCEEDED).update(artifacts_dir=str(artifacts))


def after_crawl(role: str, audit, review_url: str):
    """Pages no link leads to, audited at the end of a role's crawl (still signed in)."""

    def then(page, note) -> None:
        try:
            page.goto("/no-such-page/")
            audit(page, "/no-such-page/ (404)")
            if role == "reviewer":
                page.goto(review_url)
                page.locator("[data-vote-form] button[name=choice]").first.click()
                page.wait_for_url("**/done/**")
                audit(page, urlsplit(page.url).path)
        except (PlaywrightError, AssertionError) as exc:
            note(f"could not reach a page to audit: {str(exc).splitlines()[0]}")

    return then


def test_every_page_of_every_role_is_accessible(browser, live_server, settings, make_user, tmp_path):
    settings.SESSION_COOKIE_SECURE = False  # the live server speaks plain HTTP
    settings.CSRF_COOKIE_SECURE = False
    people = make_world(make_user)
    top_up(tmp_path)

    found: dict[str, list[str]] = defaultdict(list)  # problem -> ["[role] page", …]
    coverage: dict[str, list[str]] = {}
    audited = 0
    unreached: list[str] = []
    # the comparison the reviewer holds (make_world opened it): the reviewer votes on it after the crawl
    review_url = reverse("eval:review", args=[voting.claim_next(people["reviewer"]).pk])
    for role in ("curator", "reviewer", "engineer", "admin"):

        def audit(page, url, role=role):
            nonlocal audited
            audited += 1
            for problem in page.evaluate(AUDIT):
                found[problem].append(f"[{role}] {url}")

        # the crawl's own checks (errors, status codes, <title>/<h1>) are test_review8_pages.py's business;
        # only a page the audit could not reach is reported here
        then = after_crawl(role, audit, review_url)
        visited, crawl_problems = crawl(browser, live_server.url, role, people[role], then, on_page=audit)
        unreached += [p for p in crawl_problems if "could not reach a page to audit" in p]
        coverage[role] = visited

    summary = "\n".join(f"{role}: {len(pages)} pages: {' '.join(pages)}" for role, pages in coverage.items())
    print(f"{audited} pages audited\n{summary}")
    problems = []
    for problem, where in sorted(found.items()):
        where = list(dict.fromkeys(where))
        shown = ", ".join(where[:EXAMPLES_PER_PROBLEM]) + (" …" if len(where) > EXAMPLES_PER_PROBLEM else "")
        problems.append(f"{problem}  — on {len(where)} page(s): {shown}")
    problems += unreached
    problems += [
        f"[{role}] the crawl reached almost nothing" for role, pages in coverage.items() if len(pages) < 3
    ]
    assert problems == [], (
        f"{len(problems)} accessibility problems:\n" + "\n".join(problems) + f"\n\ncrawled:\n{summary}"
    )
