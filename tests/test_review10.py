"""Mends of the tenth session's review: each test failed before its fix."""

from __future__ import annotations

import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from test_datasets import GOOD, write_jsonl
from test_datasets import dataset as dataset  # noqa: F401 - the fixture
from test_eval_stats import world as world  # noqa: F401 - the fixture

from datasets_app.models import Dataset, Example, Upload
from datasets_app.pii import PATTERN_MAX_CHARS, PiiPolicy

pytestmark = pytest.mark.django_db


def test_a_very_long_keep_pattern_is_refused_quickly_by_the_policy_not_probed_for_minutes():
    """The backtracking probe's time grows with about the cube of a pattern's length (10,000 characters
    took 356 s): the policy refuses a longer pattern before probing it, naming the field, and the error
    quotes the pattern cut short."""
    long = "x" * 10_000
    t0 = time.perf_counter()
    errors = PiiPolicy(keep_patterns=[r"ORD-\d{6}", long], custom_recognizers=[]).validate()
    assert time.perf_counter() - t0 < 5
    assert len(errors) == 1
    assert errors[0].startswith("keep_patterns[1]: invalid regex 'xxxx")
    assert "(10,000 characters): it is 10,000 characters long; at most 500 are allowed" in errors[0]
    assert len(errors[0]) < 400
    assert PiiPolicy(keep_patterns=["x" * PATTERN_MAX_CHARS]).validate() == []


def test_import_command_refuses_a_very_long_keep_pattern_and_creates_nothing(tmp_path, roles):
    path = write_jsonl(tmp_path / "good.jsonl", GOOD)
    t0 = time.perf_counter()
    with pytest.raises(CommandError, match="at most 500 are allowed"):
        call_command(
            "import_dataset",
            str(path),
            "--name",
            "Long pattern",
            "--keep-pattern",
            "9" * 5000,
            stdout=StringIO(),
            stderr=StringIO(),
        )
    assert time.perf_counter() - t0 < 10
    assert not Dataset.objects.filter(name="Long pattern").exists()
    assert Upload.objects.count() == 0 and Example.objects.count() == 0


# --- NUL characters (PostgreSQL refuses them in text: tests/test_param_fuzz.py found these on it) -------


def test_an_edit_with_a_nul_in_a_tag_is_refused_in_words_and_changes_nothing(dataset, curator, tmp_path):
    from test_datasets import scanned

    from datasets_app.services import datasets

    scanned(dataset, tmp_path)
    ex = Example.objects.order_by("position").first()
    before = (ex.messages, ex.tags)
    with pytest.raises(
        datasets.EditRefused, match=r"The tag 2 contains a NUL character \(\\u0000\); remove it"
    ):
        datasets.edit_example(ex, messages=ex.messages, tags=["fine", "bad\x00tag"], user=curator)
    ex.refresh_from_db()
    assert (ex.messages, ex.tags) == before


def test_filters_with_a_nul_are_read_without_it_and_a_type_decision_with_one_is_refused(
    dataset, curator, client_for, tmp_path
):
    from django.urls import reverse
    from test_datasets import scanned

    from datasets_app.models import PiiFinding

    scanned(dataset, tmp_path)
    client = client_for(curator)
    assert (
        client.get(reverse("datasets:examples", args=[dataset.pk]), {"q": "\x00", "tag": "\x00"}).status_code
        == 200
    )
    assert client.get(reverse("datasets:pii", args=[dataset.pk]), {"type": "PER\x00SON"}).status_code == 200
    pending = PiiFinding.objects.filter(decision=PiiFinding.Decision.PENDING).count()
    response = client.post(
        reverse("datasets:pii_decide_type", args=[dataset.pk]),
        {"type": "PER\x00SON", "action": "accept"},
        follow=True,
    )
    assert "Choose a finding type from the list on this page." in response.content.decode()
    assert PiiFinding.objects.filter(decision=PiiFinding.Decision.PENDING).count() == pending


def test_a_vote_comment_with_a_nul_is_refused_and_no_vote_is_stored(world, make_user):
    from eval_app.models import Vote
    from eval_app.services import voting

    reviewer = make_user("rev-nul", "reviewer")
    world.run(world.version(1), n=1)
    comparison = voting.claim_next(reviewer)
    with pytest.raises(voting.VoteRefused, match=r"The comment contains a NUL character"):
        voting.cast_vote(reviewer, comparison, "a", comment="fine\x00")
    assert not Vote.objects.exists()
    assert voting.cast_vote(reviewer, comparison, "a", comment="fine").comment == "fine"
