"""Tagging photos in a batch: `predict` (tag tables, per photo and listing) and `bundle` (runs on one
body -> one ONNX file)."""
