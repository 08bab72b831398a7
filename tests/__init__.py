"""Test suite: unit/ (no network), integration/ (real services from scripts/services.sh)."""
