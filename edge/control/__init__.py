"""The control plane: keys in Redis, the admin API and the dashboard."""
