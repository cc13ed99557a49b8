"""The flow-overhead benchmark's plain script calls today's stage functions (it compares the flow with them).

Only that it runs and times every stage is checked here: its figures belong in docs/PERFORMANCE.md.
"""

import argparse
import importlib.util

from harness import REPO


def test_the_plain_script_of_the_overhead_benchmark_runs_every_stage():
    spec = importlib.util.spec_from_file_location("flow_overhead", REPO / "bench" / "flow_overhead.py")
    flow_overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow_overhead)
    work = argparse.Namespace(source="synth:48", seed=42, trials=1, tune_epochs=1, epochs=1)
    result = flow_overhead.run_plain(work)
    assert set(result["stages"]) == {"ingest", "transform", "trial", "tune", "train", "calibrate", "evaluate"}
    assert result["wall"] <= result["process_wall"]
