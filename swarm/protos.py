"""The few protobuf messages swarm speaks itself, in a descriptor pool of its own.

hivemind and py-libp2p each register libp2p's protobuf files (crypto.proto, p2pd.proto, ...) in
protobuf's default pool under the same names, which is why the two cannot be imported in one process.
The lite transport (swarm.lite) still has to speak three of those formats to hivemind's nodes, and the
libp2p key wrapper is needed on both paths (swarm.peerid). So the messages are declared here, field for
field as in the originals (the wire form depends only on field numbers and types), under the package
`swarm.wire` in a private DescriptorPool: nothing is registered globally, so this module loads beside
either library. Field comments name the original files:

    crypto.proto (libp2p)      PublicKey, PrivateKey
    p2pd.proto (hivemind's p2pd, proto2)   PersistentConnectionRequest, CallUnaryRequest, CallUnaryResponse
    dht.proto (hivemind, proto3)           NodeInfo, FindRequest, FindResult, FindResponse
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REQUIRED, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REQUIRED, _F.LABEL_REPEATED
_BYTES, _STRING, _BOOL, _DOUBLE, _ENUM, _MESSAGE = (
    _F.TYPE_BYTES, _F.TYPE_STRING, _F.TYPE_BOOL, _F.TYPE_DOUBLE, _F.TYPE_ENUM, _F.TYPE_MESSAGE,
)
PACKAGE = "swarm.wire"


def _file(name: str, syntax: str, messages: dict, enums: dict = ()) -> descriptor_pb2.FileDescriptorProto:
    """messages: {name: [(field, number, label, type, type_name or None, oneof index or None)]}, oneofs
    named in a message's "__oneofs__" entry; enums: {name: [(value name, number)]}."""
    proto = descriptor_pb2.FileDescriptorProto(name=f"swarm/wire/{name}", package=PACKAGE, syntax=syntax)
    for enum_name, values in dict(enums).items():
        enum = proto.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for message_name, fields in messages.items():
        message = proto.message_type.add(name=message_name)
        for oneof in fields.get("__oneofs__", ()):
            message.oneof_decl.add(name=oneof)
        for field_name, number, label, kind, type_name, oneof in fields["fields"]:
            field = message.field.add(name=field_name, number=number, label=label, type=kind)
            if type_name:
                field.type_name = f".{PACKAGE}.{type_name}"
            if oneof is not None:
                field.oneof_index = oneof
    return proto


def _fields(*fields, oneofs=()) -> dict:
    return {"fields": [(*f, None) if len(f) == 5 else f for f in fields], "__oneofs__": oneofs}


_CRYPTO = _file("crypto.proto", "proto2", {
    "PublicKey": _fields(("key_type", 1, _REQUIRED, _ENUM, "KeyType"), ("data", 2, _REQUIRED, _BYTES, None)),
    "PrivateKey": _fields(("key_type", 1, _REQUIRED, _ENUM, "KeyType"), ("data", 2, _REQUIRED, _BYTES, None)),
}, {"KeyType": [("RSA", 0), ("Ed25519", 1), ("Secp256k1", 2), ("ECDSA", 3)]})

_P2PD = _file("p2pd.proto", "proto2", {
    "CallUnaryRequest": _fields(
        ("peer", 1, _REQUIRED, _BYTES, None), ("proto", 2, _REQUIRED, _STRING, None),
        ("data", 3, _REQUIRED, _BYTES, None),
    ),
    "CallUnaryResponse": _fields(
        ("response", 1, _OPTIONAL, _BYTES, None, 0), ("error", 2, _OPTIONAL, _BYTES, None, 0),
        oneofs=("result",),
    ),
    "Cancel": _fields(),
    # addUnaryHandler (2) and removeUnaryHandler (6) only travel between a client and its own daemon
    "PersistentConnectionRequest": _fields(
        ("callId", 1, _REQUIRED, _BYTES, None),
        ("callUnary", 3, _OPTIONAL, _MESSAGE, "CallUnaryRequest", 0),
        ("unaryResponse", 4, _OPTIONAL, _MESSAGE, "CallUnaryResponse", 0),
        ("cancel", 5, _OPTIONAL, _MESSAGE, "Cancel", 0),
        oneofs=("message",),
    ),
})

_DHT = _file("dht.proto", "proto3", {
    # the `auth` fields (1) stay unset, as hivemind's nodes send them without an authorizer
    "NodeInfo": _fields(("node_id", 1, _OPTIONAL, _BYTES, None)),
    "FindRequest": _fields(
        ("keys", 2, _REPEATED, _BYTES, None), ("peer", 3, _OPTIONAL, _MESSAGE, "NodeInfo"),
    ),
    "FindResult": _fields(
        ("type", 1, _OPTIONAL, _ENUM, "ResultType"), ("value", 2, _OPTIONAL, _BYTES, None),
        ("expiration_time", 3, _OPTIONAL, _DOUBLE, None), ("nearest_node_ids", 4, _REPEATED, _BYTES, None),
        ("nearest_peer_ids", 5, _REPEATED, _BYTES, None),
    ),
    "FindResponse": _fields(
        ("results", 2, _REPEATED, _MESSAGE, "FindResult"), ("peer", 3, _OPTIONAL, _MESSAGE, "NodeInfo"),
    ),
}, {"ResultType": [("NOT_FOUND", 0), ("FOUND_REGULAR", 1), ("FOUND_DICTIONARY", 2)]})

_POOL = descriptor_pool.DescriptorPool()
for _proto in (_CRYPTO, _P2PD, _DHT):
    _POOL.Add(_proto)


def _message(name: str):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


PublicKey = _message("PublicKey")
PrivateKey = _message("PrivateKey")
KEY_TYPE_RSA = 0
CallUnaryRequest = _message("CallUnaryRequest")
CallUnaryResponse = _message("CallUnaryResponse")
PersistentConnectionRequest = _message("PersistentConnectionRequest")
NodeInfo = _message("NodeInfo")
FindRequest = _message("FindRequest")
FindResult = _message("FindResult")
FindResponse = _message("FindResponse")
NOT_FOUND, FOUND_REGULAR, FOUND_DICTIONARY = 0, 1, 2
