"""Serving: the cloud app, batching, Ray Serve, and the services as child processes."""
