"""``celery -A workers.app`` target (router queue, beat, Flower). Render workers start with
``python -m workers.render``, which adds their model's queue after loading it. Resources are built on the first
task (the context's lazy path)."""

from __future__ import annotations

from nirvana.config import get_settings
from workers import process

app, ctx = process.build(get_settings())
