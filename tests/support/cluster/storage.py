"""The test cluster's S3: a real ``moto_server`` on the pod bridge's gateway address, with one bucket.

It listens on the bridge (``network.GATEWAY``), not on loopback, because the
pods fetch Metaflow's code package and artifacts from it; the flow launcher
and the tests on this machine reach the same address.
"""

from __future__ import annotations

import urllib.request

from processes import Processes, free_port, wait_for

BUCKET = "petseg"
# moto accepts any key; these are the names the pods' Secret carries.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start(processes: Processes, *, python: str, host: str) -> str:
    """Start the server and make the bucket; return the endpoint URL."""
    port = free_port(host)
    url = f"http://{host}:{port}"
    moto = processes.spawn("moto_server", [python, "-m", "moto.server", "-H", host, "-p", str(port)])
    wait_for("moto_server", lambda: urllib.request.urlopen(url + "/moto-api/", timeout=2).status == 200,
             timeout=60, proc=moto, log=processes.log("moto_server"))
    import boto3

    boto3.client("s3", endpoint_url=url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                 region_name=CREDENTIALS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=BUCKET)
    return url
