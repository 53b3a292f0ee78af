"""Features: durable multi-step workflows that compose the product's other resources (docs/features.md).

`kinds.py` holds the step types as the manifest checks them, `plan.py` compiles a feature at apply time. Import from
the modules."""
