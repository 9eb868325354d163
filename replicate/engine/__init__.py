"""The tagging engine every command that tags stands on: `model_set` (a job's models, loaded once),
`onnx_models` (ONNX Runtime, no PyTorch), `fastai_models` (export.pkl) and `filters` (search
filters and the listing rule)."""
