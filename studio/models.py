"""Cross-cutting state: the hash-chained audit log and the role permissions."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class AuditEvent(models.Model):
    """One state change, append-only. Each event holds the hash of the previous one, so editing,
    inserting or deleting a row inside the chain is detected by `manage.py verify_audit`; deleting
    the newest rows is detected against a head recorded elsewhere (`verify_audit --expect HASH`)."""

    created_at = models.DateTimeField(db_index=True)
    # PROTECT: the actor's id is part of the event's hash, so a user with events is deactivated, never
    # deleted (SET_NULL would rewrite the rows and break the chain).
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT)
    actor_name = models.CharField(max_length=150, blank=True)  # kept if the user is deleted
    verb = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64, db_index=True, blank=True)
    object_id = models.CharField(max_length=64, blank=True, db_index=True)
    object_repr = models.CharField(max_length=200, blank=True)
    data = models.JSONField(default=dict, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["-id"]
        permissions = [
            ("curate", "Curate datasets (curator role)"),
            ("review", "Vote in blind comparisons (reviewer role)"),
            ("train", "Launch and manage training jobs (engineer role)"),
            ("administer", "Manage users, approve promotions (admin role)"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.verb} {self.object_type}:{self.object_id}"

    def save(self, *args, **kwargs):
        if self.pk is not None and not kwargs.pop("_allow_update", False):
            raise PermissionError("audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("audit events are append-only")


class AuditCheckpoint(models.Model):
    """The newest audit event the audit page has verified, so that a page load checks only the events
    after it (one row, kept in the database: clearing the cache does not bring back a walk of the whole
    chain). Signed with SECRET_KEY (which is not in the database), so a row moved past tampered events
    by someone who can write to the database is ignored rather than trusted. `broken`: the last walk of
    the whole chain found a break, so page loads walk the whole chain until it is whole again."""

    event_id = models.BigIntegerField()  # not a foreign key: audit events are never deleted
    event_hash = models.CharField(max_length=64)
    checked = models.PositiveBigIntegerField()  # events verified up to and including event_id
    full_at = models.DateTimeField()  # when the whole chain was last walked
    broken = models.BooleanField(default=False)
    signature = models.CharField(max_length=64)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"audit checkpoint at #{self.event_id}"
