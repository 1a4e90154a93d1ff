"""The synthetic scene world the bundled model is trained and judged on: offline quality, no weights needed.

Modules: ``world`` (attributes → 32×32 renders and prompts, the held-out split), ``train`` (the bundled model,
``nirvana train-model``), ``probe`` (attribute probe, ``nirvana train-probe``), ``metrics`` (adherence and
probe-FID), ``evaluate`` (``nirvana eval-model`` and the K × similarity table), ``gallery``. See docs/MODEL.md.
"""
