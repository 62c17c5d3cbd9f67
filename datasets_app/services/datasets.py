"""Creating datasets, their PII policy, and editing examples."""

from __future__ import annotations

from django.db import transaction

from studio import audit
from studio.db import purge_freed_pages

from .. import parsing
from ..dedup import content_hash
from ..models import Dataset, Example, PiiFinding
from ..pii import PiiPolicy
from .imports import tags_text


class EditRefused(Exception):
    pass


def create_dataset(
    name: str, kind: str, user, *, description: str = "", base_model=None, policy: PiiPolicy | None = None
):
    name = name.strip()
    if not name or len(name) > 120:
        raise EditRefused("Name: give the dataset a name of 1 to 120 characters.")
    if Dataset.objects.filter(name=name).exists():
        raise EditRefused(f"Name: a dataset called “{name}” already exists; choose another name.")
    policy = policy or PiiPolicy()
    errors = policy.validate()
    if errors:
        raise EditRefused("; ".join(errors))
    with transaction.atomic():
        dataset = Dataset.objects.create(
            name=name,
            kind=kind,
            description=description.strip(),
            owner=user if getattr(user, "is_authenticated", False) else None,
            base_model=base_model,
            pii_policy=policy.to_dict(),
        )
        audit.record(user, "dataset.create", dataset, kind=kind)
    return dataset


def update_policy(dataset: Dataset, policy: PiiPolicy, user) -> None:
    errors = policy.validate()
    if errors:
        raise EditRefused("; ".join(errors))
    with transaction.atomic():
        before = dataset.pii_policy
        dataset.pii_policy = policy.to_dict()
        dataset.save(update_fields=["pii_policy", "updated_at"])
        changed = sorted(k for k in dataset.pii_policy if dataset.pii_policy.get(k) != (before or {}).get(k))
        audit.record(user, "dataset.pii_policy", dataset, changed=changed)


def parse_tags(raw: str) -> list[str]:
    tags = [t.strip() for t in raw.replace(";", ",").split(",")]
    return list(dict.fromkeys(t for t in tags if t))[:30]


def edit_example(
    example: Example, *, messages: list[dict], chosen=None, rejected=None, tags=None, split=None, user
):
    """Validate and save an edited example; its findings are dropped and it is re-scanned."""
    dataset = example.dataset
    problem = parsing.validate_messages(messages, kind=dataset.kind)
    if problem:
        raise EditRefused(problem[1])
    if dataset.kind == Dataset.Kind.PREFERENCE:
        if not (chosen or "").strip() or not (rejected or "").strip():
            raise EditRefused("Both the chosen and the rejected answer need text.")
        if chosen.strip() == rejected.strip():
            raise EditRefused(
                "The chosen and rejected answers are identical; a preference pair needs two different answers."
            )
    else:
        chosen = rejected = None
    token_count = example.token_count
    base = dataset.base_model
    if base is not None and base.local_dir.exists():
        from ..tokens import count_chat_tokens, load_tokenizer

        tok = load_tokenizer(str(base.local_dir))
        convs = (
            [messages]
            if chosen is None
            else [
                messages + [{"role": "assistant", "content": chosen}],
                messages + [{"role": "assistant", "content": rejected}],
            ]
        )
        token_count = max(count_chat_tokens(tok, c) for c in convs)
        if token_count > base.context_length:
            raise EditRefused(
                f"The conversation is {token_count} tokens long; {base.name} takes at most {base.context_length}."
            )
    text_changed = (messages, chosen, rejected) != (example.messages, example.chosen, example.rejected)
    with transaction.atomic():
        example.messages = messages
        example.chosen, example.rejected = chosen, rejected
        if tags is not None:
            example.tags = tags
            example.tags_text = tags_text(tags)
        if split is not None:
            example.split = split
        if text_changed:
            example.content_hash = content_hash(messages, chosen, rejected)
            example.minhash = None
            example.token_count = token_count
            example.edited = True
            example.pii_status = Example.Pii.UNSCANNED
            PiiFinding.objects.filter(example=example).delete()
        example.save()
        audit.record(user, "example.edit", example, dataset=dataset.pk, text_changed=text_changed)
        if text_changed:
            from ..tasks import scan_examples

            purge_freed_pages()
            transaction.on_commit(lambda: scan_examples.delay(dataset.pk, [example.pk]))
    return example
