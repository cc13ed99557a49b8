"""``seldon-core-microservice`` listening on one address (``PETSEG_HOST``, default 127.0.0.1) instead of all,
with its metrics port closed to strangers and, with tokens, no gRPC port.

The Seldon Core 1.19 wrapper binds its REST, gRPC and metrics servers to
``0.0.0.0`` with no setting to change it. `main` runs the wrapper's own
``main`` after pointing those binds at ``PETSEG_HOST``: gunicorn's ``bind``
option (REST and metrics) and the gRPC workers' address. It also puts
`petseg.serving.seldon_http.metrics_guard` on the wrapper's metrics app (the
metrics path needs a token with the ``operator`` role, any other path is 404),
and, when the server has tokens (``PETSEG_TOKENS_FILE``), starts no gRPC
workers: the wrapper hands a model no gRPC metadata, so a token cannot be
checked there, and its gRPC services beyond predictions (transform, route,
aggregate) would answer anyone. The REST routes are closed by the model's own
guard (`petseg.serving.seldon_http.request_guard`).
`petseg.deploy.local` starts it as ``python -m petseg.entrypoints.seldon_launcher
PetSegModel --service-type MODEL ...`` (the wrapper's own arguments).
"""

import os
import sys

from petseg import tokens
from petseg.errors import PetsegError

ALL_INTERFACES = "0.0.0.0"


def main() -> int:
    """Runs the Seldon wrapper with its servers bound to ``PETSEG_HOST``; 2 when the tokens file is refused."""
    from seldon_core import gunicorn_utils, microservice, wrapper

    from petseg.serving import seldon_http

    tokens_file = os.environ.get(tokens.TOKENS_ENV)
    try:
        table = tokens.load(tokens_file) if tokens_file else None
    except PetsegError as err:
        print(f"petseg: {err}", file=sys.stderr)
        return 2
    host = os.environ.get("PETSEG_HOST") or "127.0.0.1"
    load_config = gunicorn_utils.StandaloneApplication.load_config
    run_grpc_server = microservice._run_grpc_server
    metrics_app = wrapper.get_metrics_microservice

    def bound_load_config(self):
        self.options = {**self.options, "bind": self.options["bind"].replace(ALL_INTERFACES, host, 1)}
        load_config(self)

    def bound_grpc_server(user_object, seldon_metrics, args, annotations, bind_address):
        run_grpc_server(user_object, seldon_metrics, args, annotations, bind_address.replace(ALL_INTERFACES, host, 1))

    def guarded_metrics_app(seldon_metrics):
        return seldon_http.metrics_guard(metrics_app(seldon_metrics), path=wrapper.METRICS_ENDPOINT, tokens=table)

    gunicorn_utils.StandaloneApplication.load_config = bound_load_config
    microservice._run_grpc_server = bound_grpc_server
    wrapper.get_metrics_microservice = guarded_metrics_app
    if table is not None:
        sys.argv += ["--grpc-workers", "0"]  # the last value of an option is the one argparse keeps
    return microservice.main() or 0


if __name__ == "__main__":
    sys.exit(main())
