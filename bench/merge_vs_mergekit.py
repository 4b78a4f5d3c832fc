"""Merge engine vs mergekit on ~1 GB Qwen2-shaped checkpoints (CPU).

Builds a random base and three fine-tunes (base + distinct N(0, 1e-3) deltas; Qwen2 shapes:
hidden 1024, intermediate 2816, 40 layers, vocab 32000, bf16 ≈ 1.07 GB each), then runs

  chain   the TinyR1 plan: arcee_fusion(math -> science), then arcee_fusion(-> code)
  ties    TIES of math, science, code onto the base (weight 1, density 0.5)
  linear  uniform linear merge of math, science, code

with ``branchmerge-train merge`` (A) and ``mergekit-yaml --random-seed 0`` from its own venv
(B), interleaved A B A B, and prints wall time, peak RSS, bytes read/written (from
/proc/<pid>/io of the finished process: rchar/wchar are syscall bytes, so mergekit's
mmap reads do not show there), the ratios, and the distance of our time to the I/O lower
bound (bytes in / read bandwidth + bytes out / write+fsync bandwidth, measured in this run).
Then checks Arcee Fusion against mergekit: identical output on every tensor of ≤ 1e6
elements, fused ("kept from the other model") fraction within 0.5 pp on larger ones.

    .venv/bin/python bench/merge_vs_mergekit.py --workdir /tmp/merge-bench \
        --mergekit /tmp/mergekit-venv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from branchmerge_trainer.merge.synthetic import qwen2_config, write_family
from branchmerge_trainer.tiny import build_tokenizer, sample_corpus

REPO = Path(__file__).resolve().parents[1]
OURS = [str(REPO / ".venv/bin/branchmerge-train"), "merge"]
SAMPLE_LIMIT = 1_000_000


@dataclass
class Run:
    wall: float
    rss_mb: float
    rchar: int
    wchar: int
    read_bytes: int
    write_bytes: int

    def __add__(self, o: Run) -> Run:  # sequential runs of one measurement (mergekit's chain)
        return Run(self.wall + o.wall, max(self.rss_mb, o.rss_mb), self.rchar + o.rchar, self.wchar + o.wchar,
                   self.read_bytes + o.read_bytes, self.write_bytes + o.write_bytes)  # fmt: skip


def measure(cmd: list[str], log: Path) -> Run:
    """Run ``cmd``; wall time, peak RSS (wait4) and /proc/<pid>/io read before reaping."""
    with log.open("ab") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - t0
        io = dict(line.split(": ") for line in Path(f"/proc/{p.pid}/io").read_text().splitlines())
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}); see {log}")
    return Run(wall, usage.ru_maxrss / 1024, int(io["rchar"]), int(io["wchar"]), int(io["read_bytes"]),
               int(io["write_bytes"]))  # fmt: skip


def build(root: Path, layers: int) -> dict[str, Path]:
    cfg = qwen2_config(hidden=1024, intermediate=2816, layers=layers, vocab=32000, heads=16, kv_heads=8)
    tok_dir = Path(tempfile.mkdtemp())
    build_tokenizer(sample_corpus()).save_pretrained(tok_dir)
    extra = {p.name: p.read_bytes() for p in tok_dir.iterdir() if p.is_file()}
    shutil.rmtree(tok_dir)
    return write_family(
        root, ["math", "science", "code"], cfg, base="base", delta_std=1e-3, extra_files=extra
    )


def ours_config(
    name: str, models: dict[str, Path], steps: list[dict[str, Any]], out: Path, tok: str
) -> dict[str, Any]:
    return {
        "kind": "Merge", "name": name, "fingerprint": f"{name}-{time.time_ns()}", "output": str(out),
        "resultPath": str(out.parent / f"{out.name}.result.json"),
        "models": {k: {"uri": str(v)} for k, v in models.items()}, "steps": steps,
        "dtype": "bfloat16", "outDtype": "bfloat16", "tokenizerSource": tok, "seed": 0,
    }  # fmt: skip


def mk_yaml(method: str, base: Path | None, models: list[Path], params: dict[str, Any] | None = None) -> str:
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for m in models:
        lines.append(f"  - model: {m}")
        if params:
            lines.append("    parameters: " + json.dumps(params))
    lines += ["dtype: bfloat16", "out_dtype: bfloat16"]
    return "\n".join(lines) + "\n"


def scenarios(m: dict[str, Path], work: Path) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """name -> (our stage config minus output, mergekit YAML documents run in sequence)."""
    mid = work / "mk-chain-mid"
    return {
        "chain": (
            {"steps": [
                {"name": "math_science", "method": "arcee_fusion", "base": "science", "models": [{"model": "math"}]},
                {"name": "tinyr1", "method": "arcee_fusion", "base": "code", "models": [{"model": "math_science"}]},
            ], "tok": "code"},
            [mk_yaml("arcee_fusion", m["science"], [m["math"]]), mk_yaml("arcee_fusion", m["code"], [mid])],
        ),
        "ties": (
            {"steps": [{"name": "ties", "method": "ties", "base": "base", "models": [
                {"model": k, "parameters": {"weight": 1.0, "density": 0.5}} for k in ("math", "science", "code")
            ]}], "tok": "base"},
            [mk_yaml("ties", m["base"], [m["math"], m["science"], m["code"]], {"weight": 1.0, "density": 0.5})],
        ),
        "linear": (
            {"steps": [{"name": "soup", "method": "linear", "models": [
                {"model": k, "parameters": {"weight": 1.0}} for k in ("math", "science", "code")
            ]}], "tok": "math"},
            [mk_yaml("linear", None, [m["math"], m["science"], m["code"]], {"weight": 1.0})],
        ),
    }  # fmt: skip


def run_ours(name: str, spec: dict[str, Any], models: dict[str, Path], out: Path, work: Path) -> Run:
    cfg = ours_config(name, models, spec["steps"], out, spec["tok"])
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return measure([*OURS, "--config", str(path)], work / f"ours-{name}.log")


def run_mergekit(name: str, docs: list[str], mergekit: str, out: Path, work: Path) -> Run:
    total: Run | None = None
    for i, doc in enumerate(docs):
        target = out if i == len(docs) - 1 else work / "mk-chain-mid"
        if target.exists():
            shutil.rmtree(target)
        path = work / f"mk-{name}-{i}.yml"
        path.write_text(doc)
        r = measure([mergekit, str(path), str(target), "--random-seed", "0"], work / f"mk-{name}.log")
        total = r if total is None else total + r
    assert total is not None
    return total


def bandwidth(files: list[Path], out_bytes: int, work: Path) -> tuple[float, float]:
    """Warm read bandwidth over ``files`` and write+fsync bandwidth for ``out_bytes``."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        while n := os.readv(fd, [view]):
            total += n
        os.close(fd)
    read_bw = total / (time.perf_counter() - t0)
    path = work / "bw.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    left = out_bytes
    while left > 0:
        left -= os.write(fd, view[: min(left, len(buf))])
    os.fsync(fd)
    os.close(fd)
    write_bw = out_bytes / (time.perf_counter() - t0)
    path.unlink()
    return read_bw, write_bw


def weights(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def compare_arcee(ours: Path, theirs: Path, base: Path) -> tuple[int, int, float, int]:
    """(exact small tensors, small tensors, max |fused fraction diff| in pp over large ones,
    large tensors)."""

    def open_all(d: Path) -> dict[str, Any]:
        handles: dict[str, Any] = {}
        for f in weights(d):
            h = safe_open(str(f), "pt")
            for k in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                handles[k] = h
        return handles

    a, b, c = open_all(ours), open_all(theirs), open_all(base)
    exact = small = large = 0
    worst = 0.0
    for name in sorted(c):
        x, y, z = (
            a[name].get_tensor(name),
            b[name].get_tensor(name),
            c[name].get_tensor(name).to(torch.bfloat16),
        )
        y = y.to(x.dtype)
        if x.numel() <= SAMPLE_LIMIT:
            small += 1
            exact += int(torch.equal(x, y))
        else:
            large += 1
            fx = float((x != z).float().mean())
            fy = float((y != z).float().mean())
            worst = max(worst, abs(fx - fy) * 100)
    return exact, small, worst, large


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/merge-bench"))
    ap.add_argument("--mergekit", default="/tmp/mergekit-venv/bin/mergekit-yaml")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--only", default="chain,ties,linear")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (models, outputs)")
    args = ap.parse_args()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = build(work / "models", args.layers)
    size = sum(f.stat().st_size for f in weights(models["base"]))
    print(f"built 4 checkpoints of {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s "
          f"(torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    table = []
    results: dict[str, tuple[Run, Run, float]] = {}
    for name, (spec, docs) in scenarios(models, work).items():
        if name not in args.only.split(","):
            continue
        a_runs: list[Run] = []
        b_runs: list[Run] = []
        for rep in range(args.reps):
            out_a, out_b = work / f"ours-{name}", work / f"mk-{name}"
            for d in (out_a, out_b):
                if d.exists():
                    shutil.rmtree(d)
            a_runs.append(run_ours(name, spec, models, out_a, work))
            b_runs.append(run_mergekit(name, docs, args.mergekit, out_b, work))
            print(
                f"  {name} rep {rep}: ours {a_runs[-1].wall:.1f} s, mergekit {b_runs[-1].wall:.1f} s",
                flush=True,
            )
        inputs = sorted({x for s in spec["steps"] for x in [s.get("base")] + [e["model"] for e in s["models"]]
                         if x in models})  # fmt: skip
        in_files = [f for k in inputs for f in weights(models[k])]
        out_bytes = sum(f.stat().st_size for f in weights(work / f"ours-{name}"))
        read_bw, write_bw = bandwidth(in_files, out_bytes, work)
        bound = sum(f.stat().st_size for f in in_files) / read_bw + out_bytes / write_bw
        a = a_runs[0]
        med_a = statistics.median(r.wall for r in a_runs)
        med_b = statistics.median(r.wall for r in b_runs)
        rss_a = max(r.rss_mb for r in a_runs)
        rss_b = max(r.rss_mb for r in b_runs)
        b = b_runs[0]
        results[name] = (a, b, bound)
        table.append((name, med_a, med_b, rss_a, rss_b, a, b, bound, read_bw, write_bw))
    print()
    print("| scenario | ours wall s | mergekit wall s | speedup | ours peak RSS MB | mergekit peak RSS MB | RSS ratio "
          "| ours rchar/wchar GB | mergekit rchar/wchar GB | I/O bound s | ours / bound |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    lines = []
    for name, ma, mb, ra, rb, a, b, bound, _rbw, _wbw in table:
        print(f"| {name} | {ma:.1f} | {mb:.1f} | {mb / ma:.2f}x | {ra:.0f} | {rb:.0f} | {ra / rb:.2f} "
              f"| {a.rchar / 1e9:.2f}/{a.wchar / 1e9:.2f} | {b.rchar / 1e9:.2f}/{b.wchar / 1e9:.2f} "
              f"| {bound:.2f} | {ma / bound:.1f}x |")  # fmt: skip
        goal = {"chain": 4.0, "ties": 3.0, "linear": 1.5}[name]
        lines.append(f"RESULT {name}_speedup {mb / ma:.2f} goal >= {goal}")
        lines.append(f"RESULT {name}_rss_ratio {ra / rb:.2f} goal <= 0.5")
        lines.append(f"RESULT {name}_io_bound_distance {ma / bound:.2f} goal >= 1.0")
    print(f"(read bandwidth {table[0][8] / 1e9:.2f} GB/s warm, write+fsync {table[0][9] / 1e9:.2f} GB/s)"
          if table else "")  # fmt: skip
    if "chain" in results:
        # Step 1 alone (ours) against mergekit's intermediate, and the final chain outputs.
        step1 = work / "ours-step1"
        if step1.exists():
            shutil.rmtree(step1)
        spec = {"steps": [{"name": "math_science", "method": "arcee_fusion", "base": "science",
                           "models": [{"model": "math"}]}], "tok": "science"}  # fmt: skip
        run_ours("step1", spec, models, step1, work)
        e1, s1, w1, l1 = compare_arcee(step1, work / "mk-chain-mid", models["science"])
        e2, s2, w2, l2 = compare_arcee(work / "ours-chain", work / "mk-chain", models["code"])
        print(f"arcee step 1: {e1}/{s1} tensors ≤1e6 elements identical; fused fraction max diff {w1:.3f} pp "
              f"over {l1} larger tensors")  # fmt: skip
        print(f"arcee chain:  {e2}/{s2} tensors ≤1e6 elements identical; fused fraction max diff {w2:.3f} pp "
              f"over {l2} larger tensors")  # fmt: skip
        lines.append(f"RESULT arcee_exact_small_tensors {(e1 + e2) / max(1, s1 + s2):.4f} goal >= 1.0")
        lines.append(f"RESULT arcee_fused_fraction_max_diff_pp {max(w1, w2):.3f} goal <= 0.5")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
