"""gamguard exporter: the torch side (demo model, garbage class, fused Grad-CAM ONNX export).

Importing this package requires the ``[export]`` extra (torch, onnx, onnxscript).
"""
