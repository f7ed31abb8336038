"""Throughput of ``iter_shard``: a 1,000-image shard of 32 px JPEGs, local disk vs S3.

S3 is moto's server on loopback (started here), so the S3 figures measure the client path
(s3fs requests, signing, HTTP) rather than a real network. Run:

    .venv/bin/python benchmarks/shard_reader.py [--images 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recap_dagster.corpus.listing import sample_key  # noqa: E402
from recap_dagster.corpus.reading import iter_shard  # noqa: E402
from recap_dagster.miniworld.shard_writer import ShardRecord, write_shard  # noqa: E402


def make_records(count: int, size: int = 32, seed: int = 0) -> list[ShardRecord]:
    """Simple scenes (a coloured rectangle on a coloured background, plus mild noise)."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        pixels = np.empty((size, size, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        x0, y0 = rng.integers(0, size // 2, 2)
        pixels[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.integers(0, 256, 3)
        noise = rng.integers(-8, 9, pixels.shape)
        pixels = np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=90)
        records.append(
            ShardRecord(
                key=sample_key(0, index),
                image_bytes=buffer.getvalue(),
                caption=f"a shape on a background, number {index}",
                url=f"https://example.com/{index}.jpg",
                metadata={"index": index},
            )
        )
    return records


def throughput(root: str, repeats: int, decode: bool) -> tuple[float, int]:
    """Best-of-``repeats`` images/s over the whole shard."""
    best = 0.0
    count = 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = sum(1 for record in iter_shard(root, "00000", decode=decode))
        best = max(best, count / (time.perf_counter() - start))
    return best, count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    records = make_records(args.images)
    total_bytes = sum(len(r.image_bytes or b"") for r in records)
    print(f"{args.images} images, {total_bytes / len(records):.0f} B/JPEG on average")

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        )
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{'source':<8} {'format':<11} {'decode':<7} {'images/s':>10}")
            for fmt in ("webdataset", "parquet"):
                roots = {"local": os.path.join(tmp, fmt), "s3": f"s3://bench/{fmt}"}
                for source, root in roots.items():
                    write_shard(root, 0, records, output_format=fmt)
                    for decode in (True, False):
                        rate, count = throughput(root, args.repeats, decode)
                        assert count == args.images, count
                        print(f"{source:<8} {fmt:<11} {decode!s:<7} {rate:>10,.0f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
