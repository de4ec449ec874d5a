"""spynet (placeholder: being written)."""
