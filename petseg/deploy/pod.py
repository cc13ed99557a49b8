"""The serving pod of a release: the container, and the pod's own fields, that every object serving it describes.

`serving_pod` is the one description of a server's pod (``seldon``: Seldon's microservice; ``mlserver``: MLServer
with petseg's runtime). The plain Deployment (`petseg.deploy.deployment.render_deployment`), the SeldonDeployment
and the KServe InferenceService (`petseg.deploy.kubernetes`) put exactly its container and pod fields in their
templates, so each runs the same process, environment, ports, probes and mounts. A Seldon Core v2 Server runs many
Models and its MLServer is driven by Seldon's agent: `seldon_v2_server_pod` is the ``mlserver`` pod less what
Seldon's ServerConfig decides there (see it).

The pod holds the least it needs: no service-account token, the image's non-root user, a read-only root file
system with a scratch ``/tmp``, no Linux capabilities, the serving credential as a file
(``AWS_SHARED_CREDENTIALS_FILE``), the trusted public keys and the bearer tokens as read-only mounts.
"""

from __future__ import annotations

SERVERS = ("seldon", "mlserver")
PORTS = {"seldon": 9000, "mlserver": 8080}
PORT_NAMES = {"seldon": "http", "mlserver": "http1"}
"""The REST port's name: Seldon Core v1's operator finds a model's REST port by the name ``http``; KServe's
Knative refuses any name but ``http1`` and ``h2c``."""
PROBES = {"seldon": ("/health/status", "/health/ping"),
          "mlserver": ("/v2/models/petseg/ready", "/v2/health/live")}
"""(readiness, liveness) paths: Seldon's status runs one prediction; MLServer's model is ready after a warm-up."""
DEFAULT_RESOURCES = {"requests": {"cpu": "500m", "memory": "2560Mi"}, "limits": {"memory": "3Gi"}}
"""From bench/serving_memory.py (docs/PERFORMANCE.md): a Seldon pod's processes hold about 2.1 GiB idle and
2.6 GiB with four worst-case requests in flight; MLServer's 0.6 GiB idle, 1.5 GiB with two."""
SERVING_SECRETS = ("petseg-serving-s3",)
"""The serving pods' S3 credential (k8s/base/serving-s3-secret.template.yaml): read releases, add pending
feedback samples, nothing else; never the flow's ``petseg-s3``, which can rewrite every release and run."""
TRUSTED_KEYS_CONFIGMAP = "petseg-trusted-keys"
"""The public keys a served release must be signed by (k8s/base/trusted-keys.template.yaml); no private key."""
TRUSTED_KEYS_PATH = "/etc/petseg/trusted-keys"
TOKENS_MOUNT = "/var/run/secrets/petseg-tokens"
"""Where a pod reads its bearer tokens (`petseg.tokens`): the Secret ``tokens_secret``, key ``tokens.json``."""
CREDENTIALS_MOUNT = "/var/run/secrets/petseg-s3"
"""Where a serving pod reads its S3 credential, an AWS shared-credentials file (``AWS_SHARED_CREDENTIALS_FILE``)."""
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}
"""The image's user; Secrets are mounted for its group (``fsGroup``)."""
CONTAINER_SECURITY = {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                      "capabilities": {"drop": ["ALL"]}}
SELDON_V2_MODELS = "/mnt/agent/models"
"""Where Seldon Core v2's agent puts the folders of the Models it loads (its mlserver ServerConfig's
``MLSERVER_MODELS_DIR``)."""


def command(server: str) -> tuple[list[str], str]:
    """The server's command line and working directory in the image (see Dockerfile)."""
    if server == "seldon":
        return (["python", "-m", "petseg.entrypoints.seldon_launcher", "PetSegModel", "--service-type", "MODEL",
                 "--http-port", str(PORTS["seldon"]), "--grpc-port", "5000", "--metrics-port", "6000",
                 "--workers", "1", "--threads", "4"], "/app/serving")
    # MLServer keeps metrics and environments under its working directory: the writable scratch one.
    return ["python", "-m", "petseg.entrypoints.mlserver_runtime", "/app/serving/mlserver"], "/tmp"


def serving_pod(server: str, *, image: str, model_uri: str, model_fingerprint: str,
                feedback_uri: str | None = None, s3_endpoint_url: str | None = None,
                s3_secret: str | None = SERVING_SECRETS[0], tokens_secret: str | None = None,
                resources: dict | None = None) -> dict:
    """The pod serving one release on ``server`` (one of `SERVERS`; values checked by the caller).

    Args:
        server: Which server the pod runs.
        image: Container image with petseg and ``serving/`` (see Dockerfile).
        model_uri: The release's ``s3://`` prefix (MODEL_URI).
        model_fingerprint: The fingerprint its model must have (MODEL_FINGERPRINT).
        feedback_uri: The feedback store (FEEDBACK_URI); None: feedback is refused.
        s3_endpoint_url: Endpoint of a non-AWS S3 server (AWS_ENDPOINT_URL).
        s3_secret: The serving credential's Secret (key ``credentials``, an AWS shared-credentials file).
        tokens_secret: A Secret with key ``tokens.json`` (`petseg.tokens`); without it predictions are open and
            feedback is refused.
        resources: Container resources; default `DEFAULT_RESOURCES`.

    Returns:
        ``{"container": ..., "pod": ...}``: the container (named ``petseg``) and the pod's own fields
        (``automountServiceAccountToken``, ``enableServiceLinks``, ``securityContext``, ``volumes``).
    """
    port = PORTS[server]
    env = [{"name": "MODEL_URI", "value": model_uri},
           {"name": "MODEL_FINGERPRINT", "value": model_fingerprint},
           {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
           {"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"},
           # The pod's own address, which the kubelet probes and the Service sends to.
           {"name": "PETSEG_HOST", "value": "0.0.0.0"}, {"name": "MLSERVER_HOST", "value": "0.0.0.0"},
           {"name": "MLSERVER_HTTP_PORT", "value": str(port)}]
    if feedback_uri:
        env.append({"name": "FEEDBACK_URI", "value": feedback_uri})
    if s3_endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3_endpoint_url})
    mounted = _mounted(tokens_secret, s3_secret)
    argv, working_dir = command(server)
    ready_path, live_path = PROBES[server]
    container = {
        "name": "petseg", "image": image, "imagePullPolicy": "IfNotPresent", "command": argv,
        "workingDir": working_dir, "env": env + mounted["env"],
        # Spelled out as the API server and KServe's schema would default it, so what is stored is what was sent.
        "ports": [{"name": PORT_NAMES[server], "containerPort": port, "protocol": "TCP"}],
        "volumeMounts": mounted["volume_mounts"] + [{"name": "scratch", "mountPath": "/tmp"}],
        "resources": resources or DEFAULT_RESOURCES, "securityContext": CONTAINER_SECURITY,
        # The port by number: Knative (under KServe) takes no other form in a probe.
        "readinessProbe": {"httpGet": {"path": ready_path, "port": port}, "initialDelaySeconds": 5,
                           "periodSeconds": 5, "timeoutSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": live_path, "port": port}, "initialDelaySeconds": 120,
                          "periodSeconds": 20, "timeoutSeconds": 10, "failureThreshold": 3},
    }
    pod = {"automountServiceAccountToken": False, "enableServiceLinks": False, "securityContext": POD_SECURITY,
           "volumes": mounted["volumes"] + [{"name": "scratch", "emptyDir": {}}]}
    return {"container": container, "pod": pod}


def seldon_v2_server_pod(*, image: str, s3_endpoint_url: str | None = None,
                         s3_secret: str | None = SERVING_SECRETS[0], tokens_secret: str | None = None,
                         resources: dict | None = None) -> dict:
    """What a Seldon Core v2 Server's pod takes of `serving_pod`'s ``mlserver`` one, where Seldon's mlserver
    ServerConfig does not decide (Seldon's operator merges the Server's pod spec into it, by name, field by field).

    - The container is named ``mlserver``, the ServerConfig's MLServer container. Its command is ``mlserver
      start`` on `SELDON_V2_MODELS`: Seldon's agent loads and unloads each Model there through MLServer's model
      repository API, which petseg's launcher closes. The runtime still checks the bearer tokens of every
      inference; the launcher's HTTP edge (binary data extension, 413) is not in front.
    - No MODEL_URI or MODEL_FINGERPRINT: each Model's settings name its release and fingerprint.
    - No ports, probes or MLSERVER_HTTP_PORT: the ServerConfig's (``server-http`` 9000, ``server-grpc`` 9500),
      which the agent talks to; ``MLSERVER_PARALLEL_WORKERS`` 0 as in ``serving/mlserver/settings.json``
      (MLServer's worker processes do not start with the locked uvloop).
    - The pod keeps its service-account token: Seldon's agent, beside MLServer, reads Secrets through it.

    Returns:
        ``{"container": ..., "pod": ...}`` as `serving_pod`; Seldon's own volumes are merged in beside these.
    """
    serving = serving_pod("mlserver", image=image, model_uri="", model_fingerprint="",
                          s3_endpoint_url=s3_endpoint_url, s3_secret=s3_secret, tokens_secret=tokens_secret,
                          resources=resources)
    container = {key: value for key, value in serving["container"].items()
                 if key not in ("ports", "readinessProbe", "livenessProbe")}
    env = [item for item in container["env"] if item["name"] not in ("MODEL_URI", "MODEL_FINGERPRINT",
                                                                      "MLSERVER_HTTP_PORT")]
    pod = {key: value for key, value in serving["pod"].items() if key != "automountServiceAccountToken"}
    return {"container": {**container, "name": "mlserver", "command": ["mlserver", "start", SELDON_V2_MODELS],
                          "env": env + [{"name": "MLSERVER_PARALLEL_WORKERS", "value": "0"}]},
            "pod": pod}


def _mounted(tokens_secret: str | None, s3_secret: str | None) -> dict:
    """Read-only mounts of a serving pod: the trusted public keys (its only key material), the serving credential
    as an AWS shared-credentials file (key ``credentials``; never environment variables), and tokens if named.
    Secrets are the pod's group's (mode 0440; the pod's ``fsGroup``), as the server runs as the image's user."""
    env = [{"name": "PETSEG_TRUSTED_KEYS", "value": TRUSTED_KEYS_PATH}]
    mounts = [{"name": "trusted-keys", "mountPath": TRUSTED_KEYS_PATH, "readOnly": True}]
    volumes = [{"name": "trusted-keys", "configMap": {"name": TRUSTED_KEYS_CONFIGMAP}}]
    if s3_secret:
        env.append({"name": "AWS_SHARED_CREDENTIALS_FILE", "value": f"{CREDENTIALS_MOUNT}/credentials"})
        mounts.append({"name": "s3-credentials", "mountPath": CREDENTIALS_MOUNT, "readOnly": True})
        volumes.append({"name": "s3-credentials", "secret": {
            "secretName": s3_secret, "defaultMode": 0o440, "items": [{"key": "credentials", "path": "credentials"}]}})
    if tokens_secret:
        env.append({"name": "PETSEG_TOKENS_FILE", "value": f"{TOKENS_MOUNT}/tokens.json"})
        mounts.append({"name": "petseg-tokens", "mountPath": TOKENS_MOUNT, "readOnly": True})
        volumes.append({"name": "petseg-tokens", "secret": {
            "secretName": tokens_secret, "defaultMode": 0o440, "items": [{"key": "tokens.json", "path": "tokens.json"}]}})
    return {"env": env, "volume_mounts": mounts, "volumes": volumes}
