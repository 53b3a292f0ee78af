"""Actions: third-party HTTP calls described by a product's manifest.

`plan` compiles a manifest's actions and auths once, when the manifest is validated (the registry keeps the plan on
each resolved version); `contract` checks a caller's input against the action's declared fields (sessions check
their data with it too); `executor` runs one call of an action with that plan: `call` holds the call's values
(what the caller asks, what it gets, the state threaded through the steps), `request` builds the HTTP request from
the plan and the rendered templates, `auth` gives the auths' values (minting credential tokens), `idempotent` runs
the calls that carry an idempotency key; `cache` keeps the results a call names by its `cache` tag. Import from
those modules: this package re-exports nothing, so that the registry can import the plan without importing the
executor (which imports the registry).
"""
