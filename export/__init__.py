"""Offline export of the rewritten model (ONNX + manifest, TensorRT engines): not implemented yet.

Tracked as its own issue; importing this package is harmless, calling it says so.
"""
