"""The fuzzers' input generators (hypothesis strategies), shared by the short run in
tests/security/test_fuzz.py and the long one in bench/fuzz_at_scale.py.

Bodies are shaped like the request models and mostly valid (`mostly`: 9 in 10 pick
the valid value of a field), so most inputs reach the engine and some break one field;
gRPC messages are built from the descriptors, every field any value its type allows.
The reward model is called `fake-rm`: the gateway under test must serve one by that name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, get_args

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from bon_gateway.types import Activation, Aggregation, Selection
from bon_gateway.v1 import best_of_n_pb2 as pb

__all__ = [
    "ALLOWED_GRPC_CODES",
    "GENERATE_ROUTES",
    "RAW_CONTENT_TYPES",
    "REWARD_MODEL",
    "RLHF_BODIES",
    "SERVICE",
    "RpcCall",
    "any_json",
    "case_request",
    "chat_body",
    "completion_body",
    "malformed_proto",
    "mostly",
    "proto_messages",
    "raw_body",
    "rewards_body",
    "rpc_caller",
    "schema_operations",
]

SELECTIONS: tuple[str, ...] = get_args(Selection)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
REWARD_MODEL = "fake-rm"

# -- HTTP: JSON bodies shaped like the request models ------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
any_json = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def mostly(valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any] = any_json) -> st.SearchStrategy[Any]:
    """`valid` 9 times in 10, else `wild`: most bodies reach the engine, some break one field."""
    return st.integers(0, 9).flatmap(lambda i: wild if i == 0 else valid)


text_part = st.fixed_dictionaries(
    {
        "type": mostly(st.just("text"), st.sampled_from(["image_url", ""]) | any_json),
        "text": st.text(max_size=60),
    }
)
tool_call = st.fixed_dictionaries(
    {
        "id": mostly(st.text(max_size=12)),
        "type": mostly(st.just("function")),
        "function": mostly(
            st.fixed_dictionaries(
                {"name": mostly(st.text(max_size=12)), "arguments": mostly(st.text(max_size=40))}
            )
        ),
    }
)
message = mostly(
    st.fixed_dictionaries(
        {
            "role": mostly(st.sampled_from(["system", "user", "assistant", "tool", ""])),
            "content": mostly(st.text(max_size=200) | st.lists(text_part, max_size=3), st.none() | any_json),
        },
        optional={
            "name": mostly(st.text(max_size=10)),
            "tool_calls": mostly(st.lists(tool_call, max_size=2)),
            "tool_call_id": mostly(st.text(max_size=12)),
        },
    ),
    st.fixed_dictionaries({}, optional={"role": any_json, "content": any_json, "name": any_json}),
)
tool = st.fixed_dictionaries(
    {
        "type": mostly(st.just("function")),
        "function": mostly(
            st.fixed_dictionaries(
                {"name": mostly(st.text(max_size=12))},
                optional={"parameters": mostly(st.just({"type": "object", "properties": {}}))},
            )
        ),
    }
)
generate_fields = {
    "model": mostly(st.text(max_size=20)),
    "best_of": mostly(st.integers(1, 8), st.integers(-3, 100) | any_json),
    "n": mostly(st.integers(1, 2), st.integers(-3, 100) | any_json),
    "reward_model": mostly(st.just(REWARD_MODEL), st.just("nope") | any_json),
    "selection": mostly(st.sampled_from(SELECTIONS), st.text(max_size=10) | any_json),
    "aggregation": mostly(st.sampled_from(AGGREGATIONS), st.text(max_size=10) | any_json),
    "return_candidates": mostly(st.booleans()),
    "min_candidates": mostly(st.integers(1, 2), st.integers(-3, 100) | any_json),
    "temperature": mostly(st.floats(0, 2), st.floats(-1, 3) | any_json),
    "top_p": mostly(st.floats(0.1, 1), st.floats(-1, 2) | any_json),
    "max_tokens": mostly(st.integers(1, 64), st.integers(-1, 100_000) | any_json),
    "seed": mostly(st.integers(0, 2**31), st.integers(-(2**70), 2**70) | any_json),
    "stop": mostly(st.text(max_size=10) | st.lists(st.text(max_size=10), max_size=3)),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": mostly(st.booleans())})),
    "logit_bias": mostly(st.dictionaries(st.text(max_size=5), st.floats(-100, 100), max_size=3)),
    "response_format": mostly(st.just({"type": "text"})),
    "tools": mostly(st.lists(tool, max_size=2)),
    "tool_choice": mostly(st.sampled_from(["auto", "none", "required"])),
}
chat_body = st.fixed_dictionaries(
    {
        "messages": mostly(
            st.lists(message, min_size=1, max_size=4), st.lists(message, max_size=20) | any_json
        )
    },
    optional={**generate_fields, "max_completion_tokens": mostly(st.integers(-1, 100_000))},
)
completion_body = st.fixed_dictionaries(
    {"prompt": mostly(st.text(max_size=300) | st.lists(st.text(max_size=50), max_size=3))},
    optional={k: v for k, v in generate_fields.items() if k not in ("tools", "tool_choice")},
)
rewards_body = st.fixed_dictionaries(
    {"messages": mostly(st.lists(message, min_size=1, max_size=5))},
    optional={
        "model": mostly(st.just(REWARD_MODEL), st.just("nope") | any_json),
        "candidates": mostly(st.lists(st.text(max_size=40), max_size=6)),
        "steps": mostly(st.lists(st.lists(st.text(max_size=20), max_size=3), max_size=3)),
        "activation": mostly(st.sampled_from(ACTIVATIONS), st.text(max_size=10) | any_json),
        "aggregation": mostly(st.sampled_from(AGGREGATIONS), st.text(max_size=10) | any_json),
        "selection": mostly(st.sampled_from(SELECTIONS), st.text(max_size=10) | any_json),
    },
)
GENERATE_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/rewards")

# -- HTTP: the RLHF reward-server routes (vLLM's pooling API, OpenRLHF's /get_reward) ----
# Token ids: mostly inside a small vocabulary, some anywhere an int can be.
token_ids = st.lists(mostly(st.integers(0, 1000), st.integers(-(2**40), 2**40)), max_size=12)
vllm_input = mostly(
    st.text(max_size=120)
    | st.lists(st.text(max_size=60), max_size=4)
    | token_ids
    | st.lists(token_ids, max_size=3)
)
# A chat to score: a user turn then the assistant's answer, as verl and vLLM send it.
scored_chat = mostly(
    st.tuples(st.text(max_size=80), st.text(max_size=80)).map(
        lambda t: [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}]
    ),
    st.lists(message, max_size=4) | any_json,
)
vllm_fields = {
    "model": mostly(st.just(REWARD_MODEL), st.just("nope") | any_json),
    # The wire's int32 bounds too (2**31 was a 500 before admission checked it).
    "truncate_prompt_tokens": mostly(
        st.integers(-1, 64),
        st.sampled_from([2**31 - 1, 2**31, 2**63]) | st.integers(-(2**40), 2**40) | any_json,
    ),
    "use_activation": mostly(st.booleans()),
    "activation": mostly(st.booleans()),
    "softmax": mostly(st.booleans()),
    "user": mostly(st.text(max_size=8)),
}
texts = mostly(st.text(max_size=80) | st.lists(st.text(max_size=60), max_size=5))
RLHF_BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/classify": mostly(
        st.fixed_dictionaries({"input": vllm_input}, optional=vllm_fields),
        st.fixed_dictionaries({"messages": scored_chat}, optional=vllm_fields),
    ),
    "/pooling": st.fixed_dictionaries(
        {},
        optional={
            "input": vllm_input,
            "messages": scored_chat,
            "task": mostly(st.sampled_from(["classify", "token_classify", "embed"])),
            **vllm_fields,
        },
    ),
    "/score": st.fixed_dictionaries({"text_1": texts, "text_2": texts}, optional=vllm_fields),
    "/rerank": st.fixed_dictionaries(
        {
            "query": mostly(st.text(max_size=80)),
            "documents": mostly(st.lists(st.text(max_size=60), max_size=6)),
        },
        optional={"top_n": mostly(st.integers(0, 8), st.integers(-3, 2**40) | any_json), **vllm_fields},
    ),
    "/get_reward": st.fixed_dictionaries(
        {"query": mostly(st.lists(st.text(max_size=120), max_size=5))},
        optional={
            "prompts": mostly(st.lists(st.text(max_size=40), max_size=5)),
            "labels": mostly(st.lists(any_json, max_size=5)),
            "model": mostly(st.just(REWARD_MODEL), st.just("nope") | any_json),
        },
    ),
}

# -- HTTP: bytes that may not be JSON at all ------------------------------------------
raw_body = st.binary(max_size=300) | any_json.map(lambda v: json.dumps(v).encode())
RAW_CONTENT_TYPES = ("application/json", "text/plain", "", "application/json; charset=latin-1")

# -- gRPC: every field of the request messages, from the descriptors ---------------
_INT_RANGES = {
    pb_descriptor.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    pb_descriptor.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    pb_descriptor.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    pb_descriptor.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    pb_descriptor.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pb_descriptor.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


# Values that pass validation, by field name, so most messages reach the engine.
_LIKELY = {
    "role": st.sampled_from(["user", "system", "assistant"]),
    "content": st.text(max_size=80),
    "prompt": st.just(""),
    "best_of": st.integers(0, 8),
    "n": st.integers(0, 3),
    "min_candidates": st.integers(0, 3),
    "reward_model": st.sampled_from(["", REWARD_MODEL]),
    "model": st.sampled_from(["", REWARD_MODEL]),
    "selection": st.sampled_from(("", *SELECTIONS)),
    "aggregation": st.sampled_from(("", *AGGREGATIONS)),
    "activation": st.sampled_from(("", *ACTIVATIONS)),
    "temperature": st.floats(0, 2, width=32),
    "top_p": st.floats(0.125, 1, width=32),
    "max_tokens": st.integers(1, 64),
    "steps": st.just([]),
    "messages": st.lists(
        st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system"]), content=st.text(max_size=80)),
        min_size=1,
        max_size=3,
    ),
    "candidates": st.lists(st.text(max_size=40), min_size=1, max_size=4),
    "seed": st.integers(0, 2**31),
}


def _scalar(field: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    wild = _wild(field, depth)
    likely = _LIKELY.get(field.name)
    return wild if likely is None else mostly(likely, wild)


def _wild(field: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        low, high = _INT_RANGES[t]
        return st.integers(max(low, -3), min(high, 70)) | st.integers(low, high)
    if t == pb_descriptor.FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == pb_descriptor.FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == pb_descriptor.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == pb_descriptor.FieldDescriptor.TYPE_STRING:
        names = ["", REWARD_MODEL, "argmax", "majority", "last", "min", "sigmoid", "user", "assistant"]
        return st.sampled_from(names) | st.text(max_size=60)
    if t == pb_descriptor.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == pb_descriptor.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if t == pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
        return proto_messages(field.message_type, depth + 1)
    raise AssertionError(f"unhandled field type {t}")


def proto_messages(descriptor: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[ProtoMessage]:
    """Any instance of the message: every field optional, any value its type allows."""
    cls = GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE and depth >= 3:
            continue
        repeated = getattr(field, "is_repeated", None)
        if repeated if repeated is not None else field.label == field.LABEL_REPEATED:
            value = st.lists(_wild(field, depth), max_size=6)
            if field.name in _LIKELY:
                value = mostly(_LIKELY[field.name], value)
        else:
            value = _scalar(field, depth)
        fields[field.name] = value
    return st.fixed_dictionaries({}, optional=fields).map(lambda kwargs: cls(**kwargs))


SERVICE = pb.DESCRIPTOR.services_by_name["BestOfN"]
# What the gateway may answer a fuzzed RPC; anything else (INTERNAL, UNKNOWN, ...) is its bug.
ALLOWED_GRPC_CODES = frozenset(
    {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


def malformed_proto(descriptor: pb_descriptor.Descriptor) -> st.SearchStrategy[bytes]:
    """Wire bytes that are mostly not a valid message: any bytes, or a generated message's
    encoding cut short and with some bytes overwritten (bad tags, lengths, UTF-8)."""

    def damage(data: bytes, cut: int, overwrites: list[tuple[int, int]]) -> bytes:
        damaged = bytearray(data[: max(0, len(data) - cut)] if cut else data)
        for position, value in overwrites:
            if damaged:
                damaged[position % len(damaged)] = value
        return bytes(damaged)

    encoded = proto_messages(descriptor).map(lambda m: m.SerializeToString())
    overwrites = st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=4)
    return st.binary(max_size=200) | st.builds(damage, encoded, st.integers(0, 8), overwrites)


# -- schemathesis: the OpenAPI schema the app itself publishes ----------------------
_HTTPX_KWARGS = {"method", "url", "headers", "params", "json", "content", "data", "cookies", "files"}


def schema_operations(schema_doc: dict[str, Any]) -> list[Any]:
    """schemathesis' operations of the schema (each has `.path` and `.as_strategy()`)."""
    import schemathesis

    schema = schemathesis.openapi.from_dict(schema_doc)
    return [op.ok() for op in schema.get_all_operations()]


def case_request(case: Any, base_url: str) -> dict[str, Any]:
    """A schemathesis case as httpx.Client.request keyword arguments."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    return {k: v for k, v in kwargs.items() if k in _HTTPX_KWARGS}


RpcCall = Callable[[ProtoMessage | bytes, float], tuple[grpc.StatusCode, str]]


def rpc_caller(channel: grpc.Channel, method: pb_descriptor.MethodDescriptor) -> RpcCall:
    """call(request, timeout_s) -> (status code, details) for one BestOfN RPC on `channel`;
    the request a message or wire bytes sent as they are; a stream is read to its end."""
    response_cls = GetMessageClass(method.output_type)
    path = f"/{SERVICE.full_name}/{method.name}"

    def serialize(request: ProtoMessage | bytes) -> bytes:
        return request if isinstance(request, bytes) else request.SerializeToString()

    if method.server_streaming:
        stream = channel.unary_stream(path, serialize, response_cls.FromString)
    else:
        unary = channel.unary_unary(path, serialize, response_cls.FromString)

    def call(request: ProtoMessage | bytes, timeout_s: float) -> tuple[grpc.StatusCode, str]:
        try:
            if method.server_streaming:
                for _ in stream(request, timeout=timeout_s):
                    pass
            else:
                unary(request, timeout=timeout_s)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""

    return call
