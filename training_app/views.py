"""Base model catalog pages (training jobs come with the training issue)."""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from studio.roles import ADMIN, CURATOR, ENGINEER, role_required

from . import services
from .models import BaseModel


@role_required(ENGINEER, CURATOR)
def base_models(request):
    return render(request, "training/base_models.html", {"models": BaseModel.objects.all()})


@role_required(ADMIN)
@require_POST
def base_model_status(request, pk: int):
    model = get_object_or_404(BaseModel, pk=pk)
    status = request.POST.get("status")
    if status not in BaseModel.Status.values:
        messages.error(request, "Unknown status.")
    else:
        services.set_status(model, status, request.user)
        messages.success(request, f"{model.name} is now {model.get_status_display().lower()}.")
    return redirect("training:base_models")
