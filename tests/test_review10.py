"""Mends of the tenth session's review: each test failed before its fix."""

from __future__ import annotations

import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from test_datasets import GOOD, write_jsonl

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
