"""The end-to-end benchmark (``citypulse bench``): throughput, latency, CPU, ceilings.

Public names::

    from deploy.bench import BenchOptions, Mode, run_bench, generate_rules, BenchError
    results = run_bench(BenchOptions(sensors=10_000, rules=200, duration_s=30))

See ``deploy/bench/README.md`` for the method and the latest figures.
"""

from deploy.bench._load import Mode, Template, templates_for
from deploy.bench._rules import MARKER_RULE, generate_rules, probe_sensors
from deploy.bench._run import BenchError, BenchOptions, run_bench

__all__ = [
    "MARKER_RULE",
    "BenchError",
    "BenchOptions",
    "Mode",
    "Template",
    "generate_rules",
    "probe_sensors",
    "run_bench",
    "templates_for",
]
