"""What the stages' snapshot formats share: one way to write an Arrow IPC stream."""

from __future__ import annotations

import pyarrow as pa


def ipc_stream(table: pa.Table) -> bytes:
    """``table`` as one Arrow IPC stream, one record batch per chunk, its buffers
    zstd-compressed when this pyarrow has the codec (a reader needs it then too)."""
    codec = "zstd" if pa.Codec.is_available("zstd") else None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(
        sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=codec)
    ) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())
