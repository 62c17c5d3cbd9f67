"""The reviewers' and the admin's journey in a real browser: two reviewers vote blind with the keyboard
on the comparisons of a real evaluation run; an engineer requests the promotion; the admin sees the gate
fail with too few votes, then pass once enough votes are in, approves; a request through the official
`openai` client reaches the new production version; the admin rolls back and the same request reaches the
previous version again.

Setup (the engineer's part is tested elsewhere): two LoRA versions of a model line trained in-process on
the tiny Llama by the training service, v1 promoted to production earlier through the gate service, and
an evaluation run of v2 against production (v1) executed by a real Celery worker on the "gpu" queue
(against production rather than the base model, so the run itself measures production's eval loss, which
the gate's loss rule compares with, at its default, like every rule but the vote count).
Everything after that is done by the people in headless Chromium against the live server. Screenshots:
docs/screenshots/review-NN-*.png (reviewers) and admin-NN-*.png (the admin)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_version, openai_client, smoke_request, wait_for
from django.urls import reverse
from playwright.sync_api import expect

from eval_app.inference import get_model, spec_for_version
from eval_app.models import Alias, AliasChange, Comparison, EvalRun, ModelVersion, PromotionRequest, Vote
from eval_app.services import evaluation, gate
from studio.audit import verify_chain
from studio.models import AuditEvent
from studio.roles import REVIEWER
from training_app.models import TrainingJob
from training_app.services import jobs, register_local_dir

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.django_db(transaction=True)]

LINE = "helpdesk"  # the model line (named after the dataset it is trained on)
MIN_VOTES = 8  # STUDIO_GATE_MIN_VOTES for this test; every other gate rule keeps its default
WORKER_WAIT = 180  # seconds for the worker to start and finish the evaluation run
HELLO = [{"role": "user", "content": "where is my parcel"}]
TIMEOUT_MS = 20_000  # one user-visible step, as in tests/e2e/conftest.py


# --- setup through the services ----------------------------------------------------------------------


def train(engineer, data, base, **config) -> ModelVersion:
    """One real LoRA job run to its end in this process; its model version."""
    job = jobs.create_job(
        smoke_request(data, base, max_length=64, batch_size=4, **config), engineer, enqueue=False
    )
    job = jobs.run_claimed(jobs.claim(job.pk, "e2e-setup"))
    assert job.state == TrainingJob.State.SUCCEEDED, (job.error_message, job.error_traceback[-3000:])
    return ModelVersion.objects.get(training_job=job)


def answer(version: ModelVersion) -> str:
    """What `version` answers HELLO with at temperature 0 (the API's generation, called directly)."""
    [result] = get_model(spec_for_version(version)).generate([HELLO], max_new_tokens=12, temperature=0)
    return result.text


# --- browser helpers ---------------------------------------------------------------------------------


@pytest.fixture
def open_page(browser, live_server, page, sign_in):
    """`open_page(user)` → a page in its own browser context (own cookies), signed in as `user`. Built
    like the `page` fixture (which has already made the live server's cookies plain-HTTP)."""
    contexts = []

    def make(user):
        context = browser.new_context(
            base_url=live_server.url, viewport={"width": 1280, "height": 900}, locale="en-US"
        )
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        p = context.new_page()
        p.on("dialog", lambda dialog: dialog.accept())
        p.js_errors = []
        p.on("pageerror", lambda exc, errors=p.js_errors: errors.append(str(exc)))
        sign_in(p, user)
        return p

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def snap(shot):
    """`shot`, after checking that the page fits the 1280-pixel window (no sideways scrolling)."""

    def take(page, name: str):
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"{name}: the page is {width[0]} px wide in a {width[1]} px window"
        return shot(page, name)

    return take


def assert_blind(page, names: list[str]) -> None:
    html = page.content()
    for name in names:
        assert name not in html, f"the blind comparison page names {name!r}"


def vote(page, reviewer, verdict: str, blind_names: list[str], shot=None) -> Vote:
    """On an open comparison page: choose with the keys 1–4, submit with Enter, land on the reveal.
    `verdict` is what the reviewer prefers: "candidate", "tie" or "both_bad" (the page is blind; which
    key means the candidate is read from the comparison's coin flip in the database)."""
    expect(page.locator("h1")).to_have_text("Which answer is better?")
    # votes.js rewrites the help line when it has bound the keys
    expect(page.locator("[data-vote-help]")).to_contain_text("the choice is highlighted")
    pk = int(re.search(r"/reviews/(\d+)/$", page.url).group(1))
    comparison = Comparison.objects.get(pk=pk)
    assert_blind(page, blind_names)
    key = {"candidate": "2" if comparison.swapped else "1", "tie": "3", "both_bad": "4"}[verdict]
    page.keyboard.press(key)
    chosen = page.locator(f"[data-vote-key='{key}']")
    expect(chosen).to_have_attribute("aria-pressed", "true")
    expect(chosen).to_be_focused()
    expect(page.locator("[data-vote-key][aria-pressed='true']")).to_have_count(1)
    if shot:
        shot(page)
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("Vote stored")
    assert page.url.endswith(reverse("eval:review_done", args=[pk]))
    return Vote.objects.get(comparison=comparison, reviewer=reviewer)


def next_comparison(page) -> None:
    """From the reveal, Enter goes on to the next comparison (the button has the focus)."""
    button = page.get_by_role("button", name="Next comparison")
    expect(button).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("Which answer is better?")


def contrast(element) -> float:
    """WCAG contrast ratio between an element's text colour and its background colour."""
    colours = element.evaluate("e => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]")

    def luminance(css: str) -> float:
        channels = [int(c) / 255 for c in re.findall(r"\d+", css)[:3]]
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    high, low = sorted((luminance(c) for c in colours), reverse=True)
    return (high + 0.05) / (low + 0.05)


def rule_row(page, key: str):
    return page.locator(f".policy-check tr[data-rule='{key}']")


# --- the journey -------------------------------------------------------------------------------------


def test_reviewers_vote_and_admin_promotes_then_rolls_back(
    page, open_page, snap, sign_in, live_server, settings, start_worker, tiny_model_dir, curator, engineer, admin_user,
    make_user,
):  # fmt: skip
    settings.STUDIO_GATE_MIN_VOTES = MIN_VOTES
    rene, rosa = (
        make_user("rene", REVIEWER, first_name="René"),
        make_user("rosa", REVIEWER, first_name="Rosa"),
    )

    # --- setup: v1 in production (promoted earlier, before any evaluation: an audited override), v2 the
    # candidate, trained longer on the same data; an evaluation run of v2 against production by a worker
    base = register_local_dir("tiny-llama", Path(tiny_model_dir), engineer)
    data = make_version(curator, name=LINE, train=16, eval_=10)
    v1 = train(engineer, data, base, max_steps=6, learning_rate=1e-3)
    v2 = train(engineer, data, base, max_steps=40, learning_rate=1e-2)
    assert (v1.registered_model.name, v1.number, v2.number) == (LINE, 1, 2)
    first = gate.request_promotion(engineer, v1, "production")
    gate.approve(
        admin_user, first, override=True, justification="The first helpdesk model, live before the gate."
    )
    worker = start_worker("gpu")
    run = evaluation.create_run(engineer, v2, "production", data, "eval", max_new_tokens=16, batch_size=8)
    wait_for(
        lambda: EvalRun.objects.filter(pk=run.pk, state__in=["succeeded", "failed"]).exists(),
        worker,
        timeout=WORKER_WAIT,
        what="the evaluation run",
    )
    run.refresh_from_db()
    assert run.state == EvalRun.State.SUCCEEDED, run.error_message
    assert run.baseline_version == v1 and run.pii_leaks == 0
    comparisons = run.comparisons.count()
    assert comparisons == 10
    slots = sum(run.comparisons.values_list("votes_wanted", flat=True))
    assert slots >= MIN_VOTES
    blind_names = [LINE, str(v1), str(v2), base.name]

    # --- 1. two reviewers, each in their own browser, vote blind with the keyboard -------------------
    a, b = open_page(rene), open_page(rosa)

    a.goto(reverse("eval:reviews"))
    row = a.locator("tr", has_text=f"Evaluation {run.pk}")
    expect(row).to_contain_text(f"{comparisons}")
    expect(a.locator(".vote-keys")).to_contain_text("Enter")
    snap(a, "review-01-queue")
    row.get_by_role("button", name="Review").click()
    stored = [vote(a, rene, "candidate", blind_names, shot=lambda p: snap(p, "review-02-blind-comparison"))]
    # the reveal: which side was the candidate (v2) and which the baseline (production, v1)
    reveal = a.locator(".vote-reveal")
    candidate_side = reveal.locator(".card", has=a.locator(".badge", has_text="candidate"))
    expect(candidate_side).to_contain_text(str(v2))
    expect(reveal.locator(".card", has=a.locator(".badge", has_text="baseline"))).to_contain_text(str(v1))
    expect(a.locator("main")).to_contain_text("Counted as: Candidate")
    # the "Enter" key hint on the focused button is readable (dark text on its light key cap)
    assert contrast(a.get_by_role("button", name="Next comparison").locator("kbd")) >= 4.5
    snap(a, "review-03-reveal")
    next_comparison(a)
    stored.append(vote(a, rene, "candidate", blind_names))

    b.goto(reverse("eval:reviews"))
    b.locator("tr", has_text=f"Evaluation {run.pk}").get_by_role("button", name="Review").click()
    stored.append(vote(b, rosa, "candidate", blind_names))
    next_comparison(b)
    stored.append(vote(b, rosa, "candidate", blind_names))
    assert Vote.objects.filter(comparison__run=run).count() == 4

    # --- 2. the engineer requests the promotion; the admin sees the gate fail on too few votes --------
    eng = open_page(engineer)
    eng.goto(reverse("eval:version", args=[v2.pk]))
    eng.get_by_label("Alias").fill("production")
    expect(eng.locator("#evidence")).to_contain_text(f"run {run.pk} against")  # the newest, not a choice
    eng.get_by_label("Comment for the approver").fill("Better answers than v1 on the helpdesk eval split.")
    eng.get_by_role("button", name="Request promotion").click()
    expect(eng.locator("h1")).to_contain_text(f"{v2} → production")
    req = PromotionRequest.objects.get(version=v2)
    assert req.requested_by == engineer and req.eval_run == run and not req.policy_passed
    assert req.policy["failed"] == ["votes"]

    sign_in(page, admin_user)
    page.goto(reverse("eval:promotions"))
    page.get_by_role("link", name=f"request {req.pk}", exact=True).click()
    expect(page.locator("h1")).to_contain_text(f"Request {req.pk}")
    votes_rule = rule_row(page, "votes")
    expect(votes_rule).to_contain_text(f"At least {MIN_VOTES} votes")
    expect(votes_rule).to_contain_text(f"4 votes (needs {MIN_VOTES})")
    expect(votes_rule.locator(".badge")).to_have_text("fails")
    for key in ("win_rate", "pii", "eval_loss"):  # too few votes is the only thing wrong
        expect(rule_row(page, key).locator(".badge")).to_have_text("passes")
    expect(rule_row(page, "eval_loss")).to_contain_text(f"for {v1}")
    expect(page.locator(".banner-danger")).to_contain_text("1 rule fails")
    expect(page.get_by_role("button", name="Approve with override")).to_be_visible()
    snap(page, "admin-01-gate-fails-too-few-votes")

    # --- 3. more votes (keyboard) up to the threshold; the gate passes; the admin approves ------------
    next_comparison(a)
    stored.append(vote(a, rene, "candidate", blind_names))
    next_comparison(a)
    stored.append(vote(a, rene, "candidate", blind_names))
    next_comparison(b)
    stored.append(vote(b, rosa, "candidate", blind_names))
    next_comparison(b)
    stored.append(vote(b, rosa, "both_bad", blind_names))  # one answer pair neither reviewer would ship
    assert len(stored) == MIN_VOTES

    page.reload()
    expect(rule_row(page, "votes")).to_contain_text(f"{MIN_VOTES} votes (needs {MIN_VOTES})")
    expect(rule_row(page, "win_rate")).to_contain_text("over 7 decisive votes")
    for key in ("votes", "win_rate", "pii", "eval_loss"):
        expect(rule_row(page, key).locator(".badge")).to_have_text("passes")
    expect(page.get_by_text("Every rule passes.")).to_be_visible()
    expect(page.get_by_role("button", name="Approve with override")).to_have_count(0)
    snap(page, "admin-02-gate-passes")
    page.locator("#approve-comment").fill("Eight votes, clear preference; ship it.")
    page.get_by_role("button", name="Approve and move the alias").click()  # the confirm dialog: OK
    expect(page.locator("h1")).to_contain_text("Approved")
    decision = page.locator("section", has=page.get_by_role("heading", name="Decision", exact=True))
    expect(decision).to_contain_text(admin_user.username)
    expect(decision).to_contain_text(f"{v1} → {v2}")
    snap(page, "admin-03-approved")

    page.goto(reverse("eval:model", args=[v2.registered_model_id]))
    aliases = page.locator("section", has=page.get_by_role("heading", name="Aliases", exact=True))
    production_row = aliases.locator("tr", has_text=f"{LINE}@production")
    expect(production_row).to_contain_text("v2")
    expect(production_row.get_by_role("button", name="Roll back to v1")).to_be_visible()
    snap(page, "admin-04-production-is-v2")
    assert Alias.objects.get(registered_model=v2.registered_model, name="production").version == v2

    # --- 4. an API key from the browser; the `openai` client reaches the new production version -------
    page.goto(reverse("eval:api_keys"))
    page.get_by_label("Name").fill("release smoke check")
    page.get_by_role("button", name="Create key").click()
    raw_key = page.locator("#new-key-value").inner_text().strip()
    assert raw_key.startswith("fts_")
    expected = {v1.pk: answer(v1), v2.pk: answer(v2)}
    assert expected[v1.pk] != expected[v2.pk]  # the two versions can be told apart by their answer
    client = openai_client(live_server.url, raw_key)
    try:
        ids = [m.id for m in client.models.list()]
        assert f"{LINE}@production" in ids and f"{LINE}/2" in ids
        reply = client.chat.completions.create(
            model=f"{LINE}@production", messages=HELLO, max_tokens=12, temperature=0
        )
        # the response names the alias asked for, the version behind it in `system_fingerprint`; the
        # answer itself is v2's
        assert reply.model == f"{LINE}@production" and reply.system_fingerprint == f"{LINE}/2"
        assert reply.choices[0].message.content == expected[v2.pk]

        # --- 5. the admin rolls back; the same request is answered by v1 again ------------------------
        page.goto(reverse("eval:model", args=[v2.registered_model_id]))
        production_row.get_by_role("button", name="Roll back to v1").click()  # confirm dialog: OK
        expect(production_row).to_contain_text("v1")
        expect(production_row).not_to_contain_text("v2")
        history = page.locator(
            "section", has=page.get_by_role("heading", name="Alias history", exact=True)
        ).locator("tbody tr")
        expect(history).to_have_count(3)
        expect(history.nth(0)).to_contain_text("rollback")
        expect(history.nth(1)).to_contain_text(f"request {req.pk}")
        expect(history.nth(2)).to_contain_text(f"request {first.pk}")
        snap(page, "admin-05-rolled-back-alias-history")
        assert Alias.objects.get(registered_model=v1.registered_model, name="production").version == v1
        again = client.chat.completions.create(
            model=f"{LINE}@production", messages=HELLO, max_tokens=12, temperature=0
        )
        assert again.model == f"{LINE}@production" and again.system_fingerprint == f"{LINE}/1"
        assert again.choices[0].message.content == expected[v1.pk]
    finally:
        client.close()

    # --- 6. what the database keeps -------------------------------------------------------------------
    votes = Vote.objects.filter(comparison__run=run)
    assert votes.count() == MIN_VOTES == len({v.pk for v in stored})
    assert len(set(votes.values_list("comparison_id", "reviewer_id"))) == MIN_VOTES  # once each
    assert sorted(votes.values_list("reviewer__username", flat=True)) == ["rene"] * 4 + ["rosa"] * 4
    assert sorted(votes.values_list("outcome", flat=True)) == ["both_bad"] + ["candidate"] * 7
    for v in votes.select_related("comparison"):  # the key pressed was the candidate's side
        if v.outcome == "candidate":
            assert v.choice == ("b" if v.comparison.swapped else "a")
    assert sum(run.comparisons.values_list("votes_count", flat=True)) == MIN_VOTES
    assert AuditEvent.objects.filter(verb="eval.vote").count() == MIN_VOTES

    req.refresh_from_db()
    assert req.status == PromotionRequest.Status.APPROVED and req.decided_by == admin_user
    assert req.policy_passed and not req.overridden and req.previous_version == v1
    changes = list(
        AliasChange.objects.filter(registered_model=v1.registered_model, alias="production").order_by("id")
    )
    assert [(c.kind, c.from_version, c.to_version, c.actor) for c in changes] == [
        ("promote", None, v1, admin_user),
        ("promote", v1, v2, admin_user),
        ("rollback", v2, v1, admin_user),
    ]
    assert changes[1].promotion == req and changes[2].promotion is None
    verbs = list(AuditEvent.objects.order_by("id").values_list("verb", flat=True))
    promotion_verbs = [v for v in verbs if v.startswith(("eval.promotion.", "eval.alias."))]
    assert promotion_verbs == [
        "eval.promotion.request",  # v1, earlier
        "eval.promotion.approve",
        "eval.promotion.override",
        "eval.promotion.request",  # v2, by the engineer in the browser
        "eval.promotion.approve",  # by the admin in the browser, no override
        "eval.alias.rollback",
    ]
    assert verbs.count("eval.webhook.queue") == 3
    assert AuditEvent.objects.filter(verb="eval.promotion.approve", actor=admin_user).count() == 2
    assert verify_chain().ok

    for p in (page, a, b, eng):
        assert p.js_errors == [], p.js_errors
