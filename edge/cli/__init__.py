"""The `edge` command."""
