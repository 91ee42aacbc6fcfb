"""The request path, one module per stage: request view, routing, forward, relay."""
