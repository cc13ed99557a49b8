"""Seldon Core component serving a petseg release.

Run from this directory (or with it on PYTHONPATH):

    MODEL_URI=path/to/release seldon-core-microservice PetSegModel --service-type MODEL

Environment (read here only; `petseg.serving.predictor` does the work):

- MODEL_URI: a signed release, its directory or ``s3://bucket/prefix`` (required). A Metaflow run is
  refused (its artifacts are pickles), and so is a release holding a file its signature does not cover.
- MODEL_FINGERPRINT: expected model fingerprint; on a mismatch the server does not start.
- PETSEG_TRUSTED_KEYS: the public key file or directory a release's signature must verify against
  (default: the trusted keys of petseg's configuration directory, `petseg.keys`); a release that is
  unsigned, signed by another key or changed since it was signed is refused, and the server does not start.
- FEEDBACK_URI: directory or ``s3://`` prefix of the feedback store (`petseg.serving.quarantine`); unset, feedback is refused.
- FEEDBACK_QUOTA, FEEDBACK_PENDING_CAP: most pending samples per identity and in the store (429 beyond).
- PETSEG_TOKENS_FILE: bearer tokens and identities (`petseg.tokens`; a file group or others can
  read is refused); unset, predictions and metadata are open and feedback is refused. Which route
  needs which role is `petseg.serving.routes`; the rest answer 404 (`petseg.serving.seldon_http`).
  With tokens, gRPC (which carries none to the model) is refused too.
- MAX_IMAGE_BYTES, MAX_PIXELS, MAX_LIST_PIXELS: request limits (defaults in `petseg.serving.messages.Limits`).
- AWS_ENDPOINT_URL or METAFLOW_S3_ENDPOINT_URL: endpoint of a non-AWS S3 server (`petseg.storage.s3_endpoint`).
"""

import logging
import os
import threading
import time

import flask
from seldon_core.proto import prediction_pb2
from seldon_core.utils import json_to_seldon_message, seldon_message_to_json

from petseg import storage, tokens
from petseg.errors import PetsegError
from petseg.release import bundle
from petseg.serving import messages, predictor, quarantine, seldon_http


class PetSegModel:
    """The Seldon model: predictions, feedback, health, tags, metrics and metadata."""

    def __init__(self) -> None:
        self.limits = messages.limits_from_environment()
        self.model_uri = os.environ.get("MODEL_URI", "")
        self.expected_fingerprint = os.environ.get("MODEL_FINGERPRINT") or None
        self.feedback_uri = os.environ.get("FEEDBACK_URI") or None
        self.s3_endpoint_url = storage.s3_endpoint()
        tokens_file = os.environ.get(tokens.TOKENS_ENV)
        self.tokens = tokens.load(tokens_file) if tokens_file else None
        self.service = None  # set by load()
        # Per thread: gunicorn answers requests on several threads (petseg.deploy.local.gunicorn_sizing).
        self._pending = threading.local()
        # The wrapper registers this blueprint on its Flask app (see request_guard).
        self.model_error_handler = seldon_http.request_guard(limits=self.limits, tags=self.tags, tokens=self.tokens)

    def load(self) -> None:
        """Loads the release once per server process; a release that does not verify stops the server."""
        try:
            loaded = bundle.load_release(
                self.model_uri, expected_fingerprint=self.expected_fingerprint, s3_endpoint_url=self.s3_endpoint_url
            )
        except PetsegError as err:
            logging.getLogger(__name__).error("refusing to serve %s: %s", self.model_uri, err)
            raise
        store = None
        if self.feedback_uri:
            store = quarantine.FeedbackStore(
                self.feedback_uri, s3_endpoint_url=self.s3_endpoint_url,
                quota=messages.int_setting("FEEDBACK_QUOTA", quarantine.DEFAULT_QUOTA),
                pending_cap=messages.int_setting("FEEDBACK_PENDING_CAP", quarantine.DEFAULT_PENDING_CAP))
        self.service = predictor.Service(loaded, limits=self.limits, feedback=store)

    def predict_raw(self, request: dict | prediction_pb2.SeldonMessage) -> dict | prediction_pb2.SeldonMessage:
        """Answers a SeldonMessage (JSON for REST, proto for gRPC) in the form it came."""
        is_proto = isinstance(request, prediction_pb2.SeldonMessage)
        self._refuse_grpc_with_tokens()
        message = seldon_message_to_json(request) if is_proto else request
        started = time.perf_counter()
        try:
            answer, probs = self.service.predict(message)
        except messages.BadRequest as err:
            raise seldon_http.Rejection(err, self.tags()) from None
        self._pending.metrics = predictor.prediction_metrics(probs, elapsed_ms=(time.perf_counter() - started) * 1000)
        answer["meta"] = {"tags": self.tags(), "metrics": self.metrics()}
        return json_to_seldon_message(answer) if is_proto else answer

    def send_feedback_raw(self, feedback: prediction_pb2.Feedback) -> prediction_pb2.SeldonMessage:
        """Stores the request image and its truth mask as a labelled sample."""
        self._refuse_grpc_with_tokens(feedback=True)
        try:
            stored = self.service.feedback(seldon_message_to_json(feedback), identity=flask.g.petseg_identity)
        except messages.BadRequest as err:
            raise seldon_http.Rejection(err, self.tags()) from None
        return json_to_seldon_message({"jsonData": stored, "meta": {"tags": self.tags()}})

    def _refuse_grpc_with_tokens(self, *, feedback: bool = False) -> None:
        """gRPC calls reach the model without their metadata: with tokens (or for feedback) they are refused."""
        if flask.has_request_context() or (self.tokens is None and not feedback):
            return
        denied = tokens.AccessDenied(401, "this server needs a bearer token, which its gRPC port cannot check: "
                                          "use the REST port with Authorization: Bearer TOKEN")
        raise seldon_http.Rejection(denied, self.tags())

    def health_status(self) -> dict:
        """One prediction on a blank image (raises, so the probe fails, when the model cannot answer)."""
        return self.service.health()

    def tags(self) -> dict[str, str]:
        """Provenance: model version and fingerprint, dataset fingerprint, Metaflow pathspec, code version."""
        return self.service.release.tags() if self.service else {}

    def metrics(self) -> list[dict]:
        """Metrics of this thread's last prediction, handed over once (the wrapper also asks after health checks)."""
        pending, self._pending.metrics = getattr(self._pending, "metrics", []), []
        return pending

    def init_metadata(self) -> dict:
        """Inputs and outputs, for /api/v1.0/metadata."""
        return predictor.metadata()
