"""postgres connector."""
