"""What each stage of PetSegFlow does, over plain values.

The flow (flows/seg_flow.py) is the table of contents; these functions do the
work of one step each: fetch shards from the blob store, call the library
modules named by their job (data, pipeline, train, calibration, ...), and
return plain, JSON-able results for Metaflow to version. Functions that need a
run's context (its id, fingerprints, lineage settings) take the flow object.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

from petseg import __version__
from petseg.errors import ConfigError
from petseg.split import RULES, SPLITS
from petseg.store import BlobStore, get_files, put_files

DEPLOY_TARGETS = ("local", "kubernetes", "none")
LINEAGE_MODES = ("required", "best-effort")
SAMPLE_PREDICTIONS = 6
BOOTSTRAP = 1000
"""Resamples of the test images for the 95 % intervals."""


def _store(root: str) -> BlobStore:
    from metaflow.metaflow_config import S3_ENDPOINT_URL

    return BlobStore(root, s3_endpoint_url=S3_ENDPOINT_URL)


# -- start --------------------------------------------------------------------------------------------

def check_parameters(run) -> dict:
    """Validate the run's parameters and return its settings (seed, mode, threads).

    Raises:
        ConfigError: a parameter is out of range, naming it and what is accepted.
    """
    for name, minimum in (("trials", 1), ("tune_epochs", 1), ("epochs", 1), ("threads", 1)):
        if getattr(run, name) < minimum:
            raise ConfigError(f"--{name} {getattr(run, name)} is too small: expected an integer >= {minimum}")
    if run.batch_size < 0:
        raise ConfigError(f"--batch_size {run.batch_size} is negative: expected 0 (tuned) or a positive integer")
    if run.deploy not in DEPLOY_TARGETS:
        raise ConfigError(f"--deploy {run.deploy!r} is unknown: expected one of {', '.join(DEPLOY_TARGETS)}")
    if run.lineage not in LINEAGE_MODES:
        raise ConfigError(f"--lineage {run.lineage!r} is unknown: expected one of {', '.join(LINEAGE_MODES)}")
    if run.split not in RULES:
        raise ConfigError(f"--split {run.split!r} is unknown: expected one of {', '.join(RULES)}")
    if run.arch not in ("small", "mobilenetv2"):
        raise ConfigError(f"--arch {run.arch!r} is unknown: expected small or mobilenetv2")
    return {"seed": run.seed, "strict": bool(run.deterministic), "threads": run.threads,
            "code_version": code_version()}


def parameters(run) -> dict:
    """Every parameter of the run by name, so that it can be reproduced exactly."""
    from collections.abc import Mapping

    # Configs (such as `compute`) come back as mappings; they set resources, not results.
    values = {name: getattr(run, name) for name, _ in type(run)._get_parameters()}
    return {name: value for name, value in sorted(values.items()) if not isinstance(value, Mapping)}


def _configure(settings: dict) -> dict:
    from petseg import determinism

    return determinism.configure(seed=settings["seed"], strict=settings["strict"], threads=settings["threads"])


def code_version() -> str:
    """The git commit of the code (with -dirty when modified), or the package version outside git."""
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"petseg-{__version__}"
    return f"{commit}{'-dirty' if dirty else ''}"


def blob_root(datastore) -> str:
    """Where this run's shards and logs go: beside Metaflow's datastore (a directory or s3:// prefix)."""
    root = datastore._storage_impl.datastore_root  # Metaflow exposes no public accessor for it
    return f"{root.rstrip('/')}/petseg/blobs"


# -- ingest and transform -----------------------------------------------------------------------------

def ingest(*, source: str, feedback: str, skip_bad: bool, seed: int, store: str) -> dict:
    """Read, validate and shard the source; return the ingest report with shards in the blob store."""
    from metaflow.metaflow_config import S3_ENDPOINT_URL

    from petseg import data

    with tempfile.TemporaryDirectory(prefix="petseg-ingest-") as work:
        report = data.ingest(source, Path(work) / "warehouse", seed=seed, skip_bad=skip_bad,
                             feedback=feedback or None, s3_endpoint_url=S3_ENDPOINT_URL)
        report["shards"] = put_files(_store(store), report["shards"])
    return report


def transform(*, shards: list[dict], store: str, rule: str, official_test: list[str] | None) -> dict:
    """Split the ingested samples by ``rule`` (see petseg.split); return per-split shard records and counts."""
    from petseg import data

    if rule == "official" and official_test is None:
        raise ConfigError("--split official needs the source's annotations/trainval.txt and annotations/test.txt, "
                          "and this source has neither; use --split md5 or a source with the official lists")
    blobs = _store(store)
    with tempfile.TemporaryDirectory(prefix="petseg-transform-") as work:
        local = get_files(blobs, shards, Path(work) / "in")
        result = data.transform(local, Path(work) / "splits",
                                official_test=official_test if rule == "official" else None)
        result["splits"] = {name: put_files(blobs, paths) for name, paths in result["splits"].items()}
    empty = [name for name in SPLITS if not result["counts"].get(name)]
    if empty:
        raise ConfigError(f"split(s) {', '.join(empty)} got no samples: the source is too small "
                          f"(counts {result['counts']}); use more samples")
    return result


def _dataset(split: str, splits: dict, store: str, work: str, **options):
    from petseg import pipeline

    local = get_files(_store(store), splits["splits"][split], Path(work) / split)
    return pipeline.dataset(local, **options)


# -- tune, select, train ------------------------------------------------------------------------------

def sample_trials(*, n: int, seed: int) -> list[dict]:
    """Draw ``n`` hyper-parameter configurations with a seeded sampler."""
    from petseg import tune

    return tune.sample_trials(n, seed=seed)


def _fit(config: dict, *, splits: dict, store: str, arch: str, epochs: int, settings: dict,
         work: str, log_dir: str | None = None):
    from petseg import train

    seed = settings["seed"]
    batch_size = config["batch_size"]
    training = _dataset("training", splits, store, work, batch_size=batch_size, shuffle=True, seed=seed,
                        augment=True)
    validation = _dataset("validation", splits, store, work, batch_size=batch_size)
    model, history = train.fit(train=training, validation=validation, arch=arch, epochs=epochs,
                               learning_rate=config["learning_rate"], seed=seed, log_dir=log_dir)
    return model, history, validation


def run_trial(config: dict, *, splits: dict, store: str, arch: str, epochs: int, settings: dict) -> dict:
    """Train one short trial and return its configuration, validation loss and IoU, and history."""
    from petseg import train

    _configure(settings)
    with tempfile.TemporaryDirectory(prefix="petseg-tune-") as work:
        model, history, validation = _fit(config, splits=splits, store=store, arch=arch, epochs=epochs,
                                          settings=settings, work=work)
        metrics = train.evaluate(model, validation)
    return {"index": config["index"], "config": config, "val_loss": metrics["loss"], "val_miou": metrics["miou"],
            "history": history}


def select(results: list[dict]) -> tuple[list[dict], dict]:
    """Order every trial by index and pick the best configuration."""
    from petseg import tune

    ordered = sorted(results, key=lambda r: r["index"])
    return ordered, tune.select(ordered)


def train(best: dict, *, splits: dict, store: str, arch: str, epochs: int, batch_size: int,
          settings: dict) -> dict:
    """Train the final model; return its bytes, fingerprint, history, TensorBoard logs and the
    environment record of the process that trained it (software, CPU, devices, settings)."""
    from petseg import determinism
    from petseg import model as models

    config = dict(best["config"])
    if batch_size:
        config["batch_size"] = batch_size
    environment = determinism.environment_record(_configure(settings))
    with tempfile.TemporaryDirectory(prefix="petseg-train-") as work:
        log_dir = os.path.join(work, "logs")
        model, history, _ = _fit(config, splits=splits, store=store, arch=arch, epochs=epochs,
                                 settings=settings, work=work, log_dir=log_dir)
        logs = _tar_directory(log_dir)
    return {"model_keras": models.to_bytes(model), "fingerprint": models.fingerprint(model),
            "history": history, "tensorboard_logs": logs, "config": config, "environment": environment}


def _tar_directory(path: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        if os.path.isdir(path):
            tar.add(path, arcname="logs")
    return buffer.getvalue()


# -- calibrate, evaluate ------------------------------------------------------------------------------

def calibrate(model_keras: bytes, *, splits: dict, store: str, settings: dict) -> tuple[dict, dict]:
    """Fit isotonic calibration on the calibration split; return it and the ECE report."""
    from petseg import calibration
    from petseg import model as models

    _configure(settings)
    model = models.from_bytes(model_keras)
    with tempfile.TemporaryDirectory(prefix="petseg-calibrate-") as work:
        dataset = _dataset("calibration", splits, store, work, batch_size=16)
        probs, labels = calibration.collect(model, dataset, seed=settings["seed"])
    fitted = calibration.fit(probs, labels)
    # Fitted and measured on the calibration split; evaluate measures it again on the test split.
    report = calibration.summary(fitted, probs, labels)
    return fitted.to_dict(), report


def evaluate(model_keras: bytes, calibration_table: dict, *, splits: dict, store: str,
             settings: dict) -> tuple[dict, dict]:
    """The model and the baselines on the validation and test splits, and sample predictions for the card.

    Baselines are fitted on the training split. Validation figures are for the
    release gate; test figures (with 95 % bootstrap intervals) are the report.
    """
    import numpy as np

    from petseg import baselines, calibration, train
    from petseg import model as models

    _configure(settings)
    seed = settings["seed"]
    model = models.from_bytes(model_keras)
    fitted = calibration.Calibration.from_dict(calibration_table)
    with tempfile.TemporaryDirectory(prefix="petseg-evaluate-") as work:
        batches = {split: _dataset(split, splits, store, work, batch_size=16)
                   for split in ("training", "validation", "test")}
        lookup = baselines.fit(batches["training"].as_numpy_iterator())
        test = batches["test"]
        held_out = calibration.summary(fitted, *calibration.collect(model, test, seed=seed))
        metrics = {
            "raw": train.evaluate(model, test, bootstrap=BOOTSTRAP, seed=seed),
            "calibrated": train.evaluate(model, test, calibration=fitted, bootstrap=BOOTSTRAP, seed=seed),
            "baselines": baselines.score(lookup, test.as_numpy_iterator(), bootstrap=BOOTSTRAP, seed=seed),
            "validation": {
                "calibrated": train.evaluate(model, batches["validation"], calibration=fitted),
                "baselines": baselines.score(lookup, batches["validation"].as_numpy_iterator()),
            },
            "ece": {"raw": held_out["ece_before"], "calibrated": held_out["ece_after"]},
            "test_samples": int(splits["counts"]["test"]),
        }
        images, truths = next(iter(test.unbatch().batch(SAMPLE_PREDICTIONS)))
    probs = fitted.apply(model.predict_on_batch(images))
    samples = {"images": np.asarray(images), "truths": np.asarray(truths), "probs": np.asarray(probs)}
    return metrics, samples


def report_card(card, *, metrics: dict, history: dict, trials: list[dict], calibration_report: dict,
                samples: dict) -> None:
    """Fill the evaluate step's card: metrics, curves, trials, reliability and sample predictions."""
    from petseg import report

    report.fill_card(card, metrics=metrics, history=history, trials=trials,
                     calibration_report=calibration_report, samples=samples)


# -- release ------------------------------------------------------------------------------------------

def gate(metrics: dict, *, min_miou: float, min_margin: float) -> tuple[bool, str]:
    """The quality gate on validation mIoU, against the floor and the best baseline."""
    from petseg import release

    return release.gate(metrics, min_miou=min_miou, min_margin=min_margin)


def manifest(run) -> dict:
    """Export the release (model, calibration, manifest) and return the manifest."""
    from metaflow import current
    from metaflow.metaflow_config import S3_ENDPOINT_URL

    from petseg import release

    version = f"petseg-{current.run_id}"
    location = f"{run.blob_root.rsplit('/blobs', 1)[0]}/releases/{version}"
    document = release.build_manifest(
        run_id=current.run_id, flow_name=current.flow_name, model_fingerprint=run.model_fingerprint,
        dataset_fingerprint=run.dataset_fingerprint, code_version=run.settings["code_version"],
        metrics=run.metrics, settings=run.settings, location=location)
    release.export(location, model_keras=run.model_keras, calibration=run.calibration, manifest=document,
                   s3_endpoint_url=S3_ENDPOINT_URL)
    return document


def deploy(run, target: str) -> dict | None:
    """Hand the release to the serving deployment chosen by ``--deploy``."""
    from metaflow.metaflow_config import (KUBERNETES_CONTAINER_IMAGE, KUBERNETES_NAMESPACE, KUBERNETES_SECRETS,
                                          S3_ENDPOINT_URL)

    from petseg import deploy as deployment

    if target == "none":
        return None
    fingerprint = run.manifest["model_fingerprint"]
    if target == "local":
        return deployment.deploy_local(run.manifest["location"], port=run.port or None, fingerprint=fingerprint)
    return deployment.deploy_kubernetes(
        run.manifest, image=KUBERNETES_CONTAINER_IMAGE or "petseg:latest", namespace=KUBERNETES_NAMESPACE or "default",
        s3_endpoint_url=S3_ENDPOINT_URL, secrets=[s for s in (KUBERNETES_SECRETS or "").split(",") if s])


def tag_run(**tags: str) -> None:
    """Tag the current run (e.g. dataset:<fingerprint>) so the Client can find it.

    A step in a pod with local metadata cannot see its run (the launcher syncs
    the metadata afterwards); there it says so and goes on: the fingerprints are
    artifacts of the run all the same.
    """
    from metaflow import Run, current
    from metaflow.exception import MetaflowNotFound

    pathspec = f"{current.flow_name}/{current.run_id}"
    try:
        Run(pathspec).add_tags([f"{key}:{value}" for key, value in tags.items()])
    except MetaflowNotFound:
        print(f"note: {pathspec} is not visible from this task's metadata; not tagged with {sorted(tags)}")


def fault_drill(step_name: str) -> None:
    """Fail on purpose when PETSEG_FAIL_AT names this step (to rehearse `resume`)."""
    if os.environ.get("PETSEG_FAIL_AT") == step_name:
        raise RuntimeError(f"fault drill: PETSEG_FAIL_AT={step_name} made this step fail; "
                           f"run `python flows/seg_flow.py resume {step_name}` to finish the run")


# -- lineage ------------------------------------------------------------------------------------------

def pachyderm_address(pachyderm: str) -> str | None:
    """The Pachyderm address to mirror into: the parameter, else $PACHD_ADDRESS, else none."""
    return pachyderm or os.environ.get("PACHD_ADDRESS") or None


def lineage_start(*, code_version: str) -> dict:
    """The run's lineage graph, with no stages yet."""
    from metaflow import current

    from petseg import lineage

    return lineage.new_graph(pathspec=current.pathspec, code_version=code_version)


def _as_file(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode()


def lineage_record(run, stage: str, outputs: dict) -> dict:
    """Record a stage's outputs in the run's lineage graph, mirroring them into Pachyderm when configured."""
    from metaflow import current

    from petseg import lineage

    return lineage.record_stage(
        run.lineage_graph, stage, files={name: _as_file(value) for name, value in outputs.items()},
        pathspec=current.pathspec, dataset_fingerprint=getattr(run, "dataset_fingerprint", None),
        model_fingerprint=getattr(run, "model_fingerprint", None), address=run.pachyderm_address,
        required=run.lineage == "required")


# -- end ----------------------------------------------------------------------------------------------

def summary(run) -> dict:
    """The one-line-per-run facts `petseg runs` lists (test split, calibrated model)."""
    calibrated = run.metrics["calibrated"]
    name, best = max(run.metrics["baselines"].items(), key=lambda item: item[1]["miou"])
    return {
        "dataset_fingerprint": run.dataset_fingerprint,
        "model_fingerprint": run.model_fingerprint,
        "test_pet_iou": calibrated["pet_iou"],
        "test_miou": calibrated["miou"],
        "best_baseline": name,
        "best_baseline_pet_iou": best["pet_iou"],
        "best_baseline_miou": best["miou"],
        "released": bool(run.released),
        "version": run.manifest["version"] if run.manifest else None,
        "deployment": run.deployment,
    }


def closing_words(run) -> str:
    """The run's quality and where to look next, printed at the end of a run."""
    from metaflow import current

    facts = run.summary
    calibrated = run.metrics["calibrated"]
    lines = [
        f"Run {current.flow_name}/{current.run_id} finished.",
        f"  test IoU:     pet {calibrated['pet_iou']:.3f}  background {calibrated['background_iou']:.3f}  "
        f"border {calibrated['border_iou']:.3f}  mIoU {calibrated['miou']:.3f}  "
        f"(pixel accuracy {calibrated['pixel_accuracy']:.3f}, {calibrated['images']} images)",
        f"  best baseline: {facts['best_baseline']}: pet {facts['best_baseline_pet_iou']:.3f}  "
        f"mIoU {facts['best_baseline_miou']:.3f}",
        f"  {run.gate_message}",
        f"  report card:  python flows/seg_flow.py card get {current.run_id}/evaluate --id report report.html",
        f"  details:      petseg show {current.run_id}",
    ]
    if run.deployment and run.deployment.get("url"):
        url = run.deployment["url"]
        lines += [f"  serving at:   {url}",
                  f"  query it:     petseg predict --url {url} IMAGE.jpg --out mask.png",
                  f"  stop it:      petseg stop {current.run_id}"]
    return "\n".join(lines)
