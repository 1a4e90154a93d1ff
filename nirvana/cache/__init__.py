"""Approximate cache of intermediate latents (NIRVANA): see docs/CACHE.md.

Modules: ``core`` (the facade: ``ApproximateCache``, ``Namespace``, ``CacheRequest``, ``LookupResult``),
``policy`` (similarity → K tables), ``eviction`` (paper LCBFU, ours, lru, lfu, fifo), ``gate`` (one-class SVM),
``store`` (fsspec latent/image store and codecs), ``index`` (pgvector and all SQL), ``embedder``, ``migrate``.
Nothing is imported or built here, so importing the package is cheap.
"""
