"""Generated gRPC stubs for ``proto/featurewatch/v1`` (regenerate with ``scripts/gen_proto.sh``)."""

from monitor.protocol.featurewatch.v1 import featurewatch_pb2 as pb
from monitor.protocol.featurewatch.v1 import featurewatch_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
