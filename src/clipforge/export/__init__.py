"""Deployment exports of a CLIP model: ONNX graphs of both towers (:mod:`clipforge.export.onnx`) and the
onnxruntime model that runs them (:mod:`clipforge.export.runtime`). Import the submodules: this ``__init__``
imports nothing, so the encode layer can import the runtime without the exporter (which imports it)."""
