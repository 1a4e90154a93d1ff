"""``nirvana calibrate``: fit the similarity → K table to a quality target for one model.

For each similarity bucket of the K × similarity table (``nirvana.world.evaluate.k_similarity_table``), pick the
largest K whose hits keep at least ``target`` × the full-generation adherence of the *same* pairs, judged by a
one-sided Wilson lower bound (so a bucket with few pairs cannot claim a large K by luck). Then K is made
non-increasing as similarity falls (the conservative direction: a noisy high bucket caps the buckets below it),
and equal neighbours merge into one rule. The result is a policy file ``KPolicy.from_file`` loads.
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
    decisions = []
    for b in range(len(edges) - 1):
        n = table["counts"][b][0]
        full = table["adherence"][b][0] or 0.0
        best, bounds = 0, {}
        for c, k in enumerate(ks[1:], start=1):
            a = table["adherence"][b][c]
            lb = wilson_lower((a or 0.0) * n, n)
            bounds[k] = round(lb, 3)
            if n >= min_count and a is not None and lb >= target * full:
                best = max(best, k)
        decisions.append(
            {
                "bucket": [edges[b], min(edges[b + 1], 1.0)],
                "count": n,
                "full": full,
                "lower_bounds": bounds,
                "k_raw": best,
            }
        )
    # Non-increasing K as similarity falls; walk from the highest bucket down.
    cap = None
    for d in reversed(decisions):
        k = d["k_raw"] if cap is None else min(d["k_raw"], cap)
        d["k"] = k
        cap = k
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
