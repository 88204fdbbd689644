"""Training data loader alone: how many images/s the reader delivers, with no model behind it.

    python bench/loader_speed.py --data data/mnist --batch-size 32 --workers 0,2,4

Iterates the trainer's own reader (data_prep.reader.train_batches: webdataset shards, per-worker
shuffle, exact-resume order) and, on a GPU machine, copies each batch to the device as the
trainer does. Compare the rate with bench/train_speed.py's images/s for the same batch size: the
loader must deliver faster than the model consumes, or the GPU waits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data_prep.reader import train_batches  # noqa: E402


def measure(data: str, batch_size: int, workers: int, batches: int, device: torch.device) -> float:
    """Images/s over `batches` batches after the first (worker start-up excluded)."""
    stream = iter(train_batches(data, batch_size, num_workers=workers, seed=0))
    next(stream)
    began = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
        seqs = torch.as_tensor(batch.seqs).to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del seqs
    return batches * batch_size / (time.perf_counter() - began)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared folder (python -m data_prep.prepare)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="0,2,4", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=200, help="timed batches per row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print("| workers | batch | images/s | bytes/s |")
    print("|---:|---:|---:|---:|")
    for workers in (int(w) for w in args.workers.split(",")):
        rate = measure(args.data, args.batch_size, workers, args.batches, device)
        seq_len = next(iter(train_batches(args.data, 1, num_workers=0))).seqs.shape[1]
        rows.append({"workers": workers, "batch": args.batch_size, "images_per_s": rate,
                     "bytes_per_s": rate * seq_len})
        print(f"| {workers} | {args.batch_size} | {rate:,.0f} | {rate * seq_len:.3g} |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": str(device), "data": args.data, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
