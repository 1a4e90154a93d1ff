"""TEST-ONLY render worker: ``python -m tests.faults.render_worker`` is ``python -m workers.render`` with the fault
hooks of ``tests/faults/hooks.py`` installed (prompt markers crash the worker or select the fake engine).

The fault suite's stack starts its render workers with this module (``StackConfig.render_module``); production
never does, and the hooks are not part of the installed package.
"""

from __future__ import annotations

from tests.faults.hooks import from_env
from workers import render

if __name__ == "__main__":
    render.main(fault_hooks=from_env())
