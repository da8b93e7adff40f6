"""gRPC server reflection, served as both `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

Newer tools (grpcurl, Postman, @grpc/reflection) ask v1 first; grpcio-reflection (1.85)
ships only v1alpha. The two protocols differ only in their package name: the messages
have the same fields under the same numbers, so one servicer answers both, and the v1
service is registered with the v1alpha message classes. So that v1 can itself be
described by reflection, its file descriptor is derived from v1alpha's with the package
renamed and added to the default pool.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
        return  # added before (another server in this process), or shipped by a newer grpcio-reflection
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):  # message-typed fields only
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        service.ClearField("options")  # v1alpha's is marked deprecated; v1 is not
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> tuple[str, ...]:
    """Serve reflection v1 and v1alpha for `service_names` (and both reflection services);
    returns the names listed."""
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    _add_v1_descriptor(descriptor_pool.Default())
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": v1}),))
    return names
