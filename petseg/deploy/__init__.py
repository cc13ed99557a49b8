"""Deployment: model server processes on this machine, endpoints and their releases, Kubernetes
objects with canaries, promotion and rollback, and the client of a served model."""
