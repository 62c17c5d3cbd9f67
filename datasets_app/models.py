"""Datasets: uploads, examples, PII findings, duplicate groups and immutable versions."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse


class Dataset(models.Model):
    class Kind(models.TextChoices):
        SFT = "sft", "Chat (supervised fine-tuning)"
        PREFERENCE = "preference", "Preference pairs (DPO)"

    name = models.CharField(max_length=120, unique=True)
    description = models.TextField(blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.SFT)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    base_model = models.ForeignKey(
        "training_app.BaseModel",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        help_text="Its tokenizer counts tokens; its context length bounds examples.",
    )
    # datasets_app.pii.PiiPolicy.to_dict(): enabled types, threshold, custom recognizers, allow-list,
    # keep-patterns, operators per type.
    pii_policy = models.JSONField(default=dict, blank=True)
    # HMAC digest of (entity type, normalised value) -> pseudonym label. Never raw values.
    pseudonym_map = models.JSONField(default=dict, blank=True)
    next_position = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("datasets:detail", args=[self.pk])


class Upload(models.Model):
    class Status(models.TextChoices):
        NEEDS_MAPPING = "needs_mapping", "Choose CSV columns"
        QUEUED = "queued", "Queued"
        PROCESSING = "processing", "Importing"
        IMPORTED = "imported", "Imported"
        REJECTED = "rejected", "Nothing imported"
        FAILED = "failed", "Failed"

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="uploads")
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    original_name = models.CharField(max_length=255)
    size = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    format = models.CharField(max_length=16, blank=True)
    csv_mapping = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    raw_path = models.CharField(max_length=500, blank=True)  # plaintext, only until processed
    stored_path = models.CharField(max_length=500, blank=True)  # encrypted original (or "" if deleted)
    rejects_path = models.CharField(max_length=500, blank=True)  # encrypted rejected lines
    imported_count = models.PositiveIntegerField(default=0)
    rejected_count = models.PositiveIntegerField(default=0)
    # {"counts": {code: n}, "first": [{"line", "code"}...100], "file_error": {"code", "line"}}
    report = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)  # plain-words reason for a failure (the studio's own words)
    # The reasons of those first rejected lines and of a whole-file refusal, encrypted like the upload:
    # they may quote the file's values (a role, a key, a CSV cell). storage.seal({"reasons", "error"})
    sealed = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        # not the file's name: it may hold a person's name, and this text goes into the append-only
        # audit log (object_repr), which nothing can scrub later
        return f"upload {self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("datasets:upload", args=[self.pk])

    @property
    def is_active(self) -> bool:
        return self.status in {self.Status.QUEUED, self.Status.PROCESSING}

    def _unsealed(self) -> dict:
        from .services.storage import unseal

        return unseal(self.sealed, {})

    def first_rejections(self) -> list[dict]:
        """The first rejected lines: line, code and reason (decrypted)."""
        reasons = self._unsealed().get("reasons", [])
        rows = self.report.get("first", [])
        return [
            {**row, "reason": reasons[i] if i < len(reasons) else row.get("code", "")}
            for i, row in enumerate(rows)
        ]

    @property
    def error_text(self) -> str:
        """Why nothing was imported, in full (decrypted where it quotes the file)."""
        return self._unsealed().get("error") or self.error


class Example(models.Model):
    class Split(models.TextChoices):
        TRAIN = "train", "Train"
        EVAL = "eval", "Eval"
        GOLDEN = "golden", "Golden"

    class Pii(models.TextChoices):
        UNSCANNED = "unscanned", "Not scanned"
        CLEAN = "clean", "No findings"
        PENDING = "pending", "Findings to review"
        REVIEWED = "reviewed", "Reviewed"

    # Indexes are kept to what queries use: every insert pays for each of them, and an import inserts
    # up to 100,000s of rows. (dataset, position) is unique and serves lookups by dataset alone.
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="examples", db_index=False)
    upload = models.ForeignKey(  # never filtered on; deleting an upload (admin only) scans instead
        Upload, null=True, blank=True, on_delete=models.SET_NULL, related_name="examples", db_index=False
    )
    position = models.BigIntegerField()  # import order inside the dataset
    source_line = models.PositiveIntegerField(default=0)
    messages = models.JSONField()  # [{"role", "content"}]; for preference data: the prompt turns
    chosen = models.TextField(null=True, blank=True)
    rejected = models.TextField(null=True, blank=True)
    tags = models.JSONField(default=list, blank=True)
    tags_text = models.TextField(blank=True)  # "|a|b|" for filtering (LIKE, no index); every tag, uncut
    split = models.CharField(max_length=8, choices=Split.choices, default=Split.TRAIN)
    # grouped in Python by dedup, never looked up; "" until the duplicate analysis after the import
    content_hash = models.CharField(max_length=64)
    minhash = models.BinaryField(null=True, blank=True)
    token_count = models.PositiveIntegerField(default=0)
    pii_status = models.CharField(max_length=12, choices=Pii.choices, default=Pii.UNSCANNED)
    dropped = models.BooleanField(default=False)
    duplicate_group = models.ForeignKey(
        "DuplicateGroup",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="members",
        db_index=False,  # partial index below: most examples have no group
    )
    edited = models.BooleanField(default=False)
    # HMAC digests of (type, value) the curator decided are not personal data: re-scans skip them
    kept_digests = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["position"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "position"], name="example_position_unique")
        ]
        indexes = [
            # active examples in order, and filters on split / pii_status / tags within a dataset
            models.Index(fields=["dataset", "dropped", "position"]),
            models.Index(
                fields=["duplicate_group"],
                condition=models.Q(duplicate_group__isnull=False),
                name="example_duplicate_group",
            ),
        ]

    def __str__(self) -> str:
        return f"example {self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("datasets:example", args=[self.pk])

    # Segments are the texts a PII finding points into: every message's content, then chosen/rejected,
    # then the tags (free text from the upload: scanned and scrubbed like the rest).
    def segments(self) -> list[str]:
        texts = [m["content"] for m in self.messages]
        if self.chosen is not None:
            texts.append(self.chosen)
        if self.rejected is not None:
            texts.append(self.rejected)
        return texts + list(self.tags or [])

    def segment_label(self, index: int) -> str:
        n = len(self.messages)
        if index < n:
            return self.messages[index]["role"]
        index -= n
        for name in ("chosen", "rejected"):
            if getattr(self, name) is not None:
                if index == 0:
                    return name
                index -= 1
        return "tag"

    def set_segments(self, texts: list[str]) -> None:
        from .services.imports import tags_text

        n = len(self.messages)
        self.messages = [{"role": m["role"], "content": texts[i]} for i, m in enumerate(self.messages)]
        rest = texts[n:]
        if self.chosen is not None:
            self.chosen = rest.pop(0)
        if self.rejected is not None:
            self.rejected = rest.pop(0)
        if self.tags:
            self.tags = rest[: len(self.tags)]  # one per tag (a finding's offsets stay valid)
            self.tags_text = tags_text(self.tags)


class PiiFinding(models.Model):
    class Decision(models.TextChoices):
        PENDING = "pending", "Pending"
        REDACT = "redact", "Scrubbed"
        KEEP = "keep", "Kept (not PII)"

    example = models.ForeignKey(Example, on_delete=models.CASCADE, related_name="findings")
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="findings")
    segment = models.PositiveSmallIntegerField()
    start = models.PositiveIntegerField()
    end = models.PositiveIntegerField()
    entity_type = models.CharField(max_length=40, db_index=True)
    score = models.FloatField(default=1.0)
    source = models.CharField(max_length=60)  # recognizer name, or "curator"
    decision = models.CharField(
        max_length=8, choices=Decision.choices, default=Decision.PENDING, db_index=True
    )
    replacement = models.CharField(max_length=100, blank=True)  # set once scrubbed
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["example_id", "segment", "start"]
        indexes = [models.Index(fields=["dataset", "decision", "entity_type"])]

    def __str__(self) -> str:
        return f"{self.entity_type} finding {self.pk}"


class DuplicateGroup(models.Model):
    class Kind(models.TextChoices):
        EXACT = "exact", "Exact"
        NEAR = "near", "Near-duplicate"

    class Decision(models.TextChoices):
        PENDING = "pending", "To decide"
        KEEP_ALL = "keep_all", "Keep all"
        KEEP_ONE = "keep_one", "Keep first, drop the rest"

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="duplicate_groups")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    similarity = models.FloatField(default=1.0)
    decision = models.CharField(max_length=10, choices=Decision.choices, default=Decision.PENDING)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.kind} duplicate group {self.pk}"


class DatasetVersion(models.Model):
    """An immutable snapshot. Only frozen versions can be trained on."""

    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    kind = models.CharField(max_length=16, choices=Dataset.Kind.choices)
    sha256 = models.CharField(max_length=64)
    counts = models.JSONField(default=dict)  # {"examples", "train", "eval", "golden", "tags": {...}}
    token_stats = models.JSONField(default=dict)
    base_model = models.ForeignKey("training_app.BaseModel", null=True, on_delete=models.PROTECT)
    changelog = models.TextField(blank=True)
    diff_summary = models.JSONField(default=dict)  # vs the previous version: added / removed / changed
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["dataset", "-number"]
        constraints = [models.UniqueConstraint(fields=["dataset", "number"], name="version_number_unique")]

    def __str__(self) -> str:
        return f"{self.dataset.name} v{self.number}"

    def save(self, *args, **kwargs):
        if self.pk is not None and not kwargs.pop("_allow_update", False):
            raise PermissionError("dataset versions are immutable")
        super().save(*args, **kwargs)

    def get_absolute_url(self) -> str:
        return reverse("datasets:version", args=[self.pk])


class VersionExample(models.Model):
    """A frozen copy of one example inside a version (the version's content, never edited)."""

    version = models.ForeignKey(DatasetVersion, on_delete=models.CASCADE, related_name="examples")
    example_id = models.BigIntegerField()  # identity across versions, for diffs
    position = models.PositiveIntegerField()
    messages = models.JSONField()
    chosen = models.TextField(null=True, blank=True)
    rejected = models.TextField(null=True, blank=True)
    tags = models.JSONField(default=list)
    split = models.CharField(max_length=8)
    token_count = models.PositiveIntegerField(default=0)
    digest = models.CharField(max_length=64)  # sha256 of the canonical record

    class Meta:
        ordering = ["version", "position"]
        constraints = [
            models.UniqueConstraint(fields=["version", "position"], name="version_example_position")
        ]

    def __str__(self) -> str:
        return f"{self.version_id}:{self.position}"
