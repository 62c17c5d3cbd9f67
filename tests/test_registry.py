"""Model registry: serving names, the model list, a line's page (versions, aliases, history, leaderboard),
a version's page, the lineage page's links, and who may see them."""

from __future__ import annotations

import pytest
from django.urls import reverse
from test_gate import World

from eval_app.models import ModelVersion
from eval_app.services import gate
from eval_app.services.registry import resolve_model_name

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(make_user, curator):
    return World(make_user, curator)


@pytest.fixture
def promoted(world):
    """support/1 in production, support/2 a candidate with a weaker run against support/1."""
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.promote(v1)
    run2 = world.run(v2, baseline=v1, wins=18, losses=12, loss=0.9, baseline_loss=1.0)
    return v1, v2, run2


# --- names ------------------------------------------------------------------------------------------


def test_resolve_model_name_by_alias_and_number(world, promoted):
    v1, v2, _ = promoted
    assert resolve_model_name("support@production") == v1
    assert resolve_model_name("support/2") == v2
    assert resolve_model_name(" support/1 ") == v1
    for bad in ("support", "support@", "@production", "support/x", "/2", "a@b@c", ""):
        with pytest.raises(ValueError, match="not a model name"):
            resolve_model_name(bad)
    for missing in ("support@staging", "other@production", "support/9", "other/1"):
        with pytest.raises(ModelVersion.DoesNotExist):
            resolve_model_name(missing)


def test_resolve_follows_a_rollback(world):
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.good_run(v2)
    world.promote(v1)
    world.promote(v2)
    assert resolve_model_name("support@production") == v2
    gate.rollback(world.approver, world.line, "production")
    assert resolve_model_name("support@production") == v1


# --- pages ------------------------------------------------------------------------------------------


def test_model_list_shows_versions_aliases_and_latest_win_rates(world, promoted, client_for):
    page = client_for(world.trainer).get(reverse("eval:models")).content.decode()
    assert reverse("eval:model", args=[world.line.pk]) in page
    assert "production → v1" in page
    assert "<strong>0.60</strong>" in page  # v2: 18 of 30 against production
    assert "<strong>1.00</strong>" in page  # production's own latest run: 30 of 30


def test_model_page_lists_versions_history_and_leaderboard(world, promoted, client_for):
    v1, v2, run2 = promoted
    page = client_for(world.trainer).get(reverse("eval:model", args=[world.line.pk])).content.decode()
    assert v1.get_absolute_url() in page and v2.get_absolute_url() in page
    assert reverse("eval:lineage", args=[v2.pk]) in page
    assert "<strong>0.60</strong>" in page and "[0.42, 0.75]" in page  # Wilson interval of 18/30
    assert "support-chats v1" in page  # dataset version column
    assert "<code>support@production</code>" in page
    assert "Alias history" in page and "promotion" in page
    assert "Bradley–Terry" in page and "support/2" in page
    assert "Roll back" not in page  # engineers do not get the button


def test_version_page_shows_config_metrics_runs_and_request_form(world, promoted, client_for):
    v1, v2, run2 = promoted
    page = client_for(world.trainer).get(reverse("eval:version", args=[v2.pk])).content.decode()
    assert "lora_r" in page and "learning_rate" in page and "train_loss" in page
    assert v2.training_job.get_absolute_url() in page
    assert world.data.get_absolute_url() in page
    assert f"run {run2.pk}" in page and "support/1" in page  # baseline label
    assert reverse("eval:promotion_request", args=[v2.pk]) in page and "Request promotion" in page
    assert 'data-rule="win_rate"' in page  # the policy check as it stands
    assert "<code>support/2</code>" in page  # serving name
    assert f"{reverse('eval:run_new')}?version={v2.pk}" in page  # "Evaluate" preselects this version


def test_version_page_policy_preview_for_another_alias(world, promoted, client_for):
    _, v2, _ = promoted
    client = client_for(world.trainer)
    page = client.get(reverse("eval:version", args=[v2.pk]), {"alias": "staging"}).content.decode()
    assert "Policy check for <code>staging</code>" in page
    page = client.get(reverse("eval:version", args=[v2.pk]), {"alias": "no good!"}).content.decode()
    assert "Policy check for <code>production</code>" in page


def test_lineage_links_every_step(world, promoted, client_for):
    v1, v2, run2 = promoted
    req = gate.request_promotion(world.requester, v2, "staging")
    page = client_for(world.trainer).get(reverse("eval:lineage", args=[v1.pk])).content.decode()
    assert reverse("datasets:version", args=[world.data.pk]) in page
    assert reverse("training:job", args=[v1.training_job.pk]) in page
    assert v1.get_absolute_url() in page
    approved = v1.promotions.get()
    assert reverse("eval:promotion", args=[approved.pk]) in page
    # v1 is the baseline of run2: listed with its role, the candidate and the vote count
    assert "baseline" in page and v2.get_absolute_url() in page
    assert '<td class="num">30</td>' in page
    assert reverse("eval:run", args=[run2.pk]) in page
    assert "support@production" in page  # the alias change
    page2 = client_for(world.trainer).get(reverse("eval:lineage", args=[v2.pk])).content.decode()
    assert reverse("eval:promotion", args=[req.pk]) in page2


# --- roles ------------------------------------------------------------------------------------------


@pytest.fixture
def registry_urls(world, promoted):
    v1, _, _ = promoted
    return [
        reverse("eval:models"),
        reverse("eval:model", args=[world.line.pk]),
        reverse("eval:version", args=[v1.pk]),
        reverse("eval:lineage", args=[v1.pk]),
    ]


def test_reviewers_and_curators_are_denied_registry_pages(world, registry_urls, client_for):
    for user in (world.voter, world.curator):
        client = client_for(user)
        for url in registry_urls:
            response = client.get(url)
            assert response.status_code == 403, url
            assert b"support/1" not in response.content  # nothing about the models leaks


def test_engineers_and_admins_see_registry_pages(world, registry_urls, client_for):
    for user in (world.trainer, world.approver):
        client = client_for(user)
        for url in registry_urls:
            assert client.get(url).status_code == 200, url


def test_anonymous_visitors_are_sent_to_sign_in(registry_urls, client_for):
    response = client_for(None).get(registry_urls[0])
    assert response.status_code == 302 and "/login" in response["Location"]


def test_sidebar_links_models_for_engineers_only(world, client_for):
    models, promotions = f'href="{reverse("eval:models")}"', f'href="{reverse("eval:promotions")}"'
    engineer_home = client_for(world.trainer).get(reverse("home")).content.decode()
    assert models in engineer_home and promotions not in engineer_home
    assert models not in client_for(world.voter).get(reverse("home")).content.decode()
    assert promotions in client_for(world.approver).get(reverse("home")).content.decode()
