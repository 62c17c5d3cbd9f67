"""Registry, evaluation, voting, approval-gate and serving operations (one module per area)."""

from .registry import register_job_result

__all__ = ["register_job_result"]
