"""fedlora aggregator: rounds, LoRA-aware aggregation strategies, MQTT, metrics, Kubernetes."""
