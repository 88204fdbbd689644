"""Benchmark: streaming prepare of a large synthetic ImageNet-64 set and of an image folder: peak memory, images/s.

    python bench/prep_stream.py [--images 200000] [--pngs 20000] [--cifar 50000]

Writes random images in the downsampled-ImageNet npz format (train batches 1..10, val) and a folder of
random 64x64 PNGs, then runs the real `prepare` on each in a fresh process and reports its wall time,
images/s and peak resident memory: the process's own, the largest of its writer processes, and the
largest sum over the process and its writers at one moment (RSS, counting shared library pages in
every process, and PSS, sharing them out; PSS also shares them with other processes on the machine,
so it drops when others load torch too). The CIFAR-10-sized run of bench/prep_speed.py runs in the
same call for a same-load comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RUN = """
import json, resource, sys, time
start = time.perf_counter()
from data_prep.prepare import main
code = main(sys.argv[1:])
own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_mb": own.ru_maxrss / 1024,
                  "child_peak_mb": children.ru_maxrss / 1024}))
"""


def write_imagenet(root: str, count: int, side: int = 64, n_val: int = 1000) -> None:
    """count train images over the 10 train batches, n_val in val_data.npz (random, 1-based labels)."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    sizes = [count // 10 + (1 if i < count % 10 else 0) for i in range(10)]
    for name, n in [(f"train_data_batch_{i + 1}.npz", s) for i, s in enumerate(sizes)] + [("val_data.npz", n_val)]:
        np.savez(os.path.join(root, name), data=rng.integers(0, 256, size=(n, 3 * side * side), dtype=np.uint8),
                 labels=rng.integers(1, 1001, size=n))


def write_pngs(root: str, count: int, side: int = 64, classes: int = 10) -> None:
    """count random side x side RGB PNGs in `classes` class folders."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, f"class{i % classes}", f"{i:06d}.png"), compress_level=1)


def _tree_memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB summed over a process and its descendants at this instant (Linux smaps_rollup).

    RSS counts a page shared by several processes (torch's libraries after a fork) once in each; PSS
    splits it between them, so the PSS sum is what the whole tree costs the machine.
    """
    import psutil

    rss = pss = 0.0
    try:
        processes = [psutil.Process(pid)]
        processes += processes[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/smaps_rollup") as stream:
                for line in stream:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) / 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) / 1024
        except (FileNotFoundError, ProcessLookupError):
            pass  # a writer that just exited
    return rss, pss


def prepare_in_process(*arguments: str, repo: str = REPO, every: float = 0.05) -> dict:
    """Run prepare (of the checkout `repo`) in a fresh python; its time, peak memory and exit code.

    peak_mb / child_peak_mb: the process's own peak RSS and its largest writer's (getrusage, exact);
    tree_rss_mb / tree_pss_mb: the largest sum over the process and its writers seen by sampling every
    `every` seconds (a spike shorter than that can be missed).
    """
    process = subprocess.Popen([sys.executable, "-c", RUN, *arguments, "--no-progress"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
    peaks = {"tree_rss_mb": 0.0, "tree_pss_mb": 0.0}

    def sample() -> None:
        while process.poll() is None:
            rss, pss = _tree_memory_mb(process.pid)
            peaks["tree_rss_mb"], peaks["tree_pss_mb"] = max(peaks["tree_rss_mb"], rss), max(peaks["tree_pss_mb"], pss)
            time.sleep(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(stderr)
    return dict(json.loads(stdout.strip().splitlines()[-1]), **peaks)


def main(argv=None) -> int:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200000)
    parser.add_argument("--pngs", type=int, default=20000)
    parser.add_argument("--cifar", type=int, default=50000)
    parser.add_argument("--baseline", help="another checkout (the old, in-memory prepare) to run on the same "
                                           "CIFAR-10 and ImageNet sets in the same call, for ratios under load")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    from bench.prep_speed import write_synthetic_cifar

    rows = []
    with tempfile.TemporaryDirectory(prefix="prep_stream_", dir=args.work) as work:
        def measure(name: str, count: int, dataset: str, source: str, out: str, *extra: str, repo: str = REPO) -> None:
            """One prepare of work/source into work/out, timed, as a row of the table."""
            result = prepare_in_process("--dataset", dataset, "--root", os.path.join(work, source), *extra,
                                        "--out", os.path.join(work, out), repo=repo)
            rows.append((name, count, result))

        if args.cifar:
            write_synthetic_cifar(os.path.join(work, "cifar"), args.cifar, 10000)
            measure(f"cifar10 {args.cifar:,}+10,000 32x32x3", args.cifar + 10000, "cifar10", "cifar", "out_cifar")
            if args.baseline:
                measure("  the same, baseline checkout", args.cifar + 10000, "cifar10", "cifar", "out_cifar_old",
                        repo=args.baseline)
        if args.images:
            start = time.perf_counter()
            write_imagenet(os.path.join(work, "imagenet"), args.images)
            print(f"wrote {args.images:,} synthetic 64x64 npz images in {time.perf_counter() - start:.0f} s", flush=True)
            count = args.images + 1000
            measure(f"imagenet64 {args.images:,}+1,000 64x64x3", count, "imagenet64", "imagenet", "out_imagenet")
            measure("  the same, --workers 1", count, "imagenet64", "imagenet", "out_imagenet1", "--workers", "1")
            if args.baseline:
                measure("  the same, baseline checkout", count, "imagenet64", "imagenet", "out_imagenet_old",
                        repo=args.baseline)
        if args.pngs:
            start = time.perf_counter()
            write_pngs(os.path.join(work, "pngs"), args.pngs)
            print(f"wrote {args.pngs:,} PNGs in {time.perf_counter() - start:.0f} s", flush=True)
            measure(f"folder of {args.pngs:,} 64x64 PNGs", args.pngs, "folder", "pngs", "out_pngs",
                    "--size", "64x64", "--channels", "3")
    print(f"{os.cpu_count()} CPU cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    print(f"{'run':<36}{'wall s':>9}{'images/s':>10}{'peak MB':>9}{'worker peak MB':>16}{'tree RSS MB':>13}"
          f"{'tree PSS MB':>13}")
    for name, count, result in rows:
        print(f"{name:<36}{result['seconds']:>9.1f}{count / result['seconds']:>10,.0f}{result['peak_mb']:>9.0f}"
              f"{result['child_peak_mb']:>16.0f}{result['tree_rss_mb']:>13.0f}{result['tree_pss_mb']:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
