"""delta connector."""
