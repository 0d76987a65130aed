"""fedlora edge client: trains LoRA adapters with ONNX Runtime's on-device training API.

This package is the leaf of the dependency graph: it must run on a device with only
onnxruntime-training-cpu, numpy, paho-mqtt and tokenizers installed. The wire format,
the artifact manifest and the update codecs live here so the aggregator and the exporter
share them with the device.
"""

__version__ = "0.1.0"
