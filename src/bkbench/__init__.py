"""bkbench: train and compare language models on WikiText-2, honestly.

Library entry points (the CLI ``bkbench`` is a thin layer over these)::

    from bkbench import BenchmarkConfig, WikiText2Benchmark
    config = BenchmarkConfig(model_name="transformer_baseline", split_scheme="proxy",
                             data_dir="../shared/data/wikitext-2").validate()
    results = WikiText2Benchmark("benchmark_results/wikitext2").run_benchmark(config)
"""

__version__ = "0.1.0"

from .benchmark import WikiText2Benchmark  # noqa: E402
from .config import BenchmarkConfig  # noqa: E402
from .results import BenchmarkResults  # noqa: E402

__all__ = ["WikiText2Benchmark", "BenchmarkConfig", "BenchmarkResults", "__version__"]
