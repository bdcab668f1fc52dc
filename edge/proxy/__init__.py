"""The data plane: the /v1 handler and everything one request needs."""
