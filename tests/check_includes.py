"""check_includes.py: the include graph between modules has no circles.

A module is a .c file with its header; a header with no .c of its own
(model_impl.h, store_open.h) belongs to the module whose name it extends.
Prints each cycle found; exit 1 if any. Run from the repository root."""
import glob
import os
import re
import sys

FOLDERS = ["kernels", "engine", "api", "server"]


def module_of(path, sources):
    base = os.path.splitext(os.path.basename(path))[0]
    if base in sources:
        return base
    parts = base.split("_")
    for k in range(len(parts) - 1, 0, -1):
        if "_".join(parts[:k]) in sources:
            return "_".join(parts[:k])
    return base


def main():
    files = [f for d in FOLDERS for f in glob.glob(d + "/**/*.[ch]", recursive=True)]
    sources = {os.path.splitext(os.path.basename(f))[0] for f in files if f.endswith(".c")}
    headers = {os.path.splitext(os.path.basename(f))[0]: f for f in files if f.endswith(".h")}
    graph = {}
    for f in files:
        m = module_of(f, sources)
        for inc in re.findall(r'#include "(?:\.\./)*([A-Za-z0-9_/]+)\.h"', open(f).read()):
            name = os.path.basename(inc)
            if name not in headers:
                continue
            dep = module_of(headers[name], sources)
            if dep != m:
                graph.setdefault(m, set()).add(dep)
    cycles, index, low, stack, on = [], {}, {}, [], set()
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    for c in cycles:
        print("include cycle between modules: " + " <-> ".join(c))
    print("includes: %d passed, %d failed" % (0 if cycles else 1, 1 if cycles else 0))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
