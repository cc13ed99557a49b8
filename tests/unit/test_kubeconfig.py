"""`petseg configure kubernetes`: the Metaflow profile for running the flow on a cluster."""

import json

import pytest

from petseg.cli import cluster as cluster_commands
from petseg.deploy import kubeconfig
from petseg.errors import ConfigError


def configure(argv: list[str]) -> int:
    """Run `petseg configure ...` through its command group's own parser."""
    import argparse

    parser = argparse.ArgumentParser(prog="petseg")
    cluster_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_configure_writes_profile_without_credentials(tmp_path):
    code = configure(["configure", "kubernetes", "--s3-root", "s3://bucket/metaflow", "--namespace", "petseg",
                     "--image", "registry.example.com/petseg:1.0", "--endpoint-url", "http://127.0.0.1:9000",
                      "--secret", "petseg-s3", "--service-account", "petseg", "--gpu", "1",
                      "--home", str(tmp_path), "--profile", "test"])
    assert code == 0
    settings = json.loads((tmp_path / "config_test.json").read_text())
    assert settings["METAFLOW_DEFAULT_DATASTORE"] == "s3"
    assert settings["METAFLOW_DATASTORE_SYSROOT_S3"] == "s3://bucket/metaflow"
    assert settings["METAFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert settings["METAFLOW_KUBERNETES_NAMESPACE"] == "petseg"
    assert settings["METAFLOW_KUBERNETES_CONTAINER_IMAGE"] == "registry.example.com/petseg:1.0"
    assert settings["METAFLOW_KUBERNETES_SECRETS"] == "petseg-s3"
    assert settings["METAFLOW_KUBERNETES_SERVICE_ACCOUNT"] == "petseg"
    assert json.loads(settings["METAFLOW_KUBERNETES_TOLERATIONS"])[0]["key"] == "nvidia.com/gpu"
    assert not [key for key in settings if "AWS" in key or "SECRET_ACCESS" in key]


def test_configure_keeps_other_keys_and_out_path(tmp_path):
    out = tmp_path / "mf.json"
    out.write_text(json.dumps({"METAFLOW_USER": "ci"}))
    settings = kubeconfig.metaflow_config(s3_root="s3://b/p/", namespace="ns", image="img:1")
    kubeconfig.write_config(settings, out)
    written = json.loads(out.read_text())
    assert written["METAFLOW_USER"] == "ci"
    assert written["METAFLOW_DATASTORE_SYSROOT_S3"] == "s3://b/p"
    assert "METAFLOW_KUBERNETES_TOLERATIONS" not in written
    assert kubeconfig.config_path(profile="x", home=tmp_path) == tmp_path / "config_x.json"


@pytest.mark.parametrize("kwargs, word", [
    ({"s3_root": "/local/dir"}, "--s3-root"),
    ({"namespace": "Bad_NS"}, "--namespace"),
    ({"image": ""}, "--image"),
    ({"endpoint_url": "minio:9000"}, "--endpoint-url"),
    ({"secrets": ["Not A Name"]}, "Not A Name"),
    ({"gpu": -1}, "--gpu"),
])
def test_configure_rejects_bad_values(kwargs, word):
    arguments = {"s3_root": "s3://b/p", "namespace": "ns", "image": "img:1", **kwargs}
    with pytest.raises(ConfigError, match=word):
        kubeconfig.metaflow_config(**arguments)


def test_configure_bad_value_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="--s3-root 'bucket'"):
        configure(["configure", "kubernetes", "--s3-root", "bucket", "--namespace", "ns", "--image", "i",
                   "--out", str(tmp_path / "c.json")])
    assert not (tmp_path / "c.json").exists()
