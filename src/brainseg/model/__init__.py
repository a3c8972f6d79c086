"""The network and its files: the UNet, checkpoints, ONNX files, model cards, the Hub."""
