"""Domain operations on datasets: plain functions used by views, Celery tasks and commands alike."""
