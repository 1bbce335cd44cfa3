"""OpenAI-compatible serving (`pip install moelm[serve]`): request schemas, the FastAPI app, Prometheus metrics.

`moelm serve --model DIR` runs it; `create_app(generator, ServerConfig(...))` builds the app for embedding.
"""
