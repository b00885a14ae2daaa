"""The HTTP API (FastAPI): one router per area under `routes`, dependencies in `deps`, bodies in `schemas`."""
