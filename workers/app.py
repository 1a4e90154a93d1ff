"""``celery -A workers.app`` target (router queue, beat, Flower). Render workers start with
``python -m workers.render``, which adds their model's queue after loading it."""

from __future__ import annotations

from workers import runtime
from workers.celery_app import make_celery

app = make_celery(runtime.settings())
runtime.set_app(app)
