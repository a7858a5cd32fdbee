"""Locust load for thinkahead: REST and gRPC users with realistic id and event mixes.

- user ids: Zipf-like over the known users (a few heavy users, a long tail), plus a share of
  never-seen users (cold start);
- per user task mix: mostly recommend, some events followed by a recommend (fresh context),
  a few requests with exclusions, a few explicit full decodes, and an event followed 2 s later
  (the client waits: gevent sleep) by a recommend, reported as "recommend 2s after event (no
  engine round)" or "(engine round)" by its answer's ``timings.decode_ms`` (0 exactly when no
  engine round was needed): what a near-line re-think worker saves.

Environment: THINKAHEAD_LOAD_USERS (a file with one user id per line, or N for u1..uN),
THINKAHEAD_LOAD_ITEMS (a file with item ids, for events), THINKAHEAD_GRPC (host:port; the gRPC
user is active only when it is set), THINKAHEAD_COLD_SHARE (default 0.1), THINKAHEAD_LOAD_KEY (an
API key with both scopes, for a service with a keys file); for `thinkahead bench`, files written
at exit: THINKAHEAD_LOAD_SAMPLES (every recommend's transport, kind, ms and outcome) and
THINKAHEAD_LOAD_STATS (locust's request stats CSV once every user has stopped: the --csv file is
rewritten each second while the run goes, and its last version can miss the final second).
Load only ever targets loopback: any other host is refused.

    locust -f tests/load/locustfile.py --headless -u 16 -r 8 -t 60s \
        --host http://127.0.0.1:8000 --csv out/locust
"""

from __future__ import annotations

import csv
import ipaddress
import os
import random
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from offline.bench.load import (
    AFTER_EVENT_2S,
    EVENT_NAMES,
    Sample,
    tagged,
    transport_of,
    untagged,
)
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
AFTER_EVENT_S = 2.0
# Locust names of recommends (untagged), by transport.
RECOMMENDS = {
    "rest": {
        "recommend",
        "recommend after event",
        "recommend excl",
        "full decode",
        f"recommend {AFTER_EVENT_2S}",
    },
    "grpc": {"Recommend", "Recommend after event", f"Recommend {AFTER_EVENT_2S}"},
}
EVENT_AT_ONCE = {t: names[0] for t, names in EVENT_NAMES.items()}
EVENT_2S_BEFORE = {t: names[1] for t, names in EVENT_NAMES.items()}
SAMPLES_PATH = os.environ.get("THINKAHEAD_LOAD_SAMPLES")
STATS_PATH = os.environ.get("THINKAHEAD_LOAD_STATS")
_samples: list[Sample] = []


@events.request.add_listener
def _record_recommend(  # type: ignore[no-untyped-def]
    request_type, name, response_time, exception=None, **_kwargs
) -> None:
    if not SAMPLES_PATH:
        return
    transport = transport_of(request_type)
    kind, _ = untagged(name)
    if kind in RECOMMENDS[transport]:
        _samples.append(Sample(transport, kind, float(response_time), exception is None))


@events.quitting.add_listener
def _write_results(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    if SAMPLES_PATH:
        Path(SAMPLES_PATH).write_text("".join(f"{s.line()}\n" for s in _samples))
    if STATS_PATH:
        with Path(STATS_PATH).open("w", newline="") as f:
            StatsCSV(environment, PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))


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
            name=EVENT_AT_ONCE["rest"],
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

    @task(1)
    def event_then_recommend_2s_later(self) -> None:
        user = pick_user(self.rng)
        self.client.post(
            "/v1/events",
            json={"user_id": user, "item_ids": [self.rng.choice(ITEMS)]},
            name=EVENT_2S_BEFORE["rest"],
        )
        gevent.sleep(AFTER_EVENT_S)
        with self.client.post(
            "/v1/recommend",
            json={"user_id": user, "k": 10},
            name=f"recommend {AFTER_EVENT_2S}",
            catch_response=True,
        ) as reply:
            if reply.status_code != 200:
                return  # a failure under the untagged name
            try:
                decode_ms = float(reply.json()["timings"]["decode_ms"])
            except (ValueError, KeyError, TypeError):
                reply.failure("no timings.decode_ms in the answer")
                return
            reply.request_meta["name"] = tagged(reply.request_meta["name"], decode_ms)


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

    def _call(self, name: str, fn, request, tag: bool = False) -> Any:  # type: ignore[no-untyped-def]
        """One call reported to locust; ``tag``: the name tagged by whether the answer needed
        an engine round."""
        t0 = time.perf_counter()
        exc = None
        size = 0
        reply = None
        try:
            reply = fn(request, timeout=30, metadata=METADATA)
            size = reply.ByteSize()
        except grpc.RpcError as err:
            exc = err
        if tag and reply is not None:
            name = tagged(name, reply.timings.decode_ms)
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - t0) * 1e3,
            response_length=size,
            exception=exc,
            context={},
        )
        return reply

    @task(20)
    def recommend(self) -> None:
        self._call(
            "Recommend", self.stub.Recommend, pb.RecommendRequest(user_id=pick_user(self.rng), k=10)
        )

    @task(4)
    def event_then_recommend(self) -> None:
        user = pick_user(self.rng)
        self._call(
            EVENT_AT_ONCE["grpc"],
            self.stub.AppendEvents,
            pb.AppendEventsRequest(user_id=user, item_ids=[self.rng.choice(ITEMS)]),
        )
        self._call(
            "Recommend after event", self.stub.Recommend, pb.RecommendRequest(user_id=user, k=10)
        )

    @task(1)
    def event_then_recommend_2s_later(self) -> None:
        user = pick_user(self.rng)
        self._call(
            EVENT_2S_BEFORE["grpc"],
            self.stub.AppendEvents,
            pb.AppendEventsRequest(user_id=user, item_ids=[self.rng.choice(ITEMS)]),
        )
        gevent.sleep(AFTER_EVENT_S)
        self._call(
            f"Recommend {AFTER_EVENT_2S}",
            self.stub.Recommend,
            pb.RecommendRequest(user_id=user, k=10),
            tag=True,
        )
