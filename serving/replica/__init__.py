"""One replica: the server object with its RPC methods, the Serve app, auth, health, metrics, prompt administration and task similarity."""
