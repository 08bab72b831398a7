"""sql connector."""
