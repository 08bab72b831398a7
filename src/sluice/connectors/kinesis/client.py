"""A boto3 Kinesis client from a spec (endpoint, region, credentials)."""

from __future__ import annotations

from typing import Any

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("boto3", name="boto3") from exc

__all__ = ["BotoCoreError", "ClientError", "code", "kinesis"]

#: Error codes worth retrying: throttling and the service catching its breath.
RETRYABLE = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "ThrottlingException",
        "InternalFailure",
        "ServiceUnavailable",
        "KMSThrottlingException",
    }
)


def kinesis(spec: Any) -> Any:
    """A Kinesis client. botocore's own retries are off: sluice backs off
    per shard (source) or per failed record (target) itself."""
    kwargs: dict[str, Any] = {
        "config": Config(
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        )
    }
    if spec.region:
        kwargs["region_name"] = spec.region
    if spec.endpoint:
        kwargs["endpoint_url"] = spec.endpoint
        kwargs.setdefault("region_name", "us-east-1")
    if spec.access_key_id:
        kwargs["aws_access_key_id"] = spec.access_key_id
        kwargs["aws_secret_access_key"] = spec.secret_access_key
    return boto3.session.Session().client("kinesis", **kwargs)


def code(exc: BaseException) -> str:
    """The AWS error code of ``exc`` ('' for a non-AWS error)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""
