"""Pub/Sub clients from a spec: the emulator, a private endpoint, or Google.

``endpoint`` (else ``PUBSUB_EMULATOR_HOST``) with ``anonymous_auth``, or the
emulator variable alone, talks plaintext gRPC without credentials, as the
client library does for the emulator; ``endpoint`` alone is a private
endpoint reached with the default credentials.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import grpc
    from google.api_core import exceptions as gexc
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("google.cloud.pubsub_v1", name="google.cloud.pubsub_v1") from exc

__all__ = ["gexc", "publisher", "pubsub_v1", "subscriber"]

#: Largest gRPC message the clients send or take, bytes (a pull of 1000
#: messages of up to 10 MB each is capped by the server anyway).
_MAX_MESSAGE_BYTES = 64 << 20


def _plain(spec: Any) -> str | None:
    """The host:port to reach without TLS or credentials, if any.

    ``endpoint`` may carry a scheme (``http://host:port``, the form the
    reference daemon takes): ``http://`` means plaintext, like
    ``anonymous_auth``.
    """
    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    endpoint = str(spec.endpoint or "")
    host = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
    if host and (spec.anonymous_auth or endpoint.startswith("http://") or host == emulator):
        return host
    if not host and emulator:
        return emulator
    return None


def _anonymous() -> Any:
    # google-auth leaves AnonymousCredentials' __init__ unannotated.
    return AnonymousCredentials()  # type: ignore[no-untyped-call]


def _channel(host: str) -> grpc.Channel:
    options = [
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ]
    return grpc.insecure_channel(host, options=options)


def subscriber(spec: Any) -> pubsub_v1.SubscriberClient:
    """A subscriber client for ``spec`` (a source spec)."""
    host = _plain(spec)
    if host is not None:
        transport = SubscriberGrpcTransport(
            host=host, channel=_channel(host), credentials=_anonymous()
        )
        return pubsub_v1.SubscriberClient(transport=transport)
    if spec.endpoint:
        host = str(spec.endpoint).removeprefix("https://").rstrip("/")
        return pubsub_v1.SubscriberClient(client_options={"api_endpoint": host})
    return pubsub_v1.SubscriberClient()


def publisher(spec: Any, batch: pubsub_v1.types.BatchSettings, ordered: bool) -> Any:
    """A publisher client for ``spec`` (a target spec)."""
    options = pubsub_v1.types.PublisherOptions(enable_message_ordering=ordered)
    host = _plain(spec)
    kwargs: dict[str, Any] = {}
    if host is not None:
        kwargs["transport"] = PublisherGrpcTransport(
            host=host, channel=_channel(host), credentials=_anonymous()
        )
    elif spec.endpoint:
        host = str(spec.endpoint).removeprefix("https://").rstrip("/")
        kwargs["client_options"] = {"api_endpoint": host}
    return pubsub_v1.PublisherClient(batch, options, **kwargs)
