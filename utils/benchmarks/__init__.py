"""Benchmarks: one `Benchmark` class per task, registered by name, all run by `run_benchmark`.

Adding a benchmark = a class in this package + one entry here + a YAML file in data/eval_configs/.
"""

from utils.benchmarks.base import Benchmark, run_benchmark
from utils.benchmarks.alpaca_eval import AlpacaEvalBenchmark
from utils.benchmarks.gsm8k import GSM8KBenchmark
from utils.benchmarks.math import MathBenchmark
from utils.benchmarks.mmlu import MMLUBenchmark
from utils.benchmarks.sst import SSTBenchmark

REGISTRY: dict[str, type[Benchmark]] = {
    "math": MathBenchmark,
    "gsm8k": GSM8KBenchmark,
    "mmlu": MMLUBenchmark,
    "sst": SSTBenchmark,
    "alpaca_eval": AlpacaEvalBenchmark,
}

__all__ = ["REGISTRY", "Benchmark", "MathBenchmark", "run_benchmark"]
