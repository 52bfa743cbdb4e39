"""Embedding models: ImageNet backbones, global pooling, and the ONNX export of the served embedder.

Needs torch (the `train` extra); serving only needs the exported ONNX model and its meta.json.
"""
