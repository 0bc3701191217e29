"""bkbench: train and compare language models on WikiText-2, honestly.

Library entry points (the CLI ``bkbench`` is a thin layer over these)::

    from bkbench import BenchmarkConfig, WikiText2Benchmark
    config = BenchmarkConfig.from_preset("default", model_name="transformer_baseline",
                                         split_scheme="proxy", data_dir="DIR")
    results = WikiText2Benchmark("benchmark_results/notebook").run_benchmark(config)

The documentation is in the project's ``docs/`` folder.
"""

__version__ = "0.1.0"

__all__ = ["WikiText2Benchmark", "BenchmarkConfig", "BenchmarkResults", "__version__"]

# imported on first use, so that the command line starts without loading torch
_LAZY = {"WikiText2Benchmark": ".benchmark", "BenchmarkConfig": ".config",
         "BenchmarkResults": ".results"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
