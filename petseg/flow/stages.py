"""The flow's step glue: with `petseg.flow.hooks`, the library code that reads Metaflow's settings and environment.

The flow (flows/seg_flow.py) is the table of contents; each function here does
the work of one step over explicit values: fetch shards from the blob store,
call the library modules named by their job (warehouse, pipeline, train,
calibration, ...), and return plain, JSON-able results for Metaflow to
version. Metaflow's settings (the S3 endpoint, the Kubernetes image and
namespace, the run's id) and the environment (``PACHD_ADDRESS``,
``PETSEG_FAIL_AT``, ``METAFLOW_CODE_SHA``) are read here; the OpenLineage
events and run tags live in `petseg.flow.hooks`. A `PetsegError` leaves a step as
a `StepError`, which Metaflow prints as one message without a traceback.

What a step reads and writes is declared with its stage (`petseg.lineage.graph.STAGES`),
not noted here: `petseg.flow.hooks` records each stage from that declaration and the
step's artifacts when the step ends.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from metaflow import current
from metaflow.exception import MetaflowException

from petseg import codeversion, servers, storage
from petseg.data.split import RULES
from petseg.deploy import endpoints
from petseg.errors import ConfigError, PetsegError
from petseg.layout import Layout
from petseg.model.architectures import ARCHITECTURES
from petseg.oxford import SPLITS
from petseg.storage import BlobStore, get_files, put_files

DEPLOY_TARGETS = ("local", "kubernetes", "operator", "none")
"""``--deploy``: this machine's endpoint; a Deployment and Service on the cluster (no operator); the server's
operator object (`petseg.deploy.rollout`); nothing."""
CLUSTER_TARGETS = ("kubernetes", "operator")
TOKENS_SECRET = "petseg-serving-tokens"
"""The Secret of the serving pods' bearer tokens (k8s/base/serving-tokens-secret.template.yaml;
``$PETSEG_TOKENS_SECRET`` names another): endpoints on a cluster are never open."""
LINEAGE_MODES = ("required", "best-effort")
SAMPLE_PREDICTIONS = 6
BOOTSTRAP = 1000
"""Resamples of the test images for the 95 % intervals."""
LINEAGE_TIMEOUT = 60.0
"""Seconds a stage may spend mirroring into Pachyderm before it gives up (``PETSEG_LINEAGE_TIMEOUT``)."""


class StepError(MetaflowException):
    """A user-facing problem in a step, printed by Metaflow as its message alone."""

    headline = "petseg"


def _glue(function):
    """Hand a `PetsegError` to Metaflow as a `StepError` (one message, no traceback)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except PetsegError as err:
            raise StepError(str(err)) from None

    return wrapper


def s3_endpoint() -> str | None:
    """The endpoint of a non-AWS S3 server, Metaflow's settings included (`petseg.storage.s3_endpoint`), or None."""
    return storage.s3_endpoint(metaflow=True)


def blob_store(root: str) -> BlobStore:
    """The run's blob store at ``root`` (`blob_root`), on Metaflow's S3 endpoint."""
    return BlobStore(root, s3_endpoint_url=s3_endpoint())


def _configure(settings: dict) -> dict:
    """Seeds, threads, op determinism and CPU pins for this task (`_fit` seeds again once its data is fetched).

    Called before the task imports TensorFlow: portable mode pins what TensorFlow reads when it loads.
    """
    from petseg.model import determinism

    return determinism.configure(seed=settings["seed"], strict=settings["strict"], threads=settings["threads"],
                                 portable=settings.get("portable", False))


# -- start --------------------------------------------------------------------------------------------

def code_package() -> str | None:
    """The sha of the code package Metaflow shipped to this task's pod (None when the task runs locally)."""
    return os.environ.get("METAFLOW_CODE_SHA") or None


@_glue
def settings(parameters: Mapping, *, code: Mapping) -> dict:
    """Validate the run's parameters and return its settings (seed, mode, threads, image size, code).

    Args:
        parameters: every parameter of the run by name (see `parameters`).
        code: the flow's ``code`` Config: the launching checkout's git facts.

    Raises:
        ConfigError: a parameter is out of range, naming it and what is accepted; or
            ``require_clean`` and the run was launched from a checkout with uncommitted changes.
    """
    for name, minimum in (("trials", 1), ("tune_epochs", 1), ("epochs", 1), ("threads", 1), ("image_size", 32)):
        if parameters[name] < minimum:
            raise ConfigError(f"--{name} {parameters[name]} is too small: expected an integer >= {minimum}")
    if parameters["batch_size"] < 0:
        raise ConfigError(f"--batch_size {parameters['batch_size']} is negative: "
                          "expected 0 (tuned) or a positive integer")
    for name, accepted in (("deploy", DEPLOY_TARGETS), ("lineage", LINEAGE_MODES), ("split", RULES),
                           ("arch", ARCHITECTURES),
                           ("server", servers.NAMES if parameters["deploy"] == "operator" else servers.LOCAL)):
        if parameters[name] not in accepted:
            raise ConfigError(f"--{name} {parameters[name]!r} is unknown: expected one of {', '.join(accepted)}")
    if not 0 <= parameters["canary"] < 100:
        raise ConfigError(f"--canary {parameters['canary']} is not a share of traffic: expected 0 (straight "
                          "replacement) to 99")
    if parameters["champion"] != "auto" and not parameters["champion"]:
        raise ConfigError("--champion is empty: expected auto, none or a release location")
    endpoints.check_name(parameters["endpoint"])
    if parameters["image_size"] % 16:
        raise ConfigError(f"--image_size {parameters['image_size']} is not a multiple of 16: "
                          "the U-Net halves the image four times")
    from petseg.model import determinism

    record = codeversion.record(dict(code), code_package=code_package())
    if parameters.get("require_clean"):
        codeversion.require_clean(record)
    portable = bool(parameters["deterministic"] and parameters["portable"])
    return {"seed": parameters["seed"], "strict": bool(parameters["deterministic"]), "threads": parameters["threads"],
            "portable": portable, "pins": dict(determinism.PORTABLE_PINS) if portable else {},
            "image_size": parameters["image_size"], "code_version": codeversion.describe(record), "code": record}


def parameters(values: Mapping) -> dict:
    """The run's parameters by name, sorted, so that it can be reproduced exactly.

    Configs (such as ``compute``) come as mappings; they set resources, not results.
    """
    return {name: value for name, value in sorted(values.items()) if not isinstance(value, Mapping)}


def datastore_root(datastore) -> str:
    """The root of this run's Metaflow datastore (a directory or s3:// prefix)."""
    return datastore._storage_impl.datastore_root.rstrip("/")  # Metaflow exposes no public accessor for it


def blob_root(datastore) -> str:
    """Where this run's shards and logs go: beside Metaflow's datastore (a directory or s3:// prefix)."""
    return Layout(datastore_root(datastore)).blobs


def lineage_target(*, pachyderm: str, mode: str) -> dict:
    """Where lineage is mirrored: the --pachyderm address, else $PACHD_ADDRESS, else none; whether it must be;
    and how many seconds a stage may spend on it ($PETSEG_LINEAGE_TIMEOUT, default `LINEAGE_TIMEOUT`)."""
    timeout = os.environ.get("PETSEG_LINEAGE_TIMEOUT") or LINEAGE_TIMEOUT
    try:
        timeout = float(timeout)
    except ValueError:
        raise StepError(f"PETSEG_LINEAGE_TIMEOUT={timeout!r} is not a number of seconds") from None
    return {"address": pachyderm or os.environ.get("PACHD_ADDRESS") or None, "required": mode == "required",
            "timeout": timeout}


# -- ingest and transform -----------------------------------------------------------------------------

@_glue
def ingest(*, source: str, feedback: str, skip_bad: bool, settings: dict, store: str) -> dict:
    """Read, validate and shard the source; return the ingest report with shards in the blob store."""
    from petseg.data import warehouse

    with tempfile.TemporaryDirectory(prefix="petseg-ingest-") as work:
        report = warehouse.ingest(source, Path(work) / "warehouse", seed=settings["seed"], skip_bad=skip_bad,
                                  feedback=feedback or None, image_size=settings["image_size"],
                                  s3_endpoint_url=s3_endpoint())
        report["shards"] = put_files(blob_store(store), report["shards"])
    return report


@_glue
def transform(ingest_report: dict, *, store: str, rule: str) -> dict:
    """Split the ingested samples by ``rule`` (see petseg.data.split); return per-split shard records and counts."""
    from petseg.data import warehouse

    shards, official_test = ingest_report["shards"], ingest_report.get("official_test")
    if rule == "official" and official_test is None:
        raise ConfigError("--split official needs the source's annotations/trainval.txt and annotations/test.txt, "
                          "and this source has neither; use --split md5 or a source with the official lists")
    blobs = blob_store(store)
    with tempfile.TemporaryDirectory(prefix="petseg-transform-") as work:
        local = get_files(blobs, shards, Path(work) / "in")
        result = warehouse.transform(local, Path(work) / "splits",
                                     official_test=official_test if rule == "official" else None,
                                     training_only=[sample["id"] for sample in ingest_report.get("feedback_samples", [])])
        result["splits"] = {name: put_files(blobs, paths) for name, paths in result["splits"].items()}
    empty = [name for name in SPLITS if not result["counts"].get(name)]
    if empty:
        raise ConfigError(f"split(s) {', '.join(empty)} got no samples: the source is too small "
                          f"(counts {result['counts']}); use more samples")
    return result


def _fetch(split: str, splits: dict, store: str, work: str) -> list[str]:
    """A split's shard files, fetched from the blob store into ``work``."""
    return get_files(blob_store(store), splits["splits"][split], Path(work) / split)


def _dataset(split: str, splits: dict, store: str, work: str, settings: dict, **options):
    from petseg.data import pipeline

    return pipeline.dataset(_fetch(split, splits, store, work), image_size=settings["image_size"], **options)


# -- tune, select, train ------------------------------------------------------------------------------

def _fit(config: dict, *, splits: dict, store: str, arch: str, epochs: int, settings: dict,
         work: str, log_dir: str | None = None):
    from petseg.data import pipeline
    from petseg.model import determinism, train

    batch_size = config["batch_size"]
    files = {split: _fetch(split, splits, store, work) for split in ("training", "validation")}
    # Fetching from S3 draws from Python's random, which seeds Keras' initializers: seed again after it.
    determinism.reseed(settings["seed"])
    training = pipeline.dataset(files["training"], image_size=settings["image_size"], batch_size=batch_size,
                                shuffle=True, seed=settings["seed"], augment=True)
    validation = pipeline.dataset(files["validation"], image_size=settings["image_size"], batch_size=batch_size)
    model, history = train.fit(train=training, validation=validation, arch=arch, epochs=epochs,
                               learning_rate=config["learning_rate"], log_dir=log_dir)
    return model, history, validation


@_glue
def run_trial(config: dict, *, splits: dict, store: str, arch: str, epochs: int, settings: dict) -> dict:
    """Train one short trial and return its configuration, validation loss and IoU, and history."""
    _configure(settings)
    from petseg.model import train

    with tempfile.TemporaryDirectory(prefix="petseg-tune-") as work:
        model, history, validation = _fit(config, splits=splits, store=store, arch=arch, epochs=epochs,
                                          settings=settings, work=work)
        metrics = train.evaluate(model, validation)
    return {"index": config["index"], "config": config, "val_loss": metrics["loss"], "val_miou": metrics["miou"],
            "history": history}


def select(trials: Iterable[dict]) -> tuple[list[dict], dict]:
    """Every trial's result by index, and the best (see petseg.model.tune.select)."""
    from petseg.model import tune

    results = sorted(trials, key=lambda trial: trial["index"])
    return results, tune.select(results)


@_glue
def train(best: dict, *, splits: dict, store: str, arch: str, epochs: int, batch_size: int,
          settings: dict) -> dict:
    """Train the final model; return its bytes, fingerprint, history, TensorBoard logs and the
    environment record of the process that trained it (software, CPU, devices, settings)."""
    _fault_drill("train")
    configured = _configure(settings)
    from petseg.model import determinism
    from petseg.model import unet as models

    config = dict(best["config"])
    if batch_size:
        config["batch_size"] = batch_size
    environment = determinism.environment_record(configured)
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

@_glue
def calibrate(model_keras: bytes, *, splits: dict, store: str, settings: dict) -> tuple[dict, dict]:
    """Fit isotonic calibration on the calibration split; return it and the ECE report."""
    _fault_drill("calibrate")
    _configure(settings)
    from petseg.model import calibration
    from petseg.model import unet as models

    model = models.from_bytes(model_keras)
    with tempfile.TemporaryDirectory(prefix="petseg-calibrate-") as work:
        dataset = _dataset("calibration", splits, store, work, settings, batch_size=16)
        probs, labels = calibration.collect(model, dataset, seed=settings["seed"])
    fitted = calibration.fit(probs, labels)
    # Fitted and measured on the calibration split; evaluate measures it again on the test split.
    report = calibration.summary(fitted, probs, labels)
    return fitted.to_dict(), report


@_glue
def champion(*, endpoint: str, choice: str, deploy: str, server: str = "seldon") -> dict | None:
    """The release a candidate is compared with: for ``choice`` ``auto`` the endpoint's (what serves, else the
    latest accepted): in the cluster for a run that deploys there (`petseg.deploy.cluster_endpoint.champion`),
    else on this machine (`petseg.deploy.endpoints.champion`); ``none`` none; else a release location."""
    if choice == "none":
        return None
    if choice != "auto":
        return {"version": "", "location": choice}
    if deploy in CLUSTER_TARGETS:
        from metaflow.metaflow_config import KUBERNETES_NAMESPACE

        from petseg.deploy import cluster_endpoint

        kind = "Service" if deploy == "kubernetes" else servers.get(server).kind
        return cluster_endpoint.champion(endpoints.check_name(endpoint), namespace=KUBERNETES_NAMESPACE, kind=kind)
    return endpoints.champion(endpoints.check_name(endpoint))


@_glue
def evaluate(model_keras: bytes, calibration_table: dict, *, splits: dict, store: str, settings: dict,
             champion: dict | None = None) -> tuple[dict, dict]:
    """The model, the baselines and the ``champion`` (`champion`) on the validation and test splits
    (`petseg.model.evaluation.figures`: validation decides the served mask and the gate, test is the report),
    and sample predictions for the card."""
    _configure(settings)
    import numpy as np

    from petseg.model import calibration, evaluation
    from petseg.model import unet as models
    from petseg.release import gate

    model = models.from_bytes(model_keras)
    fitted = calibration.Calibration.from_dict(calibration_table)
    with tempfile.TemporaryDirectory(prefix="petseg-evaluate-") as work:
        batches = {split: _dataset(split, splits, store, work, settings, batch_size=16)
                   for split in ("training", "validation", "test")}
        held = gate.load_champion(champion["location"], version=champion["version"],
                                  s3_endpoint_url=s3_endpoint()) if champion else None
        metrics = evaluation.figures(model, fitted, **batches, image_size=settings["image_size"],
                                     seed=settings["seed"], bootstrap=BOOTSTRAP, champion=held)
        metrics["test_samples"] = int(splits["counts"]["test"])
        images, truths = next(iter(batches["test"].unbatch().batch(SAMPLE_PREDICTIONS)))
    probs = model.predict_on_batch(images)
    if metrics["mask"]["source"] == "calibrated":
        probs = fitted.apply(probs)
    samples = {"images": np.asarray(images), "truths": np.asarray(truths), "probs": np.asarray(probs)}
    return metrics, samples


def report_card(*, metrics: dict, history: dict, trials: list[dict], calibration_report: dict,
                samples: dict) -> None:
    """Fill the evaluate step's ``report`` card: metrics, curves, trials, reliability and sample predictions."""
    from petseg.release import report

    report.fill_card(current.card["report"], metrics=metrics, history=history, trials=trials,
                     calibration_report=calibration_report, samples=samples)


# -- release ------------------------------------------------------------------------------------------

def gate(metrics: dict, *, min_miou: float, min_margin: float, tolerance: float) -> tuple[bool, str]:
    """The quality gate on validation figures (see petseg.release.gate)."""
    from petseg.release import gate as gates

    return gates.decide(metrics, min_miou=min_miou, min_margin=min_margin, tolerance=tolerance)


@_glue
def export_release(*, model_keras: bytes, calibration: dict, metrics: dict, settings: dict, parameters: dict,
                   environment: dict, dataset_fingerprint: str, model_fingerprint: str,
                   store: str) -> tuple[dict, dict]:
    """Export this run's release beside its blobs, signed with the key of `petseg.keys` (`petseg.release.bundle.publish`),
    recording the champion it replaces; return its manifest and its signature files (model.sig, the signed
    provenance), and record it as accepted for its endpoint (in the cluster for a run that deploys there,
    `petseg.deploy.cluster_endpoint`, else on this machine, `petseg.deploy.endpoints`)."""
    from petseg import keys
    from petseg.lineage import runs
    from petseg.release import bundle, gate

    key, made = keys.ensure_signing_key()
    files, location, signer = bundle.publish(
        Layout.of_blobs(store), run_id=current.run_id, flow_name=current.flow_name, model_keras=model_keras,
        calibration=calibration, metrics=metrics, settings=settings, dataset_fingerprint=dataset_fingerprint,
        model_fingerprint=model_fingerprint, signing_key=key, s3_endpoint_url=s3_endpoint(),
        replaces=gate.replaced(metrics),
        build={"parameters": parameters, "environment": environment, "started": runs.started_at(current.run_id)})
    print(f"{'Made signing key ' + key + ' and trusted it; ' if made else ''}signed {location} with key {signer[:16]}")
    manifest = json.loads(files["manifest.json"])
    if parameters["deploy"] in CLUSTER_TARGETS:
        from metaflow.metaflow_config import KUBERNETES_NAMESPACE

        from petseg.deploy import cluster_endpoint

        cluster_endpoint.accept(parameters["endpoint"], manifest, namespace=KUBERNETES_NAMESPACE)
    else:
        endpoints.accept(parameters["endpoint"], manifest)
    return manifest, {name: files[name] for name in bundle.SIGNATURE_FILES}


@_glue
def deploy(manifest: dict, *, target: str, port: int, server: str = "seldon", endpoint: str,
           canary: int = 0) -> dict | None:
    """Hand the release to the serving deployment chosen by ``--deploy``: locally, the endpoint switches to it
    without downtime (`petseg.deploy.local_endpoint.roll_out`); on Kubernetes, its own Deployment, Ready before
    the endpoint's Service selects it, or staged beside the serving one with a ``canary``
    (`petseg.deploy.deployment.roll_out`); or the server's operator object takes it, as a ``canary`` or outright
    (`petseg.deploy.rollout.roll_out`). Pods run the image this step runs in, with the serving credential
    (``$PETSEG_SERVING_SECRETS``) and tokens (`TOKENS_SECRET`), never the flow's own secrets."""
    if target == "none":
        return None
    if target == "local":
        from petseg.deploy import local_endpoint

        return local_endpoint.roll_out(endpoint, endpoints.entry(manifest), server=server, port=port or None)
    from metaflow.metaflow_config import KUBERNETES_NAMESPACE

    secrets = [s for s in os.environ.get("PETSEG_SERVING_SECRETS", "petseg-serving-s3").split(",") if s]
    tokens = os.environ.get("PETSEG_TOKENS_SECRET") or TOKENS_SECRET
    options = {"endpoint": endpoint, "who": current.username, "server": server, "image": _image(),
               "namespace": KUBERNETES_NAMESPACE or "default", "s3_endpoint_url": s3_endpoint()}
    if target == "kubernetes":
        from petseg.deploy import deployment

        result = deployment.roll_out(manifest, stage=bool(canary), s3_secret=secrets[0], tokens_secret=tokens,
                                     **options)
        if result["candidate"]:
            print(f"staged {result['candidate']} beside {next(iter(result['traffic']))}: "
                  f"`petseg promote {endpoint} --namespace {result['namespace']}` moves the endpoint to it")
        return result
    from petseg.deploy import rollout

    # A Seldon Core v2 Model runs on its Server, which holds the credential and tokens (`render_seldon_server`).
    pods = {"tokens_secret": tokens} if server != "seldon-v2" else {}
    return rollout.roll_out(manifest, canary=canary, secrets=secrets, **pods, **options)


def _image() -> str:
    """The image the serving pods run: in a pod, this pod's own (what the run ran in); else Metaflow's setting.

    Raises:
        ConfigError: outside a pod, no image is configured.
    """
    from metaflow.metaflow_config import KUBERNETES_CONTAINER_IMAGE, KUBERNETES_NAMESPACE

    pod = os.environ.get("METAFLOW_KUBERNETES_POD_NAME")
    if pod:
        from kubernetes import client

        from petseg.deploy.kubernetes import default_api_client

        own = client.CoreV1Api(default_api_client()).read_namespaced_pod(pod, KUBERNETES_NAMESPACE)
        return own.spec.containers[0].image
    if not KUBERNETES_CONTAINER_IMAGE:
        raise ConfigError("no image to serve with: set METAFLOW_KUBERNETES_CONTAINER_IMAGE "
                          "(`petseg configure kubernetes --image ...`)")
    return KUBERNETES_CONTAINER_IMAGE


def _fault_drill(step_name: str) -> None:
    """Fail on purpose when PETSEG_FAIL_AT names this step (to rehearse `resume`)."""
    if os.environ.get("PETSEG_FAIL_AT") == step_name:
        raise RuntimeError(f"fault drill: PETSEG_FAIL_AT={step_name} made this step fail; "
                           f"run `python flows/seg_flow.py resume {step_name}` to finish the run")


# -- end ----------------------------------------------------------------------------------------------

def summary(**facts) -> dict:
    """The one-line-per-run facts `petseg runs` lists (`petseg.release.report.run_summary`)."""
    from petseg.release import report

    return report.run_summary(**facts)


def closing_words(facts: dict, *, metrics: dict, gate_message: str) -> str:
    """The run's quality and where to look next, printed at the end of a run (`petseg.release.report.closing_words`)."""
    from petseg.release import report

    return report.closing_words(facts, metrics=metrics, gate_message=gate_message, flow_name=current.flow_name,
                                run_id=current.run_id)
