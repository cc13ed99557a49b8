"""Runs and lineage: past runs through the Metaflow Client, the lineage graph, its Pachyderm mirror,
OpenLineage events, and the proof of a run or release."""
