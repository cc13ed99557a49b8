"""`petseg configure kubernetes`: write the Metaflow profile for runs on Kubernetes (petseg.deploy.kubeconfig)."""

from __future__ import annotations

import argparse
from pathlib import Path

from petseg.deploy import kubeconfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``petseg configure kubernetes``."""
    configure = subparsers.add_parser("configure", help="Write configuration for where flows run.")
    targets = configure.add_subparsers(dest="target", metavar="TARGET", required=True)
    parser = targets.add_parser(
        "kubernetes",
        help="Metaflow settings for `run --with kubernetes` (S3 datastore, namespace, image, secrets).",
        description="Write a Metaflow profile for runs on Kubernetes. Credentials are not written: pods read them "
                    "from the Kubernetes secrets given with --secret.",
    )
    parser.add_argument("--s3-root", required=True, help="Metaflow datastore root, s3://bucket/prefix.")
    parser.add_argument("--namespace", required=True, help="Kubernetes namespace of the step pods.")
    parser.add_argument("--image", required=True, help="Container image of the step pods.")
    parser.add_argument("--endpoint-url", help="S3 endpoint of a non-AWS S3 server.")
    parser.add_argument("--secret", action="append", default=[], dest="secrets",
                        help="Kubernetes secret with the pods' S3 credentials (repeatable).")
    parser.add_argument("--service-account", help="Service account of the step pods.")
    parser.add_argument("--gpu", type=int, default=0,
                        help="GPUs per node for compute steps; above 0, step pods tolerate the nvidia.com/gpu "
                             "taint of GPU nodes (default 0: CPU nodes).")
    parser.add_argument("--profile", default="kubernetes",
                        help="Profile name; select it with METAFLOW_PROFILE (default: kubernetes).")
    parser.add_argument("--home", type=Path, help="Metaflow configuration directory (default ~/.metaflowconfig).")
    parser.add_argument("--out", type=Path, help="Write to this file instead of the profile's.")
    parser.set_defaults(handler=configure_kubernetes_command)


def configure_kubernetes_command(args: argparse.Namespace) -> int:
    """Write the profile and say how to select it."""
    settings = kubeconfig.metaflow_config(
        s3_root=args.s3_root,
        namespace=args.namespace,
        image=args.image,
        endpoint_url=args.endpoint_url,
        secrets=args.secrets,
        service_account=args.service_account,
        gpu=args.gpu,
    )
    path = kubeconfig.write_config(settings, args.out or kubeconfig.config_path(profile=args.profile, home=args.home))
    print(f"wrote {path}")
    if not args.out:
        home = f"METAFLOW_HOME={args.home} " if args.home else ""
        print(f"use it with: export {home}METAFLOW_PROFILE={args.profile}")
    if not args.gpu:
        # The flow's compute steps ask for compute.gpu GPUs, which a cluster
        # without GPU nodes cannot schedule.
        print("no GPU nodes: run the flow with --config-value compute '{\"cpu\": 2, \"memory\": 4096, \"gpu\": 0}'")
    return 0
