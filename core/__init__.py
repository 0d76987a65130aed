"""The shared core of fedlora: what the device, the aggregator, the exporter and the simulator
all speak. Wire messages and topics (``messages``), the envelope, chunks and reassembly
(``protocol``), tensor codecs (``codecs``), the MQTT transport (``transport``), bundles and
manifests (``bundle``), LoRA naming and rank shapes (``lora``), per-sender limits and refusal
counting (``guard``), errors (``errors``) and config loading (``config``).

It ships to devices: it imports only the standard library, numpy and paho-mqtt (pyyaml and
zstandard where present), and nothing of ``edge_client``, ``server`` or ``export``.
"""
