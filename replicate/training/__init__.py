"""Training and what reads a trained run: `dataloaders`, `features` (`--cache-features`), `train`
(`replicate run`), `export` (model.onnx, int8), `interpretation` (`interpret`, `review`),
`compare` (the grid) and `demo`."""
