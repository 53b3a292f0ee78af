"""The engine: product model, registry and, later, one executor per resource kind."""
