"""How a client spreads its calls over the replicas behind one target (no grpc import: the CLI
reads these defaults before it loads grpc).

A target that resolves to several addresses (`dns:///summarizer-headless:50051` answers with
every ready pod of a headless Service; `ipv4:10.0.0.1:50051,10.0.0.2:50051` lists them) is
balanced `round_robin` by default: the channel connects to every address and sends each call to
the next ready one, leaving out a replica that is down. `pick_first` keeps to one connection.
"""

from __future__ import annotations

import json

LOAD_BALANCING_POLICIES = ("round_robin", "pick_first")
DEFAULT_LOAD_BALANCING = "round_robin"

DEFAULT_STREAMS = 4
"""summarize_many's streams at once: a balancing channel puts each on the next replica."""
DEFAULT_ARTICLES_PER_STREAM = 32
"""Articles one stream of summarize_many carries before it is closed and another opened, so that
the channel spreads a long run over every replica, those added while it runs included. (The
first streams of a run all go to the replica that connected first: round_robin picks among the
connections that are ready, and a fresh channel's first picks see one.)"""


def service_config(load_balancing: str = DEFAULT_LOAD_BALANCING) -> str:
    """The channel's default service config (JSON) for `load_balancing`."""
    if load_balancing not in LOAD_BALANCING_POLICIES:
        raise ValueError(f"load_balancing must be one of {', '.join(LOAD_BALANCING_POLICIES)}, "
                         f"not {load_balancing!r}")
    return json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})
