"""A deterministic Binance spot trades CSV for benchmarks.

Real trade files are large and not ours to commit, so benchmarks generate one: same seed, same
bytes. The columns are Binance's (no header): ``trade_id,price,qty,quote_qty,time_ms,
is_buyer_maker,is_best_match``. Prices follow a random walk on a 0.01 tick but are written with
2 to 8 decimals, as files from different years are, so the parser sees varied exponents. About
2% of trades carry a timestamp up to ``MAX_DISORDER_MS`` earlier than the one before, so windows
also receive trades out of order.
"""

from __future__ import annotations

import argparse
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

DEFAULT_TRADES = 1_000_000
DEFAULT_SEED = 20240301
SYMBOL = "BTCUSDT"
#: 2024-03-01T00:00:00Z: the first trade's time.
START_MS = 1_709_251_200_000
#: Mean gap between trades: 1M trades span about 6 hours (360 one-minute windows).
MEAN_GAP_MS = 21.6
#: Late trades are stamped at most this much before the latest time seen.
MAX_DISORDER_MS = 2_000
LATE_SHARE = 0.02
FIRST_TRADE_ID = 3_400_000_000
#: Bump when the output for a given (trades, seed) changes, so cached files are not reused.
VERSION = 1


def default_path(out_dir: Path, trades: int, seed: int) -> Path:
    """Where the file for (trades, seed) is cached; the name starts with the symbol."""
    return out_dir / f"{SYMBOL}-trades-bench-v{VERSION}-{trades}-{seed}.csv"


def _decimal(units: int, scale: int, decimals: int) -> str:
    """``units / 10**scale`` written with exactly ``decimals`` decimals (``decimals >= scale``)."""
    whole, frac = divmod(units, 10**scale)
    return f"{whole}.{frac:0{scale}d}{'0' * (decimals - scale)}"


def trade_lines(trades: int, seed: int) -> Iterator[str]:
    """Yield the CSV lines (with newlines) of ``trades`` trades."""
    rng = random.Random(seed)
    price_cents = 6_150_000  # 61,500.00 USDT
    latest_ms = START_MS
    for offset in range(trades):
        # Random walk with volatility clustering, kept away from zero.
        step = round(rng.gauss(0, 3.0 + 12.0 * abs(math.sin(offset / 50_000))))
        price_cents = max(100_000, price_cents + step)
        # Quantities: log-normal in lots of 0.00001 BTC, at least one lot.
        lots = max(1, round(math.exp(rng.gauss(3.0, 1.9))))
        quantity_e8 = lots * 1_000
        # Binance rounds the quote quantity to 8 decimals.
        quote_e8 = (price_cents * quantity_e8 + 50) // 100
        latest_ms += round(rng.expovariate(1 / MEAN_GAP_MS))
        if rng.random() < LATE_SHARE:
            time_ms = latest_ms - rng.randint(1, MAX_DISORDER_MS)
        else:
            time_ms = latest_ms
        maker = "True" if rng.random() < 0.5 else "False"
        price = _decimal(price_cents, 2, rng.randint(2, 8))
        yield (
            f"{FIRST_TRADE_ID + offset},{price},{_decimal(quantity_e8, 8, 8)},"
            f"{_decimal(quote_e8, 8, 8)},{time_ms},{maker},True\n"
        )


def write_trades(path: Path, trades: int = DEFAULT_TRADES, seed: int = DEFAULT_SEED) -> Path:
    """Write the file atomically (a half-written cache would poison later runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="ascii", newline="") as handle:
        handle.writelines(trade_lines(trades, seed))
    os.replace(partial, path)
    return path


def cached_trades(out_dir: Path, trades: int, seed: int = DEFAULT_SEED) -> Path:
    """The cached file for (trades, seed), generated on first use."""
    path = default_path(out_dir, trades, seed)
    if not path.exists():
        write_trades(path, trades, seed)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=DEFAULT_TRADES)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("-o", "--output", type=Path, help="default: bench/out/<generated name>")
    args = parser.parse_args()
    path = args.output or default_path(Path(__file__).parent / "out", args.trades, args.seed)
    write_trades(path, args.trades, args.seed)
    print(f"wrote {args.trades:,} trades to {path}")


if __name__ == "__main__":
    main()
