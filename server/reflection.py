"""Server reflection under both service names: ``grpc.reflection.v1alpha.ServerReflection``
(what grpcio-reflection serves) and ``grpc.reflection.v1.ServerReflection`` (what current
grpcurl, Postman and grpc-java/go clients ask for).

    >>> enable_reflection(server, SERVICE_NAMES + (health.SERVICE_NAME,))   # doctest: +SKIP

The v1 messages are wire-identical to v1alpha's (same fields, same numbers, another
package), so one servicer answers both: the v1 method is a generic handler with v1alpha's
(de)serializers. So that v1 also appears in ``list_services`` and resolves by
``file_containing_symbol``, its file descriptor is built at run time from v1alpha's (the
package renamed) and added to the default descriptor pool, which the servicer reads. No
Python module named ``grpc.*`` is generated: it would shadow grpcio.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_PACKAGE = "grpc.reflection.v1"
V1 = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"  # its name in grpc's own protos
SERVICE_NAMES = (V1, V1ALPHA)


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file with the package renamed."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old = f".{proto.package}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")  # v1alpha's java/go packages; v1's would be guesses
    new = f".{V1_PACKAGE}."

    def rename(messages) -> None:
        for message in messages:
            for field in message.field:
                if field.type_name.startswith(old):
                    field.type_name = new + field.type_name[len(old):]
            rename(message.nested_type)

    rename(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    return proto


def _register_v1(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)  # this process registered it already (or grpc did)
    except KeyError:
        pool.Add(v1_file_descriptor())


def enable_reflection(server: grpc.aio.Server, service_names, pool: descriptor_pool.DescriptorPool | None = None) -> None:
    """Serve reflection of ``service_names`` (and of both reflection services) on an aio
    server, under v1alpha and v1."""
    pool = pool or descriptor_pool.Default()
    _register_v1(pool)
    servicer = reflection.aio.ReflectionServicer(tuple(service_names) + SERVICE_NAMES, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1, {"ServerReflectionInfo": handler}),))
