"""Sources and targets, one module per system, found by ``kind`` through the registry."""
