"""Stages between sources and targets: sql, window, join, cdc."""
