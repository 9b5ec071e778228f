"""Where candlekeep's worker spends its CPU a message, part by part, without a profiler's
overhead: the stages of ``stream/parse.py`` and ``stream/writers.py`` run here, in one process,
on the stream benchmark's cached messages (batches of 5,000 per partition, as the worker fetches
them), each timed with ``time.process_time`` over the whole file.

``python bench/stream_parts.py [--trades N]`` (default 1,000,000; the file is made by
bench/stream_throughput.py or bench/peers.py). The parts left out (aiokafka's fetch and record
decoding, psycopg, the transaction, PostgreSQL's side) are the rest of bench/peers.py's figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from stream_throughput import generate, read_chunks  # noqa: E402

from shared.core.intervals import IntervalSet  # noqa: E402
from shared.core.trade_messages import check_key, parse_common_trade, parse_trade_message  # noqa: E402
from shared.core.trades import Rejection  # noqa: E402
from shared.core.windows import PartitionWindows, WindowSettings  # noqa: E402
from shared.store.trade_store import prepare_trades  # noqa: E402

BATCH = 5000


def batches(path: Path):
    """Per partition, lists of BATCH (key, value) in offset order."""
    per_partition: dict[int, list] = {}
    for chunk in read_chunks(path):
        for partition, key, value in chunk:
            per_partition.setdefault(partition, []).append((key, value))
    for messages in per_partition.values():
        for start in range(0, len(messages), BATCH):
            yield messages[start : start + BATCH]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=1_000_000)
    args = parser.parse_args()
    path = generate(args.trades)
    work = list(batches(path))
    messages = sum(len(b) for b in work)
    far = 2**62

    started = time.process_time()
    parsed_batches = []
    for batch in work:
        trades = []
        for key, value in batch:
            parsed = parse_common_trade(value, far)
            if parsed is None:
                parsed = parse_trade_message(value, max_ts_us=far)
            if parsed.__class__ is not Rejection and check_key(key, parsed) is None:
                trades.append(parsed)
        parsed_batches.append(trades)
    parse_s = time.process_time() - started

    tried: dict = {}
    started = time.process_time()
    prepared = [prepare_trades(trades, tried) for trades in parsed_batches]
    prepare_s = time.process_time() - started

    folds = {}
    for names in ("1m", "1m,5m,15m,1h"):
        windows = PartitionWindows(WindowSettings(IntervalSet.parse(names)))
        started = time.process_time()
        for trades in parsed_batches:  # (one windows object: the symbols keep theirs apart)
            windows.process(trades, 0)
        folds[names] = time.process_time() - started

    del prepared
    print(f"{messages:,} messages in {len(work)} batches; CPU µs a message:")
    print(
        f"  parse and check the key (parse_common_trade, check_key): {1e6 * parse_s / messages:.2f}"
    )
    per = 1e6 / messages
    print(f"  prepare_trades (dedupe in the batch, COPY text rows):    {prepare_s * per:.2f}")
    for names, seconds in folds.items():
        print(f"  fold into the windows, {names:<13} (PartitionWindows): {seconds * per:.2f}")


if __name__ == "__main__":
    main()
