"""The OpenAI-compatible HTTP server (`qserve serve`): FastAPI handlers over an engine thread.

app.py (routes, auth, body limits, errors) -> serving.py (OpenAI request -> engine requests -> JSON/SSE)
-> engine_thread.py (the LLMEngine in its own thread); protocol.py holds the request bodies and the
error format, metrics.py the Prometheus exposition, launch.py the start-up (sizing, plan, uvicorn, SIGTERM).
"""
