"""What the serving tests share: request limits of the test servers, test images, and a gRPC v2 client.

The gRPC client is the Open Inference Protocol stubs that MLServer ships
(``mlserver.grpc.dataplane_pb2`` and ``dataplane_pb2_grpc``) over grpcio:
tritonclient's own gRPC client needs protobuf 6, and TensorFlow 2.18 pins
protobuf 5.29.
"""

import base64
import io
import socket

import numpy as np
from PIL import Image

MAX_PIXELS = 300_000
MAX_IMAGE_BYTES = 1_000_000
MAX_LIST_PIXELS = 100_000
FEEDBACK_QUOTA = 40
MAX_BODIES = 2
"""Request bodies the test MLServer reads at once."""
TOKENS = {
    "tester": ("tester-" + "t" * 40, ["predict", "feedback"]),
    "viewer": ("viewer-" + "v" * 40, ["predict"]),
    "ops": ("ops-" + "o" * 40, ["predict", "operator"]),
    "quota": ("quota-" + "q" * 40, ["feedback"]),
}
"""The session's tokens: identity -> (token, roles)."""


def bearer(identity: str = "tester") -> dict:
    """The Authorization header of a session identity."""
    return {"Authorization": f"Bearer {TOKENS[identity][0]}"}


def encode(pixels: np.ndarray, image_format: str, **options) -> bytes:
    """An image file of ``pixels`` (JPEG, PNG, GIF, ...)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def random_image(height: int = 128, width: int = 128, seed: int = 0) -> np.ndarray:
    """uint8 (height, width, 3) noise."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def grpc_infer(port: int, request, *, timeout: float = 60.0, identity: str | None = "tester"):
    """Sends a ``ModelInferRequest`` to an Open Inference Protocol server on localhost (with the
    identity's token as ``authorization`` metadata; None: without); its response."""
    import grpc
    from mlserver.grpc import dataplane_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 * 2**20),
                                                             ("grpc.max_receive_message_length", 64 * 2**20)]) as channel:
        metadata = [("authorization", bearer(identity)["Authorization"])] if identity else []
        return dataplane_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout,
                                                                               metadata=metadata)


def exchange(url: str, path: str, body: bytes, *, headers: dict | None = None, method: str = "POST",
             piece: int = 2**20) -> tuple[int, dict, bytes]:
    """Sends one request with all of ``body`` (Content-Length) over a plain socket, then reads the whole answer
    until the server closes or its Content-Length is met: (status, headers with lower-case names, body).

    A reset or a closed connection before the status line raises, as it would for any client."""
    host, port = url.removeprefix("http://").split(":")
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}", "Connection: close",
            *(f"{key}: {value}" for key, value in (headers or {}).items())]
    with socket.create_connection((host, int(port)), timeout=120) as connection:
        connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for start in range(0, len(body), piece):
            connection.sendall(body[start:start + piece])
        answer = b""
        while True:
            data = connection.recv(65536)
            if not data:
                break
            answer += data
            if b"\r\n\r\n" in answer:
                top, rest = answer.split(b"\r\n\r\n", 1)
                length = [int(line.split(b":", 1)[1]) for line in top.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
    top, rest = answer.split(b"\r\n\r\n", 1)
    lines = top.decode("latin-1").split("\r\n")
    found = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ", 2)[1]), {key.lower(): value for key, value in found.items()}, rest


def record(deployment: dict) -> dict:
    """A session server's deployment as an endpoint record keeps it (the fixtures add a feedback folder)."""
    return {key: value for key, value in deployment.items() if key != "feedback_dir"}
