"""pwcnet (placeholder: being written)."""
