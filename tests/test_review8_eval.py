"""Review 8 of the evaluation app: blindness, gate, serving API and webhook defects, each reproduced."""

from __future__ import annotations

import random

import pytest
from django.urls import reverse
from test_eval_stats import World
from test_eval_stats import world as world  # noqa: F401 - the fixture

from eval_app.models import WebhookEvent
from eval_app.services import evaluation, voting, webhooks

pytestmark = pytest.mark.django_db


# =====================================================================================================
# Blindness: the side each model is shown on must not be computable from what a reviewer can see
# =====================================================================================================


def test_side_order_is_not_predictable_from_the_run_id_and_position(world: World):
    """The coin flip was seeded with "<seed>:<run id>:<position>" only: the seed is 0 by default, the run
    id is printed in the reviewer's queue and comparisons are handed out in position order, so anyone
    with the (open) source could tell which answer is the candidate's."""
    run = world.run(world.version(1), n=0)
    run.params = {"seed": 0}
    positions = range(64)
    public = [random.Random(f"0:{run.pk}:{p}").random() < 0.5 for p in positions]
    actual = [evaluation.is_swapped(run, p) for p in positions]
    assert actual != public
    # still a fair, stable coin: both sides occur and the same run gives the same answer
    assert 10 < sum(actual) < 54
    assert actual == [evaluation.is_swapped(run, p) for p in positions]


# =====================================================================================================
# Webhooks: credentials in a webhook URL never reach the outbox's error text (shown on a page)
# =====================================================================================================


def test_failed_delivery_error_does_not_keep_url_credentials(settings):
    settings.STUDIO_WEBHOOK_URLS = ["http://deploy:s3cr3t-token@127.0.0.1:9/hook?token=q5"]
    webhooks.enqueue_event("model.promoted", {"model": "x"})
    webhooks.deliver_pending()
    row = WebhookEvent.objects.get()
    assert row.last_error and "127.0.0.1" in row.last_error
    assert "s3cr3t" not in row.last_error and "deploy:" not in row.last_error


# =====================================================================================================
# The approval gate
# =====================================================================================================


@pytest.fixture
def gate_world(make_user, curator):
    from test_gate import World as GateWorld

    return GateWorld(make_user, curator)


def test_approval_refuses_a_version_archived_since_the_request(gate_world):
    """A request made while the version was a candidate must not promote it once it has been archived
    (withdrawn from use); approving it also silently turned it back into an approved version."""
    from eval_app.models import Alias, ModelVersion, PromotionRequest
    from eval_app.services import gate

    v = gate_world.version()
    gate_world.good_run(v)
    req = gate.request_promotion(gate_world.requester, v, "production")
    ModelVersion.objects.filter(pk=v.pk).update(status=ModelVersion.Status.ARCHIVED)
    with pytest.raises(gate.GateRefused, match="archived"):
        gate.approve(gate_world.approver, req)
    v.refresh_from_db()
    req.refresh_from_db()
    assert v.status == ModelVersion.Status.ARCHIVED
    assert req.status == PromotionRequest.Status.PENDING
    assert not Alias.objects.exists() and not WebhookEvent.objects.exists()


def test_override_covers_only_the_rules_the_admin_saw_failing(gate_world, client_for):
    """An admin overrides the failing "votes" rule from the page; before they submit, a PII leak is
    flagged in another run of the version. The override must not silently cover that new failure."""
    from eval_app.models import Alias, PromotionRequest
    from eval_app.services import gate

    v = gate_world.version()
    gate_world.run(v, wins=5)
    req = gate.request_promotion(gate_world.requester, v, "production")
    admin = client_for(gate_world.approver)
    page = admin.get(reverse("eval:promotion", args=[req.pk])).content.decode()
    assert 'name="override_seen" value="votes"' in page
    gate_world.run(v, wins=5, pii_leaks=2)  # new evidence of a leak arrives meanwhile
    why = "Hotfix: only a few votes but all of them wins; full evaluation follows."
    url = reverse("eval:promotion_approve", args=[req.pk])
    page = admin.post(
        url, {"override": "1", "override_seen": "votes", "justification": why}, follow=True
    ).content.decode()
    assert "No PII leak flagged" in page and "changed" in page
    req.refresh_from_db()
    assert req.status == PromotionRequest.Status.PENDING and not Alias.objects.exists()
    # having seen both failures, the admin may still override them on purpose
    page = admin.post(
        url, {"override": "1", "override_seen": "votes,pii", "justification": why}, follow=True
    ).content.decode()
    req.refresh_from_db()
    assert req.status == PromotionRequest.Status.APPROVED and req.overridden


# =====================================================================================================
# Personal data in the answers on the blind review page
# =====================================================================================================


def test_review_page_masks_personal_data_in_both_answers_alike(world: World, make_user, client_for):
    """A leaked e-mail address was shown to reviewers in clear (the run page masked it for engineers).
    Both answers are scanned and masked the same way, so the mask does not tell which is the candidate."""
    from eval_app.models import Comparison, Generation

    run = world.run(
        world.version(1),
        n=1,
        outputs=[("Write to jane.roe@example.com today.", "Mail max.mustermann@example.org now.")],
    )
    for generation in Generation.objects.filter(run=run):
        start = generation.output.index("@") - 8
        end = generation.output.index(".", generation.output.index("@")) + 4
        generation.pii_entities = [
            {"type": "EMAIL_ADDRESS", "start": start, "end": end, "score": 1.0, "echo": False}
        ]
        generation.save()
    reviewer = make_user("rita", "reviewer")
    comparison = voting.claim_next(reviewer)
    assert comparison == Comparison.objects.get(run=run)
    client = client_for(reviewer)
    page = client.get(reverse("eval:review", args=[comparison.pk])).content.decode()
    assert "jane.roe@" not in page and "mustermann@" not in page
    assert page.count("[EMAIL_ADDRESS]") == 2
    assert "Write to" in page and "Mail max." in page  # the rest of each answer is shown

    engineer = client_for(world.owner)
    detail = engineer.get(reverse("eval:run", args=[run.pk])).content.decode()
    assert "jane.roe@" not in detail and "mustermann@" not in detail


def test_review_time_comes_from_the_server_not_the_browser(world: World, make_user, client_for):
    """The time a reviewer took was computed from a `shown_at` the browser sent: any value could be
    posted (here: a page shown 3 hours ago). The form now carries the time signed by the server."""
    import re
    import time

    from eval_app.models import Vote

    world.run(world.version(1), n=2, wanted=[1, 1])
    reviewer = make_user("rita", "reviewer")
    client = client_for(reviewer)
    first = voting.claim_next(reviewer)
    forged = client.post(
        reverse("eval:review", args=[first.pk]), {"choice": "a", "shown_at": f"{time.time() - 10800:.3f}"}
    )
    assert forged.status_code == 302
    assert Vote.objects.get(comparison=first).seconds is None  # a made-up time is not recorded

    second = voting.claim_next(reviewer)
    page = client.get(reverse("eval:review", args=[second.pk])).content.decode()
    token = re.search(r'name="shown_at" value="([^"]+)"', page)[1]
    client.post(reverse("eval:review", args=[second.pk]), {"choice": "b", "shown_at": token})
    seconds = Vote.objects.get(comparison=second).seconds
    assert seconds is not None and 0 <= seconds < 60
