"""Entry points of server processes: the Seldon wrapper bound to one address, the MLServer
runtime, and the front of a local endpoint."""
