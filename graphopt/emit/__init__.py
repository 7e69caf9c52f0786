"""Stage 4, emit: save/load (safetensors + JSON edit log), verified ONNX export, and HF checkpoints
(``save_pretrained`` that refuses what plain transformers could not load).

Imports infra, analysis, frontend and nn. The submodules are imported on use (ONNX support pulls in
onnx and onnxruntime only when an export runs).
"""
