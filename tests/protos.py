"""Protobuf message classes for the tests' producers, built without protoc.

The file below is what this ``.proto`` compiles to::

    syntax = "proto3";
    package sluice.test;
    import "google/protobuf/timestamp.proto";
    import "google/protobuf/wrappers.proto";

    message Order {
      enum Status { NEW = 0; PAID = 1; }
      int64 id = 1;
      string name = 2;
      google.protobuf.Timestamp ts = 3;
      google.protobuf.Int64Value qty = 4;
      Status status = 5;
      repeated string tags = 6;
      Address addr = 7;
      optional string note = 8;
      map<string, int64> attrs = 9;
    }
    message Envelope {
      message Inner { int64 id = 1; string what = 2; }   // message index [1, 0]
      Inner inner = 1;
    }
    message Address { string city = 1; }

confluent-kafka's ``ProtobufSerializer`` takes these classes and registers
the file (and so the consumer side, sluice, sees only the registry's schema).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import (  # noqa: F401 - into the default pool
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    timestamp_pb2,
    wrappers_pb2,
)

F = descriptor_pb2.FieldDescriptorProto


def _field(
    name: str,
    number: int,
    kind: int,
    type_name: str = "",
    repeated: bool = False,
    proto3_optional: bool = False,
) -> F:
    f = F(name=name, number=number, type=kind)  # type: ignore[arg-type]
    f.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
    if type_name:
        f.type_name = type_name
    if proto3_optional:
        f.proto3_optional = True
    return f


def _file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(
        name="sluice_test_orders.proto", package="sluice.test", syntax="proto3"
    )
    fd.dependency.extend(["google/protobuf/timestamp.proto", "google/protobuf/wrappers.proto"])
    order = fd.message_type.add(name="Order")
    status = order.enum_type.add(name="Status")
    status.value.add(name="NEW", number=0)
    status.value.add(name="PAID", number=1)
    entry = order.nested_type.add(name="AttrsEntry")
    entry.options.map_entry = True
    entry.field.extend([_field("key", 1, F.TYPE_STRING), _field("value", 2, F.TYPE_INT64)])
    order.field.extend(
        [
            _field("id", 1, F.TYPE_INT64),
            _field("name", 2, F.TYPE_STRING),
            _field("ts", 3, F.TYPE_MESSAGE, ".google.protobuf.Timestamp"),
            _field("qty", 4, F.TYPE_MESSAGE, ".google.protobuf.Int64Value"),
            _field("status", 5, F.TYPE_ENUM, ".sluice.test.Order.Status"),
            _field("tags", 6, F.TYPE_STRING, repeated=True),
            _field("addr", 7, F.TYPE_MESSAGE, ".sluice.test.Address"),
            _field("note", 8, F.TYPE_STRING, proto3_optional=True),
            _field("attrs", 9, F.TYPE_MESSAGE, ".sluice.test.Order.AttrsEntry", repeated=True),
        ]
    )
    order.oneof_decl.add(name="_note")
    order.field[7].oneof_index = 0
    envelope = fd.message_type.add(name="Envelope")
    inner = envelope.nested_type.add(name="Inner")
    inner.field.extend([_field("id", 1, F.TYPE_INT64), _field("what", 2, F.TYPE_STRING)])
    envelope.field.append(_field("inner", 1, F.TYPE_MESSAGE, ".sluice.test.Envelope.Inner"))
    address = fd.message_type.add(name="Address")
    address.field.append(_field("city", 1, F.TYPE_STRING))
    return fd


def _classes() -> dict[str, Any]:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("sluice_test_orders.proto")
    except KeyError:
        pool.Add(_file())
    names = ("Order", "Envelope", "Envelope.Inner", "Address")
    return {
        n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"sluice.test.{n}"))
        for n in names
    }


CLASSES = _classes()
Order = CLASSES["Order"]
Envelope = CLASSES["Envelope"]
Inner = CLASSES["Envelope.Inner"]
Address = CLASSES["Address"]
