"""`petseg predict`, `feedback`, `serve` and `stop`: use a served model, review its feedback, or serve one here.

    petseg predict --url URL IMAGE --out MASK.png [--protocol seldon|v2]
    petseg feedback send --url URL IMAGE TRUTH.png [--reward R] [--breed NAME] [--protocol seldon|v2]
    petseg feedback list STORE [--status pending|accepted|rejected]
    petseg feedback accept|reject STORE ID... [--by NAME]
    petseg serve RUN [--port P] [--host ADDRESS] [--server seldon|mlserver]   # foreground, Ctrl-C stops it
    petseg stop NAME|RUN                    # an endpoint (petseg status lists them), or a run's own server

RUN is a run id, ``PetSegFlow/<id>``, ``latest``, or a release directory;
STORE is a feedback store (a directory or ``s3://`` prefix, `petseg.serving.quarantine`).
The clients send the first token of `petseg.tokens.tokens_path`.
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path

from petseg import keys, layout, servers, storage, tokens
from petseg.deploy import client, endpoints, local, local_endpoint
from petseg.errors import ServingError
from petseg.lineage import runs


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

    feedback = subparsers.add_parser("feedback", help="send labelled samples, and review them before training")
    actions = feedback.add_subparsers(dest="action", required=True, metavar="send|list|accept|reject")
    command = actions.add_parser("send", help="send an image with its true trimap (held for review)")
    command.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:9000")
    command.add_argument("image", help="a JPEG or PNG image")
    command.add_argument("truth", help="its trimap PNG (1 pet, 2 background, 3 border)")
    command.add_argument("--reward", type=float, default=1.0, help="how good the served prediction was (default 1.0)")
    command.add_argument("--breed", help="the pet's Oxford breed name, e.g. Abyssinian or beagle")
    command.add_argument("--protocol", choices=client.PROTOCOLS, default="seldon",
                         help="seldon (/api/v1.0/feedback) or v2 (/v2/models/petseg/feedback). Default seldon")
    command.set_defaults(handler=feedback_send_command)
    command = actions.add_parser("list", help="list the samples of a feedback store")
    command.add_argument("store", help="the feedback store: a directory or s3:// prefix (the server's FEEDBACK_URI)")
    command.add_argument("--status", choices=("pending", "accepted", "rejected"), default="pending",
                         help="which samples (default pending)")
    command.set_defaults(handler=feedback_list_command)
    for action, verb, handler in (
            ("accept", "accept pending samples into what --feedback trains on, signed with your key "
                       "($PETSEG_SIGNING_KEY, default petseg's; the flow must trust it)", feedback_accept_command),
            ("reject", "reject pending samples (their files are deleted)", feedback_reject_command)):
        command = actions.add_parser(action, help=verb)
        command.add_argument("store", help="the feedback store: a directory or s3:// prefix")
        command.add_argument("ids", nargs="+", help="sample ids, as `petseg feedback list` shows them")
        command.add_argument("--by", default=None, help="who reviews (default: the user name)")
        command.set_defaults(handler=handler)

    command = subparsers.add_parser("serve", help="serve a run's released model in the foreground (Ctrl-C stops it)")
    command.add_argument("run", help="run id, PetSegFlow/<id>, latest, or a release directory")
    command.add_argument("--port", type=int, default=9000, help="REST port (default 9000)")
    command.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    command.add_argument("--server", choices=local.SERVERS, default="seldon",
                         help="seldon: Seldon Core v1 microservice; mlserver: MLServer, Open Inference Protocol "
                              "(REST, and gRPC on --grpc-port). Default seldon")
    command.add_argument("--grpc-port", type=int, help="gRPC port (default: a free one)")
    command.set_defaults(handler=serve_command)

    command = subparsers.add_parser("stop", help="stop a local endpoint, or the local deployment of a run")
    command.add_argument("run", help="an endpoint name, run id, PetSegFlow/<id>, latest, or a release directory")
    command.set_defaults(handler=stop_command)


def predict_command(args: argparse.Namespace) -> int:
    """Segment an image; print where the mask and the picture went, and the model version."""
    result = client.predict(args.url, args.image, args.out, figure_path=args.figure, protocol=args.protocol)
    print(f"mask:    {result['mask']}")
    print(f"figure:  {result['figure']}")
    print(f"model:   {result['tags'].get('model_version', '?')}")
    return 0


def feedback_send_command(args: argparse.Namespace) -> int:
    """Send a labelled sample; print where the server holds it for review."""
    result = client.feedback(args.url, args.image, args.truth, args.reward, breed=args.breed, protocol=args.protocol)
    print(f"{result.get('status', 'stored')} sample {result.get('sample_id')} in {result.get('store')}")
    return 0


def _store(location: str):
    from petseg.serving import quarantine

    return quarantine.FeedbackStore(location, s3_endpoint_url=storage.s3_endpoint())


def feedback_list_command(args: argparse.Namespace) -> int:
    """One line per sample: id, sender, received, release, reward, breed (and the review, when reviewed)."""
    records = _store(args.store).records(args.status)
    for record in records:
        review = ""
        if record["status"] != "pending":
            verb = record["status"]
            review = f"  {verb} by {record.get(verb + '_by')} at {record.get(verb + '_at')}"
        print(f"{record['id']}  from {record['identity']} at {record['received']}  release {record['model_version']}  "
              f"reward {record['reward']:g}  breed {record.get('breed') or '-'}{review}")
    print(f"{len(records)} {args.status} sample(s) in {args.store}")
    return 0


def feedback_accept_command(args: argparse.Namespace) -> int:
    """Accept pending samples, recording who did it and when, signed with the reviewer's key (`petseg.keys`)."""
    return _review(args)


def feedback_reject_command(args: argparse.Namespace) -> int:
    """Reject pending samples, recording who did it and when."""
    return _review(args)


def _review(args: argparse.Namespace) -> int:
    store, reviewer = _store(args.store), args.by or getpass.getuser()
    if args.action == "reject":
        for sample_id in args.ids:
            record = store.reject(sample_id, reviewer=reviewer)
            print(f"rejected {sample_id} (from {record['identity']}) by {reviewer}")
        return 0
    key, made = keys.ensure_signing_key()
    if made:
        print(f"Made signing key {key} and trusted it")
    for sample_id in args.ids:
        record = store.accept(sample_id, reviewer=reviewer, signing_key=key)
        print(f"accepted {sample_id} (from {record['identity']}) by {reviewer}, signed with key "
              f"{keys.short(record['accepted_key'])}")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """Serve a release directory or a run's release in the foreground; the server's exit status."""
    tokens_file, made = tokens.ensure_local_tokens()
    print(f"bearer tokens: {tokens_file}{' (made now)' if made else ''}; clients send the first one")
    options = {"server": args.server, "grpc_port": args.grpc_port, "host": args.host, "tokens_file": tokens_file}
    if Path(args.run).is_dir():
        return local.serve_foreground(args.run, args.port, **options)
    # The run's release, found without reading its artifacts (pickles); the server verifies it before loading.
    location, _ = runs.release_location(args.run, s3_endpoint_url=storage.s3_endpoint(metaflow=True))
    return local.serve_foreground(location, args.port, **options)


def stop_command(args: argparse.Namespace) -> int:
    """Stop a local endpoint (its front and server), or the local deployment of a release directory or a run.

    Raises:
        ServingError: nothing recorded a local deployment there, it serves under an endpoint, or it is
            served on Kubernetes.
    """
    if args.run in endpoints.names():
        stopped = local_endpoint.stop(args.run)
        print(f"{'stopped' if stopped else 'was not running:'} endpoint {args.run}")
        return 0
    if Path(args.run).is_dir():
        record = layout.deployment_dir(args.run) / "deployment.json"
        if not record.is_file():
            raise ServingError(f"{args.run} has no deployment.json in {record.parent}: it was not deployed "
                               "with deploy_local")
        deployment = json.loads(record.read_text(encoding="utf-8"))
    else:
        deployment = runs.release_artifact(args.run, "deployment")
    if deployment.get("endpoint"):
        raise ServingError(f"{args.run} was served under endpoint {deployment['endpoint']}: `petseg stop "
                           f"{deployment['endpoint']}` stops the endpoint, `petseg rollback` serves the one before")
    if deployment.get("kind") == "kubernetes":
        kind = servers.SERVERS[deployment.get("server") or "seldon"].kind.lower()
        raise ServingError(
            f"{args.run} is served on Kubernetes: `kubectl delete {kind} {deployment['name']} "
            f"-n {deployment['namespace']}` stops it"
        )
    stopped = local.stop_local(int(deployment["pid"]))
    print(f"{'stopped' if stopped else 'was not running:'} {deployment['url']} (pid {deployment['pid']})")
    return 0
