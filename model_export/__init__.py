"""Export stage: a trained PyTorch ResNet → a verified ONNX model package for `resnet-serve`."""
