"""``python -m reallm.assets OUT_DIR [--seed N] [--force]``: write the tiny assets and list them."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Optional

from reallm.errors import exit_on_user_error


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    from reallm.assets.build import is_complete, make_tiny_assets

    ap = argparse.ArgumentParser(prog="python -m reallm.assets", description=__doc__)
    ap.add_argument("out_dir", help="directory to write (created; reused when already complete)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the weights and the data splits (default 1)")
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR is complete")
    args = ap.parse_args(argv)

    reused = not args.force and is_complete(args.out_dir, args.seed)
    t0 = time.perf_counter()
    paths = make_tiny_assets(args.out_dir, seed=args.seed, force=args.force)
    what = "up to date, reused" if reused else f"built in {time.perf_counter() - t0:.1f}s"
    print(f"tiny assets (seed {args.seed}) {what}:")
    width = max(map(len, paths))
    for name, path in paths.items():
        print(f"  {name:<{width}}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
