"""Product manifests and their versions: `manifest` (the typed model), `loader` (bytes to a validated model, off the
event loop when large), `registry` (applied versions, environment pins, the resolved product), `durations`.

Import from those modules: this package re-exports nothing, so that importing the model does not import the registry
(which imports what compiles the model).
"""
