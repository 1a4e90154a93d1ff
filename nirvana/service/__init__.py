"""The job service library: job store, routing and rendering logic, HTTP client, workload.

Nothing here imports Celery or FastAPI: ``workers/`` and ``api/`` are thin shells over this package, and the
``nirvana`` CLI talks to the service over HTTP (``client.py``) or launches it as subprocesses
(``nirvana/embedded/stack.py``).
"""
