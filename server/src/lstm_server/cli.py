"""``lstm-server``: not built yet; it says so instead of pretending to serve."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("lstm-server: the gRPC server is not built yet (issue 'gRPC server'); nothing is served.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
