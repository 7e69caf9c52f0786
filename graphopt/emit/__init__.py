"""Stage 4, emit: save/load (safetensors + JSON edit log) and verified ONNX export.

Imports infra, frontend and nn. The submodules are imported on use (ONNX support pulls in onnx and
onnxruntime only when an export runs).
"""
