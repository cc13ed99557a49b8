"""The quality gate and the release: a manifest and an exported model directory.

A release directory holds everything the serving process needs and nothing it
has to unpickle: ``model.keras`` (Keras format, loaded with safe_mode),
``calibration.json`` (plain arrays) and ``manifest.json`` (provenance).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from petseg.errors import ConfigError

RELEASE_FILES = ("model.keras", "calibration.json", "manifest.json")


def gate(metrics: dict, *, min_miou: float, min_margin: float) -> tuple[bool, str]:
    """Decide whether a model is released, from validation figures only.

    The rule: on the validation split, the calibrated model's mIoU must reach
    the absolute floor ``min_miou`` and beat the best baseline's mIoU (see
    `petseg.baselines`) by at least ``min_margin``. The test split is not
    consulted: it stays an unbiased estimate of the released model.

    Args:
        metrics: the evaluate step's metrics, with ``metrics["validation"]["calibrated"]["miou"]``
            and ``metrics["validation"]["baselines"]``.
        min_miou: the floor.
        min_margin: the lead over the best baseline.

    Returns:
        (passed, a one-line message with the figures and the thresholds).
    """
    validation = metrics["validation"]
    miou = float(validation["calibrated"]["miou"])
    name, scored = max(validation["baselines"].items(), key=lambda item: item[1]["miou"])
    baseline = float(scored["miou"])
    figures = (f"validation mIoU {miou:.4f} (floor {min_miou:.2f}), best baseline {name} {baseline:.4f} "
               f"(required lead {min_margin:.2f}, got {miou - baseline:+.4f})")
    if miou >= min_miou and miou - baseline >= min_margin:
        return True, f"Release gate passed: {figures}."
    return False, (f"Release gate failed: {figures}; the model is not deployed "
                   "(train longer, or change --min_miou / --min_margin).")


def build_manifest(*, run_id: str, flow_name: str, model_fingerprint: str, dataset_fingerprint: str,
                   code_version: str, metrics: dict, settings: dict, location: str,
                   image_size: int = 128) -> dict:
    """Return the release manifest: what was released, from where, and how good it is."""
    return {
        "version": f"petseg-{run_id}",
        "pathspec": f"{flow_name}/{run_id}",
        "run_id": str(run_id),
        "model_fingerprint": model_fingerprint,
        "dataset_fingerprint": dataset_fingerprint,
        "code_version": code_version,
        "location": location,
        "model_uri": location,
        "files": list(RELEASE_FILES),
        "image_size": image_size,
        "settings": settings,
        "metrics": {key: metrics[key] for key in ("raw", "calibrated", "baselines", "validation") if key in metrics},
    }


def export(target: str, *, model_keras: bytes, calibration: dict, manifest: dict,
           s3_endpoint_url: str | None = None) -> str:
    """Write a release directory (local path or s3:// prefix) and return its location.

    A local release appears at once or not at all: files are written into a
    temporary directory beside the target, which is then renamed.
    """
    files = {
        "model.keras": model_keras,
        "calibration.json": json.dumps(calibration, sort_keys=True).encode(),
        "manifest.json": json.dumps(manifest, indent=2, sort_keys=True).encode(),
    }
    if target.startswith("s3://"):
        import boto3

        parsed = urlparse(target)
        if not parsed.netloc:
            raise ConfigError(f"release location {target!r} has no bucket: expected s3://bucket/prefix")
        client = boto3.client("s3", endpoint_url=s3_endpoint_url)
        prefix = parsed.path.strip("/")
        # manifest.json last: its presence means the release is complete.
        for name in RELEASE_FILES:
            client.put_object(Bucket=parsed.netloc, Key=f"{prefix}/{name}", Body=files[name])
        return target.rstrip("/") + "/"
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        for name in RELEASE_FILES:
            (staging / name).write_bytes(files[name])
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(final)
