"""G sampled reasoning paths before the prefix search, on a tiny model with a reasoning
vocabulary (random weights: the paths are noise, the mechanics are real)."""

from __future__ import annotations

import pytest
import redis
import torch
from transformers import LlamaForCausalLM

from offline.errors import InputError
from offline.thinkahead.worker import ThinkAheadJob, ThinkAheadRun
from offline.train.presets import PRESETS, padded_vocab
from offline.train.tokenizer import save_tokenizer
from service.contracts.catalog import Catalog
from service.contracts.constraint import Constraint
from service.contracts.manifest import ModelManifest, ReasoningTemplate
from service.contracts.snapshot import Keyspace, UserPrefixes
from tests.helpers import run_cli

pytestmark = pytest.mark.vllm
WORDS = ["<think>", "</think>", "likes", "matte", "red", "lipstick", "wants", "gloss", "again"]


@pytest.fixture(scope="module")
def reasoning_model(tiny_world, tmp_path_factory):  # type: ignore[no-untyped-def]
    catalog = Catalog.load(tiny_world.catalog_dir)
    out = tmp_path_factory.mktemp("reasoning") / "model"
    tok = save_tokenizer(catalog.codebook_size, out, extra_tokens=WORDS)
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].config(
        padded_vocab(len(tok)), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    ModelManifest(
        model_version="reasoning-test",
        catalog_version=catalog.version,
        codebook_size=catalog.codebook_size,
        reasoning=ReasoningTemplate(max_tokens=12, temperature=1.0),
    ).write(out)
    return out


def test_paths_are_sampled_and_merged_into_valid_prefixes(tiny_world, reasoning_model, redis_url):  # type: ignore[no-untyped-def]
    # a child process: vLLM's distributed state is process-global, and this pytest process
    # already holds the session's in-process engine
    result = run_cli(
        "think-ahead",
        "--model", str(reasoning_model),
        "--catalog", str(tiny_world.catalog_dir),
        "--interactions", str(tiny_world.interactions_csv),
        "--redis", redis_url,
        "--paths", "3", "--prefixes", "6", "--beam", "6", "--max-users", "20",
        "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run = ThinkAheadRun(
        reasoning_model,
        tiny_world.catalog_dir,
        tiny_world.interactions_csv,
        redis_url,
        ThinkAheadJob(paths=3, prefixes=6, beam=6, max_users=20),
    )
    r = redis.Redis.from_url(redis_url)
    keys = Keyspace("ta")
    snapshot_id = r.get(keys.current).decode()
    catalog = run.catalog
    texts = set()
    for user, history in zip(run.plan.users, run.plan.histories, strict=True):
        value = UserPrefixes.decode(r.get(keys.user(snapshot_id, user)))
        assert value.reasoning is not None
        # the path between the tags (a random model also "thinks" in item tokens)
        # sampling stops at </think>: it never appears inside the stored path
        assert value.reasoning.strip() and "</think>" not in value.reasoning
        texts.add(value.reasoning)
        assert 1 <= len(value.prefixes) <= 6
        constraint = Constraint(catalog, history)
        assert all(constraint.has_prefix(p.a, p.b) for p in value.prefixes)
        assert all(p.score <= 1e-6 for p in value.prefixes)  # mean probability <= 1
    assert len(texts) > 1  # sampled, not one fixed string
    manifest = r.get(keys.manifest(snapshot_id))
    assert b'"paths": 3' in manifest


def test_several_paths_need_a_reasoning_template(tiny_world, redis_url) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="--paths 3 needs a model with a reasoning template"):
        ThinkAheadRun(
            tiny_world.model_dir,
            tiny_world.catalog_dir,
            tiny_world.interactions_csv,
            redis_url,
            ThinkAheadJob(paths=3),
        )
