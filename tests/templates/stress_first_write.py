"""Two processes write first into a new embedded template store at the same moment, many times over.

Usage: ``python tests/templates/stress_first_write.py ITERATIONS [FOLDER]``

Two worker processes (forked once, kept for every iteration) meet at a barrier, then both open the same store
path, which does not exist yet, for writing, list its ids and add their documents as an import does (two ids
of their own, two shared with the other worker). Afterwards every store must hold each of its six ids exactly
once and open for reading. Prints ``PASSED of ITERATIONS passed`` and exits 0 when every iteration passed,
else names the failures and exits 1.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
from pathlib import Path

from pymatgen.core import Lattice, Structure

from cspml_flows.templates.store import TemplateStore

WORKERS = ("a", "b")


def documents(who: str) -> list[dict]:
    """Template-shaped documents (id, formula, structure) of worker ``who``: two its own, two shared."""
    s = Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).as_dict()
    ids = [f"{who}-0", f"{who}-1", "shared-0", "shared-1"]
    return [{"material_id": mid, "formula": "CsCl", "anonymous_formula": "AB", "structure": s} for mid in ids]


def worker(who: str, root: str, iterations: int, barrier, failures) -> None:
    docs = documents(who)
    for i in range(iterations):
        try:
            barrier.wait(timeout=120)
        except Exception:  # the other worker is gone: nothing left to race against
            failures.put((i, who, "barrier broken"))
            return
        try:
            ts = TemplateStore.open(Path(root) / f"store-{i}")
            existing = ts.ids()
            ts.add([d for d in docs if d["material_id"] not in existing], assume_new=True)
            ts.close()
        except Exception as exc:
            failures.put((i, who, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def check_store(path: Path) -> str | None:
    """Why the store at ``path`` is wrong, or None."""
    try:
        ts = TemplateStore.open(path, create=False)
        ids = [d["material_id"] for d in ts.docs(properties=["material_id"])]
        ts.close()
    except Exception as exc:
        return f"cannot read: {type(exc).__name__}: {exc}"
    expected = {f"{w}-{k}" for w in WORKERS for k in range(2)} | {"shared-0", "shared-1"}
    if sorted(ids) != sorted(expected):
        return f"ids {sorted(ids)}"
    return None


def run(iterations: int, root: Path) -> tuple[int, list[str]]:
    """Passed iterations and one line per failure."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(WORKERS))
    failures = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(w, str(root), iterations, barrier, failures)) for w in WORKERS]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad: dict[int, list[str]] = {}
    while not failures.empty():
        i, who, why = failures.get()
        bad.setdefault(i, []).append(f"worker {who}: {why}")
    for p, who in zip(procs, WORKERS, strict=True):
        if p.exitcode != 0:
            bad.setdefault(-1, []).append(f"worker {who} exited with {p.exitcode}")
    for i in range(iterations):
        why = check_store(root / f"store-{i}")
        if why:
            bad.setdefault(i, []).append(why)
    lines = [f"iteration {i}: {'; '.join(why)}" for i, why in sorted(bad.items())]
    return iterations - len([i for i in bad if i >= 0]), lines


def main(argv: list[str]) -> int:
    iterations = int(argv[0]) if argv else 200
    with tempfile.TemporaryDirectory(prefix="stress-first-write-") as tmp:
        root = Path(argv[1]) if len(argv) > 1 else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        passed, lines = run(iterations, root)
    for line in lines:
        print(line)
    print(f"{passed} of {iterations} passed")
    return 0 if passed == iterations and not lines else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
