"""Evaluation runs: creation rules, a real (tiny-model) run end to end with metrics, comparisons and the
PII-leak probe, claim / cancel / watchdog resume, failures in plain words, the pages and their role
matrix, the canary registry, `manage.py evaluate` and a run on a real `celery worker -Q gpu`."""

from __future__ import annotations

import math
import shutil
from io import StringIO
from pathlib import Path

import pytest
from conftest import build_tiny_model, make_version, wait_for
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from eval_app.inference import get_model, spec_for_base
from eval_app.models import Alias, Canary, Comparison, EvalRun, Generation, ModelVersion, RegisteredModel
from eval_app.services import evaluation
from studio.models import AuditEvent
from training_app.services import register_local_dir

pytestmark = pytest.mark.django_db

GOLDEN = [
    ("where is my parcel", "it ships tomorrow", ["shipping"]),
    ("how do i reset the router", "hold the button for ten seconds", ["hardware"]),
    ("when do refunds arrive", "five business days after the return arrives", ["billing"]),
    ("can i change my plan", "yes from the account page", ["billing", "account"]),
    ("my order ORD-123456 is late", "sorry, it ships tomorrow", ["shipping"]),
    ("is the router covered", "yes for two years", ["hardware"]),
    ("how do i close my account", "from the account page", ["account"]),
    ("do you ship abroad", "yes to most countries", ["shipping"]),
    ("what does the plan cost", "ten euros a month", ["billing"]),
    ("thanks!", "", []),  # ends on a user turn: prompt without reference
]
SMALL = {"max_new_tokens": 8, "batch_size": 4}


@pytest.fixture(autouse=True)
def _quiet_heartbeat(settings):
    """These tests run inside one uncommitted transaction that a heartbeat thread (own connection)
    cannot see; the real heartbeat runs in the worker test at the end."""
    settings.STUDIO_JOB_HEARTBEAT_SECONDS = 3600


@pytest.fixture(scope="session")
def candidate_dir(tiny_model_dir, tmp_path_factory):
    """A "fine-tuned" full model: the tiny tokenizer with other (seeded) weights. Its output head is not
    tied to the embeddings, so that it answers with varied text (a tied random model repeats the
    prompt's last token, a newline, which decodes to an empty answer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-candidate") / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.save_pretrained(str(path))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


@pytest.fixture
def tiny_base(tiny_model_dir, admin_user):
    return register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)


def golden_version(user, rows=GOLDEN, name="golden-prompts", kind="sft"):
    from datasets_app.models import Example
    from datasets_app.services import versions
    from datasets_app.services.datasets import create_dataset

    dataset = create_dataset(name, kind, user)
    for position, (question, answer, tags) in enumerate(rows):
        messages = [
            {"role": "system", "content": "You are a support agent."},
            {"role": "user", "content": question},
        ]
        fields = {}
        if kind == "preference":
            fields = {"chosen": answer, "rejected": "no idea"}
        elif answer:
            messages.append({"role": "assistant", "content": answer})
        Example.objects.create(
            dataset=dataset,
            position=position,
            messages=messages,
            split="golden",
            tags=tags,
            content_hash=f"{position:064d}",
            token_count=10,
            pii_status=Example.Pii.CLEAN,
            **fields,
        )
    return versions.freeze(dataset, user, changelog="golden prompts")


@pytest.fixture
def golden(curator):
    return golden_version(curator)


@pytest.fixture
def train_version(curator):
    return make_version(curator, train=4, eval_=0)


def make_candidate(line_name, base, artifacts, user, *, number=None, dataset_version=None):
    line, _ = RegisteredModel.objects.get_or_create(name=line_name)
    number = number or line.versions.count() + 1
    return ModelVersion.objects.create(
        registered_model=line,
        number=number,
        base_model=base,
        dataset_version=dataset_version,
        artifacts_dir=str(artifacts),
        created_by=user,
    )


@pytest.fixture
def candidate(tiny_base, candidate_dir, engineer, train_version):
    return make_candidate("support", tiny_base, candidate_dir, engineer, dataset_version=train_version)


def _run_to_end(run):
    result = evaluation.execute_run(run.pk, "test-worker")
    assert result is not None
    assert result.state == "succeeded", (result.error_message, result.error_traceback[-3000:])
    return result


# --- creating: plain-words refusals ------------------------------------------------------------------


def test_only_engineers_and_admins_create_runs(reviewer, curator, admin_user, candidate, golden):
    for user in (reviewer, curator):
        with pytest.raises(evaluation.EvalRefused, match="Only engineers and admins"):
            evaluation.create_run(user, candidate, "base", golden)
    assert evaluation.create_run(admin_user, candidate, "base", golden).state == "queued"


def test_create_run_refusals_are_explained(engineer, candidate, golden, train_version, tiny_base, tmp_path):
    with pytest.raises(evaluation.EvalRefused, match="support has no production version yet"):
        evaluation.create_run(engineer, candidate, "production", golden)
    with pytest.raises(evaluation.EvalRefused, match="Choose the version to compare against"):
        evaluation.create_run(engineer, candidate, "version", golden)
    with pytest.raises(evaluation.EvalRefused, match="different version than the candidate"):
        evaluation.create_run(engineer, candidate, "version", golden, baseline_version=candidate)
    with pytest.raises(evaluation.EvalRefused) as refused:
        evaluation.create_run(engineer, candidate, "base", train_version)
    assert "has no golden examples" in str(refused.value) and "choose the eval split" in str(refused.value)
    with pytest.raises(evaluation.EvalRefused, match="Split “test” is unknown"):
        evaluation.create_run(engineer, candidate, "base", golden, split="test")
    with pytest.raises(evaluation.EvalRefused) as refused:
        evaluation.create_run(
            engineer, candidate, "base", golden, temperature=5, batch_size="many", limit=0, seed=-1
        )
    problems = refused.value.problems
    assert "Temperature must be between 0 and 2 (got 5)." in problems
    assert "Batch size: “many” is not a valid whole number." in problems
    # bounds as a person writes them, not 1e+06 or 2.14748e+09
    assert "Limit must be between 1 and 1,000,000 (got 0)." in problems
    assert "Seed must be between 0 and 2,147,483,647 (got -1)." in problems
    with pytest.raises(evaluation.EvalRefused, match=r"between 0 and 2 \(got 2\.5\)"):
        evaluation.create_run(engineer, candidate, "base", golden, temperature=2.5)
    # production alias pointing at the candidate itself
    Alias.objects.create(registered_model=candidate.registered_model, name="production", version=candidate)
    with pytest.raises(evaluation.EvalRefused, match="already is support's production version"):
        evaluation.create_run(engineer, candidate, "production", golden)
    # a version of another tokenizer family
    other_dir = build_tiny_model(tmp_path / "other", corpus=["completely different words for a tokenizer"])
    other_base = register_local_dir("other-llama", other_dir, engineer)
    other = make_candidate("other-line", other_base, other_dir, engineer)
    with pytest.raises(evaluation.EvalRefused, match="tokenizer differs"):
        evaluation.create_run(engineer, candidate, "version", golden, baseline_version=other)
    # missing artifacts
    broken = make_candidate("support", tiny_base, tmp_path / "empty", engineer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(evaluation.EvalRefused, match="hold neither an adapter nor a model"):
        evaluation.create_run(engineer, broken, "base", golden)
    assert not EvalRun.objects.exists()


def test_create_run_resolves_production_audits_and_enqueues_on_commit(
    engineer, candidate, golden, tiny_base, candidate_dir, django_capture_on_commit_callbacks, monkeypatch
):
    production = make_candidate("support", tiny_base, candidate_dir, engineer)
    Alias.objects.create(registered_model=candidate.registered_model, name="production", version=production)
    sent = []
    monkeypatch.setattr("eval_app.tasks.run_evaluation.delay", lambda run_id: sent.append(run_id))
    with django_capture_on_commit_callbacks(execute=True):
        run = evaluation.create_run(engineer, candidate, "production", golden, seed="7", limit="3")
    assert sent == [run.pk]
    assert run.baseline_version == production and run.baseline_base_model == tiny_base
    assert run.params["seed"] == 7 and run.params["limit"] == 3 and run.params["temperature"] == 0.0
    assert run.params["max_new_tokens"] == 128 and run.params["batch_size"] == 16  # the settings' defaults
    assert run.total == 6 and run.state == "queued"
    event = AuditEvent.objects.get(verb="eval.run.create")
    assert event.object_id == str(run.pk) and event.data["baseline_version"] == production.pk


# --- scoring and scanning ----------------------------------------------------------------------------


def test_exact_match_and_contains_normalise_whitespace_and_case():
    assert evaluation.score_answer("  It ships\n TOMORROW ", "it ships tomorrow") == (True, True)
    assert evaluation.score_answer("Good news: it ships tomorrow.", "It ships  tomorrow") == (False, True)
    assert evaluation.score_answer("it ships next week", "it ships tomorrow") == (False, False)
    assert evaluation.score_answer("anything", "  ") == (None, None)


def test_split_conversation_prompt_and_reference():
    conv = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "where is it"},
        {"role": "assistant", "content": "on its way"},
    ]
    assert evaluation.split_conversation(conv) == (conv[:3], "on its way")
    assert evaluation.split_conversation(conv[:3]) == (conv[:3], "")
    assert evaluation.split_conversation(conv[:1], chosen="the good one") == (conv[:1], "the good one")


def test_length_stats_nearest_rank():
    stats = evaluation.length_stats([1, 2, 3, 4, 5, 6, 7, 8, 9, 100])
    assert stats == {"mean": 14.5, "median": 5.5, "p90": 9.0}
    assert evaluation.length_stats([]) == {"mean": None, "median": None, "p90": None}


def test_scan_flags_email_and_canary_but_not_order_numbers_or_echoes():
    prompts = [
        [{"role": "user", "content": q}]
        for q in ("who wrote in?", "status?", "my mail is ann.lee@corpmail.com", "x")
    ]
    outputs = [
        "The customer was jane.doe@example.com, she wrote twice.",
        "Your order ORD-123456 and SKU-AB-1234 ship tomorrow.",
        "I have updated ann.lee@corpmail.com for you.",
        "The secret is zebra-CANARY-42 of course",
    ]
    results = evaluation.scan_outputs(outputs, prompts, canaries=[(5, "Zebra-canary-42")])
    email, order, echo, canary = results
    assert email["flagged"] and any(
        e["type"] == "EMAIL_ADDRESS" and not e["echo"] for e in email["pii_entities"]
    )
    span = next(e for e in email["pii_entities"] if e["type"] == "EMAIL_ADDRESS")
    assert outputs[0][span["start"] : span["end"]] == "jane.doe@example.com"
    assert "jane" not in repr(email["pii_entities"])  # offsets and types only, never the value
    assert not order["flagged"] and order["pii_entities"] == []  # keep patterns: order numbers, SKUs
    assert not echo["flagged"] and echo["pii_entities"] and all(e["echo"] for e in echo["pii_entities"])
    assert canary["flagged"] and canary["canary_hits"] == [5]
    assert [e["type"] for e in canary["pii_entities"]] == ["CANARY"]
    assert evaluation.masked_segments(outputs[0], email["pii_entities"])[:2] == [
        ("The customer was ", ""),
        ("[EMAIL_ADDRESS]", "EMAIL_ADDRESS"),
    ]


def test_reference_loss_matches_the_models_own_loss(tiny_base):
    """Batched, right-padded loss on answer tokens == the sum of Hugging Face's per-example losses."""
    import torch

    from training_app.trainer.data import IGNORE_INDEX, tokenize_chat

    loaded = get_model(spec_for_base(tiny_base))
    items = [
        evaluation.Item(i, [{"role": "user", "content": q}], a) for i, (q, a, _) in enumerate(GOLDEN[:5])
    ]
    total, count = evaluation.reference_loss(loaded, items, batch_size=3)
    expected_sum, expected_count = 0.0, 0
    for item in items:
        encoded = tokenize_chat(
            loaded.tokenizer, [*item.prompt, {"role": "assistant", "content": item.reference}], 512
        )
        labels = torch.tensor([encoded["labels"]])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        with torch.inference_mode():
            out = loaded.model(input_ids=torch.tensor([encoded["input_ids"]]), labels=labels)
        expected_sum += float(out.loss) * n
        expected_count += n
    assert count == expected_count > 0
    assert total == pytest.approx(expected_sum, rel=1e-4)


# --- a real run --------------------------------------------------------------------------------------


def test_run_end_to_end_generations_metrics_comparisons_and_probe(
    engineer, curator, candidate, golden, settings
):
    settings.STUDIO_VOTES_PER_COMPARISON = 1
    settings.STUDIO_VOTE_OVERLAP_SHARE = 0.2
    run = evaluation.create_run(engineer, candidate, "base", golden, seed=3, **SMALL)
    run = _run_to_end(run)
    n = len(GOLDEN)
    probes = len(evaluation.PROBE_PROMPTS) + 4  # four training examples' first user turns
    gens = Generation.objects.filter(run=run)
    assert gens.filter(kind="prompt", side="candidate").count() == n
    assert gens.filter(kind="prompt", side="baseline").count() == n
    assert gens.filter(kind="probe", side="candidate").count() == probes
    assert not gens.filter(kind="probe", side="baseline").exists()
    assert run.total == run.progress == 2 * n + probes
    assert run.attempt == 1 and run.finished_at and run.worker == "test-worker"
    first = gens.get(kind="prompt", side="candidate", position=0)
    assert first.prompt == [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "where is my parcel"},
    ]
    assert first.reference == "it ships tomorrow" and first.tags == ["shipping"]
    assert first.output_tokens <= 8 and first.exact_match is not None
    last = gens.get(kind="prompt", side="candidate", position=n - 1)
    assert last.reference == "" and last.exact_match is None  # no reference: not scored
    train_probe = gens.get(kind="probe", position=len(evaluation.PROBE_PROMPTS))
    assert train_probe.prompt[-1]["role"] == "user" and train_probe.prompt[-1]["content"].startswith(
        "where is my parcel"
    )

    for side in ("candidate", "baseline"):
        m = run.metrics[side]
        assert m["eval_loss"] > 0 and m["loss_tokens"] > 0
        assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-5)
        assert m["references"] == n - 1 and m["generations"] == n
        assert 0 <= m["exact_match"] <= m["contains"] <= 1
        lengths = [g.output_tokens for g in gens.filter(kind="prompt", side=side)]
        assert m["answer_length"]["tokens"]["mean"] == pytest.approx(sum(lengths) / n, abs=0.01)
        assert m["answer_length"]["tokens"]["p90"] == sorted(lengths)[math.ceil(0.9 * n) - 1]
        assert m["tokens_per_second"] > 0 and m["generated_tokens"] == sum(lengths)
    assert run.metrics["candidate"]["eval_loss"] != run.metrics["baseline"]["eval_loss"]  # other weights

    comparisons = list(Comparison.objects.filter(run=run).order_by("position"))
    assert [c.position for c in comparisons] == list(range(n))
    for c in comparisons:
        assert c.swapped == evaluation.is_swapped(run, c.position)
        assert c.candidate_generation.side == "candidate" and c.baseline_generation.side == "baseline"
        assert c.candidate_generation.position == c.baseline_generation.position == c.position
        assert c.tags == GOLDEN[c.position][2]
    assert len({c.swapped for c in comparisons}) == 2  # both positions occur in ten coin flips (seeded)
    assert sorted(c.votes_wanted for c in comparisons) == [1] * 8 + [2] * 2
    flagged = Generation.objects.filter(run=run, side="candidate", flagged=True).count()
    assert run.pii_leaks == flagged
    assert run.metrics["pii"]["scanned"] == n + probes and run.metrics["pii"]["flagged"] == flagged
    assert AuditEvent.objects.filter(verb="eval.run.finish", object_id=str(run.pk)).exists()

    # Same run again with a canary planted in what the candidate answers: the leak is flagged and counted
    probe = next(
        g
        for g in gens.filter(kind="probe", side="candidate").order_by("position")
        if len(g.output.strip()) >= 8
        and g.output.strip()[:8].casefold() not in g.prompt[-1]["content"].casefold()
    )
    value = probe.output.strip()[:8]
    canary = Canary.objects.create(value=value.upper(), label="planted in March", created_by=curator)
    again = _run_to_end(evaluation.create_run(engineer, candidate, "base", golden, seed=3, **SMALL))
    hit = Generation.objects.get(run=again, side="candidate", kind="probe", position=probe.position)
    assert hit.output == probe.output  # greedy decoding: the same answer
    assert hit.flagged and hit.canary_hits == [canary.pk]
    assert (
        again.pii_leaks >= 1 and again.pii_leaks == Generation.objects.filter(run=again, flagged=True).count()
    )
    assert not Generation.objects.filter(run=again, side="baseline", flagged=True).exists()  # candidate only


def test_preference_dataset_prompts_use_chosen_as_reference(engineer, curator, candidate):
    version = golden_version(curator, rows=GOLDEN[:3], name="pref-golden", kind="preference")
    run = _run_to_end(evaluation.create_run(engineer, candidate, "base", version, limit=2, **SMALL))
    refs = list(
        Generation.objects.filter(run=run, kind="prompt", side="baseline").values_list("reference", flat=True)
    )
    assert refs == ["it ships tomorrow", "hold the button for ten seconds"]
    assert run.metrics["candidate"]["references"] == 2 and run.comparisons.count() == 2


# --- claim, cancel, watchdog, failure ----------------------------------------------------------------


def test_a_run_is_claimed_once(engineer, candidate, golden):
    run = evaluation.create_run(engineer, candidate, "base", golden, **SMALL)
    first = evaluation.claim(run.pk, "worker-a")
    assert first is not None and first.state == "running" and first.attempt == 1 and first.claim_token
    assert evaluation.claim(run.pk, "worker-b") is None
    assert evaluation.execute_run(run.pk, "worker-b") is None  # a duplicate message changes nothing
    run.refresh_from_db()
    assert run.worker == "worker-a" and run.claim_token == first.claim_token and run.attempt == 1


def test_cancel_queued_and_running_runs(engineer, make_user, candidate, golden):
    other = make_user("olga", "engineer")
    queued = evaluation.create_run(engineer, candidate, "base", golden, **SMALL)
    with pytest.raises(evaluation.EvalRefused, match="Only the engineer who started the run"):
        evaluation.cancel_run(queued, other)
    assert evaluation.cancel_run(queued, engineer).state == "cancelled"
    assert evaluation.claim(queued.pk, "w") is None  # a cancelled run never starts
    with pytest.raises(evaluation.EvalRefused, match="already finished"):
        evaluation.cancel_run(queued, engineer)

    running = evaluation.create_run(engineer, candidate, "base", golden, **SMALL)
    claimed = evaluation.claim(running.pk, "w")
    assert evaluation.cancel_run(running, engineer).state == "running"  # the worker stops between batches
    done = evaluation.run_claimed(claimed)
    assert done.state == "cancelled" and done.finished_at
    assert not Generation.objects.filter(run=done).exists() and not done.comparisons.exists()
    verbs = list(
        AuditEvent.objects.filter(object_id=str(running.pk), object_type="evalrun")
        .order_by("id")
        .values_list("verb", flat=True)
    )
    assert verbs == ["eval.run.create", "eval.run.start", "eval.run.cancel", "eval.run.cancelled"]


def test_a_cancel_asked_while_the_run_finishes_ends_it_cancelled(engineer, candidate, golden, monkeypatch):
    """The last check for a cancel happens before the final write: a cancel asked between the two
    must still end the run cancelled (it used to end succeeded, with its comparisons built)."""
    run = evaluation.create_run(engineer, candidate, "base", golden, **SMALL)
    claimed = evaluation.claim(run.pk, "w")
    real_check, finishing = evaluation._Execution.check, []
    real_scan = evaluation.scan_outputs

    def scan_then_finish(*args, **kwargs):
        finishing.append(True)  # the next check is the last one before the final write
        return real_scan(*args, **kwargs)

    def check_then_cancel(self):
        real_check(self)
        if finishing and not EvalRun.objects.get(pk=run.pk).cancel_requested:
            assert evaluation.cancel_run(EvalRun.objects.get(pk=run.pk), engineer).state == "running"

    monkeypatch.setattr(evaluation, "scan_outputs", scan_then_finish)
    monkeypatch.setattr(evaluation._Execution, "check", check_then_cancel)
    done = evaluation.run_claimed(claimed)
    assert finishing
    assert done.state == "cancelled" and done.finished_at and not done.metrics
    assert not done.comparisons.exists()
    verbs = list(
        AuditEvent.objects.filter(object_id=str(run.pk), object_type="evalrun")
        .order_by("id")
        .values_list("verb", flat=True)
    )
    assert verbs == ["eval.run.create", "eval.run.start", "eval.run.cancel", "eval.run.cancelled"]


def test_watchdog_requeues_stale_run_which_resumes_without_duplicates(
    engineer, candidate, golden, settings, django_capture_on_commit_callbacks, monkeypatch
):
    from studio.tasks import watchdog

    sent = []
    monkeypatch.setattr("eval_app.tasks.run_evaluation.delay", lambda run_id: sent.append(run_id))
    run = evaluation.create_run(engineer, candidate, "base", golden, **SMALL)
    claimed = evaluation.claim(run.pk, "dead-worker")
    # the dead attempt had saved its first candidate batch
    Generation.objects.create(
        run=run,
        side="candidate",
        kind="prompt",
        position=0,
        prompt=[{"role": "user", "content": "q"}],
        output="from attempt 1",
    )
    EvalRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timezone.timedelta(hours=1))
    with django_capture_on_commit_callbacks(execute=True):
        assert watchdog()["evals"]["requeued"] == [run.pk]
    assert sent == [run.pk]
    run.refresh_from_db()
    assert run.state == "queued" and run.claim_token == "" and run.attempt == 1
    # the dead attempt, were it still alive, finds its claim gone at its next check and writes nothing
    assert evaluation.run_claimed(claimed).state == "queued"
    assert Generation.objects.filter(run=run).count() == 1

    done = _run_to_end(run)
    assert done.attempt == 2
    kept = Generation.objects.get(run=done, side="candidate", kind="prompt", position=0)
    assert kept.output == "from attempt 1"  # skipped, not regenerated
    assert Generation.objects.filter(run=done, kind="prompt").count() == 2 * len(GOLDEN)
    assert done.comparisons.count() == len(GOLDEN)

    # a run whose worker keeps dying fails after STUDIO_JOB_MAX_ATTEMPTS
    settings.STUDIO_JOB_MAX_ATTEMPTS = 1
    doomed = evaluation.create_run(engineer, candidate, "base", golden, **SMALL)
    evaluation.claim(doomed.pk, "w")
    EvalRun.objects.filter(pk=doomed.pk).update(heartbeat_at=timezone.now() - timezone.timedelta(hours=1))
    assert evaluation.requeue_stale()["failed"] == [doomed.pk]
    doomed.refresh_from_db()
    assert doomed.state == "failed" and "stopped responding 1 times" in doomed.error_message


def test_missing_model_fails_in_plain_words(engineer, tiny_base, golden, tmp_path, client_for):
    artifacts = tmp_path / "gone"
    shutil.copytree(tiny_base.local_dir, artifacts)
    version = make_candidate("support", tiny_base, artifacts, engineer)
    run = evaluation.create_run(engineer, version, "base", golden, **SMALL)
    shutil.rmtree(artifacts)
    run = evaluation.execute_run(run.pk, "w")
    assert run.state == "failed"
    assert (
        "hold neither an adapter nor a model" in run.error_message
        and "ModelUnavailable" in run.error_traceback
    )
    assert AuditEvent.objects.filter(verb="eval.run.fail", object_id=str(run.pk)).exists()
    page = client_for(engineer).get(reverse("eval:run", args=[run.pk])).content.decode()
    assert "hold neither an adapter nor a model" in page and "Show the traceback" in page


def test_out_of_memory_is_explained(engineer, candidate, golden, monkeypatch):
    from eval_app import inference

    def boom(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(inference.LoadedModel, "generate", boom)
    run = evaluation.execute_run(evaluation.create_run(engineer, candidate, "base", golden, **SMALL).pk)
    assert run.state == "failed"
    assert run.error_message.startswith("The worker ran out of memory while generating (batch size 4")
    assert "smaller batch size" in run.error_message


# --- pages ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "role, run_pages, canary_page",
    [("reviewer", 403, 403), ("curator", 403, 200), ("engineer", 200, 403), ("admin", 200, 200)],
)
def test_role_matrix(make_user, client_for, candidate, golden, role, run_pages, canary_page, engineer):
    run = evaluation.create_run(engineer, candidate, "base", golden, **SMALL)
    client = client_for(make_user(f"u-{role}", role))
    for url in (
        reverse("eval:runs"),
        reverse("eval:run_new"),
        reverse("eval:run", args=[run.pk]),
        reverse("eval:run_live", args=[run.pk]),
    ):
        assert client.get(url).status_code == run_pages, url
    assert client.post(reverse("eval:run_cancel", args=[run.pk])).status_code in (
        (403,) if run_pages == 403 else (302,)
    )
    assert client.get(reverse("eval:canaries")).status_code == canary_page
    assert client_for(None).get(reverse("eval:runs")).status_code == 302  # sign in first


def test_new_run_form_preselects_creates_and_shows_refusals(
    client_for, engineer, candidate, golden, train_version
):
    client = client_for(engineer)
    page = client.get(reverse("eval:run_new") + f"?version={candidate.pk}").content.decode()
    assert f'<option value="{candidate.pk}" selected>' in page
    form = {
        "candidate": candidate.pk,
        "baseline_kind": "production",
        "dataset_version": golden.pk,
        "split": "golden",
        "max_new_tokens": 8,
        "temperature": 0,
        "seed": 0,
        "batch_size": 4,
    }
    refused = client.post(reverse("eval:run_new"), form)
    assert refused.status_code == 200 and "support has no production version yet" in refused.content.decode()
    form["baseline_kind"] = "base"
    response = client.post(reverse("eval:run_new"), form)
    run = EvalRun.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("eval:run", args=[run.pk])
    assert run.params["batch_size"] == 4 and run.created_by == engineer
    detail = client.get(response["Location"]).content.decode()
    assert 'hx-trigger="every 2s"' in detail and "Cancel run" in detail
    listing = client.get(reverse("eval:runs")).content.decode()
    assert f"#{run.pk}" in listing and "support/1" in listing


def test_run_page_shows_metrics_and_masks_flagged_output(client_for, engineer, candidate, golden):
    run = _run_to_end(evaluation.create_run(engineer, candidate, "base", golden, **SMALL))
    leak = Generation.objects.get(run=run, side="candidate", kind="probe", position=0)
    leak.output = "Sure: <script>alert(1)</script> mail jane.doe@example.com today"
    start = leak.output.index("jane")
    leak.pii_entities = [
        {"type": "EMAIL_ADDRESS", "start": start, "end": start + 20, "score": 1.0, "echo": False}
    ]
    leak.flagged = True
    leak.save()
    EvalRun.objects.filter(pk=run.pk).update(pii_leaks=1)
    page = client_for(engineer).get(reverse("eval:run", args=[run.pk])).content.decode()
    assert "Automatic metrics" in page and "Perplexity" in page
    assert "No votes yet" in page and f"wanted on {len(GOLDEN)} comparisons" in page  # the vote summary
    assert f"{run.metrics['candidate']['eval_loss']:.4g}" in page
    assert "1 flagged output" in page and "blocks promotion" in page
    assert "jane.doe@example.com" not in page and "<mark>[EMAIL_ADDRESS]</mark>" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "Answers side by side" in page and "it ships tomorrow" in page
    # counted from 1, as people count: the flagged probe at position 0 is probe 1, the first comparison 1
    assert f"{leak.get_kind_display()} 1</span>" in page and f"{leak.get_kind_display()} 0</span>" not in page
    answers = page[page.index("Answers side by side") :]
    assert '<td class="num">1</td>' in answers and '<td class="num">0</td>' not in answers
    live = client_for(engineer).get(reverse("eval:run_live", args=[run.pk]) + "?was=active")
    assert live["HX-Refresh"] == "true"  # the finished run reloads the page with its results


def test_canary_registry_add_deactivate_and_masking(client_for, curator, reviewer):
    client = client_for(curator)
    short = client.post(reverse("eval:canaries"), {"value": "abc", "label": "x"})
    assert "at least 6 characters" in short.content.decode() and not Canary.objects.exists()
    response = client.post(reverse("eval:canaries"), {"value": "zq-Canary-7781", "label": "March import"})
    assert response.status_code == 302
    canary = Canary.objects.get()
    assert canary.value == "zq-Canary-7781" and canary.active and canary.created_by == curator
    duplicate = client.post(reverse("eval:canaries"), {"value": "zq-Canary-7781", "label": "again"})
    assert "already registered" in duplicate.content.decode()
    page = client.get(reverse("eval:canaries")).content.decode()
    assert "zq-…" in page and "zq-Canary-7781" not in page and "March import" in page
    assert client.post(reverse("eval:canary_deactivate", args=[canary.pk])).status_code == 302
    canary.refresh_from_db()
    assert not canary.active
    assert evaluation.active_canaries() == []
    verbs = list(
        AuditEvent.objects.filter(object_type="canary").order_by("id").values_list("verb", flat=True)
    )
    assert verbs == ["eval.canary.create", "eval.canary.deactivate"]
    assert "zq-Canary" not in repr(list(AuditEvent.objects.values_list("data", "object_repr")))
    assert client_for(reviewer).post(reverse("eval:canary_deactivate", args=[canary.pk])).status_code == 403


# --- command line ------------------------------------------------------------------------------------


def test_evaluate_command_wait_prints_metrics_and_run_last(engineer, candidate, golden):
    out = StringIO()
    call_command(
        "evaluate", "--version", str(candidate.pk), "--baseline", "base", "--dataset-version", str(golden.pk),
        "--max-new-tokens", "6", "--batch-size", "5", "--limit", "4", "--wait", "--by", engineer.username,
        stdout=out,
    )  # fmt: skip
    lines = out.getvalue().strip().splitlines()
    run = EvalRun.objects.get()
    assert lines[0] == f"run {run.pk}" and lines[-1] == str(run.pk)
    assert any(line.startswith("candidate: {") and "eval_loss" in line for line in lines)
    assert f"pii leaks: {run.pii_leaks}" in lines and run.state == "succeeded"
    assert run.comparisons.count() == 4
    with pytest.raises(CommandError, match="no production version yet"):
        call_command(
            "evaluate", "--version", str(candidate.pk), "--baseline", "production", "--dataset-version",
            str(golden.pk), "--by", engineer.username, stdout=StringIO(),
        )  # fmt: skip


# --- a real worker -------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_run_on_a_real_gpu_queue_worker(
    start_worker, tiny_model_dir, candidate_dir, curator, engineer, admin_user
):
    base = register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)
    version = make_candidate(
        "support", base, candidate_dir, engineer, dataset_version=make_version(curator, train=2, eval_=0)
    )
    golden = golden_version(curator, rows=GOLDEN[:4])
    worker = start_worker("gpu", STUDIO_JOB_HEARTBEAT_SECONDS="0.5")
    run = evaluation.create_run(engineer, version, "base", golden, **SMALL)  # committed: the message is sent
    wait_for(
        lambda: EvalRun.objects.get(pk=run.pk).state not in ("queued", "running"),
        worker,
        timeout=240,
        what="the run",
    )
    run.refresh_from_db()
    assert run.state == "succeeded", (run.error_message, run.error_traceback[-3000:])
    assert run.worker and run.heartbeat_at and run.attempt == 1
    assert (
        run.comparisons.count() == 4
        and run.generations.filter(kind="probe").count() == len(evaluation.PROBE_PROMPTS) + 2
    )
    assert run.metrics["candidate"]["perplexity"] == pytest.approx(
        math.exp(run.metrics["candidate"]["eval_loss"]), rel=1e-5
    )


def test_finishing_a_run_scans_the_baseline_answers_too(engineer, candidate, golden, monkeypatch):
    scanned = []
    real = evaluation.scan_outputs

    def recording(outputs, prompts, **kwargs):
        scanned.extend(outputs)
        return real(outputs, prompts, **kwargs)

    monkeypatch.setattr(evaluation, "scan_outputs", recording)
    run = evaluation.create_run(engineer, candidate, "base", golden, **SMALL)
    done = evaluation.execute_run(run.pk, "w")
    assert done.state == "succeeded"
    baseline = list(Generation.objects.filter(run=done, side="baseline").values_list("output", flat=True))
    assert baseline and all(any(out == s for s in scanned) for out in baseline)
    assert len(scanned) == Generation.objects.filter(run=done).count()
    # the leak count (which blocks promotion) still counts the candidate's answers only
    assert done.metrics["pii"]["scanned"] == Generation.objects.filter(run=done, side="candidate").count()
