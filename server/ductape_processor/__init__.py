"""The Ductape processor: a gRPC service that runs a product's resources for callers in any language."""

__version__ = "0.1.0"
