"""What the SQL lookup loaders share: quoting a (schema, table) name."""

from __future__ import annotations


def qualified(schema: str | None, table: str, quote: str = '"') -> str:
    """``"schema"."table"`` (or ``"table"``), each part quoted with ``quote``."""

    def q(name: str) -> str:
        return quote + name.replace(quote, quote * 2) + quote

    return f"{q(schema)}.{q(table)}" if schema else q(table)
