"""Celery workers: where the service's tables meet cape's trainer, evaluation and inference. One training worker
process per GPU (queue gpu), and predict workers (queue predict)."""
