"""The learning-rate schedule of `./run.sh train`: linear warmup, then cosine decay.

optax's `warmup_cosine_decay_schedule` with its settings checked first: a run shorter
than its warmup fails inside optax with a negative `decay_steps`, and a quoted or
fractional step count fails later still. The checks name the gin macros that bind the
values (gin/runs/train.gin).
"""

from __future__ import annotations

import optax

from training import settings


def warmup_cosine_decay(
    *,
    peak_value: float,
    warmup_steps: int,
    total_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
) -> optax.Schedule:
    """Warms up linearly from `init_value` to `peak_value`, then decays to `end_value`.

    A run shorter than (or as long as) its warmup is refused rather than given a
    shorter warmup: the schedule is a hyperparameter of the run, and changing it
    silently would make a short run differ from what its configuration says. The
    message gives the valid range of WARMUP_STEPS for that TRAIN_STEPS.

    Args:
      peak_value: the learning rate at the end of the warmup (LEARNING_RATE).
      warmup_steps: steps of linear warmup, 0 <= warmup_steps < total_steps
        (WARMUP_STEPS).
      total_steps: the step at which the decay reaches `end_value` (TRAIN_STEPS).
      init_value: the learning rate at step 0.
      end_value: the learning rate at `total_steps`.

    Returns:
      the optax schedule (step -> learning rate).

    Raises:
      settings.SettingError: a step count is not a whole number, or the warmup is not
        shorter than the run.
    """
    total = settings.whole_number(total_steps, "TRAIN_STEPS", 1, "total_steps of the schedule")
    warmup = settings.whole_number(warmup_steps, "WARMUP_STEPS", 0)
    if warmup >= total:
        raise settings.SettingError(
            f"WARMUP_STEPS={warmup} is not below TRAIN_STEPS={total}: the learning rate warms "
            f"up for WARMUP_STEPS steps, then decays until TRAIN_STEPS (valid: "
            f"0 <= WARMUP_STEPS < {total}, e.g. --gin.WARMUP_STEPS={total // 10})."
        )
    return optax.warmup_cosine_decay_schedule(
        init_value, peak_value, warmup, total, end_value=end_value
    )
