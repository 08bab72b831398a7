"""Where object-store files live: a local folder or an S3 bucket.

A :class:`Store` lists the files under a prefix (sorted by key, optionally
only the keys after a given one: S3 ``StartAfter``) and opens one for
random-access reads (``pyarrow.fs``: a range request per read on S3, so a
file is streamed, never downloaded whole). Keys are ``/``-separated paths
below the store's root (the local ``path`` or the bucket).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.fs as pafs

from sluice.errors import ConnectorError, TransientError


@dataclass(frozen=True, slots=True)
class Entry:
    """One listed file: its key, size in bytes and modification time (µs since the epoch)."""

    key: str
    size: int
    mtime_us: int


class Store(Protocol):
    """A folder or bucket holding files."""

    #: ``file:///abs/root`` or ``s3://bucket``: names the store in messages and
    #: in the source's position file name.
    url: str
    #: Whether :meth:`list` with ``after`` lists only the keys after it (S3):
    #: else every listing is whole.
    incremental: bool

    def check(self, prefix: str) -> None:
        """Raise :class:`ConnectorError` when the folder / bucket does not exist."""

    def list(self, prefix: str, after: str | None) -> list[Entry]:
        """The files under ``prefix`` (keys after ``after`` when given), sorted by key."""

    def open(self, key: str) -> pa.NativeFile:
        """A random-access reader of ``key``."""


def _skipped(key: str) -> bool:
    """Hidden and temporary files (``.name``, ``_name``, under ``_delta_log/`` ...)."""
    return any(part.startswith((".", "_")) for part in key.split("/"))


class LocalStore:
    """Files under a local folder (``path``, made absolute once, at build time)."""

    incremental = False

    def __init__(self, root: str) -> None:
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()
        self._fs = pafs.LocalFileSystem()

    def check(self, prefix: str) -> None:
        """The root, and the prefix as a folder below it, must exist."""
        folder = self.root / prefix if prefix else self.root
        if not folder.is_dir():
            raise ConnectorError(
                f"object_store_local: folder {folder} does not exist (path = "
                f"{str(self.root)!r}, source_query = {prefix!r}; a relative path is "
                f"resolved from the working directory {os.getcwd()})"
            )

    def list(self, prefix: str, after: str | None) -> list[Entry]:
        """Walk the prefix folder (a local listing is always whole)."""
        folder = self.root / prefix if prefix else self.root
        out: list[Entry] = []

        def failed(exc: OSError) -> None:
            # A folder that cannot be listed must not look empty: its files'
            # positions would be forgotten (a folder removed meanwhile is fine).
            if not isinstance(exc, FileNotFoundError):
                raise TransientError(f"object_store_local: listing {folder}: {exc}") from exc

        for dirpath, dirnames, filenames in os.walk(folder, onerror=failed):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
            base = Path(dirpath)
            for name in filenames:
                if name.startswith((".", "_")):
                    continue
                path = base / name
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed since the walk saw it
                    continue
                key = path.relative_to(self.root).as_posix()
                out.append(Entry(key, st.st_size, st.st_mtime_ns // 1000))
        out.sort(key=lambda e: e.key)
        return out

    def open(self, key: str) -> pa.NativeFile:
        """The file, for random-access reads."""
        return self._fs.open_input_file(str(self.root / key))


class S3Store:
    """Objects in an S3 bucket: listed with boto3 (``StartAfter``), read with ``pyarrow.fs``."""

    incremental = True

    def __init__(self, spec: Any) -> None:
        try:
            import boto3
        except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
            raise ModuleNotFoundError("boto3", name="boto3") from exc
        self.bucket: str = spec.bucket
        self.url = f"s3://{self.bucket}"
        self._client = boto3.client(
            "s3",
            endpoint_url=spec.endpoint,
            region_name=spec.region,
            aws_access_key_id=spec.access_key_id,
            aws_secret_access_key=spec.secret_access_key,
        )
        kwargs: dict[str, Any] = {}
        if spec.endpoint:
            kwargs["endpoint_override"] = spec.endpoint
        if spec.region:
            kwargs["region"] = spec.region
        if spec.access_key_id:
            kwargs["access_key"] = spec.access_key_id
            kwargs["secret_key"] = spec.secret_access_key or ""
        self._fs = pafs.S3FileSystem(**kwargs)

    def check(self, prefix: str) -> None:
        """The bucket must exist (a prefix with no objects yet is fine)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise ConnectorError(
                    f"object_store_s3: bucket {self.bucket!r} does not exist"
                ) from exc
            raise ConnectorError(f"object_store_s3: bucket {self.bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise TransientError(f"object_store_s3: {exc}") from exc

    def list(self, prefix: str, after: str | None) -> list[Entry]:
        """``ListObjectsV2`` pages under ``prefix``, after ``after`` when given."""
        from botocore.exceptions import BotoCoreError, ClientError

        out: list[Entry] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if after:
            kwargs["StartAfter"] = after
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", ()):
                    key = str(obj["Key"])
                    if key.endswith("/") or _skipped(key[len(prefix) :]):
                        continue
                    mtime_us = int(obj["LastModified"].timestamp() * 1_000_000)
                    out.append(Entry(key, int(obj["Size"]), mtime_us))
        except (BotoCoreError, ClientError) as exc:
            raise TransientError(f"object_store_s3: listing {self.url}/{prefix}: {exc}") from exc
        return out  # S3 lists in key (UTF-8 byte) order

    def open(self, key: str) -> pa.NativeFile:
        """The object, for ranged reads."""
        return self._fs.open_input_file(f"{self.bucket}/{key}")
