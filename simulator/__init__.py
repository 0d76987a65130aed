"""The simulator: a whole federated job on one machine (``fedlora simulate``).

``run`` (the job: bundle, data split, embedded broker, the aggregator's own loop, device
processes), ``datasets`` (built-in and CSV/JSONL data sets, partitions), ``report`` (report,
metrics and plots), ``broker`` (the embedded MQTT broker), ``cli`` (the command line).
"""
