"""Serving pages: API keys and the two-model playground. Thin: parse, authorise, call a service, render.

Both pages are for engineers and admins (the roles that may call the API; see services/serving.py for
why reviewers are left out). Everyone sees and revokes their own keys; admins see and revoke all keys.
"""

from __future__ import annotations

import json
import secrets

from django import forms
from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from studio.htmx import render_htmx
from studio.roles import ADMIN, ENGINEER, has_role, role_required

from .services import serving

# --- API keys ----------------------------------------------------------------------------------------


class ApiKeyForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        required=False,
        help_text="A label to tell your keys apart, e.g. “support chatbot” or “CI”.",
    )
    # one use per rendered form: re-submitting the same form (a browser refresh of the page that shows
    # the new key) must not mint a second key
    once = forms.CharField(widget=forms.HiddenInput, max_length=64, required=False)


USED_KEY_FORMS = "api_key_forms_used"  # session: the `once` tokens already spent (never a key)


def _fresh_form(data=None) -> ApiKeyForm:
    return ApiKeyForm(data, initial={"once": secrets.token_urlsafe(16)})


def _keys_context(request, form=None, new_key=None, raw_key="") -> dict:
    keys = serving.visible_keys(request.user).order_by("revoked_at", "-created_at")
    return {
        "keys": keys,
        "form": form or _fresh_form(),
        "new_key": new_key,
        "raw_key": raw_key,
        "show_owner": has_role(request.user, ADMIN),
        "api_base": request.build_absolute_uri("/v1"),
        "rate_limit": serving.rate_limit_per_minute(),
        "max_tokens": serving.max_tokens_cap(),
    }


@role_required(ENGINEER)
@never_cache
def api_keys(request):
    return render(request, "eval/serving/api_keys.html", _keys_context(request))


@role_required(ENGINEER)
@require_POST
@never_cache
def api_key_create(request):
    form = ApiKeyForm(request.POST)
    if not form.is_valid():
        return render(request, "eval/serving/api_keys.html", _keys_context(request, form=form), status=400)
    once = form.cleaned_data["once"]
    used = request.session.get(USED_KEY_FORMS, [])
    if once and once in used:
        messages.info(
            request,
            "That form was already used: its key was created and shown once (it is in the list below). "
            "Revoke it if you did not copy it, and create another.",
        )
        return redirect("eval:api_keys")
    try:
        key, raw = serving.create_key(request.user, form.cleaned_data["name"])
    except serving.KeyRefused as exc:
        form.add_error(None, str(exc))
        return render(request, "eval/serving/api_keys.html", _keys_context(request, form=form), status=400)
    if once:
        request.session[USED_KEY_FORMS] = [*used, once][-20:]
    # The plaintext is in this response only (never stored, never cached): the page says so.
    return render(request, "eval/serving/api_keys.html", _keys_context(request, new_key=key, raw_key=raw))


@role_required(ENGINEER)
@require_POST
def api_key_revoke(request, pk: int):
    key = get_object_or_404(serving.visible_keys(request.user), pk=pk)
    if serving.revoke(request.user, key):
        messages.success(request, f"Key {key.prefix}… is revoked; requests with it now get 401.")
    else:
        messages.info(request, f"Key {key.prefix}… was already revoked.")
    return redirect("eval:api_keys")


# --- playground --------------------------------------------------------------------------------------


class PlaygroundForm(forms.Form):
    model_a = forms.ChoiceField(label="Model A")
    model_b = forms.ChoiceField(label="Model B")
    system = forms.CharField(
        label="System prompt", required=False, max_length=4000, widget=forms.Textarea(attrs={"rows": 2})
    )
    message = forms.CharField(
        label="Your message",
        max_length=serving.PLAYGROUND_MESSAGE_CHARS,
        widget=forms.Textarea(attrs={"rows": 3, "autofocus": True}),
        error_messages={"required": "Write a message to send to both models."},
    )
    temperature = forms.FloatField(
        label="Temperature",
        min_value=0,
        max_value=2,
        initial=0,
        help_text="0 gives the same answer every time.",
    )
    history_a = forms.CharField(required=False, widget=forms.HiddenInput)
    history_b = forms.CharField(required=False, widget=forms.HiddenInput)

    def __init__(self, *args, names: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        choices = [(n, n) for n in names]
        self.fields["model_a"].choices = choices
        self.fields["model_b"].choices = choices
        cap = serving.max_tokens_cap()
        self.fields["max_tokens"] = forms.IntegerField(
            label="Max tokens", min_value=1, max_value=cap, initial=min(128, cap), help_text=f"At most {cap}."
        )

    def clean(self):
        data = super().clean()
        for side in ("a", "b"):
            try:
                data[f"history_{side}"] = serving.parse_history(data.get(f"history_{side}"))
            except serving.InvalidRequest as exc:
                self.add_error(None, exc.message)
        return data


def _names() -> list[str]:
    return [s.name for s in serving.servable_models()]


def _side(label: str, model: str, history: list[dict], turn: serving.Turn | None = None) -> dict:
    history = turn.history if turn else history
    return {
        "label": label,
        "model": model,
        "history": history,
        "history_json": json.dumps(history, ensure_ascii=False),
        "completion": turn.completion if turn else None,
        "error": turn.error if turn else "",
    }


def _render(request, context: dict):
    return render_htmx(
        request, "eval/serving/playground.html", "eval/serving/partials/playground_chat.html", context
    )


@role_required(ENGINEER)
def playground(request):
    names = _names()
    a = request.GET.get("a") if request.GET.get("a") in names else (names[0] if names else "")
    others = [n for n in names if n != a]
    b = request.GET.get("b") if request.GET.get("b") in names else (others[0] if others else a)
    form = PlaygroundForm(names=names, initial={"model_a": a, "model_b": b})
    context = {"form": form, "names": names, "sides": [_side("A", a, []), _side("B", b, [])]}
    return render(request, "eval/serving/playground.html", context)


@role_required(ENGINEER)
@require_POST
def playground_send(request):
    names = _names()
    form = PlaygroundForm(request.POST, names=names)
    if not form.is_valid():
        sides = []
        for side in ("a", "b"):
            try:
                history = serving.parse_history(request.POST.get(f"history_{side}"))
            except serving.InvalidRequest:
                history = []
            sides.append(_side(side.upper(), request.POST.get(f"model_{side}", ""), history))
        return _render(request, {"form": form, "names": names, "sides": sides})
    data = form.cleaned_data
    params = serving.ChatParams(
        max_tokens=data["max_tokens"],
        temperature=data["temperature"],
        seed=0 if data["temperature"] == 0 else None,
    )
    sides = []
    for side in ("a", "b"):
        model, history = data[f"model_{side}"], data[f"history_{side}"]
        turn = serving.playground_turn(model, data["system"], history, data["message"], params)
        sides.append(_side(side.upper(), model, history, turn))
    # The next message starts empty; the other settings stay as they were.
    keep = {k: v for k, v in data.items() if k not in ("message", "history_a", "history_b")}
    form = PlaygroundForm(names=names, initial=keep)
    return _render(request, {"form": form, "names": names, "sides": sides})
