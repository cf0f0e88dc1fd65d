"""Deployable students: export to TorchScript/ONNX and restoration of a folder of images."""
