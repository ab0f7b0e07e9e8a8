"""CAPE: category-agnostic pose estimation on MP-100.

The library knows nothing of the web service, the database or Celery.
"""
