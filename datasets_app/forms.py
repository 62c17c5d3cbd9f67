from __future__ import annotations

import re

import regex as regex_engine  # Presidio's engine, which the scan runs the patterns on
from django import forms
from django.conf import settings

from training_app.models import BaseModel

from .models import Dataset, Example
from .pii import DEFAULT_KEEP_PATTERNS, ENTITY_TYPES, PATTERN_MAX_CHARS, CustomRecognizer, PiiPolicy

OPERATORS = [
    ("pseudonym", "Pseudonym (<PERSON_1>)"),
    ("mask", "Mask (****)"),
    ("hash", "Hash"),
    ("redact", "Type only (<PERSON>)"),
]


class DatasetForm(forms.ModelForm):
    class Meta:
        model = Dataset
        fields = ["name", "kind", "description", "base_model"]
        widgets = {"description": forms.Textarea(attrs={"rows": 3})}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["base_model"].queryset = BaseModel.objects.filter(status=BaseModel.Status.ACTIVE)
        self.fields["base_model"].required = False
        default = BaseModel.objects.filter(name=settings.STUDIO_DEFAULT_BASE_MODEL).first()
        if default and not self.initial.get("base_model"):
            self.initial["base_model"] = default.pk


class UploadForm(forms.Form):
    FORMAT_CHOICES = [
        ("", "Detect automatically"),
        ("openai", "OpenAI chat JSONL"),
        ("sharegpt", "ShareGPT"),
        ("alpaca", "Alpaca"),
        ("csv", "CSV (choose columns next)"),
        ("preference", "Preference pairs"),
    ]
    file = forms.FileField(help_text="JSONL, JSON array or CSV; UTF-8. Up to the configured size limit.")
    format = forms.ChoiceField(choices=FORMAT_CHOICES, required=False)


class CsvMappingForm(forms.Form):
    prompt = forms.ChoiceField(label="Prompt column")
    response = forms.ChoiceField(label="Response column")
    system = forms.ChoiceField(label="System prompt column", required=False)
    tags = forms.ChoiceField(label="Tags column", required=False)

    def __init__(self, columns: list[str], *args, **kwargs):
        super().__init__(*args, **kwargs)
        options = [(c, c) for c in columns]
        self.fields["prompt"].choices = options
        self.fields["response"].choices = options
        self.fields["system"].choices = [("", "— none —"), *options]
        self.fields["tags"].choices = [("", "— none —"), *options]
        lower = {c.lower(): c for c in columns}
        for field, guesses in {
            "prompt": ("prompt", "question", "input", "instruction", "user"),
            "response": ("response", "answer", "output", "completion", "assistant"),
            "system": ("system",),
            "tags": ("tags", "tag", "labels"),
        }.items():
            for g in guesses:
                if g in lower:
                    self.initial.setdefault(field, lower[g])
                    break

    def clean(self):
        data = super().clean()
        if data.get("prompt") and data.get("prompt") == data.get("response"):
            raise forms.ValidationError("The prompt and response must come from two different columns.")
        return data


# Each regular expression is tried on probe texts before it is saved (datasets_app.pii: a pattern that
# backtracks exponentially is refused), and the regex engine's time for that grows with the cube of the
# pattern's length: a 10,000-character line held the request for minutes. The policy refuses a pattern
# longer than pii.PATTERN_MAX_CHARS before probing it; the form says so per line, and limits the lines.
PATTERN_MAX_LINES = 50


def _compiles(pattern: str) -> bool:
    """Whether both engines compile the pattern (cheap, unlike the backtracking probe). One that does not
    is left to the policy's own check, which names the regex error."""
    try:
        re.compile(pattern)
        regex_engine.compile(pattern)
    except (re.error, regex_engine.error, TypeError, ValueError, OverflowError, RecursionError, MemoryError):
        return False
    return True


def _check_pattern_lines(text: str, what: str) -> None:
    """Refuse more than PATTERN_MAX_LINES patterns, or one longer than PATTERN_MAX_CHARS, in the field's
    words (`what`: "keep-pattern", "recognizer"). Lines are numbered as the curator sees them."""
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) > PATTERN_MAX_LINES:
        raise forms.ValidationError(
            f"{len(lines):,} {what}s given; at most {PATTERN_MAX_LINES} are allowed. Merge similar ones "
            "into one regular expression or remove those no longer needed."
        )
    for n, line in lines:
        if len(line) > PATTERN_MAX_CHARS and _compiles(line):  # one that does not: "invalid regex" says why
            raise forms.ValidationError(
                f"Line {n}: the {what} is {len(line):,} characters long; at most {PATTERN_MAX_CHARS:,} are "
                "allowed. Describe the shape of the identifier (e.g. ORD-\\d{6}) rather than listing values."
            )


class PolicyForm(forms.Form):
    enabled_types = forms.MultipleChoiceField(
        choices=[(t, t) for t in ENTITY_TYPES], widget=forms.CheckboxSelectMultiple, required=False
    )
    threshold = forms.FloatField(min_value=0, max_value=1, help_text="Findings scoring below are ignored.")
    custom_recognizers = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": "EMPLOYEE_ID: EMP-\\d{6}"}),
        required=False,
        help_text="One per line: TYPE: regular expression",
    )
    allow_list = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        required=False,
        help_text="One term per line; never flagged.",
    )
    keep_patterns = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 5}),
        required=False,
        help_text="One regular expression per line: business identifiers never scrubbed (orders, SKUs, tickets).",
    )

    def __init__(self, *args, policy: PiiPolicy | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        types = list(ENTITY_TYPES)
        if policy is not None:
            types += [c.entity_type for c in policy.custom_recognizers if c.entity_type not in types]
        for t in types:
            self.fields[f"op_{t}"] = forms.ChoiceField(choices=OPERATORS, label=t, required=False)
        if policy is not None and not self.is_bound:
            self.initial.update(
                enabled_types=[t for t in policy.enabled_types if t in ENTITY_TYPES],  # custom: below
                threshold=policy.threshold,
                custom_recognizers="\n".join(
                    f"{c.entity_type}: {c.regex}" for c in policy.custom_recognizers
                ),
                allow_list="\n".join(policy.allow_list),
                keep_patterns="\n".join(policy.keep_patterns),
            )
            for t in types:
                self.initial[f"op_{t}"] = policy.operators.get(t, "pseudonym")

    def operator_fields(self):
        return [self[name] for name in self.fields if name.startswith("op_")]

    def clean_custom_recognizers(self):
        _check_pattern_lines(self.cleaned_data["custom_recognizers"], "recognizer")
        out = []
        for n, line in enumerate(self.cleaned_data["custom_recognizers"].splitlines(), 1):
            if not line.strip():
                continue
            name, sep, regex = line.partition(":")
            name, regex = name.strip().upper().replace(" ", "_"), regex.strip()
            if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]{1,39}", name) or not regex:
                raise forms.ValidationError(
                    f"Line {n}: write TYPE: regular expression, e.g. EMPLOYEE_ID: EMP-\\d{{6}}"
                )
            out.append(CustomRecognizer(name=name.lower(), entity_type=name, regex=regex))
        return out

    def clean_keep_patterns(self):
        _check_pattern_lines(self.cleaned_data["keep_patterns"], "keep-pattern")
        return self.cleaned_data["keep_patterns"]

    def to_policy(self, base: PiiPolicy) -> PiiPolicy:
        d = self.cleaned_data
        custom = d["custom_recognizers"]
        enabled = list(d["enabled_types"]) + [c.entity_type for c in custom]
        # operator fields exist for the custom types of the stored policy too: keep only the types
        # that still exist, or removing a custom recognizer would leave an operator for an unknown type
        known = set(ENTITY_TYPES) | {c.entity_type for c in custom}
        operators = {
            name[3:]: value
            for name, value in d.items()
            if name.startswith("op_") and value and name[3:] in known
        }
        return PiiPolicy(
            enabled_types=list(dict.fromkeys(enabled)),
            threshold=d["threshold"],
            custom_recognizers=custom,
            allow_list=[t.strip() for t in d["allow_list"].splitlines() if t.strip()],
            keep_patterns=[p.strip() for p in d["keep_patterns"].splitlines() if p.strip()],
            operators=operators,
        )


class SplitForm(forms.Form):
    train = forms.FloatField(min_value=0, max_value=100, initial=80, label="Train %")
    eval = forms.FloatField(min_value=0, max_value=100, initial=10, label="Eval %")
    golden = forms.FloatField(min_value=0, max_value=100, initial=10, label="Golden %")
    seed = forms.IntegerField(initial=42)

    def clean(self):
        data = super().clean()
        if sum(data.get(k) or 0 for k in ("train", "eval", "golden")) <= 0:
            raise forms.ValidationError("At least one share must be above zero.")
        return data


class FreezeForm(forms.Form):
    changelog = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4}),
        required=False,
        help_text="What changed and why; shown in the version history and model cards.",
    )


class EstimateForm(forms.Form):
    epochs = forms.FloatField(min_value=0.01, max_value=100, initial=3)
    batch_size = forms.IntegerField(min_value=1, max_value=1024, initial=4)
    grad_accum = forms.IntegerField(min_value=1, max_value=1024, initial=4, label="Gradient accumulation")
    max_length = forms.IntegerField(min_value=16, max_value=131072, initial=2048)


class ExampleSplitForm(forms.Form):
    split = forms.ChoiceField(choices=Example.Split.choices)


def default_policy() -> PiiPolicy:
    return PiiPolicy(keep_patterns=list(DEFAULT_KEEP_PATTERNS))
