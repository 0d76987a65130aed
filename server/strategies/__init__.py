"""LoRA-aware aggregation strategies: one module per method, one interface (``base.Strategy``)."""
