"""`replicate serve`: `server` (uvicorn, draining), `app` (routes), `gate` (token, limits,
metrics), `uploads` (checks before decoding), `answers` (JSON) and `batching`."""
