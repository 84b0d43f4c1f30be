"""Sum cubecl's per-kernel profile log into kernel families, for the profile tables in BENCHMARKS.md.

    python3 scripts/profile_summary.py prof.log STEPS > profile.json

`prof.log` is what cubecl writes with `[profiling.logger] level = "basic"` and a `file` in a
`cubecl.toml` in the working directory of the run: one `| 1.23ms | KernelName | ...` line per
launch. Launch counts and times are divided by STEPS (the steps the run took). cubecl times each
launch on its own, so the times overlap and sum to more than the wall time: read the shares and
the launch counts.
"""
import re, sys, json, collections
path, steps = sys.argv[1], int(sys.argv[2])
unit = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
pat = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+)$")
by_name = collections.defaultdict(lambda: [0.0, 0])
for line in open(path, errors="replace"):
    m = pat.match(line.strip())
    if not m:
        continue
    name = m.group(3).strip()
    by_name[name][0] += float(m.group(1)) * unit[m.group(2)]
    by_name[name][1] += 1
def cat(n):
    l = n.lower()
    for key, c in [("ssd", "ssd"), ("conv", "conv"), ("selective", "selective scan"), ("matmul", "matmul"),
                   ("gemm", "matmul"), ("mma", "matmul"), ("reduce", "reduce (norms, sums, softmax)"),
                   ("sum", "reduce (norms, sums, softmax)"), ("mean", "reduce (norms, sums, softmax)"),
                   ("argmax", "reduce (norms, sums, softmax)"), ("cast", "cast"), ("gather", "gather/select/scatter"),
                   ("select", "gather/select/scatter"), ("scatter", "gather/select/scatter"), ("slice", "copy/slice/cat"),
                   ("copy", "copy/slice/cat"), ("into_contiguous", "copy/slice/cat"), ("cat", "copy/slice/cat"),
                   ("random", "random"), ("fill", "fill/zeros"), ("zeros", "fill/zeros")]:
        if key in l:
            return c
    return "elementwise/other"
cats = collections.defaultdict(lambda: [0.0, 0])
for n, (t, k) in by_name.items():
    c = cats[cat(n)]; c[0] += t; c[1] += k
total = sum(t for t, _ in by_name.values())
print(json.dumps({"profile": path, "steps": steps, "kernel_ms_per_step": 1e3 * total / steps,
                  "categories": {c: {"ms_per_step": round(1e3 * t / steps, 3), "launches_per_step": k // steps,
                                     "share": round(t / total, 4)} for c, (t, k) in sorted(cats.items(), key=lambda x: -x[1][0])},
                  "top": [[n[:120], round(1e3 * t / steps, 3), k // steps] for n, (t, k) in sorted(by_name.items(), key=lambda x: -x[1][0])[:40]]}))
