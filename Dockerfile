# One image for the flow's step pods (Metaflow on Kubernetes) and for serving
# (SeldonDeployment, serving/PetSegModel.py through seldon-core-microservice).
#
#   docker build -t petseg:latest .                                  # CPU
#   docker build --build-arg VARIANT=gpu -t petseg:latest-gpu .      # NVIDIA GPU
#
# Python packages come from requirements.lock, so the image runs the versions
# the tests ran. The GPU variant swaps tensorflow-cpu for the same version of
# tensorflow[and-cuda], whose wheels carry CUDA and cuDNN; the node provides
# the driver (NVIDIA container runtime).
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG VARIANT=cpu

# Metaflow's pod command would otherwise pip-install boto3 and requests at
# every task start; the lock file already has them.
ENV METAFLOW_SKIP_INSTALL_DEPENDENCIES=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    USER=petseg

COPY requirements.lock /tmp/requirements.lock
RUN set -eux; \
    case "$VARIANT" in \
      cpu) cp /tmp/requirements.lock /tmp/requirements.txt ;; \
      gpu) tf="$(sed -n -E 's/^tensorflow[-_]cpu==([^ ;\\]+).*/\1/Ip' /tmp/requirements.lock)"; \
           test -n "$tf"; \
           grep -v -i -E '^tensorflow[-_]cpu==' /tmp/requirements.lock > /tmp/requirements.txt; \
           echo "tensorflow[and-cuda]==$tf" >> /tmp/requirements.txt ;; \
      *) echo "VARIANT must be cpu or gpu, not $VARIANT" >&2; exit 1 ;; \
    esac; \
    pip install -r /tmp/requirements.txt; \
    rm /tmp/requirements.lock /tmp/requirements.txt

# The project itself; its dependencies are all in the lock file (the GPU
# variant has tensorflow[and-cuda] where setup.py names tensorflow-cpu).
COPY setup.py README.md /src/
COPY petseg /src/petseg
RUN pip install --no-deps /src && rm -rf /src
COPY flows /app/flows
COPY serving /app/serving

# Step pods unpack Metaflow's code package into the working directory, so it
# must be writable by the (non-root) user.
RUN useradd --create-home --uid 1000 petseg
USER petseg
WORKDIR /home/petseg

# Serving: the Seldon operator starts the container with this command and
# sets the ports through PREDICTIVE_UNIT_* variables. Step pods replace it
# with Metaflow's own command, and the MLServer runtime's InferenceService
# (k8s/kserve-inferenceservice.yaml) with
# `python -m petseg.entrypoints.mlserver_runtime /app/serving/mlserver` (ports 8080 REST, 8081 gRPC).
# petseg's launcher runs the wrapper's own main: with a tokens file it starts no gRPC server (which
# cannot check tokens); PETSEG_HOST is the pod's own addresses, where the kubelet probes.
ENV PYTHONPATH=/app/serving \
    MODEL_NAME=PetSegModel \
    SERVICE_TYPE=MODEL \
    PETSEG_HOST=0.0.0.0
EXPOSE 9000 5000 6000
CMD ["sh", "-c", "exec python -m petseg.entrypoints.seldon_launcher \"$MODEL_NAME\" --service-type \"$SERVICE_TYPE\""]
