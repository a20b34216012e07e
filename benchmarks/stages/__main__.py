"""``python -m benchmarks.stages NAME --context FILE --result FILE``: one stage in this process."""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
from pathlib import Path

from benchmarks.stages import stage_function


def own_peak_mb() -> float | None:
    """Peak resident size of this process (VmHWM, counted since its exec) and of the children it waited for
    (they are forks of it), in MB. A child's ``ru_maxrss`` seen from the parent would also count the
    parent's size at the fork that started it, which is why each stage measures itself."""
    peak = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        peak = int(line.split()[1]) / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return max(peak or 0.0, children) or None


def stage_main(name: str, ctx_file: Path, result_file: Path) -> int:
    """Run the stage, write its result (with this process's peak resident size)."""
    ctx = json.loads(ctx_file.read_text())
    fn, ctx["imports_s"] = stage_function(name)
    result = fn(ctx) | {"peak_rss_mb": own_peak_mb()}
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(result_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the stage process's arguments and run the stage."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__)
    p.add_argument("name", help="the stage")
    p.add_argument("--context", type=Path, required=True, help="the run's context (JSON)")
    p.add_argument("--result", type=Path, required=True, help="where the stage's result goes (JSON)")
    args = p.parse_args(argv)
    return stage_main(args.name, args.context, args.result)


sys.exit(main())
