"""``nirvana calibrate``: fit the similarity → K table to a quality target for one model.

For each similarity bucket of the K × similarity table (``nirvana.scene.evaluate.k_similarity_table``), the
largest K whose hits keep at least ``target`` × the full-generation adherence of the *same* pairs, judged by a
one-sided Wilson lower bound (few pairs cannot claim a large K by luck). Assumption: resuming from a more similar
prompt's state is never worse, so K never falls as similarity rises — a bucket without enough evidence keeps what
the buckets below earned — and a bucket whose own pairs show failure at K (even their Wilson upper bound misses
the target) caps itself and every less similar bucket below K. Equal neighbours merge into one rule; the result
is a policy file ``KPolicy.from_file`` loads.

Why not cap from above only (before session 5): on the bundled model's table the top buckets hold 1 and 6 of 240
pairs and a 12-pair bucket is noisy; each had "no K", which capped every bucket below at K = 0, although the 209
pairs below 0.80 support K = 20.
"""

from __future__ import annotations

import math
from typing import Any

Z_ONE_SIDED_90 = 1.2816


def wilson_lower(successes: float, n: int, z: float = Z_ONE_SIDED_90) -> float:
    """One-sided Wilson score lower bound of a binomial proportion (0 when ``n`` is 0)."""
    if n <= 0:
        return 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / denom)


def fit_policy(
    table: dict[str, Any], target: float, min_count: int = 10, name: str = "calibrated"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Fit a policy dict from a K × similarity table.

    Args:
        table: output of ``k_similarity_table`` (``k`` columns with 0 = full generation first, ``adherence`` and
            ``counts`` per bucket, ``bucket_edges``, ``num_steps``).
        target: keep hits at ≥ target × full adherence (0 < target ≤ 1).
        min_count: buckets with fewer pairs never get a K (miss).

    Returns:
        (policy dict for ``KPolicy.from_dict``, per-bucket decisions for the report).

    Raises:
        ValueError: target out of range, or no bucket qualifies for any K (the table would be empty).
    """
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    ks: list[int] = table["k"]
    if ks[0] != 0:
        raise ValueError("table: first column must be K=0 (full generation)")
    edges: list[float] = table["bucket_edges"]
    counts, adh = table["counts"], table["adherence"]
    decisions = []
    for b in range(len(edges) - 1):
        n = counts[b][0]
        full = adh[b][0] or 0.0
        best, bounds, veto = 0, {}, None
        for c, k in enumerate(ks[1:], start=1):
            a = adh[b][c]
            lb = wilson_lower((a or 0.0) * n, n)
            bounds[k] = round(lb, 3)
            if n >= min_count and a is not None and lb >= target * full:
                best = max(best, k)
            # Evidence of failure: even the upper bound of the bucket's own adherence misses the target.
            ub = 1.0 - wilson_lower((1.0 - (a or 0.0)) * n, n)
            if veto is None and n >= min_count and a is not None and ub < target * full:
                veto = k
        decisions.append(
            {
                "bucket": [edges[b], min(edges[b + 1], 1.0)],
                "count": n,
                "full": full,
                "lower_bounds": bounds,
                "k_raw": best,
                "veto_from_k": veto,
            }
        )
    # A more similar source is never worse: K never falls as similarity rises, so a bucket without enough
    # evidence (few or noisy pairs) keeps what the buckets below earned ...
    floor_k = 0
    for d in decisions:
        floor_k = max(floor_k, d["k_raw"])
        d["k"] = floor_k
    # ... and a bucket shown to fail at K (veto) caps itself and every less similar bucket below K.
    cap: int | None = None
    for d in reversed(decisions):
        if d["veto_from_k"] is not None:
            below = max([kk for kk in ks[1:] if kk < d["veto_from_k"]], default=0)
            cap = below if cap is None else min(cap, below)
        if cap is not None:
            d["k"] = min(d["k"], cap)
    rules: list[dict[str, Any]] = []
    for d in reversed(decisions):
        if d["k"] <= 0:
            continue
        if rules and rules[-1]["k"] == d["k"]:
            rules[-1]["min_similarity"] = d["bucket"][0]  # merge: extend the rule down to this bucket
        else:
            rules.append({"min_similarity": d["bucket"][0], "k": d["k"]})
    if not rules:
        raise ValueError(f"no similarity bucket keeps {target:.2f} × full adherence at any K; table unchanged")
    policy = {
        "name": name,
        "description": f"calibrated: hits keep >= {target} x full-generation adherence (one-sided 90% Wilson bound)",
        "reference_steps": int(table["num_steps"]),
        "target": target,
        "rules": rules,
    }
    return policy, decisions
