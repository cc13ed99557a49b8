"""The client and its commands, against a stand-in HTTP server (the real server is tested in test_serving)."""

import argparse
import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from petseg import layout
from petseg.cli import serving as serving_commands
from petseg.deploy import client
from petseg.errors import DataError, ServingError


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


MASK = np.zeros((20, 30, 3), np.uint8)
MASK[..., 1] = 200
MASK[5:15, 10:20] = (230, 10, 20)
TAGS = {"model_version": "petseg-1", "model_fingerprint": "f" * 64}


class StandIn(BaseHTTPRequestHandler):
    """Answers like the petseg server; a request whose image is b"bad" gets a 400."""

    received: list = []
    authorizations: list = []

    def do_POST(self):
        message = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.path, message))
        self.authorizations.append(self.headers.get("Authorization"))
        image = message.get("binData") or message.get("request", {}).get("binData")
        if base64.b64decode(image) == b"bad":
            status = {"code": 400, "reason": "BAD_IMAGE: expected JPEG or PNG bytes; got 3 bytes",
                      "info": "binData: expected JPEG or PNG bytes; got 3 bytes"}
            self._answer(400, {"status": status})
        elif self.path == client.PREDICT_PATH:
            self._answer(200, {"binData": base64.b64encode(_png(MASK)).decode(), "meta": {"tags": TAGS}})
        else:
            self._answer(200, {"jsonData": {"sample_id": "feedback_0123456789abcdef", "store": "/feedback"}})

    def _answer(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "pet.png"
    path.write_bytes(_png(np.full((20, 30, 3), 90, np.uint8)))
    return path


def test_predict_writes_the_mask_and_the_side_by_side_picture(url, image_path, tmp_path):
    result = client.predict(url, image_path, tmp_path / "out" / "mask.png")
    assert np.array_equal(np.asarray(Image.open(result["mask"])), MASK)
    assert result["figure"] == str(tmp_path / "out" / "mask.side_by_side.png")
    assert Image.open(result["figure"]).size == (1200, 400)
    assert result["tags"] == TAGS
    path, message = StandIn.received[-1]
    assert path == "/api/v1.0/predictions"
    assert base64.b64decode(message["binData"]) == image_path.read_bytes()


def test_feedback_sends_image_truth_reward_and_breed(url, image_path, tmp_path):
    truth = tmp_path / "truth.png"
    truth.write_bytes(_png(np.ones((20, 30), np.uint8)))
    result = client.feedback(url, image_path, truth, reward=0.25, breed="Bengal")
    assert result == {"sample_id": "feedback_0123456789abcdef", "store": "/feedback"}
    path, message = StandIn.received[-1]
    assert path == "/api/v1.0/feedback"
    assert base64.b64decode(message["truth"]["binData"]) == truth.read_bytes()
    assert message["truth"]["meta"] == {"tags": {"breed": "Bengal"}}
    assert message["reward"] == 0.25


def test_a_refused_request_is_one_clear_error(url, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"bad")
    with pytest.raises(ServingError, match="answered HTTP 400: binData: expected JPEG or PNG bytes; got 3 bytes"):
        client.predict(url, bad, tmp_path / "mask.png")


def test_connection_refused_names_the_url(image_path, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ServingError, match=f"cannot connect to http://127.0.0.1:{port}"):
        client.predict(f"http://127.0.0.1:{port}", image_path, tmp_path / "mask.png")


def test_a_malformed_url_is_one_clear_error(image_path, tmp_path):
    with pytest.raises(ServingError, match="expected a URL like"):
        client.predict("127.0.0.1:9000", image_path, tmp_path / "mask.png")


def test_a_missing_image_names_the_file(url, tmp_path):
    with pytest.raises(DataError, match="nowhere.jpg"):
        client.predict(url, tmp_path / "nowhere.jpg", tmp_path / "mask.png")


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petseg")
    serving_commands.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_predict_command(url, image_path, tmp_path, capsys):
    args = _cli().parse_args(["predict", "--url", url, str(image_path), "--out", str(tmp_path / "mask.png")])
    assert args.handler(args) == 0
    assert "petseg-1" in capsys.readouterr().out
    assert (tmp_path / "mask.png").is_file()


def test_commands_parse():
    parser = _cli()
    args = parser.parse_args(["feedback", "send", "--url", "http://h:1", "img.jpg", "truth.png", "--reward", "0.5"])
    assert (args.image, args.truth, args.reward, args.breed, args.protocol) == ("img.jpg", "truth.png", 0.5, None,
                                                                                "seldon")
    args = parser.parse_args(["feedback", "accept", "/store", "feedback_1", "feedback_2", "--by", "ana"])
    assert (args.store, args.ids, args.by) == ("/store", ["feedback_1", "feedback_2"], "ana")
    assert parser.parse_args(["feedback", "list", "/store", "--status", "accepted"]).status == "accepted"
    assert parser.parse_args(["serve", "123"]).host == "127.0.0.1"
    args = parser.parse_args(["serve", "123", "--port", "9100"])
    assert (args.run, args.port, args.server) == ("123", 9100, "seldon")
    args = parser.parse_args(["serve", "123", "--server", "mlserver", "--grpc-port", "9101"])
    assert (args.server, args.grpc_port) == ("mlserver", 9101)
    args = parser.parse_args(["predict", "--url", "http://h:1", "img.jpg", "--out", "m.png", "--protocol", "v2"])
    assert args.protocol == "v2"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "123", "--server", "triton"])
    assert parser.parse_args(["stop", "latest"]).run == "latest"


def test_stop_command_on_a_release_directory(tmp_path, capsys):
    args = _cli().parse_args(["stop", str(tmp_path)])
    with pytest.raises(ServingError, match="no deployment.json"):
        args.handler(args)
    # A recorded deployment whose process is gone: nothing to stop.
    gone = {"kind": "local", "url": "http://127.0.0.1:1", "pid": 2**22 + 1}
    layout.deployment_dir(tmp_path).mkdir(parents=True)
    (layout.deployment_dir(tmp_path) / "deployment.json").write_text(json.dumps(gone))
    assert args.handler(args) == 0
    assert "was not running" in capsys.readouterr().out
