"""Model registry: named model lines, their versions and aliases (evaluation and the gate build on these)."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import models
from django.urls import NoReverseMatch, reverse


class RegisteredModel(models.Model):
    """A named line of models, e.g. "support-assistant"."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    class Status(models.TextChoices):
        CANDIDATE = "candidate", "Candidate"
        APPROVED = "approved", "Approved"
        ARCHIVED = "archived", "Archived"

    registered_model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    base_model = models.ForeignKey("training_app.BaseModel", on_delete=models.PROTECT, related_name="+")
    training_job = models.OneToOneField(
        "training_app.TrainingJob",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="model_version",
    )
    dataset_version = models.ForeignKey(
        "datasets_app.DatasetVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    dataset_sha256 = models.CharField(max_length=64, blank=True)
    method = models.CharField(max_length=8, blank=True)
    config = models.JSONField(default=dict)
    metrics = models.JSONField(default=dict)
    artifacts_dir = models.CharField(max_length=500, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.CANDIDATE)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["registered_model", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["registered_model", "number"], name="model_version_number")
        ]

    def __str__(self) -> str:
        return f"{self.registered_model.name}/{self.number}"

    def get_absolute_url(self) -> str:
        try:
            return reverse("eval:version", args=[self.pk])
        except NoReverseMatch:  # registry pages come with the evaluation issue
            return self.training_job.get_absolute_url() if self.training_job_id else ""

    @property
    def artifacts_path(self) -> Path:
        return Path(self.artifacts_dir)


class Alias(models.Model):
    """A movable name ("staging", "production", …) pointing at one version of a model line."""

    registered_model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="aliases")
    name = models.SlugField(max_length=40)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="aliases")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["registered_model", "name"]
        constraints = [models.UniqueConstraint(fields=["registered_model", "name"], name="alias_unique")]

    def __str__(self) -> str:
        return f"{self.registered_model.name}@{self.name}"


class AliasChange(models.Model):
    """History of an alias: every promotion and rollback, so that rollback knows the previous version."""

    class Kind(models.TextChoices):
        PROMOTE = "promote", "Promotion"
        ROLLBACK = "rollback", "Rollback"

    registered_model = models.ForeignKey(
        RegisteredModel, on_delete=models.CASCADE, related_name="alias_changes"
    )
    alias = models.SlugField(max_length=40)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    from_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    to_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="alias_changes")
    promotion = models.ForeignKey(
        "PromotionRequest", null=True, blank=True, on_delete=models.PROTECT, related_name="alias_changes"
    )
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.registered_model.name}@{self.alias}: {self.kind} to v{self.to_version.number}"


class Canary(models.Model):
    """A string a curator planted in training data; any model output containing it is a leak."""

    value = models.CharField(max_length=200, unique=True)
    label = models.CharField(max_length=100, blank=True)
    active = models.BooleanField(default=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.label or f"canary {self.pk}"


class EvalRun(models.Model):
    """Candidate vs baseline on a dataset version's golden (or eval) split: generations, metrics, comparisons."""

    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    class BaselineKind(models.TextChoices):
        BASE = "base", "The candidate's base model"
        PRODUCTION = "production", "The current production version"
        VERSION = "version", "A chosen version"

    candidate = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="eval_runs")
    baseline_kind = models.CharField(max_length=12, choices=BaselineKind.choices, default=BaselineKind.BASE)
    # resolved at creation: a version for production/version baselines, null when the baseline is the base model
    baseline_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="baseline_runs"
    )
    baseline_base_model = models.ForeignKey(
        "training_app.BaseModel", on_delete=models.PROTECT, related_name="+"
    )  # the base model used when baseline_kind == base (also recorded for the others, for lineage)
    dataset_version = models.ForeignKey(
        "datasets_app.DatasetVersion", on_delete=models.PROTECT, related_name="eval_runs"
    )
    split = models.CharField(max_length=8, default="golden")  # golden | eval
    params = models.JSONField(default=dict)  # max_new_tokens, temperature, seed, batch_size, limit, votes…
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED, db_index=True)
    progress = models.PositiveIntegerField(default=0)  # generations done
    total = models.PositiveIntegerField(default=0)  # generations to do
    metrics = models.JSONField(default=dict)  # {"candidate": {...}, "baseline": {...}}
    pii_leaks = models.PositiveIntegerField(default=0)  # flagged candidate outputs (blocks promotion)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # execution bookkeeping (same scheme as training jobs: conditional-UPDATE claim, heartbeat, requeue)
    attempt = models.PositiveIntegerField(default=0)
    claim_token = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    error_message = models.TextField(blank=True)
    error_traceback = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"eval run {self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("eval:run", args=[self.pk])

    @property
    def is_active(self) -> bool:
        return self.state in {self.State.QUEUED, self.State.RUNNING}

    @property
    def baseline_label(self) -> str:
        if self.baseline_version_id:
            return str(self.baseline_version)
        return f"base model {self.baseline_base_model.name}"


class Generation(models.Model):
    """One model's answer to one prompt of a run (golden/eval prompts and PII-leak probes)."""

    class Side(models.TextChoices):
        CANDIDATE = "candidate", "Candidate"
        BASELINE = "baseline", "Baseline"

    class Kind(models.TextChoices):
        PROMPT = "prompt", "Evaluation prompt"
        PROBE = "probe", "PII-leak probe"

    run = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="generations")
    side = models.CharField(max_length=10, choices=Side.choices)
    kind = models.CharField(max_length=6, choices=Kind.choices, default=Kind.PROMPT)
    position = models.PositiveIntegerField()  # order inside (run, side, kind)
    example = models.ForeignKey(
        "datasets_app.VersionExample", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    prompt = models.JSONField()  # chat messages sent to the model
    reference = models.TextField(blank=True)  # the example's assistant answer, when it has one
    output = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    exact_match = models.BooleanField(null=True)
    contains = models.BooleanField(null=True)
    pii_entities = models.JSONField(default=list)  # [{"type", "start", "end", "score"}] found by Presidio
    canary_hits = models.JSONField(default=list)  # canary ids found in the output
    flagged = models.BooleanField(default=False, db_index=True)  # PII or canary leak
    tags = models.JSONField(default=list)

    class Meta:
        ordering = ["run", "kind", "side", "position"]
        constraints = [
            models.UniqueConstraint(fields=["run", "side", "kind", "position"], name="generation_slot")
        ]

    def __str__(self) -> str:
        return f"{self.side} {self.kind} {self.position} of run {self.run_id}"


class Comparison(models.Model):
    """A prompt with the two answers shown blind; `swapped` means the candidate is on side B."""

    run = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="comparisons")
    position = models.PositiveIntegerField()
    candidate_generation = models.ForeignKey(Generation, on_delete=models.CASCADE, related_name="+")
    baseline_generation = models.ForeignKey(Generation, on_delete=models.CASCADE, related_name="+")
    swapped = models.BooleanField()
    votes_wanted = models.PositiveSmallIntegerField(default=1)  # K, or 2 for the overlap share
    votes_count = models.PositiveSmallIntegerField(default=0)
    tags = models.JSONField(default=list)

    class Meta:
        ordering = ["run", "position"]
        constraints = [models.UniqueConstraint(fields=["run", "position"], name="comparison_position")]
        indexes = [models.Index(fields=["run", "votes_count"])]

    def __str__(self) -> str:
        return f"comparison {self.pk}"

    @property
    def generation_a(self) -> Generation:
        return self.baseline_generation if self.swapped else self.candidate_generation

    @property
    def generation_b(self) -> Generation:
        return self.candidate_generation if self.swapped else self.baseline_generation

    @property
    def overlap(self) -> bool:
        return self.votes_wanted > 1


class Assignment(models.Model):
    """A reviewer's claim on one vote slot of a comparison (claimed with skip_locked; expires)."""

    comparison = models.ForeignKey(Comparison, on_delete=models.CASCADE, related_name="assignments")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    claimed_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    skipped = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["comparison", "reviewer"], name="assignment_once_per_reviewer")
        ]

    def __str__(self) -> str:
        return f"assignment {self.pk}"


class Vote(models.Model):
    class Choice(models.TextChoices):
        A = "a", "A is better"
        B = "b", "B is better"
        TIE = "tie", "Tie"
        BOTH_BAD = "both_bad", "Both bad"

    class Outcome(models.TextChoices):
        CANDIDATE = "candidate", "Candidate wins"
        BASELINE = "baseline", "Baseline wins"
        TIE = "tie", "Tie"
        BOTH_BAD = "both_bad", "Both bad"

    comparison = models.ForeignKey(Comparison, on_delete=models.PROTECT, related_name="votes")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    choice = models.CharField(max_length=8, choices=Choice.choices)  # what the reviewer clicked (A/B side)
    outcome = models.CharField(max_length=10, choices=Outcome.choices)  # resolved through `swapped`
    comment = models.TextField(blank=True)
    seconds = models.FloatField(null=True, blank=True)  # time from page shown to vote
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["comparison", "reviewer"], name="vote_once_per_reviewer")
        ]

    def __str__(self) -> str:
        return f"vote {self.pk}"


class PromotionRequest(models.Model):
    """A request to point an alias at a version; approved by a second person when the policy holds."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        CANCELLED = "cancelled", "Cancelled"

    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="promotions")
    alias = models.SlugField(max_length=40)
    eval_run = models.ForeignKey(
        EvalRun, null=True, blank=True, on_delete=models.PROTECT, related_name="promotions"
    )  # the evidence: the run (against the baseline) whose votes the policy reads
    policy = models.JSONField(default=dict)  # snapshot of rule settings and each rule's figure and result
    policy_passed = models.BooleanField(default=False)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    comment = models.TextField(blank=True)  # the requester's
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_comment = models.TextField(blank=True)
    overridden = models.BooleanField(default=False)  # approved although a rule failed
    justification = models.TextField(blank=True)  # required for an override
    previous_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )  # what the alias pointed at before approval

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"promotion {self.pk}: {self.version} → {self.alias}"

    def get_absolute_url(self) -> str:
        return reverse("eval:promotion", args=[self.pk])


class WebhookEvent(models.Model):
    """Outbox: each promotion/rollback writes one signed event; a Celery task delivers with retries."""

    event = models.CharField(max_length=60)  # e.g. "model.promoted", "model.rolled_back"
    payload = models.JSONField()
    body = models.TextField()  # the exact bytes that are signed and sent
    signature = models.CharField(max_length=100)  # "sha256=<hex HMAC of body>"
    created_at = models.DateTimeField(auto_now_add=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    gave_up = models.BooleanField(default=False)
    # short SHA-256 digests of the configured URLs that accepted it (a retry skips them; URLs may hold tokens)
    delivered_to = models.JSONField(default=list)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.event} #{self.pk}"


class ApiKey(models.Model):
    """A per-user key for the OpenAI-compatible API; only its SHA-256 is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(
        max_length=16, db_index=True
    )  # first characters, shown in the UI to tell keys apart
    hashed_key = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @property
    def active(self) -> bool:
        return self.revoked_at is None
