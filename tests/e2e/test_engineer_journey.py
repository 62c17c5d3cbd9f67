"""The engineer's journey in a real browser: launch a smoke-test LoRA job of the real SmolLM2-135M-Instruct
from the "Smoke test" preset, watch its progress and loss chart update live (HTMX polling, no reload), find
the result registered as a candidate version, evaluate it against its base model on the eval split and
read both sides' metrics. Headless Chromium against the live server, a real Celery worker on the "gpu"
queue, the configured database and broker (PostgreSQL + Redis in CI). Screenshots of each step:
docs/screenshots/engineer-NN-*.png.

The curator's part (a frozen dataset version) and the admin's (the registered base model) are set up
with the services: the curator journey covers them in the browser."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import wait_for
from django.urls import reverse
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from eval_app.models import Comparison, EvalRun, Generation, ModelVersion
from training_app.models import TrainingJob, TrainingMetric
from training_app.services import register_local_dir

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]

# generous: about 1.5 and 1 minute on an idle 2-core machine, four times that with the cores shared
TRAIN_WAIT = 600  # seconds for the worker to start, load SmolLM2 and run the 5 smoke steps
EVAL_WAIT = 600  # seconds for both models to answer the eval prompts and the leak probe
SMOKE_STEPS = 5  # the "Smoke test" preset's max_steps

# (question, answer): short support conversations, the curator's frozen output
TRAIN = [
    ("Where is my parcel? It was due on Monday.", "It left our depot yesterday and arrives within two days."),
    ("How do I reset my router?", "Hold the reset button for ten seconds until the light blinks."),
    ("When will my refund arrive?", "Refunds reach your account five business days after we get the return."),
    ("Can I change my plan?", "Yes, open Account, then Plan, and pick the new plan."),
    ("Do you ship abroad?", "We ship to most countries in Europe; costs show at checkout."),
    ("My router keeps dropping Wi-Fi.", "Update its firmware from the app, then restart it."),
    ("How do I close my account?", "Open Account, then Settings, and choose Close account."),
    ("Is the router covered by warranty?", "Yes, every router has a two-year warranty."),
]
EVAL = [
    ("Where is my order?", "It left our depot yesterday and arrives within two days."),
    ("How long do refunds take?", "Five business days after we get the return."),
    ("How can I reset the router?", "Hold the reset button for ten seconds."),
    ("Can I switch to another plan?", "Yes, open Account, then Plan."),
]

# What the job page renders, read in the browser: the job's state, the steps stat and the number of
# points of the loss chart's "train loss" series (from the chart's SVG description).
READ_JOB_PAGE = """() => {
    const live = document.querySelector('#job-live');
    if (!live) return null;
    const badge = live.querySelector('.badge');
    const desc = live.querySelector('.chart-line svg desc');
    const match = desc ? desc.textContent.match(/train loss: (\\d+) points?/) : null;
    return {
        state: badge ? badge.textContent.trim().toLowerCase() : '',
        steps: live.querySelector('.stat .stat-value').textContent.trim(),
        points: match ? parseInt(match[1], 10) : 0,
        polling: live.hasAttribute('hx-get'),
    };
}"""

# Every render of #job-live the page goes through (the first one and each HTMX swap), recorded in the
# page itself so that no state is missed between two reads from the test.
RECORD_JOB_PAGE = (
    """() => {
    const read = """
    + READ_JOB_PAGE
    + """;
    window.__renders = [read()];
    new MutationObserver(() => {
        const now = read();
        const last = window.__renders[window.__renders.length - 1];
        if (now && JSON.stringify(now) !== JSON.stringify(last)) window.__renders.push(now);
    }).observe(document.querySelector('main') || document.body, {childList: true, subtree: true});
}"""
)


def frozen_support_version(curator):
    """A frozen SFT version: 8 train and 4 eval support conversations."""
    from datasets_app.models import Example
    from datasets_app.services import versions
    from datasets_app.services.datasets import create_dataset

    dataset = create_dataset("Support conversations", "sft", curator)
    rows = [("train", qa) for qa in TRAIN] + [("eval", qa) for qa in EVAL]
    for position, (split, (question, answer)) in enumerate(rows):
        Example.objects.create(
            dataset=dataset,
            position=position,
            messages=[
                {"role": "system", "content": "You are the help desk of an internet provider."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ],
            split=split,
            content_hash=f"{position:064x}",
            token_count=len(question.split()) + len(answer.split()) + 12,
            pii_status=Example.Pii.CLEAN,
        )
    return versions.freeze(dataset, curator, changelog="Help-desk conversations, scrubbed")


@pytest.fixture
def snap(shot):
    """`shot` from the top of the page: filling a field scrolls the window, and a full-page screenshot
    taken scrolled leaves the sticky top bar over the middle of the page."""

    def take(page, name: str):
        page.evaluate("() => window.scrollTo(0, 0)")
        return shot(page, name)

    return take


def test_engineer_trains_a_smoke_lora_and_evaluates_it(
    page, snap, sign_in, engineer, curator, admin_user, smollm2_dir, start_worker
):
    base = register_local_dir("SmolLM2-135M-Instruct", Path(smollm2_dir), admin_user, license="apache-2.0")
    version = frozen_support_version(curator)
    worker = start_worker("gpu")

    # 1. sign in
    sign_in(page, engineer, before_submit=lambda: snap(page, "engineer-01-sign-in"))

    # 2. a new job from the "Smoke test" preset on the frozen version and SmolLM2
    page.goto(reverse("training:job_new"))
    page.get_by_role("link", name=re.compile("^Smoke test")).click()
    form = page.locator("#job-form")
    expect(form.get_by_label("Preset")).to_have_value("smoke")
    expect(form.get_by_label("Max steps")).to_have_value(str(SMOKE_STEPS))
    form.get_by_label("Dataset version").select_option(label=str(version))
    form.get_by_label("Base model").select_option(label=base.name)
    form.get_by_label("Model line").fill("support-assistant")
    estimate = page.locator("#estimate")
    expect(estimate.get_by_text("Tokens in all")).to_be_visible()
    expect(
        estimate.locator("dt", has_text="Steps").locator("xpath=following-sibling::dd[1]")
    ).to_contain_text(str(SMOKE_STEPS))
    snap(page, "engineer-02-new-job")
    form.get_by_role("button", name="Launch job").click()

    # 3. the job page: progress and loss chart update in place while the worker trains
    expect(page.locator("h1")).to_contain_text("support-assistant")
    job = TrainingJob.objects.get()
    assert page.url.endswith(job.get_absolute_url())
    assert job.preset == "smoke" and job.config["max_steps"] == SMOKE_STEPS
    page.wait_for_selector("#job-live")
    page.evaluate(RECORD_JOB_PAGE)
    running_shot, ended = False, None
    deadline = time.monotonic() + TRAIN_WAIT
    while True:
        now = page.evaluate(READ_JOB_PAGE) or {"state": "", "points": 0, "polling": True}
        if not running_shot and now["state"] == "running" and 2 <= now["points"] < SMOKE_STEPS:
            snap(page, "engineer-03-training")  # caught mid-way: the chart draws part of its line
            running_shot = True
        if not now["polling"]:
            break
        if worker["proc"].poll() is not None:
            pytest.fail(f"worker exited: {worker['log'].read_text()[-3000:]}")
        if (
            ended is None
            and TrainingJob.objects.filter(pk=job.pk, state__in=TrainingJob.FINAL_STATES).exists()
        ):
            ended = time.monotonic()
        if ended is not None and time.monotonic() - ended > 60:
            pytest.fail(f"the job ended a minute ago but its page still shows {now}")
        if time.monotonic() > deadline:
            pytest.fail(f"the job page still polls after {TRAIN_WAIT} s: {now}; {job.pk=}")
        page.wait_for_timeout(250)
    job.refresh_from_db()
    assert job.state == TrainingJob.State.SUCCEEDED, (
        job.state,
        job.error_message,
        job.error_traceback[-3000:],
    )
    renders = page.evaluate("() => window.__renders")
    live = page.locator("#job-live")
    expect(live.locator(".badge").first).to_have_text(re.compile("succeeded", re.I))
    expect(live.locator(".stat").first.locator(".stat-value")).to_have_text(f"{SMOKE_STEPS} / {SMOKE_STEPS}")
    # the page was never reloaded: every state below came in by HTMX swaps of #job-live
    points = [r["points"] for r in renders]
    assert renders[0]["polling"] and renders[0]["points"] < SMOKE_STEPS, renders
    assert points == sorted(points), f"the loss chart lost points: {renders}"
    assert points[-1] == SMOKE_STEPS, renders
    assert len(set(points)) >= 2, f"the loss chart never updated in place: {renders}"
    assert any(r["state"] == "running" for r in renders), f"the running state was never shown: {renders}"
    loss = page.locator("section", has=page.locator("h2", has_text=re.compile("^Loss$")))
    expect(loss.locator("svg desc")).to_contain_text(f"train loss: {SMOKE_STEPS} points")
    expect(loss.locator("svg desc")).to_contain_text("eval loss: 1 point")  # eval_every 0: at the end
    # a one-point series has no line: its marker is drawn, so the eval loss is visible in the chart
    expect(loss.locator("circle.point[fill-opacity='1']")).to_have_count(1)
    expect(loss.locator("circle.point[fill-opacity='1'] title")).to_have_text(
        re.compile(r"^eval loss — Step 5: ")
    )
    expect(live.get_by_role("link", name="adapter_model.safetensors")).to_be_visible()
    banner = live.locator(".banner-success")
    expect(banner).to_contain_text("support-assistant/1")
    snap(page, "engineer-04-job-succeeded")

    # 4. the result is a candidate version of the "support-assistant" line, added on success
    page.get_by_role("link", name="Models", exact=True).first.click()
    expect(page.locator("h1")).to_have_text("Models")
    page.get_by_role("link", name="support-assistant").first.click()
    expect(page.locator("h1")).to_have_text("support-assistant")
    page.get_by_role("link", name="v1", exact=True).click()
    expect(page.locator("h1")).to_contain_text("Version 1")
    expect(page.locator("h1")).to_contain_text("Candidate")
    expect(page.locator(".page-sub")).to_contain_text("SmolLM2-135M-Instruct")
    expect(page.get_by_role("link", name=f"job {job.pk}")).to_be_visible()
    expect(page.get_by_text("Not evaluated yet.")).to_be_visible()
    snap(page, "engineer-05-candidate-version")

    # 5. evaluate it against its base model on the eval split
    page.locator(".page-actions").get_by_role("link", name="Evaluate", exact=True).click()
    expect(page.locator("h1")).to_have_text("New evaluation run")
    run_form = page.locator("#run-form")
    expect(run_form.get_by_label("Candidate version")).to_have_value(str(ModelVersion.objects.get().pk))
    expect(run_form.get_by_label("Dataset version")).to_have_value(str(version.pk))
    run_form.get_by_label("The candidate's base model").check()
    run_form.get_by_label("Split").select_option("eval")
    run_form.get_by_label("Max new tokens").fill("12")
    run_form.get_by_label("Batch size").fill("8")
    snap(page, "engineer-06-new-evaluation")
    run_form.get_by_role("button", name="Start evaluation").click()

    expect(page.locator("h1")).to_contain_text("Evaluation run")
    run = EvalRun.objects.get()
    assert page.url.endswith(run.get_absolute_url())
    status = page.locator("#run-status")
    metrics = page.locator("section", has=page.locator("h2", has_text="Automatic metrics"))
    generations = status.locator(".stat").first.locator(".stat-value")
    deadline = time.monotonic() + EVAL_WAIT
    while time.monotonic() < deadline and worker["proc"].poll() is None:
        # screenshot the run while it generates, if it is caught then (it may finish between two reads)
        try:
            badge = (status.locator(".badge").first.text_content(timeout=2000) or "").strip().lower()
            if badge not in ("queued", "running"):
                break
            done = int((generations.text_content(timeout=2000) or "0").split("/")[0].strip().replace(",", ""))
            if badge == "running" and done > 0:
                snap(page, "engineer-07-evaluating")
                break
        except (PlaywrightError, ValueError):  # the page reloads itself when the run ends
            pass
        page.wait_for_timeout(250)
    wait_for(
        lambda: EvalRun.objects.get(pk=run.pk).state not in ("queued", "running"),
        worker,
        timeout=max(deadline - time.monotonic(), 30),
        what="the evaluation run",
    )
    run.refresh_from_db()
    assert run.state == EvalRun.State.SUCCEEDED, (run.state, run.error_message, run.error_traceback[-3000:])
    # the status card polls; once the run has ended the page reloads itself with the results
    expect(metrics).to_be_visible(timeout=60_000)
    expect(status.locator(".badge").first).to_have_text(re.compile("succeeded", re.I))
    for label in ("Eval loss (reference answers)", "Perplexity"):
        cells = metrics.locator("tr", has_text=label).locator("td")
        for index in (1, 2, 3):  # candidate, baseline, difference: all numbers
            expect(cells.nth(index)).to_have_text(re.compile(r"^[+-]?\d"))
    expect(metrics).to_contain_text(f"{len(EVAL)} prompts")
    sample = page.locator("#sample tbody tr")
    expect(sample).to_have_count(len(EVAL))
    expect(sample.first).to_contain_text(EVAL[0][0])
    snap(page, "engineer-08-evaluated")

    # 6. the end state
    job.refresh_from_db()
    assert job.state == TrainingJob.State.SUCCEEDED and job.attempt == 1, (job.state, job.error_message)
    assert TrainingMetric.objects.filter(job=job, name="loss").count() >= 2
    candidate = ModelVersion.objects.get()
    assert candidate.training_job_id == job.pk and candidate.base_model_id == base.pk
    assert run.candidate_id == candidate.pk and run.baseline_kind == "base" and run.split == "eval"
    for side in (Generation.Side.CANDIDATE, Generation.Side.BASELINE):
        answers = run.generations.filter(side=side, kind=Generation.Kind.PROMPT)
        assert answers.count() == len(EVAL), side
    assert Comparison.objects.filter(run=run).count() == len(EVAL)
    for side in ("candidate", "baseline"):
        assert run.metrics[side]["eval_loss"] > 0 and run.metrics[side]["perplexity"] > 1, run.metrics
    # the candidate side really runs the trained adapter: its loss on the references is its own
    assert run.metrics["candidate"]["eval_loss"] != run.metrics["baseline"]["eval_loss"], run.metrics
    assert page.js_errors == []
