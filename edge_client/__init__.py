"""fedlora edge client: the device runtime. It trains LoRA adapters with ONNX Runtime's
on-device training API and runs the device loop; it also builds and installs the flashable
bundle. It must run on a device with only onnxruntime-training-cpu, numpy, paho-mqtt and
tokenizers installed, and imports only ``core`` (the wire format, codecs, transport, manifest
and config it shares with the aggregator and the exporter) besides those.
"""

__version__ = "0.1.0"
