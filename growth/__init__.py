"""Function-preserving growth of transformers (issue 4; docs/architecture.md).

The one public entry point is ``expand(config, params, requests, *, rng, opt_state=None,
fill=None) -> (new_config, new_params, new_opt_state)``; see ``growth.api.expand``.
"""

from growth.api import expand
from growth.requests import Request, parse_requests
from growth.rules import GrowthError, exactness_table

__all__ = ["GrowthError", "Request", "exactness_table", "expand", "parse_requests"]
