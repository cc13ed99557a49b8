"""Package definition for petseg. Exact versions live in requirements.lock."""

from setuptools import find_packages, setup

setup(
    name="petseg",
    version="0.1.0",
    description="Reproducible pet segmentation on Metaflow, Seldon Core and Kubernetes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",  # seldon-core 1.19 requires Python 3.12
    packages=find_packages(include=["petseg", "petseg.*"]),
    # The serving objects' templates travel with the package, so the release step's pod can deploy.
    package_data={"petseg.deploy": ["manifests/*.yaml"]},
    install_requires=[
        "tensorflow-cpu==2.18.1",
        "protobuf==5.29.5",  # also encodes and parses shard Examples without TensorFlow (petseg.data.shards)
        "seldon-core==1.19.0",
        "metaflow>=2.19,<2.20",
        "tensorflow-datasets>=4.9,<5",
        "tensorflow-metadata<1.17",  # 1.17+ is generated for protobuf 6
        "kubernetes>=36,<37",  # 37 needs python-dateutil>=3, botocore needs <3
        "boto3>=1.44,<1.45",
        "pachyderm-sdk>=2.12,<2.13",
        "google-crc32c>=1.9,<2",  # TFRecord framing without importing TensorFlow (petseg.data.shards)
        "mlserver==1.7.1",  # the Open Inference Protocol server (Seldon Core v2, KServe)
        "openlineage-python==1.54.0",  # OpenLineage run events (petseg.lineage.openlineage)
        "model-signing==1.1.1",  # OpenSSF model signing: signed releases and provenance (offline, EC keys)
        "pyopenssl==26.4.0",  # model-signing imports OpenSSL without declaring it
        "pillow",
        "matplotlib",
        "requests",
    ],
    extras_require={
        "gpu": ["tensorflow[and-cuda]==2.18.1"],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "moto[server]", "tritonclient[http]"],
    },
    entry_points={"console_scripts": ["petseg=petseg.cli:main"]},
)
