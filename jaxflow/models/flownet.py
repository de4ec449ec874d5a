"""flownet (placeholder: being written)."""
