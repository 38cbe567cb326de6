"""pykimi's OpenAI-compatible HTTP server (``pykimi serve``): a thin layer over :mod:`pykimi.engine`.

``pykimi.server.app.create_app(model, processor, engine, ...)`` makes the ASGI app (FastAPI; the optional
``serve`` extra). The static page in ``static/`` (when present) is served at ``/``, and
``pykimi.server.inspector.register(app, ctx)`` (when the module exists) adds its routes.
"""
