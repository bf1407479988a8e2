"""Registers the offline multitask mixtures (members in task_id order).

- `offline_image_rgb32_v1`: every offline image task at 32x32x3 with `task_id`
  (Fashion-MNIST only when its Debian package is installed).
- `evolution_image_rgb32_v1`: the six of them the muNet system evolves over (all but
  Fashion-MNIST, which the root model pretrains on); task ids as in the mixture above.
- `offline_text_v1`: SMS spam, TREC-6, movie sentiment (+ fortune topics when present).
- `offline_lm_v1`: pydoc topics (+ fortunes when present), byte-level LM.

Rates follow the train split sizes with temperature 2 (square root), so that the large
Fashion-MNIST does not drown the 160 LFW faces; counting loads the data lazily, on the
first draw from the mixture.
"""

from __future__ import annotations

import functools

import seqio

from tasks import offline_image, offline_text
from tasks.registry import add_mixture

SQRT_SIZE_RATE = functools.partial(seqio.mixing_rate_num_examples, temperature=2.0)


def register() -> None:
    """Registers the offline mixtures; their member tasks must be registered first."""
    add_mixture("offline_image_rgb32_v1", offline_image.mixture_members(), rate=SQRT_SIZE_RATE)
    add_mixture("evolution_image_rgb32_v1", offline_image.evolution_members(), rate=SQRT_SIZE_RATE)
    add_mixture("offline_text_v1", offline_text.text_mixture_members(), rate=SQRT_SIZE_RATE)
    add_mixture("offline_lm_v1", offline_text.lm_mixture_members(), rate=SQRT_SIZE_RATE)
