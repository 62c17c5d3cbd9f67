"""Creating datasets, their PII policy, and editing examples."""

from __future__ import annotations

import hashlib
import json

from django.db import IntegrityError, transaction

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
    taken = EditRefused(f"Name: a dataset called “{name}” already exists; choose another name.")
    if Dataset.objects.filter(name=name).exists():
        raise taken
    policy = policy or PiiPolicy()
    errors = policy.validate()
    if errors:
        raise EditRefused("; ".join(errors))
    try:
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
    except IntegrityError:
        # two curators creating the same name at once: both passed the check above, one insert wins
        if Dataset.objects.filter(name=name).exists():
            raise taken from None
        raise
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


STALE_EDIT = (
    "This example was changed since you opened it (another curator, or a finding scrubbed meanwhile); "
    "your edit was not saved. Its current text is shown below: make your edit again."
)


def edit_token(example: Example) -> str:
    """A digest of what the edit form shows: sent back with the form, it tells whether the example
    changed since the form was rendered (saving the old text then would undo that change, e.g. bring
    back a name a curator scrubbed meanwhile)."""
    body = [example.messages, example.chosen, example.rejected, example.tags, example.split]
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def edit_example(
    example: Example,
    *,
    messages: list[dict],
    chosen=None,
    rejected=None,
    tags=None,
    split=None,
    user,
    expected_token: str | None = None,
):
    """Validate and save an edited example; its findings are dropped and it is re-scanned. With
    ``expected_token`` (``edit_token`` of the example the form showed) an example changed meanwhile is
    refused instead of overwritten."""
    dataset = example.dataset
    problem = parsing.validate_messages(messages, kind=dataset.kind)
    if problem:
        raise EditRefused(problem[1])
    for where, text in [("The chosen answer", chosen), ("The rejected answer", rejected)] + [
        (f"The tag {n}", tag) for n, tag in enumerate(tags or [], 1)
    ]:
        unstorable = parsing.text_problem(text, where) if isinstance(text, str) else None
        if unstorable:
            raise EditRefused(unstorable)
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
    with transaction.atomic():
        current = Example.objects.select_for_update().get(pk=example.pk)
        if expected_token is not None and edit_token(current) != expected_token:
            raise EditRefused(STALE_EDIT)
        text_changed = (messages, chosen, rejected) != (current.messages, current.chosen, current.rejected)
        example.messages = messages
        example.chosen, example.rejected = chosen, rejected
        fields = ["messages", "chosen", "rejected", "updated_at"]
        if tags is not None:
            example.tags = tags
            example.tags_text = tags_text(tags)
            fields += ["tags", "tags_text"]
        if split is not None:
            example.split = split
            fields.append("split")
        # tags are scanned like the text: new tags must be scanned, and findings in the old ones point at
        # words that are no longer there
        rescan = text_changed or (tags is not None and tags != current.tags)
        if text_changed:
            example.content_hash = content_hash(messages, chosen, rejected)
            example.minhash = None
            example.token_count = token_count
            fields += ["content_hash", "minhash", "token_count"]
        if rescan:
            example.edited = True
            example.pii_status = Example.Pii.UNSCANNED
            fields += ["edited", "pii_status"]
            PiiFinding.objects.filter(example=example).delete()
        # only what the edit sets: a drop, a duplicate decision or a kept value recorded since this
        # example was read is not overwritten with the values of that older read
        example.save(update_fields=fields)
        audit.record(user, "example.edit", example, dataset=dataset.pk, text_changed=text_changed)
        if rescan:
            from ..tasks import scan_examples

            purge_freed_pages()
            transaction.on_commit(lambda: scan_examples.delay(dataset.pk, [example.pk]))
    return example
