"""`phi3-onnx serve`: a local OpenAI-compatible HTTP server over `phi3_onnx.runtime` (the [serve] extra).

Modules: options (ServeOptions), schemas (pydantic request bodies), errors (OpenAI-style error JSON),
service (requests -> runtime generation, batched through runtime.batch), app (FastAPI routes),
server (uvicorn with a graceful SIGINT/SIGTERM drain).
"""
