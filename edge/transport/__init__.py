"""The HTTP transport: edge's server protocol and its upstream client."""
