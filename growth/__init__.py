"""Function-preserving growth of transformers (docs/architecture.md).

The public entry point is ``expand(config, params, requests, *, rng, opt_state=None,
fill=None) -> (new_config, new_params, new_opt_state)``; ``plan_expansion`` splits it into
a plan made from shapes only and its application in one jitted program (``growth.api``).
"""

from growth.api import Expansion, expand, plan_expansion
from growth.requests import Request, parse_requests
from growth.rules import GrowthError, exactness_table

__all__ = [
    "Expansion",
    "GrowthError",
    "Request",
    "exactness_table",
    "expand",
    "parse_requests",
    "plan_expansion",
]
