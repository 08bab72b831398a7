"""mysql connector."""
