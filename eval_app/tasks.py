"""Thin Celery wrappers around eval_app services (routed to queue `gpu`, see CELERY_TASK_ROUTES)."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="eval_app.tasks.run_evaluation", acks_late=True)
def run_evaluation(run_id: int) -> None:
    """Generate both models' answers for an evaluation run, score them and create its comparisons."""
    from .services.evaluation import execute_run

    execute_run(run_id)


@shared_task(name="eval_app.tasks.deliver_webhooks")
def deliver_webhooks() -> int:
    """Deliver due webhook events from the outbox (retries with back-off); returns how many were sent."""
    from .services.webhooks import deliver_pending

    return deliver_pending()
