"""Celery workers: where the service's tables meet cape.Trainer. One worker process per GPU."""
