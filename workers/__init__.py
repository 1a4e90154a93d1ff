"""Celery workers: thin shells over ``nirvana.service.pipeline`` (router, render, beat maintenance)."""
