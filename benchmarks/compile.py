"""Compile time, artifact size and artifact load time for every catalogue blueprint.

Run: `.venv/bin/python benchmarks/compile.py` (targets: p50 compile < 3 s, p50 load < 50 ms).
Compile times are measured after one warm-up compile (the first `torch.export` in a process
pays a one-off cost, reported separately as `first_compile_s`). Load is what the runtime
does with downloaded bytes: `tezzeret.compiler.load_kernel` (archive checks + torch.export.load).
"""

from __future__ import annotations

import argparse
import time

from _common import p50, save
from tqdm import tqdm

from tezzeret.catalogue import CATALOGUE
from tezzeret.compiler import compile_kernel, load_kernel
from tezzeret.ir import parse_signature

TARGET_COMPILE_S = 3.0
TARGET_LOAD_MS = 50.0


def signature_for(ir: dict, *, features: int, channels: int) -> dict:
    n = channels if ir["layout"] == "channels" else features
    return {"graft": ir["graft"], "layout": ir["layout"], "in": n, "out": n, "dtype": "float32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--loads", type=int, default=15, help="loads per artifact")
    args = parser.parse_args()

    first = CATALOGUE[0]["ir"]
    started = time.perf_counter()
    compile_kernel(first, parse_signature(signature_for(first, **_dims(args))))
    first_compile_s = time.perf_counter() - started

    rows = []
    for entry in tqdm(CATALOGUE, desc="blueprints", unit="bp"):
        sig = parse_signature(signature_for(entry["ir"], **_dims(args)))
        started = time.perf_counter()
        compiled = compile_kernel(entry["ir"], sig)
        compile_s = time.perf_counter() - started
        loads = []
        for _ in range(args.loads):
            started = time.perf_counter()
            load_kernel(compiled.artifact)
            loads.append((time.perf_counter() - started) * 1000)
        rows.append(
            {
                "name": entry["name"],
                "signature": sig.to_dict(),
                "compile_s": round(compile_s, 4),
                "size_bytes": compiled.size_bytes,
                "param_count": compiled.param_count,
                "load_ms": round(p50(loads), 2),
                "latency_us_p50": compiled.report["latency_us_p50"],
            }
        )

    result = {
        "compile_s_p50": round(p50([r["compile_s"] for r in rows]), 4),
        "load_ms_p50": round(p50([r["load_ms"] for r in rows]), 2),
        "first_compile_s": round(first_compile_s, 3),
        "targets": {"compile_s_p50": TARGET_COMPILE_S, "load_ms_p50": TARGET_LOAD_MS},
        "per_blueprint": rows,
    }
    path = save("compile", result)
    print(f"{'blueprint':24} {'compile s':>9} {'size B':>9} {'load ms':>8}")
    for r in rows:
        print(f"{r['name']:24} {r['compile_s']:9.3f} {r['size_bytes']:9d} {r['load_ms']:8.1f}")
    print(
        f"p50 compile {result['compile_s_p50']:.3f} s (target < {TARGET_COMPILE_S}), "
        f"p50 load {result['load_ms_p50']:.1f} ms (target < {TARGET_LOAD_MS}); "
        f"first compile in a process {first_compile_s:.2f} s -> {path}"
    )


def _dims(args) -> dict:
    return {"features": args.features, "channels": args.channels}


if __name__ == "__main__":
    main()
