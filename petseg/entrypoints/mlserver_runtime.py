"""The MLServer runtime of a petseg release (Open Inference Protocol, REST and gRPC), and its launcher.

`PetSegRuntime` is the model class that ``serving/mlserver/petseg/model-settings.json``
names: it loads the release once (`petseg.release.bundle.load_release`: the same
fingerprint check and calibration as the Seldon server) into a
`petseg.serving.predictor.Predictor`, and answers inference requests through
`petseg.serving.v2_messages`, with the release's provenance
(`petseg.release.bundle.Release.tags`) in the response parameters.

Concurrency: ``serving/mlserver/settings.json`` sets ``parallel_workers: 0``,
so MLServer answers in its own process, and the runtime answers each request
on a pool of threads (one per core): TensorFlow, Pillow and numpy compute off
the GIL, and MLServer's event loop stays free. On 2 cores this answered
faster than MLServer's inference worker processes, which pickle every request
and answer across process boundaries (12 against 14 ms at concurrency 1, 105
against 97 requests/s at 16), and those workers do not start with the locked
uvloop 0.23 (MLServer 1.7.1 calls ``asyncio.get_event_loop()`` in a fresh
worker process, which uvloop >= 0.22 refuses). MLServer's adaptive batching
stays off: an image costs TensorFlow nearly the same CPU time in a batch
(14.3 ms alone, 13.1 in a batch of 4, measured), and MLServer's batcher fails
every request of a batch when one of them is bad.

`main` is ``mlserver start FOLDER`` with petseg's HTTP edge in front
(`petseg.serving.v2_http`: routes not served answer 404, tokens on every other route
but health and model metadata, feedback, body limit and 413, bodies at once and 503,
the binary data extension, 400 error bodies), its metrics port closed the same way,
the repository API of the gRPC port refused, and MLServer's gzip off; `petseg.deploy.local` runs it as
``python -m petseg.entrypoints.mlserver_runtime FOLDER``. Plain ``mlserver start FOLDER``
serves the same runtime with MLServer's own REST behaviour (JSON tensors only,
422 for a body that is not an inference request, no body limit).

Settings (read here, as serving/PetSegModel.py reads them for the Seldon server):

- the release: MODEL_URI (a release directory or ``s3://`` prefix, never a Metaflow run), else
  ``parameters.uri`` of the model settings. Those settings are not signed (Seldon Core v2's agent
  rewrites them), so a release they name is served only as its own model: the model's name (a Seldon
  Core v2 Model's, which Seldon's agent writes into the settings) must be the signed manifest's
  release's (`petseg.layout.is_model_of`), checked before the model loads. Model settings live
  beside the release (`petseg.layout.seldon_model`), never in it: a release holding them is refused;
- the model fingerprint the release must have: ``parameters.extra.model_fingerprint``
  of the model settings, else MODEL_FINGERPRINT (the signed manifest's is checked in any case);
- PETSEG_TRUSTED_KEYS: the public keys a release's signature must verify against (`petseg.keys`);
  a release that does not verify fails the load, and the server exits with status 1;
- MAX_IMAGE_BYTES, MAX_PIXELS, MAX_LIST_PIXELS: request limits (defaults in `petseg.serving.messages.Limits`);
- PETSEG_TOKENS_FILE: bearer tokens and identities (`petseg.tokens`; a file group or others can
  read is refused); with it, inference over REST and gRPC needs a ``predict`` token (the edge
  checks REST, `petseg.serving.routes` saying which role each route needs; the runtime checks the
  ``authorization`` metadata MLServer hands it for both); feedback always needs one, and so do
  the repository API and the metrics port (``operator``);
- MAX_BODIES: requests with a body read and answered at once (default: twice PETSEG_THREADS, so
  that each thread has one request ready); another waits up to 10 s for one, then answers 503
  with Retry-After;
- FEEDBACK_URI, FEEDBACK_QUOTA, FEEDBACK_PENDING_CAP: the feedback store (`petseg.serving.quarantine`)
  behind ``POST /v2/models/petseg/feedback``; unset, feedback answers 404;
- PETSEG_THREADS: threads answering requests (default: the cores this process may use);
- PETSEG_TF_THREADS: TensorFlow's intra- and inter-op threads (default: TensorFlow's own, the cores);
- AWS_ENDPOINT_URL or METAFLOW_S3_ENDPOINT_URL: endpoint of a non-AWS S3 server (`petseg.storage.s3_endpoint`);
- MLSERVER_*: MLServer's own settings (ports, ``MLSERVER_PARALLEL_WORKERS``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys

import numpy as np
from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, Parameters, ResponseOutput

from petseg import storage, tokens
from petseg.errors import PetsegError
from petseg.serving import v2_messages
from petseg.serving.messages import BadRequest, int_setting, limits_from_environment


class Refusal(MLServerError):
    """A `petseg.serving.messages.BadRequest` as MLServer answers it: 400 (413 when too large), ``{"error": ...}``."""

    def __init__(self, error: BadRequest):
        super().__init__(f"{error.kind}: {error}", status_code=error.status)


class Denied(MLServerError):
    """A `petseg.tokens.AccessDenied` as MLServer answers it (gRPC: UNAUTHENTICATED or PERMISSION_DENIED)."""

    def __init__(self, error: tokens.AccessDenied):
        super().__init__(f"{error.reason}: {error}", status_code=error.status)


class ClosedRepository:
    """Stands in for MLServer's model repository handlers on the gRPC port: index, load and unload are refused."""

    async def _refuse(self, *args, **kwargs):
        raise Denied(tokens.AccessDenied(403, "the model repository API is closed on the gRPC port; "
                                              "use REST with an operator token"))

    index = load = unload = _refuse


class PetSegRuntime(MLModel):
    """The MLServer model: one petseg release, its predictor and its request limits."""

    async def load(self) -> bool:
        """Loads the release; one that does not verify (signature, provenance, hashes, fingerprint) fails the
        load, and the server start."""
        # TensorFlow and the release: only in the workers that predict, not in MLServer's main process.
        import tensorflow as tf

        from petseg.release import bundle
        from petseg.serving import predictor

        tf_threads = int_setting("PETSEG_TF_THREADS", 0)
        if tf_threads:
            tf.config.threading.set_intra_op_parallelism_threads(tf_threads)
            tf.config.threading.set_inter_op_parallelism_threads(tf_threads)
        parameters = self.settings.parameters
        chosen_by_settings = not os.environ.get("MODEL_URI")
        uri = os.environ.get("MODEL_URI") or (parameters.uri if parameters else None) or ""
        extra = (parameters.extra if parameters else None) or {}
        endpoint = storage.s3_endpoint()
        try:
            loaded = bundle.load_release(
                uri,
                expected_fingerprint=extra.get("model_fingerprint") or os.environ.get("MODEL_FINGERPRINT") or None,
                s3_endpoint_url=endpoint,
                # Unsigned settings chose the release: it must be the one the Model (the model's name) names.
                model_name=self.name if chosen_by_settings else None,
            )
        except PetsegError as err:
            logging.getLogger("mlserver").error("refusing to serve %s: %s", uri, err)
            raise
        self._limits = limits_from_environment()
        # Requests are answered on a pool of threads, one per core: TensorFlow, Pillow and
        # numpy release the GIL while they compute, and MLServer's event loop stays free.
        self._executor = concurrent.futures.ThreadPoolExecutor(runtime_threads(), thread_name_prefix="petseg")
        self._predictor = predictor.Predictor(loaded)
        self._tags = loaded.tags()
        self._fingerprint = loaded.fingerprint
        tokens_file = os.environ.get(tokens.TOKENS_ENV)
        self._tokens = tokens.load(tokens_file) if tokens_file else None
        self._store = None
        if os.environ.get("FEEDBACK_URI"):
            from petseg.serving import quarantine

            self._store = quarantine.FeedbackStore(
                os.environ["FEEDBACK_URI"],
                s3_endpoint_url=endpoint,
                quota=int_setting("FEEDBACK_QUOTA", quarantine.DEFAULT_QUOTA),
                pending_cap=int_setting("FEEDBACK_PENDING_CAP", quarantine.DEFAULT_PENDING_CAP))
        # The first call traces the model's graph: here, not in the first request.
        size = loaded.image_size
        self._predictor.predict(np.zeros((1, size, size, 3), np.float32))
        inputs, outputs = v2_messages.metadata_tensors()
        self.inputs = [MetadataTensor(**tensor) for tensor in inputs]
        self.outputs = [MetadataTensor(**tensor) for tensor in outputs]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Answers an inference request with the outputs it asks for (default: the mask)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._answer, payload)

    async def feedback(self, message: dict, identity: str) -> dict:
        """Stores a Seldon Feedback message's labelled image as pending (`petseg.serving.quarantine`)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._store_feedback,
                                                                message, identity)

    def _store_feedback(self, message: dict, identity: str) -> dict:
        from petseg.serving.feedback import parse_feedback

        if self._store is None:
            raise BadRequest("FEEDBACK_DISABLED", where="feedback",
                             expected="a server started with a feedback store (FEEDBACK_URI)", got="a server without one")
        sample = parse_feedback(message, limits=self._limits)
        stored = self._store.add(sample, identity=identity, model_version=self._tags["model_version"],
                                 model_fingerprint=self._fingerprint)
        return {**stored, "store": self._store.root}

    def _answer(self, payload: InferenceRequest) -> InferenceResponse:
        if self._tokens is not None:
            headers = (payload.parameters.headers if payload.parameters else None) or {}
            authorization = next((value for key, value in headers.items() if key.lower() == "authorization"), None)
            try:
                self._tokens.check(authorization, "predict")
            except tokens.AccessDenied as err:
                raise Denied(err) from None
        try:
            # gRPC requests come unvalidated (MLServer constructs them): a datatype may be a plain string.
            inputs = [v2_messages.Tensor(tensor.name, str(getattr(tensor.datatype, "value", tensor.datatype)),
                                         tensor.shape, getattr(tensor.data, "root", tensor.data))
                      for tensor in payload.inputs]
            names = v2_messages.requested_outputs([output.name for output in payload.outputs or []])
            images, size = v2_messages.read_images(inputs, limits=self._limits, work_side=self._predictor.work_side)
        except BadRequest as err:
            raise Refusal(err) from None
        if "probabilities" in names:
            pixels = len(images) * size[0] * size[1]
            if pixels > self._limits.max_list_pixels:
                raise Refusal(BadRequest(
                    "TOO_LARGE", where="outputs", got=f"probabilities for {pixels} pixels",
                    expected=f"probabilities for at most {self._limits.max_list_pixels} pixels "
                             "(ask for the mask, which has no such limit)"))
            probs = self._predictor.predict(images, size, calibrated=True)
            mask_probs = None
            if "mask" in names and self._predictor.mask_source != "calibrated":
                mask_probs = self._predictor.predict_eight_bits(images, size)
        else:  # the mask only: made from eight bits a band at a time, no full-size floats
            probs = mask_probs = self._predictor.predict_eight_bits(images, size)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[ResponseOutput(**tensor)
                     for tensor in v2_messages.encode_outputs(probs, names, mask_probs=mask_probs)],
            parameters=Parameters(**self._tags),
        )


# -- the launcher -----------------------------------------------------------------------------------


def runtime_threads() -> int:
    """Threads answering requests: PETSEG_THREADS, default the cores this process may use."""
    return int_setting("PETSEG_THREADS", len(os.sched_getaffinity(0)))


def max_bodies() -> int:
    """Requests with a body the edge reads and answers at once: MAX_BODIES, default twice `runtime_threads`
    (each thread has the next request read while it answers one)."""
    return int_setting("MAX_BODIES", 2 * runtime_threads())


async def serve(folder: str) -> int:
    """Runs MLServer on the model settings under ``folder`` until it is stopped (SIGTERM, SIGINT).

    Returns:
        0 after a stop, 1 when the model did not load, 2 when the tokens file is refused (the log says why).
    """
    import grpc
    from mlserver.cli.serve import load_settings
    from mlserver.grpc import utils as grpc_utils
    from mlserver.server import MLServer

    from petseg.serving.v2_http import MetricsGate, OpenInferenceEdge

    limits = limits_from_environment()
    settings, models_settings = await load_settings(folder)
    settings.gzip_enabled = False  # the edge reads and rewrites bodies; on 2 cores gzip would also cost a core
    settings.debug = False  # no access log line per request
    if settings.grpc_max_message_length is None:
        settings.grpc_max_message_length = limits.max_bytes + 2**16  # the body limit, plus the proto's framing
    # MLServer maps 400, 404, 422 and 500 to gRPC codes; a 413 would be UNKNOWN.
    grpc_utils.STATUS_CODE_MAPPING.setdefault(413, grpc.StatusCode.RESOURCE_EXHAUSTED)
    grpc_utils.STATUS_CODE_MAPPING.setdefault(429, grpc.StatusCode.RESOURCE_EXHAUSTED)
    grpc_utils.STATUS_CODE_MAPPING.setdefault(401, grpc.StatusCode.UNAUTHENTICATED)
    grpc_utils.STATUS_CODE_MAPPING.setdefault(403, grpc.StatusCode.PERMISSION_DENIED)
    tokens_file = os.environ.get(tokens.TOKENS_ENV)
    try:
        table = tokens.load(tokens_file) if tokens_file else None
    except PetsegError as err:
        logging.getLogger("mlserver").error("refusing to start: %s", err)
        return 2
    server = MLServer(settings)

    async def feedback(message: dict, identity: str) -> dict:
        model = await server._model_registry.get_model(models_settings[0].name)
        return await model.feedback(message, identity)

    # MLServer builds its REST and metrics apps in the constructor and gives no hook: the edges go on them here,
    # each reading the app's live route list (routes a model's custom handlers add at load included).
    rest_app = server._rest_server._app
    rest_app.add_middleware(
        OpenInferenceEdge, limits=limits, registered=rest_app.router.routes, tokens=table, max_bodies=max_bodies(),
        feedback=feedback if os.environ.get("FEEDBACK_URI") else None)
    if server._metrics_server is not None:
        metrics_app = server._metrics_server._app
        metrics_app.add_middleware(MetricsGate, path=settings.metrics_endpoint, registered=metrics_app.router.routes,
                                   tokens=table)
    # The gRPC port's repository service (index, load, unload) is not reachable: it is built on start.
    server._grpc_server._model_repository_handlers = ClosedRepository()
    await server.start(models_settings)
    # MLServer stops, and returns, when its model failed to load; that is a failed start.
    models = list(await server._model_registry.get_models())
    return 0 if models and all(model.ready for model in models) else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m petseg.entrypoints.mlserver_runtime FOLDER``: serve the model settings under FOLDER."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m petseg.entrypoints.mlserver_runtime FOLDER  (FOLDER holds model-settings.json, "
              "optionally settings.json)", file=sys.stderr)
        return 2
    from mlserver.logging import configure_logger
    from mlserver.utils import install_uvloop_event_loop

    configure_logger()
    install_uvloop_event_loop()
    return asyncio.run(serve(args[0]))


if __name__ == "__main__":
    sys.exit(main())
