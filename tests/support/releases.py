"""Small releases for tests: an untrained small model and a calibration fitted on random probabilities."""

from __future__ import annotations

from pathlib import Path


def small_release(target: Path, **manifest: object) -> Path:
    """Export a release of version petseg-7 to ``target``; ``manifest`` overrides `bundle.build_manifest`'s
    arguments (code_version, settings, ...). Returns ``target``."""
    import keras
    import numpy as np

    from petseg.model import calibration
    from petseg.model import unet as models
    from petseg.release import bundle

    keras.utils.set_random_seed(0)
    small = models.build("small", image_size=32, width=4)
    rng = np.random.default_rng(0)
    probs = rng.random((2, 8, 8, 3)).astype(np.float32)
    fitted = calibration.fit(probs / probs.sum(-1, keepdims=True), (rng.random((2, 8, 8, 3)) > 0.5).astype(np.float32))
    options = {"run_id": "7", "flow_name": "PetSegFlow", "model_fingerprint": models.fingerprint(small),
               "dataset_fingerprint": "d" * 64, "code_version": "0.1.0", "metrics": {}, "settings": {},
               "location": str(target), "image_size": 32, **manifest}
    bundle.export(str(target), model_keras=models.to_bytes(small), calibration=fitted.to_dict(),
                  manifest=bundle.build_manifest(**options))
    return target
