"""Celery workers: thin shells over ``nirvana.pipeline`` (router, render, beat maintenance)."""
