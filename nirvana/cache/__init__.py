"""Approximate cache of intermediate latents (NIRVANA): see docs/CACHE.md.

Modules: ``core`` (the facade: ``ApproximateCache``; re-exports ``request``'s ``Namespace``, ``CacheRequest``,
``LookupResult``), ``record`` (the record path), ``policy`` (similarity → K tables), ``eviction`` (paper LCBFU,
ours, lru, lfu, fifo), ``gate`` (one-class SVM), ``store`` (fsspec latent/image store and codecs), ``index``
(``CacheIndex``, all SQL, composed of ``index_search``, ``index_exact``, ``index_record``, ``index_evict``,
``index_conn``, ``index_rows``), ``embedder``, ``migrate``.
Nothing is imported or built here, so importing the package is cheap.
"""
