"""The pre-launch estimate leaves out the train examples the trainer will skip (no trained token within the
max length: a prompt that alone fills it), says how many and why, and refuses a launch that would skip
them all. The expected figures come from the trainer's own code run on the rows the worker writes for it
(`tokenize_conversations` for SFT; TRL's DPOTrainer dataset preparation for DPO), with the real SmolLM2
tokenizer, so the estimate and the trainer agree by construction."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import make_version
from django.urls import reverse
from test_training_jobs import _no_heartbeat_thread_writes as _no_heartbeat_thread_writes  # noqa: F401

from datasets_app import tokens
from datasets_app.models import Example
from datasets_app.services import versions
from datasets_app.services.datasets import create_dataset
from training_app.models import TrainingJob
from training_app.services import jobs, register_local_dir
from training_app.trainer import data as trainer_data

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

MAX = 64
LONG = " ".join(
    ["my parcel was supposed to arrive last week but the tracking page still says it is waiting at the depot"]
    * 3
)
SHORT = [
    {"role": "user", "content": "where is my parcel"},
    {"role": "assistant", "content": "it ships tomorrow"},
]
OTHER = [
    {"role": "user", "content": "how do i reset the router"},
    {"role": "assistant", "content": "hold it"},
]
# the prompt alone fills the max length: no answer token within it, the trainer skips the row
LONG_PROMPT = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "it ships tomorrow"}]
LONG_PROMPT_2 = [{"role": "user", "content": "hello " + LONG}, {"role": "assistant", "content": "sorry"}]
# longer than the max length too, but its first answer lies within it: cut, not skipped
LONG_KEPT = SHORT + [{"role": "user", "content": LONG}, {"role": "assistant", "content": "sorry about that"}]
# positions 0-4 of the train split: candidates (longer than MAX) are 2, 3 and 4
MIXED = [SHORT, OTHER, LONG_KEPT, LONG_PROMPT, LONG_PROMPT_2]
# preference pairs: TRL drops the two whose prompt fills MAX tokens
PAIRS = [
    ([{"role": "user", "content": "where is my parcel"}], "it ships tomorrow", "no idea"),
    ([{"role": "user", "content": LONG}], "it ships tomorrow", "no idea"),
    ([{"role": "user", "content": "how do i reset the router"}], "hold the button", "buy a new one"),
    ([{"role": "user", "content": "hello " + LONG}], "sorry", "no"),
]
SKIPPED_SENTENCE = (
    "2 of 5 train examples would be skipped: their prompt alone fills the max length of 64 tokens; "
    "raise the max length or shorten them."
)
ALL_SKIPPED = (
    "All 2 train examples would be skipped: their prompt alone fills the max length of 64 tokens, so the "
    "job would have nothing to learn. Raise the max length or shorten them."
)


@pytest.fixture
def smollm2(smollm2_dir, admin_user):
    return register_local_dir("SmolLM2-skips", Path(smollm2_dir), admin_user)


def _version(user, base, items, *, kind="sft", name="skips", eval_items=()):
    """A frozen version of `items` (conversations, or (prompt messages, chosen, rejected) for preference)
    in the train split (and `eval_items` after them in the eval split), with the token counts the importer
    stores for `base` (so train_lengths uses them)."""
    tokenizer = tokens.load_tokenizer(base.local_dir)
    dataset = create_dataset(name, kind, user, base_model=base)
    splits = ["train"] * len(items) + ["eval"] * len(eval_items)
    for position, (item, split) in enumerate(zip([*items, *eval_items], splits, strict=True)):
        if kind == "preference":
            messages, chosen, rejected = item
            fields = {"chosen": chosen, "rejected": rejected}
            sides = [messages + [{"role": "assistant", "content": a}] for a in (chosen, rejected)]
            count = max(tokens.count_many(tokenizer, sides))
        else:
            messages, fields = item, {}
            count = tokens.count_many(tokenizer, [messages])[0]
        Example.objects.create(
            dataset=dataset,
            position=position,
            messages=messages,
            split=split,
            content_hash=f"{position:064d}",
            token_count=count,
            pii_status=Example.Pii.CLEAN,
            **fields,
        )
    return versions.freeze(dataset, user, changelog="test data")


def _trainer_tokenizer(base):
    """The tokenizer as the trainer loads it (training_app.trainer.run)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base.local_dir), local_files_only=True)


def _trainer_sft(version, base, max_length=MAX, assistant_only_loss=True, split="train"):
    """(kept examples, dropped count) as the trainer makes them from the rows the worker writes."""
    rows = jobs._rows(version, split)
    return trainer_data.tokenize_conversations(
        _trainer_tokenizer(base), trainer_data.check_sft_rows(rows), max_length, assistant_only_loss
    )


def _config(**overrides) -> dict:
    config, problems = jobs.normalise_config(
        {**jobs.PRESETS["smoke"]["config"], "max_steps": None, "max_length": MAX, **overrides}
    )
    assert problems == []
    return config


def _estimate(version, base, method="lora", **overrides) -> dict:
    return jobs.estimate(dataset_version=version, base_model=base, method=method, config=_config(**overrides))


def _request(version, base, method="lora", **overrides):
    return jobs.JobRequest(
        dataset_version=version, base_model=base, method=method, config=_config(**overrides), preset="smoke"
    )


def _form(client, version, base, **fields) -> dict:
    page = client.get(reverse("training:job_new") + "?preset=smoke")
    data = {k: v for k, v in page.context["form"].initial.items() if v is not None and v is not False}
    data.update(dataset_version=version.pk, base_model=base.pk, max_length=MAX, max_steps="", **fields)
    return {k: v for k, v in data.items() if v is not None}


def _estimate_page(client, version, base, **fields) -> str:
    response = client.post(reverse("training:job_estimate"), _form(client, version, base, **fields))
    assert response.status_code == 200
    return response.content.decode()


def test_examples_whose_prompt_fills_the_max_length_are_left_out_of_the_estimate(
    client_for, engineer, curator, smollm2
):
    version = _version(curator, smollm2, MIXED)
    lengths = [c.token_count for c in version.examples.filter(split="train").order_by("position")]
    assert [n > MAX for n in lengths] == [False, False, True, True, True]
    kept, dropped = _trainer_sft(version, smollm2)
    assert (len(kept), dropped) == (3, 2)  # the trainer keeps SHORT, OTHER and LONG_KEPT

    figures = _estimate(version, smollm2)
    assert figures["examples"] == 3 == len(kept)
    assert figures["rows"] == 3
    assert figures["truncated_examples"] == 1  # LONG_KEPT, cut at the max length
    assert figures["tokens_per_epoch"] == trainer_data.count_tokens(kept) == lengths[0] + lengths[1] + MAX
    assert figures["steps_per_epoch"] == figures["steps"] == 2  # 3 rows, batch 2 (5 rows would make 3)
    assert figures["skipped"] == {
        "examples": 2, "of": 5, "max_length": MAX, "candidates": 3, "measured": 3, "approximate": False,
    }  # fmt: skip
    assert figures["approximate"] is False and figures["examples_approximate"] is False

    page = _estimate_page(client_for(engineer), version, smollm2)
    assert SKIPPED_SENTENCE in page
    assert "<dt>Examples</dt><dd>3 " in page

    # packing packs only the kept examples (the two skipped would have made two more full rows)
    packed = _estimate(version, smollm2, packing=True)
    assert packed["examples"] == 3
    assert packed["rows"] == len(trainer_data.packed_rows(kept, MAX, 42)) == 3

    # the launched job keeps these figures and its step count
    job = jobs.create_job(_request(version, smollm2), engineer)
    assert job.estimate["examples"] == 3 and job.estimate["skipped"]["examples"] == 2
    assert job.total_steps == 2


def test_a_single_skipped_example_is_named_in_the_singular(client_for, engineer, curator, smollm2):
    version = _version(curator, smollm2, [SHORT, OTHER, LONG_PROMPT])
    assert _trainer_sft(version, smollm2)[1] == 1
    assert _estimate(version, smollm2)["examples"] == 2
    page = _estimate_page(client_for(engineer), version, smollm2)
    assert (
        "1 of 3 train examples would be skipped: its prompt alone fills the max length of 64 tokens; "
        "raise the max length or shorten it." in page
    )


def test_a_launch_that_would_skip_every_example_is_refused(client_for, engineer, curator, smollm2):
    version = _version(curator, smollm2, [LONG_PROMPT, LONG_PROMPT_2])
    kept, dropped = _trainer_sft(version, smollm2)
    assert (kept, dropped) == ([], 2)  # the trainer would fail: "No training row has an assistant answer…"

    _config_, _name, problems, figures = jobs.preview(_request(version, smollm2))
    assert figures is None and problems == [ALL_SKIPPED]
    with pytest.raises(jobs.JobRefused) as refused:
        jobs.create_job(_request(version, smollm2), engineer)
    assert refused.value.problems == [ALL_SKIPPED]

    client = client_for(engineer)
    page = _estimate_page(client, version, smollm2)
    assert "This job cannot run yet" in page and ALL_SKIPPED in page
    response = client.post(reverse("training:job_new"), _form(client, version, smollm2))
    assert response.status_code == 200 and ALL_SKIPPED in response.content.decode()
    assert not TrainingJob.objects.exists()

    # a max length that holds the prompts lets it run, with every example
    figures = _estimate(version, smollm2, max_length=256)
    assert figures["examples"] == 2 and figures["skipped"]["examples"] == 0


def test_nothing_longer_than_the_max_length_leaves_the_figures_as_they_were(
    client_for, engineer, curator, smollm2, monkeypatch
):
    version = _version(curator, smollm2, [SHORT, OTHER, SHORT[:1] + OTHER[1:]])
    lengths = [c.token_count for c in version.examples.filter(split="train").order_by("position")]
    assert max(lengths) <= MAX
    kept, dropped = _trainer_sft(version, smollm2)
    assert (len(kept), dropped) == (3, 0)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("no example is longer than the max length: nothing to tokenise")

    monkeypatch.setattr(trainer_data, "tokenize_conversations", no_tokenising)
    figures = _estimate(version, smollm2)
    assert figures["examples"] == 3 and figures["rows"] == 3 and figures["truncated_examples"] == 0
    assert figures["tokens_per_epoch"] == sum(lengths) == trainer_data.count_tokens(kept)
    assert figures["steps"] == 2
    assert figures["skipped"]["examples"] == 0 and figures["skipped"]["candidates"] == 0
    assert figures["approximate"] is False and figures["steps_approximate"] is False
    page = _estimate_page(client_for(engineer), version, smollm2)
    assert "would be skipped" not in page
    assert "<dt>Examples</dt><dd>3</dd>" in page


def test_without_assistant_only_loss_nothing_is_skipped(client_for, engineer, curator, smollm2, monkeypatch):
    version = _version(curator, smollm2, MIXED)
    kept, dropped = _trainer_sft(version, smollm2, assistant_only_loss=False)
    assert (len(kept), dropped) == (5, 0)  # every token is trained: a cut row still has some

    def no_tokenising(*args, **kwargs):
        raise AssertionError("without assistant-only loss no row can be skipped: nothing to tokenise")

    monkeypatch.setattr(trainer_data, "tokenize_conversations", no_tokenising)
    figures = _estimate(version, smollm2, assistant_only_loss=False)
    assert figures["examples"] == 5 and figures["truncated_examples"] == 3
    assert figures["tokens_per_epoch"] == trainer_data.count_tokens(kept)
    assert figures["skipped"]["examples"] == 0
    page = _estimate_page(client_for(engineer), version, smollm2, assistant_only_loss="")
    assert "would be skipped" not in page


def sampled_mixed(curator, smollm2, monkeypatch):
    """The MIXED version with a sample of 2, and the conversations the trainer's tokenisation is given."""
    version = _version(curator, smollm2, MIXED)
    monkeypatch.setattr(jobs, "TOKEN_SAMPLE_SIZE", 2)
    measured = []
    real = trainer_data.tokenize_conversations

    def tokenize_conversations(tokenizer, conversations, *args, **kwargs):
        measured.extend(conversations)
        return real(tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(trainer_data, "tokenize_conversations", tokenize_conversations)
    return version, measured


def assert_sampled(version, measured) -> None:
    # candidates 2, 3, 4; the sample is 2 and one of 3 and 4 (one pick per stretch): the first kept, the
    # second skipped, so round(1 * 3 / 2) = 2 skipped
    candidates = [LONG_KEPT, LONG_PROMPT, LONG_PROMPT_2]
    assert measured == [candidates[i] for i in jobs.spread_sample(3, 2, version.pk)]
    assert measured[0] == LONG_KEPT and measured[1] in (LONG_PROMPT, LONG_PROMPT_2)


def test_many_long_examples_are_measured_on_a_sample(client_for, engineer, curator, smollm2, monkeypatch):
    version, measured = sampled_mixed(curator, smollm2, monkeypatch)
    figures = _estimate(version, smollm2)
    assert_sampled(version, measured)
    assert figures["skipped"] == {
        "examples": 2, "of": 5, "max_length": MAX, "candidates": 3, "measured": 2, "approximate": True,
    }  # fmt: skip
    assert figures["examples"] == 3
    assert figures["approximate"] is True and figures["examples_approximate"] is True
    assert figures["steps_approximate"] is True
    page = _estimate_page(client_for(engineer), version, smollm2)
    assert "about " + SKIPPED_SENTENCE in page
    assert "<dt>Examples</dt><dd>about 3 " in page
    assert len(measured) == 2  # the page's request took the measurement from the cache


def test_replayed_examples_are_the_rows_the_worker_mixes_in(curator, smollm2):
    """The replay share is of the whole train split (the worker mixes it in before the trainer skips), and
    the estimate counts the very rows the worker's seeded draw picks, not a mean."""
    replayed = make_version(curator, name="replayed")  # 8 train examples, stored counts 12 to 19
    replay_lengths, _source = jobs.train_lengths(replayed, smollm2)
    version = _version(curator, smollm2, MIXED)
    config = _config()
    figures = jobs.estimate(
        dataset_version=version,
        base_model=smollm2,
        method="lora",
        config=config,
        replay_version=replayed,
        replay_percent=40,  # round(5 * 40 / 100) = 2 replayed examples
    )
    picks = trainer_data.replay_picks(5, 8, 40, config["seed"])
    assert len(picks) == 2
    assert figures["examples"] == 3 + 2
    kept, _dropped = _trainer_sft(version, smollm2)
    assert figures["tokens_per_epoch"] == trainer_data.count_tokens(kept) + sum(
        replay_lengths[i] for i in picks
    )
    assert figures["skipped"]["examples"] == 2 and figures["skipped"]["of"] == 5
    assert figures["replay"] == {"examples": 2, "skipped": 0, "max_length": MAX, "approximate": False}


def test_replayed_examples_the_trainer_skips_are_left_out_as_the_worker_would_skip_them(
    client_for, engineer, curator, smollm2
):
    replayed = _version(curator, smollm2, MIXED, name="replay-source")  # positions 3 and 4 are skipped
    version = _version(curator, smollm2, [SHORT, OTHER, SHORT, OTHER], name="replay-target")
    config = _config()
    figures = jobs.estimate(
        dataset_version=version, base_model=smollm2, method="lora", config=config,
        replay_version=replayed, replay_percent=100,
    )  # fmt: skip
    # what the worker does: mix the replay rows in, then the trainer tokenises and skips
    mixed = trainer_data.mix_replay(
        jobs._rows(version, "train"), jobs._rows(replayed, "train"), 100, config["seed"]
    )
    kept, dropped = trainer_data.tokenize_conversations(
        _trainer_tokenizer(smollm2), trainer_data.check_sft_rows(mixed), MAX, True
    )
    picks = trainer_data.replay_picks(4, 5, 100, config["seed"])
    expected_skips = sum(1 for i in picks if i in (3, 4))
    assert dropped == expected_skips  # the draw below is the worker's
    assert figures["examples"] == len(kept) == 4 + 4 - expected_skips
    assert figures["tokens_per_epoch"] == trainer_data.count_tokens(kept)
    assert figures["replay"]["skipped"] == expected_skips and figures["replay"]["examples"] == 4
    assert figures["skipped"]["examples"] == 0  # the version's own rows are all kept
    assert expected_skips in (1, 2)  # 4 of the 5 rows drawn: at least one of the two long prompts
    page = _estimate_page(
        client_for(engineer), version, smollm2, replay_version=replayed.pk, replay_percent=100
    )
    assert f"{expected_skips} of the 4 replayed examples would be skipped" in page


def _mix_replay_as_before(train_rows, replay_rows, percent, seed):
    """mix_replay as it was written before `replay_picks` (sampling the rows themselves)."""
    import random

    wanted = round(len(train_rows) * percent / 100)
    if wanted <= 0 or not replay_rows:
        return list(train_rows)
    rng = random.Random(seed)
    if wanted <= len(replay_rows):
        extra = rng.sample(list(replay_rows), wanted)
    else:
        extra = list(replay_rows) + rng.choices(list(replay_rows), k=wanted - len(replay_rows))
    mixed = list(train_rows) + extra
    rng.shuffle(mixed)
    return mixed


def test_the_replay_draw_is_mix_replays_own():
    """`replay_picks` names exactly the rows `mix_replay` adds, with and without replacement, and the mix
    is the one earlier jobs got for the same seed."""
    for train, replay, percent, seed in [
        (10, 7, 50, 1),
        (10, 3, 100, 2),
        (5, 40, 40, 42),
        (1, 1, 10, 3),
        (9, 9, 200, 4),
    ]:
        rows = [{"train": i} for i in range(train)]
        pool = [{"replay": i} for i in range(replay)]
        mixed = trainer_data.mix_replay(rows, pool, percent, seed)
        assert mixed == _mix_replay_as_before(rows, pool, percent, seed)
        added = sorted(r["replay"] for r in mixed if "replay" in r)
        assert added == sorted(trainer_data.replay_picks(train, replay, percent, seed))
        assert len(mixed) == train + round(train * percent / 100)


def _train(version):
    return version.examples.filter(split="train").order_by("position")


def _trl_keeps(version, base, tmp_path, max_length=MAX, split="train") -> int:
    """How many pairs TRL's DPOTrainer keeps of the rows the worker writes (its own dataset preparation:
    tokenising, then dropping the pairs whose prompt fills the max length)."""
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    tokenizer = _trainer_tokenizer(base)
    items = trainer_data.preference_rows(jobs._rows(version, split))
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=max_length, use_cpu=True, bf16=False)
    stub = SimpleNamespace(_tokenizer=tokenizer, _is_vision_dataset=False)
    return len(DPOTrainer._prepare_dataset(stub, Dataset.from_list(items), tokenizer, args, "train"))


def test_preference_pairs_whose_prompt_fills_the_max_length_are_left_out(
    client_for, engineer, curator, smollm2, tmp_path
):
    version = _version(curator, smollm2, PAIRS, kind="preference", name="prefs")
    assert _trl_keeps(version, smollm2, tmp_path) == 2

    figures = _estimate(version, smollm2, method="dpo", packing=False)
    assert figures["examples"] == 2
    assert figures["skipped"]["examples"] == 2 and figures["skipped"]["of"] == 4
    short = [c.token_count for c in _train(version)][0::2]
    assert figures["tokens_per_epoch"] == sum(short)
    page = _estimate_page(client_for(engineer), version, smollm2, method="dpo", packing="")
    assert (
        "2 of 4 train examples would be skipped: their prompt alone fills the max length of 64 tokens; "
        "raise the max length or shorten them." in page
    )

    only_long = _version(curator, smollm2, PAIRS[1::2], kind="preference", name="long-prefs")
    # the trainer would fail: "No preference pair's prompt fits in the max length…"
    assert _trl_keeps(only_long, smollm2, tmp_path) == 0
    with pytest.raises(jobs.JobRefused) as refused:
        jobs.create_job(_request(only_long, smollm2, method="dpo", packing=False), engineer)
    assert refused.value.problems == [ALL_SKIPPED]


# --- the eval split: the trainer tokenises it the same way and skips the same rows; with evaluation every
# N steps on and none left it fails at its start ("No evaluation row has an assistant answer within the
# max length…"; DPO: "No evaluation pair's prompt fits in the max length…")

ALL_EVAL_SKIPPED = (
    "All 2 eval examples would be skipped: their prompt alone fills the max length of 64 tokens, so the "
    "job would have nothing to evaluate every 2 steps. Raise the max length, shorten them or set evaluate "
    "every N steps to 0."
)


def _without(figures: dict, *keys) -> dict:
    return {k: v for k, v in figures.items() if k not in keys}


def test_eval_examples_whose_prompt_fills_the_max_length_are_named_on_the_panel(
    client_for, engineer, curator, smollm2
):
    train = [SHORT, OTHER, LONG_KEPT]
    # positions 0-3 of the eval split: candidates (longer than MAX) are 1 and 3, and 1 is skipped
    evals = [SHORT, LONG_PROMPT, OTHER, LONG_KEPT]
    version = _version(curator, smollm2, train, eval_items=evals)
    lengths = [c.token_count for c in version.examples.filter(split="eval").order_by("position")]
    assert [n > MAX for n in lengths] == [False, True, False, True]
    kept, dropped = _trainer_sft(version, smollm2, split="eval")
    assert (len(kept), dropped) == (3, 1)

    figures = _estimate(version, smollm2, eval_every=2)
    assert figures["eval_skipped"] == {
        "examples": 1, "of": 4, "max_length": MAX, "candidates": 2, "measured": 2, "approximate": False,
    }  # fmt: skip
    # the train figures are those of the same train split without an eval split
    train_only = _estimate(_version(curator, smollm2, train, name="train-only"), smollm2, eval_every=2)
    assert train_only["eval_skipped"] is None
    assert _without(figures, "eval_skipped") == _without(train_only, "eval_skipped")
    assert figures["examples"] == 3 and figures["skipped"]["examples"] == 0

    page = _estimate_page(client_for(engineer), version, smollm2, eval_every=2)
    assert (
        "1 of 4 eval examples would be skipped: its prompt alone fills the max length of 64 tokens; "
        "raise the max length or shorten it." in page
    )
    assert "train examples would be skipped" not in page

    # some eval examples are left: the job runs (as the trainer does, evaluating on the 3 kept)
    job = jobs.create_job(_request(version, smollm2, eval_every=2), engineer)
    assert job.estimate["eval_skipped"]["examples"] == 1

    # two skipped: the plural, beside the train split's own sentence
    both = _version(curator, smollm2, MIXED, name="both", eval_items=[LONG_PROMPT, SHORT, LONG_PROMPT_2])
    assert _trainer_sft(both, smollm2, split="eval")[1] == 2
    page = _estimate_page(client_for(engineer), both, smollm2)
    assert SKIPPED_SENTENCE in page
    assert (
        "2 of 3 eval examples would be skipped: their prompt alone fills the max length of 64 tokens; "
        "raise the max length or shorten them." in page
    )


def test_a_launch_evaluating_every_n_steps_with_every_eval_example_skipped_is_refused(
    client_for, engineer, curator, smollm2
):
    version = _version(curator, smollm2, [SHORT, OTHER], eval_items=[LONG_PROMPT, LONG_PROMPT_2])
    assert _trainer_sft(version, smollm2, split="eval") == ([], 2)  # the trainer would fail at its start
    assert _trainer_sft(version, smollm2)[1] == 0

    _config_, _name, problems, figures = jobs.preview(_request(version, smollm2, eval_every=2))
    assert figures is None and problems == [ALL_EVAL_SKIPPED]
    with pytest.raises(jobs.JobRefused) as refused:
        jobs.create_job(_request(version, smollm2, eval_every=2), engineer)
    assert refused.value.problems == [ALL_EVAL_SKIPPED]

    client = client_for(engineer)
    page = _estimate_page(client, version, smollm2, eval_every=2)
    assert "This job cannot run yet" in page and ALL_EVAL_SKIPPED in page
    response = client.post(reverse("training:job_new"), _form(client, version, smollm2, eval_every=2))
    assert response.status_code == 200 and ALL_EVAL_SKIPPED in response.content.decode()
    assert not TrainingJob.objects.exists()

    # a max length that holds the prompts lets it run, evaluating on both
    figures = _estimate(version, smollm2, eval_every=2, max_length=256)
    assert figures["eval_skipped"]["examples"] == 0 and figures["eval_skipped"]["of"] == 2


def test_every_eval_example_skipped_without_evaluation_every_n_steps_is_allowed(
    client_for, engineer, curator, smollm2
):
    version = _version(curator, smollm2, [SHORT, OTHER], eval_items=[LONG_PROMPT, LONG_PROMPT_2])
    figures = _estimate(version, smollm2, eval_every=0)
    assert figures["eval_skipped"] == {
        "examples": 2, "of": 2, "max_length": MAX, "candidates": 2, "measured": 2, "approximate": False,
    }  # fmt: skip
    assert figures["examples"] == 2 and figures["skipped"]["examples"] == 0
    page = _estimate_page(client_for(engineer), version, smollm2, eval_every=0)
    assert "This job cannot run yet" not in page
    assert (
        "2 of 2 eval examples would be skipped: their prompt alone fills the max length of 64 tokens; "
        "raise the max length or shorten them." in page
    )
    job = jobs.create_job(_request(version, smollm2, eval_every=0), engineer)
    assert job.estimate["eval_skipped"]["examples"] == 2


def test_a_single_eval_example_and_a_train_split_all_skipped_are_both_named(engineer, curator, smollm2):
    version = _version(curator, smollm2, [SHORT], eval_items=[LONG_PROMPT])
    with pytest.raises(jobs.JobRefused) as refused:
        jobs.create_job(_request(version, smollm2, eval_every=1), engineer)
    assert refused.value.problems == [
        "The eval example would be skipped: its prompt alone fills the max length of 64 tokens, so the job "
        "would have nothing to evaluate every step. Raise the max length, shorten it or set evaluate every "
        "N steps to 0."
    ]
    both = _version(
        curator, smollm2, [LONG_PROMPT, LONG_PROMPT_2], name="both", eval_items=[LONG_PROMPT, LONG_PROMPT_2]
    )
    _config_, _name, problems, figures = jobs.preview(_request(both, smollm2, eval_every=2))
    assert figures is None and problems == [ALL_SKIPPED, ALL_EVAL_SKIPPED]
    assert not TrainingJob.objects.exists()


def test_no_long_eval_example_tokenises_nothing_and_leaves_the_figures_as_they_were(
    client_for, engineer, curator, smollm2, monkeypatch
):
    train = [SHORT, OTHER, SHORT[:1] + OTHER[1:]]
    version = _version(curator, smollm2, train, eval_items=[OTHER, SHORT])
    assert max(c.token_count for c in version.examples.all()) <= MAX
    kept, dropped = _trainer_sft(version, smollm2, split="eval")
    assert (len(kept), dropped) == (2, 0)  # the trainer keeps both eval examples
    train_only = _estimate(_version(curator, smollm2, train, name="train-only"), smollm2, eval_every=2)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("no example is longer than the max length: nothing to tokenise")

    monkeypatch.setattr(trainer_data, "tokenize_conversations", no_tokenising)
    figures = _estimate(version, smollm2, eval_every=2)
    assert figures["eval_skipped"] == {
        "examples": 0, "of": 2, "max_length": MAX, "candidates": 0, "measured": 0, "approximate": False,
    }  # fmt: skip
    assert _without(figures, "eval_skipped") == _without(train_only, "eval_skipped")
    page = _estimate_page(client_for(engineer), version, smollm2, eval_every=2)
    assert "would be skipped" not in page and "This job cannot run yet" not in page


def test_eval_counts_made_with_another_tokenizer_are_counted_only_when_evaluating_every_n_steps(
    client_for, engineer, curator, smollm2, monkeypatch
):
    """Without stored counts of the job's tokenizer the eval split is counted (as the train split is)
    only when evaluation every N steps is on, the one case where it can fail the job."""
    from datasets_app.models import DatasetVersion, VersionExample

    # two train and two eval examples: the same number, so each split must keep its own cached counts
    version = _version(curator, smollm2, [SHORT, OTHER], eval_items=[LONG_PROMPT, LONG_PROMPT_2])
    VersionExample.objects.filter(version=version).update(token_count=0)
    DatasetVersion.objects.filter(pk=version.pk).update(base_model=None)
    version.refresh_from_db()
    counted = []
    real = tokens.count_many

    def count_many(tokenizer, conversations):
        counted.append([c[0]["content"][:5] for c in conversations])
        return real(tokenizer, conversations)

    monkeypatch.setattr(tokens, "count_many", count_many)
    figures = _estimate(version, smollm2, eval_every=0)
    assert counted == [["where", "how d"]]  # the train split only
    assert figures["eval_skipped"] is None and figures["token_sources"][0]["method"] == "counted"
    page = _estimate_page(client_for(engineer), version, smollm2, eval_every=0)
    assert "would be skipped" not in page

    counted.clear()
    with pytest.raises(jobs.JobRefused) as refused:
        jobs.create_job(_request(version, smollm2, eval_every=2), engineer)
    assert refused.value.problems == [ALL_EVAL_SKIPPED]
    assert counted == [["my pa", "hello"]]  # the eval split, now; the train split's counts were cached


def test_preference_eval_pairs_whose_prompt_fills_the_max_length_refuse_evaluation_every_n_steps(
    engineer, curator, smollm2, tmp_path
):
    short = [
        ([{"role": "user", "content": "where is my parcel"}], "it ships tomorrow", "no idea"),
        ([{"role": "user", "content": "how do i reset the router"}], "hold the button", "buy a new one"),
    ]
    long = [
        ([{"role": "user", "content": LONG}], "it ships tomorrow", "no idea"),
        ([{"role": "user", "content": "hello " + LONG}], "sorry", "no"),
    ]
    version = _version(curator, smollm2, short, kind="preference", name="prefs", eval_items=long)
    assert _trl_keeps(version, smollm2, tmp_path, split="eval") == 0  # the trainer would fail at its start
    with pytest.raises(jobs.JobRefused) as refused:
        jobs.create_job(_request(version, smollm2, method="dpo", packing=False, eval_every=2), engineer)
    assert refused.value.problems == [ALL_EVAL_SKIPPED]

    mixed = _version(
        curator, smollm2, short, kind="preference", name="mixed-prefs", eval_items=[short[0], *long]
    )
    assert _trl_keeps(mixed, smollm2, tmp_path, split="eval") == 1
    figures = _estimate(mixed, smollm2, method="dpo", packing=False, eval_every=2)
    assert figures["eval_skipped"]["examples"] == 2 and figures["eval_skipped"]["of"] == 3


def test_the_sample_takes_one_random_pick_per_stretch_and_does_not_alias_with_a_pattern():
    assert jobs.spread_sample(5, 8, seed=1) == [0, 1, 2, 3, 4]  # small: every example
    picks = jobs.spread_sample(6000, 2000, seed=11)
    assert picks == jobs.spread_sample(6000, 2000, seed=11)  # the same on every request (cached counts)
    assert picks != jobs.spread_sample(6000, 2000, seed=12)
    assert [p // 3 for p in picks] == list(range(2000))  # exactly one in each stretch of 3, in order
    # data that repeats every 3 examples: evenly spaced picks (every 3rd) would see one kind only
    assert {(i * 6000 // 2000) % 3 for i in range(2000)} == {0}
    for seed in range(20):
        kinds = Counter(p % 3 for p in jobs.spread_sample(6000, 2000, seed))
        assert all(600 <= kinds[k] <= 733 for k in range(3)), (seed, kinds)
