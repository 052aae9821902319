"""Layer 3: the agent (kernel sync, control API) and its client."""
