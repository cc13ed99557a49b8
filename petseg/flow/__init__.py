"""Step glue: the work of each step of flows/seg_flow.py over explicit values, and the decorators that
record every step; the only library code that reads Metaflow's settings and the environment."""
