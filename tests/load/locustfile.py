"""Locust load for thinkahead: REST and gRPC users with realistic id and event mixes.

- user ids: Zipf-like over the known users (a few heavy users, a long tail), plus a share of
  never-seen users (cold start);
- per user task mix: mostly recommend, some events followed by a recommend (fresh context),
  a few requests with exclusions, a few explicit full decodes.

Environment: THINKAHEAD_LOAD_USERS (a file with one user id per line, or N for u1..uN),
THINKAHEAD_LOAD_ITEMS (a file with item ids, for events), THINKAHEAD_GRPC (host:port; the gRPC
user is active only when it is set), THINKAHEAD_COLD_SHARE (default 0.1), THINKAHEAD_LOAD_KEY (an
API key with both scopes, for a service with a keys file).
Load only ever targets loopback: any other host is refused.

    locust -f tests/load/locustfile.py --headless -u 16 -r 8 -t 60s \
        --host http://127.0.0.1:8000 --csv out/locust
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task
from locust.contrib.fasthttp import FastHttpUser

from service.api._proto.thinkahead.v1 import recommender_pb2 as pb
from service.api._proto.thinkahead.v1 import recommender_pb2_grpc as pb_grpc

# grpcio blocks the OS thread in its own completion queue; under locust's gevent loop every
# other user (the REST ones too) would wait behind each gRPC call. This makes grpc yield.
grpc_gevent.init_gevent()


def _is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
        )
    except (socket.gaierror, ValueError):
        return False


@events.test_start.add_listener
def _loopback_only(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    targets = [urlparse(environment.host or "").hostname or ""]
    if os.environ.get("THINKAHEAD_GRPC"):
        targets.append(os.environ["THINKAHEAD_GRPC"].rsplit(":", 1)[0])
    for host in targets:
        if not _is_loopback(host):
            raise SystemExit(
                f"refusing to load {host!r}: thinkahead load tests target loopback only"
            )


def _ids(var: str, prefix: str, default: int) -> list[str]:
    value = os.environ.get(var, str(default))
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [f"{prefix}{i}" for i in range(1, int(value) + 1)]


USERS = _ids("THINKAHEAD_LOAD_USERS", "", 1000)
ITEMS = _ids("THINKAHEAD_LOAD_ITEMS", "", 1000)
COLD_SHARE = float(os.environ.get("THINKAHEAD_COLD_SHARE", "0.1"))
API_KEY = os.environ.get("THINKAHEAD_LOAD_KEY")
HEADERS = {"authorization": f"Bearer {API_KEY}"} if API_KEY else {}
METADATA = tuple(HEADERS.items())
# Zipf-like popularity over users: weight 1/rank.
WEIGHTS = [1.0 / (r + 1) for r in range(len(USERS))]


def pick_user(rng: random.Random) -> str:
    if rng.random() < COLD_SHARE:
        return f"cold-{rng.randrange(10**9)}"
    return rng.choices(USERS, weights=WEIGHTS, k=1)[0]


class RestUser(FastHttpUser):
    wait_time = between(0.0, 0.05)
    default_headers = HEADERS

    def on_start(self) -> None:
        self.rng = random.Random()

    @task(20)
    def recommend(self) -> None:
        self.client.post(
            "/v1/recommend", json={"user_id": pick_user(self.rng), "k": 10}, name="recommend"
        )

    @task(4)
    def event_then_recommend(self) -> None:
        user = pick_user(self.rng)
        self.client.post(
            "/v1/events",
            json={"user_id": user, "item_ids": [self.rng.choice(ITEMS)]},
            name="events",
        )
        self.client.post(
            "/v1/recommend", json={"user_id": user, "k": 10}, name="recommend after event"
        )

    @task(2)
    def recommend_with_exclusions(self) -> None:
        self.client.post(
            "/v1/recommend",
            json={
                "user_id": pick_user(self.rng),
                "k": 20,
                "exclude_item_ids": self.rng.sample(ITEMS, min(5, len(ITEMS))),
            },
            name="recommend excl",
        )

    @task(1)
    def full_decode(self) -> None:
        self.client.post(
            "/v1/recommend",
            json={"user_id": pick_user(self.rng), "k": 10, "strategy": "full_decode"},
            name="full decode",
        )


class GrpcUser(User):
    """gRPC twin of RestUser; reports to locust under request_type "grpc"."""

    wait_time = between(0.0, 0.05)
    weight = 1 if os.environ.get("THINKAHEAD_GRPC") else 0

    def on_start(self) -> None:
        self.rng = random.Random()
        self.channel = grpc.insecure_channel(os.environ["THINKAHEAD_GRPC"])
        self.stub = pb_grpc.RecommenderStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, fn, request) -> None:  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        exc = None
        size = 0
        try:
            size = fn(request, timeout=30, metadata=METADATA).ByteSize()
        except grpc.RpcError as err:
            exc = err
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - t0) * 1e3,
            response_length=size,
            exception=exc,
            context={},
        )

    @task(20)
    def recommend(self) -> None:
        self._call(
            "Recommend", self.stub.Recommend, pb.RecommendRequest(user_id=pick_user(self.rng), k=10)
        )

    @task(4)
    def event_then_recommend(self) -> None:
        user = pick_user(self.rng)
        self._call(
            "AppendEvents",
            self.stub.AppendEvents,
            pb.AppendEventsRequest(user_id=user, item_ids=[self.rng.choice(ITEMS)]),
        )
        self._call(
            "Recommend after event", self.stub.Recommend, pb.RecommendRequest(user_id=user, k=10)
        )
