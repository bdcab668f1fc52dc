"""Redis: the clients, the request path's own client, the Lua scripts."""
