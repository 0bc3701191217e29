"""Child-process entry point of one isolated run (``WikiText2Benchmark.run_all(isolate=True)``).

    python -m bkbench.worker '{"config": {...}, "output_dir": "...", "resume": false,
                               "overwrite": false, "progress": true, "progress_interval": 30}'

Exit codes as the CLI's: 0 done, 1 diverged, 2 bad input, 128+N interrupted by signal N.
"""

import json
import logging
import sys

from .benchmark import WikiText2Benchmark
from .cli import failure_exit_code
from .config import BenchmarkConfig
from .progress import CommandProgress
from .threads import ThreadPolicy
from .runlock import die_with_parent


def main(payload: str) -> int:
    request = json.loads(payload)
    if "parent_pid" in request:
        die_with_parent(request["parent_pid"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bench = WikiText2Benchmark(request["output_dir"], progress=request["progress"],
                               progress_interval=request.get("progress_interval", 30.0))
    command, policy = request.get("command"), request.get("thread_policy")
    try:
        config = BenchmarkConfig.from_dict(request["config"]).validate()
        bench.run_benchmark(config, resume=request["resume"],
                            overwrite=request.get("overwrite", False),
                            command=CommandProgress(**command) if command else None,
                            thread_policy=ThreadPolicy(**policy) if policy else None)
    except KeyboardInterrupt:  # Ctrl-C outside training (which checkpoints): no traceback
        print("bkbench: interrupted", file=sys.stderr)
        return 128 + 2
    except Exception as exc:
        code = failure_exit_code(exc)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
