"""A device plugin that advertises ``nvidia.com/gpu`` to the test node's kubelet.

A STAND-IN for NVIDIA's device plugin: these machines have no GPU, so the
devices it lists are names only. Everything else is the kubelet's own path: it
speaks the kubelet's device-plugin API (``v1beta1``, gRPC over a Unix socket
in the kubelet's ``device-plugins`` directory), registers with the kubelet,
streams its devices with ListAndWatch, and answers Allocate as NVIDIA's plugin
does, with ``NVIDIA_VISIBLE_DEVICES`` naming the devices granted. So a pod
asking for ``nvidia.com/gpu: 1`` is admitted by the kubelet's device manager,
and the container sees which device it was given.

The API's messages are declared here from the published ``api.proto``
(k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1) with protobuf's descriptor
classes, so no generated code is needed.

Usage::

    python device_plugin.py --kubelet-dir DIR/kubelet/device-plugins --count 2
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

VERSION = "v1beta1"
RESOURCE = "nvidia.com/gpu"
HEALTHY = "Healthy"

_F = descriptor_pb2.FieldDescriptorProto
# name -> [(field, number, type, label, message type)], as in api.proto.
_MESSAGES = {
    "DevicePluginOptions": [("pre_start_required", 1, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
                            ("get_preferred_allocation_available", 2, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None)],
    "RegisterRequest": [("version", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
                        ("endpoint", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
                        ("resource_name", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
                        ("options", 4, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "DevicePluginOptions")],
    "Empty": [],
    "Device": [("ID", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
               ("health", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None)],
    "ListAndWatchResponse": [("devices", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "Device")],
    "ContainerAllocateRequest": [("devicesIDs", 1, _F.TYPE_STRING, _F.LABEL_REPEATED, None)],
    "AllocateRequest": [("container_requests", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "ContainerAllocateRequest")],
    "ContainerAllocateResponse": [("envs", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "ContainerAllocateResponse.EnvsEntry")],
    "AllocateResponse": [("container_responses", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "ContainerAllocateResponse")],
    "PreStartContainerRequest": [("devicesIDs", 1, _F.TYPE_STRING, _F.LABEL_REPEATED, None)],
    "PreStartContainerResponse": [],
}


def _messages() -> dict[str, type]:
    """The API's message classes, built from their declarations above."""
    proto = descriptor_pb2.FileDescriptorProto(name="deviceplugin_v1beta1.proto", package=VERSION, syntax="proto3")
    for name, fields in _MESSAGES.items():
        message = proto.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            entry = message.field.add(name=field, number=number, type=kind, label=label)
            if type_name:
                entry.type_name = f".{VERSION}.{type_name}"
        if name == "ContainerAllocateResponse":  # map<string, string> envs = 1
            envs = message.nested_type.add(name="EnvsEntry")
            envs.options.map_entry = True
            envs.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
            envs.field.add(name="value", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{VERSION}.{name}"))
            for name in _MESSAGES}


M = _messages()


class FakeGpus:
    """The DevicePlugin service: ``count`` healthy devices named ``fake-gpu-N``."""

    def __init__(self, count: int) -> None:
        self.devices = [f"fake-gpu-{n}" for n in range(count)]
        self.stopped = threading.Event()

    def options(self, request, context):
        return M["DevicePluginOptions"]()

    def list_and_watch(self, request, context):
        yield M["ListAndWatchResponse"](devices=[M["Device"](ID=d, health=HEALTHY) for d in self.devices])
        # The stream stays open while the devices stay as they are.
        while not self.stopped.wait(1) and context.is_active():
            pass

    def allocate(self, request, context):
        responses = []
        for container in request.container_requests:
            unknown = [d for d in container.devicesIDs if d not in self.devices]
            if unknown:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown devices {unknown}")
            responses.append(M["ContainerAllocateResponse"](
                envs={"NVIDIA_VISIBLE_DEVICES": ",".join(container.devicesIDs)}))
        return M["AllocateResponse"](container_responses=responses)

    def pre_start(self, request, context):
        return M["PreStartContainerResponse"]()

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(function, request):
            return grpc.unary_unary_rpc_method_handler(
                function, request_deserializer=M[request].FromString, response_serializer=lambda m: m.SerializeToString())

        return grpc.method_handlers_generic_handler(f"{VERSION}.DevicePlugin", {
            "GetDevicePluginOptions": unary(self.options, "Empty"),
            "ListAndWatch": grpc.unary_stream_rpc_method_handler(
                self.list_and_watch, request_deserializer=M["Empty"].FromString,
                response_serializer=lambda m: m.SerializeToString()),
            "Allocate": unary(self.allocate, "AllocateRequest"),
            "PreStartContainer": unary(self.pre_start, "PreStartContainerRequest"),
        })


def register(kubelet_socket: Path, endpoint: str) -> None:
    """Tell the kubelet where this plugin listens (its Registration service)."""
    with grpc.insecure_channel(f"unix://{kubelet_socket}") as channel:
        call = channel.unary_unary(f"/{VERSION}.Registration/Register",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=M["Empty"].FromString)
        call(M["RegisterRequest"](version=VERSION, endpoint=endpoint, resource_name=RESOURCE,
                                  options=M["DevicePluginOptions"]()), timeout=10)


def serve(kubelet_dir: Path, count: int) -> None:
    """Serve and register; register again whenever the kubelet's socket is made anew (a kubelet restart)."""
    plugin = FakeGpus(count)
    socket_path = kubelet_dir / "petseg-fake-gpu.sock"
    kubelet_socket = kubelet_dir / "kubelet.sock"
    signal.signal(signal.SIGTERM, lambda *_: plugin.stopped.set())
    registered_with = None
    server = None
    while not plugin.stopped.is_set():
        try:
            current = kubelet_socket.stat().st_ino
        except FileNotFoundError:
            current = None
        if current is not None and current != registered_with:
            if server is not None:
                server.stop(0)
            # The kubelet wipes its plugin directory when it starts: serve a new socket each time.
            socket_path.unlink(missing_ok=True)
            server = grpc.server(_executor())
            server.add_generic_rpc_handlers((plugin.handler(),))
            server.add_insecure_port(f"unix://{socket_path}")
            server.start()
            try:
                register(kubelet_socket, socket_path.name)
            except grpc.RpcError as error:  # a stale socket, or a kubelet not listening yet: try again
                print(f"device_plugin: not registered yet ({error.code().name}); retrying", flush=True)
            else:
                registered_with = current
                print(f"device_plugin: {count} x {RESOURCE} registered with {kubelet_socket}", flush=True)
        plugin.stopped.wait(1)
    if server is not None:
        server.stop(0)


def _executor():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubelet-dir", type=Path, required=True, help="the kubelet's device-plugins directory")
    parser.add_argument("--count", type=int, default=2, help="how many devices to advertise")
    args = parser.parse_args(argv)
    os.makedirs(args.kubelet_dir, exist_ok=True)
    serve(args.kubelet_dir, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
