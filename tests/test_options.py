"""The loss options are checked and turned into one KDOptions once per call, whatever the op, the
number of chunks or the process group: counted here by wrapping KDOptions' constructor, with the
parse cache turned off (so that every parse builds one)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import kdfused
from kdfused import _options
from kdfused import topk as _topk
from kdfused._options import KDOptions

pytestmark = pytest.mark.fused_only


@pytest.fixture
def built(monkeypatch):
    """A counter of KDOptions built, each parse building one (no cache)."""
    count = [0]
    post_init = KDOptions.__post_init__

    def counting(self):
        count[0] += 1
        post_init(self)

    monkeypatch.setattr(KDOptions, "__post_init__", counting)
    monkeypatch.setattr(_options, "_parse_cached", _options._parse)
    monkeypatch.setattr(_options, "_from_keywords_cached", _options._from_keywords)
    monkeypatch.setattr(_topk, "_topk_options_cached", _topk._parse_topk)
    return count


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo backend")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "f"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _logits(gen, n=40, v=33):
    s = torch.randn(n, v, generator=gen).requires_grad_(True)
    return s, torch.randn(n, v, generator=gen), torch.randint(0, v, (n,), generator=gen)


KW = dict(temperature=1.7, soft_weight=0.6, hard_weight=0.4, divergence="jsd", beta=0.3)


def test_kd_loss_parses_once(built, gen):
    s, t, y = _logits(gen)
    kdfused.kd_loss(s, t, y, **KW).backward()
    assert built[0] == 1


def test_linear_kd_loss_parses_once_for_all_chunks(built, gen):
    h, w = torch.randn(40, 8, generator=gen), torch.randn(33, 8, generator=gen)
    th, tw = torch.randn(40, 8, generator=gen), torch.randn(33, 8, generator=gen)
    y = torch.randint(0, 33, (40,), generator=gen)
    h.requires_grad_(True)
    kdfused.linear_kd_loss(h, w, th, tw, y, chunk_size=3, **KW).backward()  # 14 chunks
    assert built[0] == 1


def test_topk_kd_loss_parses_once(built, gen):
    s, t, y = _logits(gen)
    idx, vals = kdfused.topk_teacher(t, 5)
    kw = dict(KW, divergence="kl")
    del kw["beta"]
    kdfused.topk_kd_loss(s, idx, vals, y, **kw).backward()
    assert built[0] == 1


def test_the_cache_builds_nothing_for_options_seen_before(gen):
    s, t, y = _logits(gen)
    kw = dict(KW, temperature=1.2345)
    kdfused.kd_loss(s, t, y, **kw)
    hits = _options._from_keywords_cached.cache_info().hits
    kdfused.kd_loss(s, t, y, **kw)
    assert _options._from_keywords_cached.cache_info().hits == hits + 1


def test_modules_parse_when_built_not_when_called(built, gen):
    s, t, y = _logits(gen)
    crit = kdfused.KDLoss(**KW)
    assert built[0] == 1
    for _ in range(3):
        crit(s, t, y).backward()
    assert built[0] == 1


@pytest.mark.parametrize("op", ["kd_loss", "linear_kd_loss"])
def test_vocabulary_parallel_parses_once(built, gen, group, op):
    s, t, y = _logits(gen)
    if op == "kd_loss":
        kdfused.kd_loss(s, t, y, process_group=group, **KW).backward()
    else:
        h, w = torch.randn(40, 8, generator=gen), torch.randn(33, 8, generator=gen)
        h.requires_grad_(True)
        kdfused.linear_kd_loss(
            h, w, None, None, y, teacher_logits=t, chunk_size=4, process_group=group, **KW
        ).backward()
    assert built[0] == 1
