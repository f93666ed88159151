"""``edgefl bench``: run a benchmark script of the source checkout (``benchmarks/``)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = {"kernels": "bench_kernels.py", "federated": "bench_federated.py",
              "own-model": "bench_own_model.py"}


def run_bench(argv, benchmarks_dir: Path | None = None) -> int:
    """Run a benchmark script of the source checkout (``benchmarks/`` next to the package)."""
    suite = "kernels"
    if argv and argv[0] in BENCHMARKS:
        suite, argv = argv[0], argv[1:]
    if benchmarks_dir is None:
        benchmarks_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    script = benchmarks_dir / BENCHMARKS[suite]
    if not script.is_file():
        print(
            f"edgefl bench: the benchmarks ship with edgefl's source, not with the installed "
            f"package; in a source checkout run `edgefl bench {suite}` or "
            f"`python benchmarks/{BENCHMARKS[suite]}`",
            file=sys.stderr,
        )
        return 2
    spec = importlib.util.spec_from_file_location(f"edgefl_bench_{suite}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))  # the benchmarks import their shared harness
    spec.loader.exec_module(module)
    sys.argv[0] = f"edgefl bench {suite}"  # argparse names the program in usage lines after it
    return module.main(argv) or 0
