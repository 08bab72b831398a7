"""Operator state and source positions: the StateStore protocol and its implementations."""
