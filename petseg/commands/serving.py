"""`petseg predict`, `feedback`, `serve` and `stop`: use a served model, or serve one here.

    petseg predict --url URL IMAGE --out MASK.png [--protocol seldon|v2]
    petseg feedback --url URL IMAGE TRUTH.png [--reward R] [--breed NAME]
    petseg serve RUN [--port P] [--server seldon|mlserver]      # foreground, Ctrl-C stops it
    petseg stop RUN

RUN is a run id, ``PetSegFlow/<id>``, ``latest``, or a release directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from petseg import client, deploy_local, runs
from petseg.errors import ServingError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``predict``, ``feedback``, ``serve`` and ``stop``."""
    command = subparsers.add_parser("predict", help="segment an image with a served model")
    command.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:9000")
    command.add_argument("image", help="a JPEG or PNG image")
    command.add_argument("--out", required=True,
                         help="mask PNG to write (probabilities * 255, RGB = pet, background, border)")
    command.add_argument("--figure", help="side-by-side picture to write (default: beside the mask)")
    command.add_argument("--protocol", choices=client.PROTOCOLS, default="seldon",
                         help="seldon: Seldon Core v1 (petseg serve --server seldon); "
                              "v2: Open Inference Protocol (--server mlserver). Default seldon")
    command.set_defaults(handler=predict_command)

    command = subparsers.add_parser("feedback", help="send an image with its true trimap as a new labelled sample")
    command.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:9000")
    command.add_argument("image", help="a JPEG or PNG image")
    command.add_argument("truth", help="its trimap PNG (1 pet, 2 background, 3 border)")
    command.add_argument("--reward", type=float, default=1.0, help="how good the served prediction was (default 1.0)")
    command.add_argument("--breed", help="the pet's Oxford breed name, e.g. Abyssinian or beagle")
    command.set_defaults(handler=feedback_command)

    command = subparsers.add_parser("serve", help="serve a run's released model in the foreground (Ctrl-C stops it)")
    command.add_argument("run", help="run id, PetSegFlow/<id>, latest, or a release directory")
    command.add_argument("--port", type=int, default=9000, help="REST port (default 9000)")
    command.add_argument("--server", choices=deploy_local.SERVERS, default="seldon",
                         help="seldon: Seldon Core v1 microservice; mlserver: MLServer, Open Inference Protocol "
                              "(REST, and gRPC on --grpc-port). Default seldon")
    command.add_argument("--grpc-port", type=int, help="gRPC port (default: a free one)")
    command.set_defaults(handler=serve_command)

    command = subparsers.add_parser("stop", help="stop the local deployment of a run")
    command.add_argument("run", help="run id, PetSegFlow/<id>, latest, or a release directory")
    command.set_defaults(handler=stop_command)


def predict_command(args: argparse.Namespace) -> int:
    """Segment an image; print where the mask and the picture went, and the model version."""
    result = client.predict(args.url, args.image, args.out, figure_path=args.figure, protocol=args.protocol)
    print(f"mask:    {result['mask']}")
    print(f"figure:  {result['figure']}")
    print(f"model:   {result['tags'].get('model_version', '?')}")
    return 0


def feedback_command(args: argparse.Namespace) -> int:
    """Send a labelled sample; print where the server stored it."""
    result = client.feedback(args.url, args.image, args.truth, args.reward, breed=args.breed)
    print(f"stored sample {result.get('sample_id')} in {result.get('store')}")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """Serve a release directory or a run's release in the foreground; the server's exit status."""
    options = {"server": args.server, "grpc_port": args.grpc_port}
    if Path(args.run).is_dir():
        return deploy_local.serve_foreground(args.run, args.port, **options)
    manifest = runs.release_artifact(args.run, "manifest")
    return deploy_local.serve_foreground(manifest["model_uri"], args.port, fingerprint=manifest["model_fingerprint"],
                                         **options)


def stop_command(args: argparse.Namespace) -> int:
    """Stop the local deployment of a release directory or a run.

    Raises:
        ServingError: nothing recorded a local deployment there, or it is served on Kubernetes.
    """
    if Path(args.run).is_dir():
        record = deploy_local.record_dir(args.run) / "deployment.json"
        if not record.is_file():
            raise ServingError(f"{args.run} has no deployment.json in {record.parent}: it was not deployed "
                               "with deploy_local")
        deployment = json.loads(record.read_text(encoding="utf-8"))
    else:
        deployment = runs.release_artifact(args.run, "deployment")
    if deployment.get("kind") == "kubernetes":
        kind = "inferenceservice" if deployment.get("server") == "mlserver" else "seldondeployment"
        raise ServingError(
            f"{args.run} is served on Kubernetes: `kubectl delete {kind} {deployment['name']} "
            f"-n {deployment['namespace']}` stops it"
        )
    stopped = deploy_local.stop_local(int(deployment["pid"]))
    print(f"{'stopped' if stopped else 'was not running:'} {deployment['url']} (pid {deployment['pid']})")
    return 0
