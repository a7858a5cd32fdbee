"""``thinkahead think-ahead``: compute every user's C_u and publish it as a new Redis snapshot.

Users are cut into deterministic shards. A shard's values are written, then the shard is marked
done, so a run killed at any point (kill -9 included) and started again with the same inputs
resumes the same pending snapshot, redoes only unfinished shards, and flips ``current`` only
once every shard is in. Different inputs abandon the old pending snapshot and start anew.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from tqdm.auto import tqdm

from offline.data import read_interactions
from offline.errors import InputError
from offline.thinkahead.entries import CovisitSource, ItemSource, Thinker
from offline.thinkahead.publish import SnapshotWriter, connect_sync
from offline.thinkahead.reasoning import CategoryReasoner, Reasoner
from service.contracts.affinity import DEFAULT_AFFINITY_ITEMS
from service.contracts.answers import DEFAULT_ANSWER_ITEMS
from service.contracts.catalog import Catalog
from service.contracts.covisit import COVISIT_FILE
from service.contracts.manifest import MAX_HISTORY, SnapshotManifest, file_hash, sha256_hex
from service.contracts.model import ModelInfo, load_model_info, load_serving_config
from service.contracts.rationale import Categories
from service.contracts.snapshot import Keyspace, UserPrefixes
from service.contracts.think_ahead import ScoringSettings, ThinkAheadScorer
from service.contracts.tokens import Code
from service.engine.base import BatchEngine

log = logging.getLogger(__name__)


class ThinkAheadJob(BaseModel):
    paths: int | None = Field(
        default=None,
        ge=0,
        description="G reasoning paths; None: the model's reasoning template's (1 without one); "
        "0 with a category model: the rationale is stated and stored, the search runs plainly",
    )
    prefixes: int = Field(default=32, ge=1, le=256, description="M prefixes kept per user")
    beam: int = Field(default=32, ge=1, description="beam width of the 2-token prefix search")
    ttl_s: int = Field(default=3 * 86400, ge=60)
    grace_s: float = Field(default=3600, ge=0, description="keep replaced snapshots this long")
    shard_size: int = Field(default=2048, ge=1)
    batch_users: int = Field(default=256, ge=1)
    holdout_last: int = Field(default=0, ge=0, description="drop each user's last N events")
    key_prefix: str = "ta"
    history_prefix: str | None = Field(default=None, description="None: key_prefix")
    max_users: int | None = Field(default=None, ge=1, description="first N users (benchmarks)")
    answer_items: int = Field(
        default=DEFAULT_ANSWER_ITEMS,
        ge=0,
        le=1000,
        description="items of each user's whole answer stored for an unchanged history "
        "(answered with no engine work); 0: prefixes only",
    )
    affinity_items: int = Field(
        default=DEFAULT_AFFINITY_ITEMS,
        ge=0,
        le=1000,
        description="each user's best items under the item-level model stored with their "
        "scores (candidates and a feature online); 0 or no item model: none",
    )
    item_model: str | None = Field(
        default=None,
        description="item-level model directory (thinkahead train-items); None: the model "
        "directory's items/ when there is one",
    )
    c_tails: bool = Field(
        default=False,
        description="store log P(c | a, b) of every item under the multi-item prefixes, "
        "the user's and the extra ones (7 B/item, ~600 B/user on Beauty): an engine round "
        "after fresh events skips their c steps. Off by default: re-think and the no-engine "
        "re-rank make that round the exception",
    )

    @model_validator(mode="after")
    def _beam_covers_m(self) -> ThinkAheadJob:
        if self.beam < self.prefixes:
            raise ValueError(f"beam ({self.beam}) must be >= prefixes ({self.prefixes})")
        return self


@dataclass
class UserPlan:
    users: list[str]
    histories: list[list[Code]]
    skipped_unknown: int
    empty: int


@dataclass
class Summary:
    snapshot_id: str
    users: int
    written: int
    skipped_unknown: int
    empty_history: int
    prefixes_per_user: float
    shards: int
    resumed_shards: int
    seconds: float
    users_per_s: float
    previous_snapshot: str | None
    cleaned: list[str]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def plan_users(path: Path, catalog: Catalog, max_history: int, holdout_last: int) -> UserPlan:
    """Users with a usable history. Unknown items: the user is skipped and counted. Empty
    histories are left to the service's cold-start path."""
    seqs = read_interactions(path).truncated(holdout_last)
    users, histories = [], []
    skipped = empty = 0
    for user, items in zip(seqs.users, seqs.items, strict=True):
        if not items:
            empty += 1
            continue
        codes, unknown = catalog.codes_of(items[-max_history:])
        if unknown:
            skipped += 1
            continue
        users.append(user)
        histories.append(codes)
    return UserPlan(users, histories, skipped, empty)


def job_identity(
    model: ModelInfo,
    catalog: Catalog,
    data_hash: str,
    job: ThinkAheadJob,
    scoring: ScoringSettings,
    item_model_version: str | None = None,
) -> str:
    return sha256_hex(
        model.version.encode(),
        catalog.version.encode(),
        data_hash.encode(),
        job.model_dump_json(exclude={"grace_s"}).encode(),
        (scoring.key() if job.answer_items else "").encode(),
        (item_model_version or "").encode(),
    )


def scoring_settings(model_dir: Path, job: ThinkAheadJob) -> ScoringSettings:
    """How the service scores users with this model's serving.json, the job's M prefixes and
    its default settings: the stored answers' scoring."""
    return load_serving_config(model_dir).scoring(prefixes=job.prefixes)


def item_source(model_dir: Path, catalog: Catalog, job: ThinkAheadJob) -> ItemSource | None:
    directory = Path(job.item_model) if job.item_model else None
    return ItemSource.load(Path(model_dir), catalog, directory, job.affinity_items)


def new_snapshot_id(identity: str) -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{identity[:8]}"


def reasoner_for(
    model: ModelInfo, catalog: Catalog, catalog_dir: Path, paths: int | None
) -> Reasoner | CategoryReasoner | None:
    """The model's reasoner, or None (then G must be 1)."""
    template = model.manifest.reasoning
    if template is None:
        if (paths or 1) > 1:
            raise InputError(
                model.path,
                f"--paths {paths} needs a model with a reasoning template (manifest "
                "'reasoning'); this one has none: use --paths 1",
            )
        return None
    if template.kind == "categories":
        categories = Categories.load_optional(catalog_dir, len(catalog))
        if categories is None:
            raise InputError(catalog_dir, "the model reasons in categories; this catalog has none")
        return CategoryReasoner(model.path, catalog, categories, model.token_ids)
    return Reasoner(model.path, template, model.token_ids)


def thought_paths(model: ModelInfo, paths: int | None) -> int:
    """G: as asked, else the model's template's, else 1."""
    template = model.manifest.reasoning
    if paths is not None:
        return paths
    return template.paths if template is not None else 1


def make_thinker(
    engine: BatchEngine,
    model: ModelInfo,
    catalog: Catalog,
    job: ThinkAheadJob,
    scoring: ScoringSettings,
    covisit: CovisitSource | None,
    items: ItemSource | None,
    reasoner: Reasoner | CategoryReasoner | None = None,
) -> Thinker:
    """The job's entry computer: the same one eval and re-think use."""
    return Thinker(
        engine,
        ThinkAheadScorer(catalog, model.token_ids, scoring),
        model.version,
        beam=job.beam,
        covisit=covisit,
        items=items,
        answer_items=job.answer_items,
        c_tails=job.c_tails,
        reasoner=reasoner,
        paths=thought_paths(model, job.paths),
    )


def process_shard(
    thinker: Thinker,
    job: ThinkAheadJob,
    users: Sequence[str],
    histories: Sequence[Sequence[Code]],
    on_batch: Callable[[int], None],
) -> list[tuple[str, UserPrefixes]]:
    values: list[tuple[str, UserPrefixes]] = []
    for start in range(0, len(users), job.batch_users):
        batch = histories[start : start + job.batch_users]
        entries = thinker.entries(batch, seed=start)
        values.extend(zip(users[start : start + len(batch)], entries, strict=True))
        on_batch(len(batch))
    return values


class ThinkAheadRun:
    """One run: resolve the snapshot (new or resumed), then shards, then publish."""

    def __init__(
        self,
        model_dir: Path,
        catalog_dir: Path,
        interactions: Path,
        redis_url: str,
        job: ThinkAheadJob,
        cluster: bool = False,
    ) -> None:
        self.catalog = Catalog.load(catalog_dir)
        self.model = load_model_info(model_dir, self.catalog)  # refuses a catalog mismatch
        self.model_dir, self.catalog_dir = Path(model_dir), Path(catalog_dir)
        # refuses G > 1 without a template before any work
        self.reasoner = reasoner_for(self.model, self.catalog, self.catalog_dir, job.paths)
        self.redis_url, self.cluster = redis_url, cluster
        self.job = job
        self.plan = plan_users(interactions, self.catalog, self.model.max_history, job.holdout_last)
        self.covisit = CovisitSource.load(self.catalog_dir, self.catalog)
        self.scoring = scoring_settings(self.model_dir, job)
        self.items = item_source(self.model_dir, self.catalog, job)
        if job.max_users is not None:
            self.plan.users = self.plan.users[: job.max_users]
            self.plan.histories = self.plan.histories[: job.max_users]
        self.writer = SnapshotWriter(
            connect_sync(redis_url, cluster=cluster),
            Keyspace(job.key_prefix, job.history_prefix),
            job.ttl_s,
        )
        self.identity = job_identity(
            self.model,
            self.catalog,
            file_hash(interactions),
            job,
            self.scoring,
            self.items.model.version if self.items is not None else None,
        )
        self.shards = [
            (
                i,
                self.plan.users[s : s + job.shard_size],
                self.plan.histories[s : s + job.shard_size],
            )
            for i, s in enumerate(range(0, len(self.plan.users), job.shard_size))
        ]

    def seed_histories(self, interactions: Path, cap: int = MAX_HISTORY) -> int:
        """Load users' recent histories into ``ta:hist`` (what the online prompt reads): the
        same events the snapshot was computed from (``holdout_last`` of the job applies), so
        a seeded user's history digest matches their snapshot value."""
        seqs = read_interactions(interactions).truncated(self.job.holdout_last)
        return self.writer.seed_histories(zip(seqs.users, seqs.items, strict=True), cap)

    def open_snapshot(self) -> tuple[SnapshotManifest, set[int]]:
        self.writer.ping()  # fail before loading an engine when Redis is not there
        pending = self.writer.pending()
        if pending is not None and pending[1].parameters.get("identity") == self.identity:
            sid, manifest = pending
            return manifest, self.writer.done_shards(sid)
        if pending is not None:
            log.info("abandoning pending snapshot %s (other inputs)", pending[0])
            self.writer.abandon(pending[0])
        manifest = SnapshotManifest(
            snapshot_id=new_snapshot_id(self.identity),
            model_version=self.model.version,
            catalog_version=self.catalog.version,
            prefixes_per_user=self.job.prefixes,
            paths=thought_paths(self.model, self.job.paths),
            beam=self.job.beam,
            aggregation=(
                "log sum over paths of P(category) P(a, b | category)"
                if self.reasoner is not None and isinstance(self.reasoner, CategoryReasoner)
                else "log-mean-prob over paths"
            ),
            answers_key=self.scoring.key() if self.job.answer_items else None,
            answer_items=self.job.answer_items,
            parameters={
                "identity": self.identity,
                "status": "building",
                "shards": len(self.shards),
                "item_model_version": self.items.model.version if self.items else None,
                **self.job.model_dump(),
            },
        )
        self.writer.begin(manifest)
        return manifest, set()

    def publish_covisit(self, snapshot_id: str) -> str | None:
        """Write the co-visitation table the users were scored with under the snapshot; its
        version, or None when the catalog has none (the service then serves without it)."""
        if self.covisit is None:
            log.warning(
                "no %s in %s: the snapshot carries no co-visitation table",
                COVISIT_FILE,
                self.catalog_dir,
            )
            return None
        self.writer.write_covisit(snapshot_id, self.covisit.neighbours.items())
        return self.covisit.version

    def finish(self, manifest: SnapshotManifest, started: float, resumed: int) -> Summary:
        covisit_version = self.publish_covisit(manifest.snapshot_id)
        final = manifest.model_copy(
            update={
                "num_users": len(self.plan.users),
                "parameters": {
                    **manifest.parameters,
                    "status": "complete",
                    "covisit_version": covisit_version,
                },
            }
        )
        previous = self.writer.publish(final)
        cleaned = self.writer.cleanup(self.job.grace_s)
        seconds = time.monotonic() - started
        return Summary(
            snapshot_id=manifest.snapshot_id,
            users=len(self.plan.users) + self.plan.skipped_unknown + self.plan.empty,
            written=len(self.plan.users),
            skipped_unknown=self.plan.skipped_unknown,
            empty_history=self.plan.empty,
            prefixes_per_user=float(self.job.prefixes),
            shards=len(self.shards),
            resumed_shards=resumed,
            seconds=round(seconds, 2),
            users_per_s=round(len(self.plan.users) / max(seconds, 1e-9), 1),
            previous_snapshot=previous,
            cleaned=cleaned,
        )

    def thinker(self, engine: BatchEngine) -> Thinker:
        return make_thinker(
            engine,
            self.model,
            self.catalog,
            self.job,
            self.scoring,
            self.covisit,
            self.items,
            self.reasoner,
        )

    def run(self, engine_factory: Callable[[], BatchEngine], progress: bool = True) -> Summary:
        started = time.monotonic()
        manifest, done = self.open_snapshot()
        todo = [s for s in self.shards if s[0] not in done]
        bar = tqdm(
            total=len(self.plan.users),
            initial=sum(len(s[1]) for s in self.shards if s[0] in done),
            desc="think-ahead",
            unit="user",
            disable=not progress,
        )
        if todo:
            thinker = self.thinker(engine_factory())
            for index, users, histories in todo:
                values = process_shard(thinker, self.job, users, histories, bar.update)
                self.writer.write_shard(manifest.snapshot_id, index, values)
        bar.close()
        return self.finish(manifest, started, resumed=len(done))


def local_engine_factory(model_dir: Path) -> Callable[[], BatchEngine]:
    """vLLM's offline engine for this process (imported only when a shard needs it)."""

    def make() -> BatchEngine:
        from service.engine.vllm_engine import VllmBatchEngine, VllmOptions

        return VllmBatchEngine(model_dir, VllmOptions())

    return make
