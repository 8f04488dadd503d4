"""The weight and the scale of each delta in a version's mean (`aggregation`, `staleness_weight`).

mean = sum_i(weight_i * scale_i * delta_i) / sum_i(weight_i), summed in stream order (diloco/reduce.py):
  weight: 1 (`aggregation=uniform`) or the tokens the delta trained on (`tokens`);
  scale:  1 (`staleness_weight=none`) or 1/sqrt(1 + s) (`inv_sqrt`), s = the version stepped from minus
          the delta's base version (its staleness; always 0 in sync mode).
The scale is not normalised away: a lone stale delta (async mode, one delta per version) still counts
for less. A version whose rule is not plain uniform records its rule, weights and scales in the
versions stream (`recorded`), and the replay recomputes them from the announcements and the rule.
"""

from __future__ import annotations

import math

from diloco.config import RunConfig
from diloco.messages import Announcement


def weight(aggregation: str, ann: Announcement) -> float:
    return float(ann.tokens) if aggregation == "tokens" else 1.0


def scale(staleness_weight: str, staleness: int) -> float:
    return 1.0 / math.sqrt(1.0 + staleness) if staleness_weight == "inv_sqrt" else 1.0


def factors(aggregation: str, staleness_weight: str, head_version: int, ann: Announcement) -> tuple[float, float]:
    """(weight, scale) of `ann` in the outer step from `head_version`."""
    return weight(aggregation, ann), scale(staleness_weight, head_version - ann.version)


def recorded(cfg: RunConfig) -> bool:
    """Whether versions record their weights (any rule but sync and uniform, which stays as it always was)."""
    return cfg.is_async or cfg.aggregation != "uniform"


def stats(cfg: RunConfig, head_version: int, anns: list[Announcement]) -> dict[str, str]:
    """The versions-stream fields that record a version's rule and each included delta's factors, in order."""
    if not recorded(cfg):
        return {}
    pairs = [factors(cfg.aggregation, cfg.staleness_weight, head_version, a) for a in anns]
    return {"aggregation": cfg.aggregation, "staleness_weight": cfg.staleness_weight,
            "staleness": ",".join(str(head_version - a.version) for a in anns),
            "delta_weights": ",".join(repr(w) for w, _ in pairs), "delta_scales": ",".join(repr(s) for _, s in pairs)}
