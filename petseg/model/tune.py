"""Random search over training settings.

Trials are drawn from a seeded NumPy generator, so a seed names a fixed list
of trials; the best trial is the one with the lowest validation loss.
"""

import math

import numpy as np

from petseg.errors import ConfigError

LEARNING_RATE_RANGE = (1e-3, 6e-3)
"""Peak learning rates (cosine schedule, Adam) are drawn log-uniformly from this range: below it the
small model is still far from converged after a CPU budget of epochs, above it training diverges."""
BATCH_SIZES = (8, 16)
"""Small batches: more updates per epoch, which is what a short CPU run lacks."""


def sample_trials(n: int, *, seed: int) -> list[dict]:
    """Draws `n` trial settings; the same seed gives the same trials.

    Args:
        n: Number of trials, at least 1.
        seed: Seed of the generator.

    Returns:
        One dict per trial: index (0, 1, ...), learning_rate, batch_size.

    Raises:
        ConfigError: n is below 1.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of trials must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    low, high = (math.log10(bound) for bound in LEARNING_RATE_RANGE)
    trials = []
    for index in range(n):
        learning_rate = 10 ** rng.uniform(low, high)
        trials.append(
            {
                "index": index,
                # Three significant digits read well in logs and stay within the range.
                "learning_rate": float(f"{learning_rate:.3g}"),
                "batch_size": int(rng.choice(BATCH_SIZES)),
            }
        )
    return trials


def select(results: list[dict]) -> dict:
    """Picks the trial with the lowest validation loss; ties go to the lower index.

    A trial whose loss is NaN (training diverged) ranks last.

    Args:
        results: One dict per trial with at least "index" and "val_loss".

    Returns:
        The best result dict.

    Raises:
        ConfigError: The list is empty or a result lacks "index" or "val_loss".
    """
    if not results:
        raise ConfigError("no tuning results to select from: run at least one trial")
    for position, result in enumerate(results):
        missing = [key for key in ("index", "val_loss") if key not in result]
        if missing:
            raise ConfigError(f"tuning result {position} lacks {', '.join(missing)}: {result!r}")

    def rank(result: dict) -> tuple[float, int]:
        loss = float(result["val_loss"])
        return (math.inf if math.isnan(loss) else loss, result["index"])

    return min(results, key=rank)
