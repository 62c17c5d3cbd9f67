"""Dataset pages. Thin: parse, authorise, call a service, render."""

from __future__ import annotations

import base64
import itertools
import json
from collections import Counter

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Count, OuterRef, Q, Subquery, TextField
from django.db.models.functions import Cast, Coalesce
from django.http import Http404, HttpResponse, HttpResponseBadRequest, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.views.decorators.http import require_POST

from studio import audit
from studio.htmx import is_htmx_partial, render_htmx
from studio.numbers import form_id
from studio.roles import CURATOR, ENGINEER, role_required

from . import forms, search
from .models import Dataset, DatasetVersion, DuplicateGroup, Example, PiiFinding, Upload
from .services import datasets, duplicates, imports, progress, scrub, storage, versions
from .tokens import training_estimate

READERS = (CURATOR, ENGINEER)


# --- datasets ---------------------------------------------------------------------------------------


@role_required(*READERS)
def dataset_list(request):
    # one counting subquery each: joining both tables counted examples x versions rows (a 100,000-example
    # dataset with 3 versions: 300,000 joined rows to count distinct ids for one line of the list)
    rows = Dataset.objects.annotate(
        n_examples=_count_of(Example.objects.filter(dropped=False)),
        n_versions=_count_of(DatasetVersion.objects.all()),
    ).select_related("base_model", "owner")
    return render(request, "datasets/list.html", {"datasets": rows})


def _count_of(queryset):
    """The number of rows of ``queryset`` (a model with a ``dataset`` key) per dataset, as a subquery."""
    counted = queryset.filter(dataset=OuterRef("pk")).order_by().values("dataset").annotate(n=Count("pk"))
    return Coalesce(Subquery(counted.values("n")), 0)


@role_required(CURATOR)
def dataset_create(request):
    form = forms.DatasetForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            dataset = datasets.create_dataset(
                form.cleaned_data["name"],
                form.cleaned_data["kind"],
                request.user,
                description=form.cleaned_data["description"],
                base_model=form.cleaned_data["base_model"],
                policy=forms.default_policy(),
            )
        except datasets.EditRefused as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Dataset “{dataset.name}” created. Upload a file to fill it.")
            return redirect("datasets:upload_new", dataset.pk)
    return render(request, "datasets/create.html", {"form": form})


def _overview(dataset: Dataset) -> dict:
    # One pass over the dataset's examples for every count (one query per count read all 100,000 rows of
    # a large dataset five times), then the token counts of the active ones for the histogram.
    counts = {
        **{f"split:{v}": Count("pk", filter=Q(dropped=False, split=v)) for v in Example.Split.values},
        **{f"pii:{v}": Count("pk", filter=Q(dropped=False, pii_status=v)) for v in Example.Pii.values},
        "dropped": Count("pk", filter=Q(dropped=True)),
        "unscanned": Count("pk", filter=Q(pii_status=Example.Pii.UNSCANNED)),
    }
    counted = dataset.examples.order_by().aggregate(**counts)
    # only the values present, as the grouped counts gave them
    splits = {v: counted[f"split:{v}"] for v in Example.Split.values if counted[f"split:{v}"]}
    pii = {v: counted[f"pii:{v}"] for v in Example.Pii.values if counted[f"pii:{v}"]}
    pending = PiiFinding.objects.filter(
        dataset=dataset, decision=PiiFinding.Decision.PENDING, example__dropped=False
    ).count()  # as the PII page and the freeze check count them: dropped examples are not reviewed
    lengths = list(dataset.examples.filter(dropped=False).values_list("token_count", flat=True))
    from .tokens import token_stats

    stats = versions.stats_to_dict(token_stats(lengths)) if lengths else None
    return {
        "total": sum(splits.values()),
        "dropped": counted["dropped"],
        "unscanned": counted["unscanned"],
        "splits": splits,
        "pii": pii,
        "pending_findings": pending,
        "dup_groups": dataset.duplicate_groups.filter(decision=DuplicateGroup.Decision.PENDING).count(),
        "stats": stats,
        "blockers": versions.blockers(dataset, unscanned=counted["unscanned"]),
    }


@role_required(*READERS)
def dataset_detail(request, pk: int):
    dataset = get_object_or_404(Dataset.objects.select_related("base_model"), pk=pk)
    overview = _overview(dataset)
    context = {
        "dataset": dataset,
        "overview": overview,
        "uploads": dataset.uploads.select_related("uploaded_by")[:10],
        "versions": dataset.versions.select_related("created_by")[:20],
        "scan": progress.get_progress("scan", dataset.pk),
        # a scan can only have failed while examples wait for it (scan_failure says None otherwise)
        "scan_failed": scrub.scan_failure(dataset) if overview["unscanned"] else None,
        "split_form": forms.SplitForm(),
        "freeze_form": forms.FreezeForm(),
    }
    return render(request, "datasets/detail.html", context)


@role_required(*READERS)
def scan_status(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    return render(
        request,
        "datasets/partials/scan_status.html",
        {
            "dataset": dataset,
            "scan": progress.get_progress("scan", pk),
            "scan_failed": scrub.scan_failure(dataset),
        },
    )


@role_required(CURATOR)
def dataset_settings(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    policy = scrub.policy_for(dataset)
    form = forms.PolicyForm(request.POST or None, policy=policy)
    if request.method == "POST" and form.is_valid():
        try:
            datasets.update_policy(dataset, form.to_policy(policy), request.user)
        except datasets.EditRefused as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(
                request, "PII settings saved. Re-scan the dataset to apply them to existing examples."
            )
            return redirect("datasets:pii", dataset.pk)
    return render(request, "datasets/settings.html", {"dataset": dataset, "form": form})


# --- uploads ----------------------------------------------------------------------------------------


@role_required(CURATOR)
def upload_new(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    form = forms.UploadForm(request.POST, request.FILES) if request.method == "POST" else forms.UploadForm()
    if request.method == "POST" and getattr(request, "upload_too_large", False):
        form.is_valid()
        form.errors.pop("file", None)
        form.add_error(
            "file",
            f"The file is larger than the upload limit of {filesizeformat(settings.STUDIO_UPLOAD_MAX_BYTES)}. "
            "Split it into smaller files and upload them one by one.",
        )
    elif request.method == "POST" and form.is_valid():
        f = form.cleaned_data["file"]
        try:
            upload = imports.receive_upload(
                dataset, request.user, f.name, f.chunks(storage.CHUNK), fmt=form.cleaned_data["format"]
            )
        except imports.ImportRefused as exc:
            form.add_error("file", str(exc))
        else:
            with transaction.atomic():
                if imports.needs_csv_mapping(upload):
                    Upload.objects.filter(pk=upload.pk).update(status=Upload.Status.NEEDS_MAPPING)
                    return redirect("datasets:upload_mapping", upload.pk)
                imports.enqueue(upload)
            return redirect(upload)
    limit_mb = request_limit_mb()
    return render(
        request, "datasets/upload_new.html", {"dataset": dataset, "form": form, "limit_mb": limit_mb}
    )


def request_limit_mb() -> int:
    return settings.STUDIO_UPLOAD_MAX_BYTES // (1024 * 1024)


@role_required(CURATOR)
def upload_mapping(request, pk: int):
    upload = get_object_or_404(
        Upload.objects.select_related("dataset"), pk=pk, status=Upload.Status.NEEDS_MAPPING
    )
    try:
        columns = imports.csv_columns(upload)
    except Exception as exc:  # noqa: BLE001 - parsing.FileError and friends: shown in plain words
        messages.error(request, getattr(exc, "reason", "The CSV header could not be read."))
        return redirect(upload.dataset)
    form = forms.CsvMappingForm(columns, request.POST or None)
    if request.method == "POST" and form.is_valid():
        from .parsing import CsvMapping

        d = form.cleaned_data
        with transaction.atomic():
            mapped = imports.set_csv_mapping(
                upload,
                CsvMapping(
                    prompt=d["prompt"],
                    response=d["response"],
                    system=d["system"] or None,
                    tags=d["tags"] or None,
                ),
                from_status=(Upload.Status.NEEDS_MAPPING,),
            )
            if mapped:
                imports.enqueue(upload)
        if not mapped:
            messages.error(
                request,
                "The columns of this file were already chosen (in another tab or by another curator) and "
                "its import is under way; your choice was not applied. Its progress is shown below.",
            )
        return redirect(upload)
    return render(
        request, "datasets/upload_mapping.html", {"upload": upload, "form": form, "columns": columns}
    )


@role_required(CURATOR)
def upload_detail(request, pk: int):
    upload = get_object_or_404(Upload.objects.select_related("dataset"), pk=pk)
    context = {
        "upload": upload,
        "progress": progress.get_progress("upload", upload.pk),
        "reason_labels": _labels(),
    }
    return render_htmx(
        request, "datasets/upload_detail.html", "datasets/partials/upload_status.html", context
    )


def _labels() -> dict:
    from .parsing import REJECTION_CODES

    return REJECTION_CODES


@role_required(CURATOR)
def upload_rejects(request, pk: int):
    upload = get_object_or_404(Upload, pk=pk)
    if not upload.rejects_path:
        raise Http404("This upload has no rejected lines.")
    # Read the first frame before answering: a file gone from the data dir or sealed with a key no
    # longer configured is then a message on the upload's page, not a download cut off after its
    # headers (a 200 with an empty or truncated file, and a traceback in the log).
    chunks = storage.decrypt_chunks(storage.Path(upload.rejects_path))
    try:
        first = next(chunks, b"")
    except (OSError, storage.DecryptionError):
        messages.error(
            request,
            "The rejected lines of this upload can no longer be read (their encrypted file is missing or "
            "was sealed with a key the studio no longer has). Upload the file again to get them, or ask "
            "an administrator to restore the data directory.",
        )
        return redirect(upload)
    audit.record(request.user, "upload.download_rejects", upload, lines=upload.rejected_count)
    response = StreamingHttpResponse(
        itertools.chain([first], chunks), content_type="application/octet-stream"
    )
    response["Content-Disposition"] = f'attachment; filename="upload-{upload.pk}-rejected-lines.txt"'
    return response


# --- PII review ---------------------------------------------------------------------------------------


def _filter_text(value: str) -> str:
    """A filter from the address, NUL characters dropped: no stored text holds one (the importer and the
    edit form refuse them), and PostgreSQL refuses them in a query."""
    return value.replace("\x00", "")


@role_required(CURATOR)
def pii_review(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    decision = request.GET.get("decision", "pending")
    entity_type = _filter_text(request.GET.get("type", ""))
    qs = PiiFinding.objects.filter(dataset=dataset, example__dropped=False).select_related("example")
    by_type = Counter(
        dict(
            qs.filter(decision=PiiFinding.Decision.PENDING)
            .values_list("entity_type")
            .annotate(n=Count("id"))
            .values_list("entity_type", "n")
        )
    )
    decided = dict(
        qs.exclude(decision=PiiFinding.Decision.PENDING)
        .values_list("decision")
        .annotate(n=Count("id"))
        .values_list("decision", "n")
    )
    if decision in PiiFinding.Decision.values:
        qs = qs.filter(decision=decision)
    if entity_type:
        qs = qs.filter(entity_type=entity_type)
    page = Paginator(qs.order_by("entity_type", "example__position", "segment", "start"), 50).get_page(
        request.GET.get("page")
    )
    rows = [{"f": f, **scrub.finding_context(f, f.example)} for f in page]
    context = {
        "dataset": dataset,
        "page": page,
        "rows": rows,
        "by_type": sorted(by_type.items()),
        "decided": decided,
        "decision": decision,
        "entity_type": entity_type,
        "scan": progress.get_progress("scan", dataset.pk),
        "scan_failed": scrub.scan_failure(dataset),
        "types": scrub.entity_types(scrub.policy_for(dataset)),
    }
    return render_htmx(request, "datasets/pii_review.html", "datasets/partials/pii_table.html", context)


# A decision must be asked for: anything else (a missing or mistyped action) used to count as "reject",
# i.e. keep the text as not personal data, the unsafe choice.
DECISION_ACTIONS = ("accept", "reject")
NO_ACTION = "action: choose Accept (scrub) or Reject (keep the text); nothing was decided."


@role_required(CURATOR)
@require_POST
def pii_decide(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    # ids beyond a 64-bit key can name no finding (and overflow SQLite's integers: a 500)
    ids = [i for i in map(form_id, request.POST.getlist("finding")) if i is not None]
    if request.POST.get("action") not in DECISION_ACTIONS:
        if request.htmx:
            return HttpResponseBadRequest(NO_ACTION)
        messages.error(request, NO_ACTION)
        return redirect("datasets:pii", dataset.pk)
    accept = request.POST.get("action") == "accept"
    n = scrub.decide(dataset, ids, accept, request.user)
    if request.htmx and len(ids) == 1:
        f = PiiFinding.objects.filter(pk=ids[0], dataset=dataset).select_related("example").first()
        if f is None:  # superseded by an overlapping redaction
            return HttpResponse("")
        return render(
            request,
            "datasets/partials/pii_row.html",
            {"row": {"f": f, **scrub.finding_context(f, f.example)}},
        )
    messages.success(request, f"{n} findings {'scrubbed' if accept else 'kept as not personal data'}.")
    return redirect("datasets:pii", dataset.pk)


@role_required(CURATOR)
@require_POST
def pii_decide_type(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    entity_type = request.POST.get("type", "")
    if request.POST.get("action") not in DECISION_ACTIONS:
        messages.error(request, NO_ACTION)
        return redirect(reverse("datasets:pii", args=[dataset.pk]))
    if "\x00" in entity_type:  # no finding type has one (and PostgreSQL refuses it in a query)
        messages.error(request, "Choose a finding type from the list on this page.")
        return redirect(reverse("datasets:pii", args=[dataset.pk]))
    accept = request.POST.get("action") == "accept"
    n = scrub.decide_type(dataset, entity_type, accept, request.user)
    messages.success(request, f"{n} {entity_type} findings {'scrubbed' if accept else 'kept'}.")
    return redirect(reverse("datasets:pii", args=[dataset.pk]))


@role_required(CURATOR)
@require_POST
def pii_rescan(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    from .tasks import scan_examples

    progress.set_progress("scan", dataset.pk, "Queued for scanning", 0, 1)
    transaction.on_commit(lambda: scan_examples.delay(dataset.pk, None))
    audit.record(request.user, "pii.rescan", dataset)
    messages.info(request, "Re-scan queued; pending findings will be replaced as it runs.")
    return redirect(reverse("datasets:pii", args=[dataset.pk]))


# --- examples -------------------------------------------------------------------------------------------


@role_required(CURATOR)
def example_list(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    qs = dataset.examples.all()
    q = _filter_text(request.GET.get("q", "")).strip()
    tag = _filter_text(request.GET.get("tag", "")).strip()
    split = request.GET.get("split", "")
    state = request.GET.get("state", "active")
    if q:
        qs = search.search(qs, q)
    if tag:
        qs = qs.filter(tags_text__contains=imports.tag_filter_text(tag))
    if split in Example.Split.values:
        qs = qs.filter(split=split)
    if state == "active":
        qs = qs.filter(dropped=False)
    elif state == "dropped":
        qs = qs.filter(dropped=True)
    elif state == "findings":
        qs = qs.filter(dropped=False, pii_status=Example.Pii.PENDING)
    elif state == "duplicate":
        qs = qs.filter(duplicate_group__isnull=False)
    page = Paginator(qs.order_by("position"), 25).get_page(request.GET.get("page"))
    context = {
        "dataset": dataset,
        "page": page,
        "q": q,
        "tag": tag,
        "split": split,
        "state": state,
        # the filter menu: only the whole page shows it, not the rows an HTMX filter or search replaces
        "all_tags": [] if is_htmx_partial(request) else _top_tags(dataset),
        "splits": Example.Split.choices,
    }
    return render_htmx(request, "datasets/examples.html", "datasets/partials/example_rows.html", context)


def _top_tags(dataset: Dataset, limit: int = 40, sample: int = 20000) -> list[str]:
    """The most common tags of the dataset's first ``sample`` active examples, for the filter menu.
    Counted on the stored JSON texts of the tag lists: only the few distinct lists are parsed, not one
    per example (a quarter of a second on a large dataset, for every page of examples)."""
    texts = Counter(
        dataset.examples.filter(dropped=False)
        .annotate(tags_json=Cast("tags", TextField()))
        .values_list("tags_json", flat=True)[:sample]
    )
    tags: Counter[str] = Counter()
    for text, n in texts.items():  # in order of first appearance, as the examples' own lists were
        for t in (json.loads(text) if text else None) or []:  # JSON null: no tags, as before
            tags[t] += n
    return [t for t, _ in tags.most_common(limit)]


def _example_messages_from_post(example: Example, post) -> list[dict]:
    out = []
    for i, m in enumerate(example.messages):
        content = post.get(f"content_{i}")
        out.append(
            {"role": m["role"], "content": m["content"] if content is None else content.replace("\r\n", "\n")}
        )
    return out


@role_required(CURATOR)
def example_detail(request, pk: int):
    example = get_object_or_404(Example.objects.select_related("dataset", "duplicate_group"), pk=pk)
    error = ""
    if request.method == "POST":
        messages_ = _example_messages_from_post(example, request.POST)
        split = request.POST.get("split") if request.POST.get("split") in Example.Split.values else None
        try:
            datasets.edit_example(
                example,
                messages=messages_,
                chosen=request.POST.get("chosen", example.chosen),
                rejected=request.POST.get("rejected", example.rejected),
                tags=datasets.parse_tags(request.POST.get("tags", "")),
                split=split,
                user=request.user,
                expected_token=request.POST.get("loaded") or None,
            )
        except datasets.EditRefused as exc:
            error = str(exc)
            if error == datasets.STALE_EDIT:  # show what the example holds now, not the stale post
                example.refresh_from_db()
        else:
            messages.success(request, "Example saved; it is being re-scanned for personal data.")
            return redirect(example)
    findings = list(example.findings.all())
    segments = []
    for i, text in enumerate(example.segments()):
        segments.append(
            {
                "index": i,
                "label": example.segment_label(i),
                "text": text,
                "pieces": _highlight(text, [f for f in findings if f.segment == i]),
            }
        )
    context = {
        "example": example,
        "dataset": example.dataset,
        "segments": segments,
        "findings": findings,
        "error": error,
        "types": scrub.entity_types(scrub.policy_for(example.dataset)),
        "splits": Example.Split.choices,
        "neighbours": _neighbours(example),
        "edit_token": datasets.edit_token(example),
    }
    return render(request, "datasets/example.html", context)


def _highlight(text: str, findings: list[PiiFinding]) -> list[dict]:
    """Split a text into plain and highlighted pieces (rendered with autoescape, never |safe)."""
    pieces, cursor = [], 0
    for f in sorted(findings, key=lambda f: f.start):
        if f.start < cursor or f.end > len(text):
            continue
        if f.start > cursor:
            pieces.append({"text": text[cursor : f.start]})
        pieces.append({"text": text[f.start : f.end], "finding": f})
        cursor = f.end
    if cursor < len(text):
        pieces.append({"text": text[cursor:]})
    return pieces


def _neighbours(example: Example) -> dict:
    qs = Example.objects.filter(dataset_id=example.dataset_id, dropped=False)
    prev = qs.filter(position__lt=example.position).order_by("-position").values_list("pk", flat=True).first()
    nxt = qs.filter(position__gt=example.position).order_by("position").values_list("pk", flat=True).first()
    return {"prev": prev, "next": nxt}


@role_required(CURATOR)
@require_POST
def example_mark(request, pk: int):
    example = get_object_or_404(Example.objects.select_related("dataset"), pk=pk)
    loaded = request.POST.get("loaded")
    if loaded and loaded != datasets.edit_token(example):
        # the selection's offsets count characters of the text the page showed: after a scrub or an edit
        # since then they point at other words, which would be scrubbed instead of the selected ones
        messages.error(
            request,
            "This example was changed since you opened it (another curator, or a finding scrubbed "
            "meanwhile); nothing was marked. Select the words again in its current text.",
        )
        return redirect(example)
    try:
        scrub.mark_span(
            example,
            int(request.POST.get("segment", -1)),
            int(request.POST.get("start", -1)),
            int(request.POST.get("end", -1)),
            request.POST.get("entity_type", ""),
            request.user,
        )
    except (ValueError, scrub.ScrubError) as exc:
        messages.error(
            request, str(exc) if isinstance(exc, scrub.ScrubError) else "Select the words to scrub first."
        )
    else:
        messages.success(request, "Marked and scrubbed.")
    return redirect(example)


@role_required(CURATOR)
@require_POST
def example_drop(request, pk: int):
    example = get_object_or_404(Example, pk=pk)
    if request.POST.get("drop") not in ("0", "1"):  # not "restore" by default: that puts it back in training
        messages.error(request, "drop: choose “Drop from dataset” or “Restore”; nothing was changed.")
        return redirect(example)
    drop = request.POST.get("drop") == "1"
    with transaction.atomic():
        # the dataset's row before the example's and before the audit event (see services.scrub's
        # docstring): scrub_dropped below takes it, and waiting for it while holding the audit log's lock
        # deadlocked with a curator scrubbing a finding of this example, or an import into the dataset
        Dataset.objects.select_for_update(no_key=True).get(pk=example.dataset_id)
        Example.objects.filter(pk=pk).update(dropped=drop)
        audit.record(request.user, "example.drop" if drop else "example.restore", example)
        if drop:
            scrub.scrub_dropped(example.dataset, [pk], request.user)
    return redirect(example)


# --- duplicates ---------------------------------------------------------------------------------------


@role_required(CURATOR)
def duplicate_list(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    show = request.GET.get("show", "pending")
    qs = dataset.duplicate_groups.prefetch_related("members")
    if show == "pending":
        qs = qs.filter(decision=DuplicateGroup.Decision.PENDING)
    page = Paginator(qs.order_by("kind", "id"), 20).get_page(request.GET.get("page"))
    return render(request, "datasets/duplicates.html", {"dataset": dataset, "page": page, "show": show})


@role_required(CURATOR)
@require_POST
def duplicate_decide(request, pk: int):
    group = get_object_or_404(DuplicateGroup.objects.select_related("dataset"), pk=pk)
    try:
        duplicates.decide(group, request.POST.get("decision", ""), request.user)
    except ValueError:
        messages.error(request, "Choose keep all or keep one.")
    return redirect(reverse("datasets:duplicates", args=[group.dataset_id]))


@role_required(CURATOR)
@require_POST
def duplicate_decide_all(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    try:
        n = duplicates.decide_all(dataset, request.POST.get("decision", ""), request.user)
    except ValueError:
        messages.error(request, "Choose keep all or keep one.")
    else:
        messages.success(request, f"{n} groups decided.")
    return redirect(reverse("datasets:duplicates", args=[dataset.pk]))


# --- split, freeze, versions ------------------------------------------------------------------------------


@role_required(CURATOR)
@require_POST
def dataset_split(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    form = forms.SplitForm(request.POST)
    if form.is_valid():
        d = form.cleaned_data
        counts = versions.split_by_ratio(dataset, d["train"], d["eval"], d["golden"], d["seed"], request.user)
        messages.success(request, "Split: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    else:
        messages.error(request, " ".join(e for errs in form.errors.values() for e in errs))
    return redirect(dataset)


@role_required(CURATOR)
@require_POST
def dataset_freeze(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    form = forms.FreezeForm(request.POST)
    form.is_valid()
    try:
        version = versions.freeze(dataset, request.user, form.cleaned_data.get("changelog", ""))
    except versions.NothingChanged as exc:  # often the same form sent twice: show the version it made
        messages.info(request, f"Not frozen again: {exc}")
        return redirect(exc.version)
    except versions.FreezeRefused as exc:
        messages.error(request, f"Not frozen: {exc}")
        return redirect(dataset)
    messages.success(request, f"Version {version.number} frozen.")
    return redirect(version)


@role_required(*READERS)
def version_detail(request, pk: int):
    version = get_object_or_404(
        DatasetVersion.objects.select_related("dataset", "created_by", "base_model"), pk=pk
    )
    form = forms.EstimateForm(request.GET or None)
    estimate = None
    if form.is_valid():
        from training_app.services.jobs import version_skipped

        d = form.cleaned_data
        # the examples the trainer will skip left out, as the launch page's estimate does
        kept = version_skipped(version, d["max_length"])
        estimate = training_estimate(
            kept["lengths"],
            epochs=d["epochs"],
            batch_size=d["batch_size"],
            grad_accum=d["grad_accum"],
            max_length=d["max_length"],
        )
        estimate.update(
            skipped=kept["skipped"],
            eval_skipped=kept["eval_skipped"],
            skipped_unchecked=kept["unchecked"],
            approximate=bool(kept["skipped"] and kept["skipped"]["approximate"]),
        )
    others = version.dataset.versions.exclude(pk=version.pk).order_by("-number")
    sample = version.examples.order_by("position")[:5]
    return render(
        request,
        "datasets/version.html",
        {
            "version": version,
            "form": form,
            "estimate": estimate,
            "others": others,
            "sample": sample,
            "export_sha256": versions.export_sha256(version),
        },
    )


@role_required(*READERS)
def version_export(request, pk: int):
    version = get_object_or_404(DatasetVersion.objects.select_related("dataset"), pk=pk)
    file_sha256 = versions.export_sha256(version)
    audit.record(request.user, "dataset.export", version, sha256=version.sha256, file_sha256=file_sha256)
    # streamed (the rows are read in chunks, never the whole file in memory), in blocks of lines: one
    # write to the client per 64 KiB rather than per line
    response = StreamingHttpResponse(
        _blocks(versions.export_lines(version)), content_type="application/jsonl"
    )
    response["Content-Disposition"] = (
        f'attachment; filename="dataset-{version.dataset_id}-v{version.number}.jsonl"'
    )
    # the same value the version page shows and `export_dataset` prints: `sha256sum` of this file
    response["X-Content-SHA256"] = file_sha256
    response["Repr-Digest"] = f"sha-256=:{base64.b64encode(bytes.fromhex(file_sha256)).decode()}:"
    return response


def _blocks(lines, size: int = 64 * 1024):
    """The byte strings of ``lines`` joined into blocks of about ``size`` bytes (the same bytes)."""
    block, n = [], 0
    for line in lines:
        block.append(line)
        n += len(line)
        if n >= size:
            yield b"".join(block)
            block, n = [], 0
    if block:
        yield b"".join(block)


@role_required(*READERS)
def version_diff(request, pk: int, other: int):
    new = get_object_or_404(DatasetVersion.objects.select_related("dataset"), pk=pk)
    # versions of another dataset share no example, so such a "diff" would say nothing: refused
    old = get_object_or_404(DatasetVersion, pk=other, dataset_id=new.dataset_id)
    if old.number > new.number:
        old, new = new, old
    from .models import VersionExample

    limit = 50
    try:
        page = max(1, min(int(request.GET.get("page", 1)), 10**9))
    except ValueError:
        page = 1
    d = versions.diff_page(old, new, page=page, limit=limit)
    added = VersionExample.objects.filter(pk__in=d.added)
    removed = VersionExample.objects.filter(pk__in=d.removed)
    rows = {v.pk: v for v in VersionExample.objects.filter(pk__in=[p for pair in d.changed for p in pair])}
    changed = [(rows[a], rows[b]) for a, b in d.changed]
    pages = max(1, -(-max(d.summary.values()) // limit))
    return render(
        request,
        "datasets/diff.html",
        {
            "old": old,
            "new": new,
            "summary": d.summary,
            "added": added,
            "removed": removed,
            "changed": changed,
            "limit": limit,
            "page": page,
            "pages": pages,
            "previous_page": page - 1 if page > 1 else None,
            "next_page": page + 1 if page < pages else None,
        },
    )
