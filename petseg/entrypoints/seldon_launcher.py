"""``seldon-core-microservice`` listening on one address (``PETSEG_HOST``, default 127.0.0.1) instead of all.

The Seldon Core 1.19 wrapper binds its REST, gRPC and metrics servers to
``0.0.0.0`` with no setting to change it. `main` runs the wrapper's own
``main`` after pointing those binds at ``PETSEG_HOST``: gunicorn's ``bind``
option (REST and metrics) and the gRPC workers' address.
`petseg.deploy.local` starts it as ``python -m petseg.entrypoints.seldon_launcher
PetSegModel --service-type MODEL ...`` (the wrapper's own arguments).
"""

import os
import sys

ALL_INTERFACES = "0.0.0.0"


def main() -> int:
    """Runs the Seldon wrapper with its servers bound to ``PETSEG_HOST``."""
    from seldon_core import gunicorn_utils, microservice

    host = os.environ.get("PETSEG_HOST") or "127.0.0.1"
    load_config = gunicorn_utils.StandaloneApplication.load_config
    run_grpc_server = microservice._run_grpc_server

    def bound_load_config(self):
        self.options = {**self.options, "bind": self.options["bind"].replace(ALL_INTERFACES, host, 1)}
        load_config(self)

    def bound_grpc_server(user_object, seldon_metrics, args, annotations, bind_address):
        run_grpc_server(user_object, seldon_metrics, args, annotations, bind_address.replace(ALL_INTERFACES, host, 1))

    gunicorn_utils.StandaloneApplication.load_config = bound_load_config
    microservice._run_grpc_server = bound_grpc_server
    return microservice.main() or 0


if __name__ == "__main__":
    sys.exit(main())
