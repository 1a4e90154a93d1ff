"""``nirvana/`` is the library: importing any of its service modules pulls in neither Celery nor FastAPI."""

from __future__ import annotations

import subprocess
import sys


def test_library_imports_neither_celery_nor_fastapi() -> None:
    code = (
        "import sys, importlib\n"
        "for m in ('nirvana.cli', 'nirvana.cli.service', 'nirvana.cli.bench', 'nirvana.cli.cache',"
        " 'nirvana.service.service', 'nirvana.pipeline.router', 'nirvana.pipeline.renderer',"
        " 'nirvana.pipeline.maintenance', 'nirvana.embedded.stack', 'nirvana.cli.demo',"
        " 'nirvana.service.metrics', 'nirvana.service.offline'):\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('celery', 'fastapi', 'kombu', 'starlette'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
