"""Build-host side of fedlora: Hugging Face model + peft LoRA -> ONNX -> ORT training artifacts."""
