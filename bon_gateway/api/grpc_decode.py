"""Decoding BestOfN requests so that a bad message is the client's INVALID_ARGUMENT.

protobuf refuses a string field that is not valid UTF-8 with a DecodeError, and
grpc.aio answers a deserializer's exception with UNKNOWN. Here the deserializer
keeps the failure (`Undecodable`, naming the field: the raw bytes are walked
once more to find it) and the servicer turns it into InvalidRequest through the
one error mapping of the gRPC front.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError, Message  # type: ignore[import-untyped]

from bon_gateway.errors import InvalidRequest
from bon_gateway.v1 import best_of_n_pb2 as pb

__all__ = ["SERVICE_NAME", "Undecodable", "add_best_of_n_to_server", "bad_utf8_field", "decoded"]

SERVICE_NAME = "bon_gateway.v1.BestOfN"

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request that protobuf could not parse; `param` is the field at fault, when found."""

    detail: str
    param: str | None


def decoded(request: M | Undecodable) -> M:
    """The request, or InvalidRequest naming what made it undecodable."""
    if isinstance(request, Undecodable):
        raise InvalidRequest(request.detail, param=request.param)
    return request


def _deserializer(message_type: type[M]) -> Callable[[bytes], M | Undecodable]:
    def deserialize(data: bytes) -> M | Undecodable:
        try:
            return cast(M, message_type.FromString(data))
        except DecodeError:
            param = bad_utf8_field(data, message_type.DESCRIPTOR)
            if param is not None:
                return Undecodable(f"{param}: not valid UTF-8 (a string field must be UTF-8 text)", param)
            return Undecodable(f"the request is not a valid {message_type.DESCRIPTOR.name} message", None)

    return deserialize


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def bad_utf8_field(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The path (`messages[0].content`) of the first string field in `data` that is not
    UTF-8, walking the wire format with `descriptor`; None if none is (or the bytes are
    malformed otherwise)."""
    counts: dict[str, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
                continue
            if wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return None  # groups (deprecated) or garbage: not a UTF-8 question
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            name = prefix + field.name
            if _is_repeated(field):
                counts[field.name] = counts.get(field.name, -1) + 1
                name = f"{name}[{counts[field.name]}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return cast(str, name)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = bad_utf8_field(value, field.message_type, f"{name}.")
                if found is not None:
                    return found
    except DecodeError:
        return None
    return None


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; `label` is deprecated
    if isinstance(repeated, bool):
        return repeated
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def add_best_of_n_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """The generated `add_BestOfNServicer_to_server`, with deserializers that keep a
    decoding failure for the servicer (see the module docstring)."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_deserializer(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream,
            request_deserializer=_deserializer(pb.GenerateRequest),
            response_serializer=pb.GenerateEvent.SerializeToString,
        ),
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score,
            request_deserializer=_deserializer(pb.ScoreRequest),
            response_serializer=pb.ScoreResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=_deserializer(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
