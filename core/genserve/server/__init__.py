"""genserve's HTTP server: TGI's routes and the OpenAI-compatible ones on FastAPI.

``genserve.server.app.create_app(state)`` builds the app; ``genserve.server.state.ServerState``
owns the engine, limits and metrics. Nothing here reaches into the scheduler: requests go in
through ``AsyncEngine.generate``.
"""
