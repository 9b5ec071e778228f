"""Run a Python module or script under yappi's CPU clock, every thread, and write where the CPU
went.

``python bench/cpu_profile.py OUT.txt -m candlekeep stream ...`` (or ``OUT.txt SCRIPT ARGS``):
bench/peers.py's ``--profile`` runs every system this way (candlekeep's writers are threads,
which cProfile does not see).
OUT.txt gets the functions by own CPU time and by CPU time including callees; OUT.pstats the
whole profile for ``python -m pstats``. Needs ``pip install yappi`` (not a dependency).
"""

from __future__ import annotations

import atexit
import io
import runpy
import sys


def main() -> None:
    import yappi

    out, *rest = sys.argv[1:]
    if rest[0] == "-m":
        module, *args = rest[1:]
    else:
        module, args = None, rest[1:]
    yappi.set_clock_type("cpu")
    yappi.start(builtins=True, profile_threads=True)

    def dump() -> None:
        yappi.stop()
        stats = yappi.get_func_stats()
        stats.save(out.removesuffix(".txt") + ".pstats", type="pstat")
        text = io.StringIO()
        for sort in ("tsub", "ttot"):
            text.write(f"== by {sort} (CPU seconds)\n")
            for s in stats.sort(sort)[:45]:
                text.write(f"{s.tsub:8.3f} {s.ttot:8.3f} {s.ncall:>10} {s.module}:{s.name}\n")
        threads = yappi.get_thread_stats()
        text.write("== threads\n")
        for t in threads:
            text.write(f"{t.ttot:8.3f} {t.name} {t.id}\n")
        with open(out, "w", encoding="utf-8") as handle:
            handle.write(text.getvalue())

    atexit.register(dump)
    if module is not None:
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [rest[0], *args]
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
