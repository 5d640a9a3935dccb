"""Server reflection under v1 (what grpcurl and Postman ask for today) and v1alpha (what
grpcio-reflection serves), through the session's real server (server/reflection.py)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.reflection import V1, V1ALPHA, V1_FILE, v1_file_descriptor

OURS = ("qianjiang.v1.ScoreService", "qianjiang.v1.EligibilityService", "qianjiang.v1.RecordsService",
        "qianjiang.v1.AuditService")


def _v1_call(channel: grpc.Channel):
    """A client that speaks v1: the v1 method path; the messages are v1alpha's, which are
    the same on the wire."""
    return channel.stream_stream(
        f"/{V1}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )


def _ask(call, *requests) -> list:
    return list(call(iter(requests), timeout=5))


def _files(response) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    protos = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in response.file_descriptor_response.file_descriptor_proto]
    return {p.name: p for p in protos}


def _build_pool(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    """What a reflection client does: a pool of its own from the files it was sent."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        for dep in files[name].dependency:
            add(dep)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    return pool


@pytest.mark.parametrize("speak", ["v1", "v1alpha"])
def test_a_client_lists_the_services_and_fetches_the_eligibility_descriptor(served, speak):
    channel = served.client.channel
    call = _v1_call(channel) if speak == "v1" else reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    listed, by_symbol = _ask(
        call,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="qianjiang.v1.EligibilityService"),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert set(OURS) <= names
    assert {V1, V1ALPHA, "grpc.health.v1.Health"} <= names
    pool = _build_pool(_files(by_symbol))
    service = pool.FindServiceByName("qianjiang.v1.EligibilityService")
    check = service.methods_by_name["StreamCheck"]
    assert check.client_streaming and check.server_streaming
    assert check.input_type.full_name == "qianjiang.v1.CheckRequest"


def test_the_v1_service_resolves_to_its_own_descriptor(served):
    """grpcurl describes the reflection service itself by symbol: v1 is a file of its own,
    v1alpha's messages under the v1 package."""
    (resp,) = _ask(_v1_call(served.client.channel), reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1))
    files = _files(resp)
    assert set(files) == {V1_FILE}
    pool = _build_pool(files)
    method = pool.FindServiceByName(V1).methods_by_name["ServerReflectionInfo"]
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert method.output_type.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    # wire-identical to v1alpha: the same fields with the same numbers and types
    for name in ("ServerReflectionRequest", "ServerReflectionResponse", "FileDescriptorResponse", "ErrorResponse"):
        v1 = pool.FindMessageTypeByName(f"grpc.reflection.v1.{name}")
        alpha = getattr(reflection_pb2, name).DESCRIPTOR
        assert [(f.name, f.number, f.type) for f in v1.fields] == [(f.name, f.number, f.type) for f in alpha.fields]


def test_an_unknown_symbol_is_an_error_response_not_a_failed_stream(served):
    (resp,) = _ask(_v1_call(served.client.channel),
                   reflection_pb2.ServerReflectionRequest(file_containing_symbol="qianjiang.v1.Nope"))
    assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_the_v1_descriptor_names_only_v1_types():
    proto = v1_file_descriptor()
    assert (proto.name, proto.package) == (V1_FILE, "grpc.reflection.v1")
    text = proto.SerializeToString()
    assert b"v1alpha" not in text
