"""Teacher-output cache: round trips, validity (stale caches, augmentation), resumable and sharded builds."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.config import parse_config
from kdistill.data import ArrayDataset
from kdistill.data.augment import AugmentedDataset
from kdistill.distiller import Distiller, LiveTeacher, Term
from kdistill.errors import CacheError, ConfigError, WiringError
from kdistill.losses import SparseDistribution
from kdistill.teachers import CacheSpec, CacheStore, build_cache, open_cache
from kdistill.teachers.cache import cache_key_parts

from conftest import tiny_config


def dataset(n=300, d=6, seed=0, image=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g) if image else torch.randn(n, d, generator=g)
    return ArrayDataset({"x": x, "y": torch.randint(0, 5, (n,), generator=g)}, "toy")


def teacher_net(seed=0, d=6, classes=5, image=False):
    torch.manual_seed(seed)
    head = [nn.Flatten(), nn.Linear(16, d)] if image else []
    return nn.Sequential(*head, nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, classes))


def test_dense_cache_returns_the_teacher_outputs_and_taps(tmp_path):
    data, net = dataset(), teacher_net()
    live = LiveTeacher(net, {"hidden": "1"})
    cached = build_cache(live, data, tmp_path, CacheSpec(dtype="float32", shard_rows=64), outputs=["hidden", "logits"])
    assert CacheStore(tmp_path).done_shards() == set(range(5))
    idx = torch.tensor([299, 0, 64, 63, 128, 5])
    batch = data.batch(idx)
    want, got = live(batch), cached(batch)
    assert set(got) == {"logits", "hidden"}
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    prefetched = {**batch, **cached.prefetch(batch)}  # the engine's path: rows read on the host first
    for name, value in cached(prefetched).items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)
    # reading goes through memory maps, never a whole-file load
    assert all(isinstance(a.base, np.memmap) for shard in cached.reader._open() for a in shard.values())


def test_fp16_and_bf16_storage_round_trip(tmp_path):
    data, live = dataset(), LiveTeacher(teacher_net())
    batch = data.batch(torch.arange(40))
    want = live(batch)["logits"]
    for dtype, tol in (("float16", 1e-2), ("bfloat16", 6e-2)):
        cached = build_cache(live, data, tmp_path / dtype, CacheSpec(dtype=dtype))
        assert cached.reader.fields[0].row_bytes() == 10
        torch.testing.assert_close(cached(batch)["logits"], want, rtol=tol, atol=tol)


def test_topk_cache_stores_k_plus_one_buckets(tmp_path):
    data, live = dataset(), LiveTeacher(teacher_net())
    cached = build_cache(live, data, tmp_path, CacheSpec(kind="topk", k=2, temperature=2.0, dtype="float32"))
    batch = data.batch(torch.arange(10))
    got = cached(batch)["logits"]
    want = SparseDistribution.from_logits(live(batch)["logits"], 2, 2.0)
    assert isinstance(got, SparseDistribution) and got.temperature == 2.0 and got.num_classes == 5
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.log_probs, want.log_probs)
    torch.testing.assert_close(got.log_tail, want.log_tail)
    files = {p.name: p for p in (tmp_path / "shards" / "00000").iterdir()}
    assert np.load(files["logits.indices.npy"]).dtype == np.uint16  # V <= 65536
    # a distiller routes the sparse teacher value to the k + 1 bucket loss; losses without one are refused
    student = nn.Linear(6, 5)
    d = Distiller(student, cached, [Term("kd", "kd", params={"temperature": 2.0})])
    d.build(batch)
    assert torch.isfinite(d(batch).loss)
    bad = Distiller(nn.Linear(6, 5), cached, [Term("dkd", "dkd", params={"temperature": 2.0})])
    with pytest.raises(WiringError, match="full teacher distribution"):
        bad.build(batch)


def test_topk_bytes_per_token_and_wide_vocabulary_indices(tmp_path):
    k, tokens = 8, 6

    class Wide:
        def __init__(self, vocab):
            self.vocab = vocab

        def fingerprint(self):
            return {"synthetic": self.vocab}

        def __call__(self, batch):
            g = torch.Generator().manual_seed(int(batch["index"][0]))
            return {"logits": torch.randn(len(batch["index"]), tokens, self.vocab, generator=g)}

    data = ArrayDataset({"x": torch.zeros(20, 1)}, "tokens")
    for vocab, index_dtype in ((1000, np.uint16), (70000, np.int32)):
        cached = build_cache(Wide(vocab), data, tmp_path / str(vocab), CacheSpec(kind="topk", k=k, batch_size=4))
        shard = tmp_path / str(vocab) / "shards" / "00000"
        assert np.load(shard / "logits.indices.npy", mmap_mode="r").dtype == index_dtype
        payload = sum(int(np.prod(np.load(p, mmap_mode="r").shape)) * np.load(p, mmap_mode="r").itemsize
                      for p in shard.iterdir())
        per_token = payload / (20 * tokens)
        assert per_token == (4 * k + 4 if vocab <= 65536 else 6 * k + 4)
        assert cached(data.batch(torch.arange(3)))["logits"].shape == (3, tokens, vocab)


def test_stale_cache_is_refused_naming_what_changed(tmp_path):
    data, net = dataset(), teacher_net()
    build_cache(LiveTeacher(net), data, tmp_path)
    other = teacher_net(seed=1)
    with pytest.raises(CacheError, match="stale: the teacher differs"):
        build_cache(LiveTeacher(other), data, tmp_path)
    with pytest.raises(CacheError, match="stale: the dataset differs"):
        build_cache(LiveTeacher(net), dataset(seed=1), tmp_path)
    with pytest.raises(CacheError, match="stale: the input transform"):
        build_cache(LiveTeacher(net), AugmentedDataset(data, max_shift=1, views=2), tmp_path)
    with pytest.raises(CacheError, match="stale: the storage settings"):
        build_cache(LiveTeacher(net), data, tmp_path, CacheSpec(kind="topk", k=2))
    with pytest.raises(CacheError, match="stale: the teacher differs"):
        open_cache(tmp_path, cache_key_parts(LiveTeacher(other), data, CacheSpec(), ["logits"]))
    # one changed weight is enough
    with torch.no_grad():
        net[0].bias[0] += 1e-3
    with pytest.raises(CacheError, match="teacher differs"):
        build_cache(LiveTeacher(net), data, tmp_path)
    rebuilt = build_cache(LiveTeacher(net), data, tmp_path, rebuild=True)
    batch = data.batch(torch.arange(4))
    torch.testing.assert_close(rebuilt(batch)["logits"], LiveTeacher(net)(batch)["logits"], rtol=1e-2, atol=1e-2)


def test_random_augmentation_is_refused_with_an_explanation(tmp_path):
    data = AugmentedDataset(dataset(image=True), max_shift=1, flip=True)  # new randomness every step
    with pytest.raises(CacheError, match="augments its inputs randomly at every step.*views"):
        build_cache(LiveTeacher(teacher_net(image=True)), data, tmp_path)
    with pytest.raises(ConfigError, match="data.augment.views"):
        parse_config(tiny_config(teacher={"name": "cnn1d", "cache": {}},
                                 data={"name": "mnist1d", "augment": {"max_shift": 2}}))


def test_augmentation_views_are_keyed_by_index_and_seed(tmp_path):
    base = dataset(n=100, image=True)
    data = AugmentedDataset(base, max_shift=1, flip=True, views=3)
    live = LiveTeacher(teacher_net(image=True))
    cached = build_cache(live, data, tmp_path, CacheSpec(dtype="float32", shard_rows=70))
    assert cached.reader.views == 3 and cached.reader.num_shards == 5  # 300 rows
    torch.manual_seed(0)
    batch = data.batch(torch.arange(100))  # each row under a random one of the 3 views
    assert len(batch["aug_seed"].unique()) == 3
    views = [data.batch(torch.arange(100), aug_seed=torch.full((100,), v))["x"] for v in range(3)]
    assert not torch.equal(views[0], views[1])  # the views really differ
    torch.testing.assert_close(cached(batch)["logits"], live(batch)["logits"], rtol=0, atol=0)
    # a batch without its view, or of un-augmented inputs for an augmented cache, is refused
    with pytest.raises(CacheError, match="no 'aug_seed'"):
        cached(base.batch(torch.arange(4)))
    plain = build_cache(live, base, tmp_path / "plain")
    with pytest.raises(CacheError, match="augmented inputs"):
        plain(batch)


KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_teacher_cache import dataset, teacher_net
    from kdistill.distiller import LiveTeacher
    from kdistill.teachers import CacheSpec, build_cache, teacher_fingerprint

    live = LiveTeacher(teacher_net())

    class DiesInThirdShard:
        calls = 0
        def fingerprint(self):
            return teacher_fingerprint(live)
        def __call__(self, batch):
            self.calls += 1
            if self.calls == 1 + 2 * 4 + 2:  # probe, two shards of 4 batches, half of the third shard
                os.kill(os.getpid(), signal.SIGKILL)
            return live(batch)

    build_cache(DiesInThirdShard(), dataset(), {root!r}, CacheSpec(shard_rows=64, batch_size=16))
""")


def test_a_build_killed_midway_resumes(tmp_path):
    root = tmp_path / "cache"
    script = KILLED_BUILD.format(tests=os.path.dirname(__file__), root=str(root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = CacheStore(root)
    assert store.done_shards() == {0, 1} and store.shard_tmp(2).is_dir() and not store.is_complete()
    with pytest.raises(CacheError, match="incomplete.*2 of 5"):
        open_cache(root)

    live = LiveTeacher(teacher_net())
    rows_run = []

    class Counting:
        def fingerprint(self):
            return {"weights": __import__("kdistill.teachers", fromlist=["x"]).weights_fingerprint(live.model),
                    "taps": {}}

        def __call__(self, batch):
            rows_run.append(len(batch["index"]))
            return live(batch)

    resumed = build_cache(Counting(), dataset(), root, CacheSpec(shard_rows=64, batch_size=16), log=lambda m: None)
    assert sum(rows_run) == 300 - 128  # only the three missing shards ran
    fresh = build_cache(live, dataset(), tmp_path / "fresh", CacheSpec(shard_rows=64, batch_size=16))
    idx = torch.arange(300)
    assert torch.equal(resumed(dataset().batch(idx))["logits"], fresh(dataset().batch(idx))["logits"])


def test_build_is_sharded_across_ranks(tmp_path):
    data, live = dataset(), LiveTeacher(teacher_net())
    barrier = threading.Barrier(2)
    seen, errors = {0: [], 1: []}, []

    class PerRank:
        def __init__(self, rank):
            self.rank = rank

        def fingerprint(self):
            return {"weights": "same-teacher"}

        def __call__(self, batch):
            seen[self.rank].append(batch["index"].clone())
            return live(batch)

    def run(rank):
        try:
            build_cache(PerRank(rank), data, tmp_path, CacheSpec(shard_rows=64, batch_size=64), rank=rank,
                        world_size=2, barrier=barrier.wait)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    rows = {r: torch.cat(seen[r][1:] if r == 0 else seen[r]) for r in (0, 1)}  # rank 0's first call: the probe
    assert sorted(set((rows[0] // 64).tolist())) == [0, 2, 4] and sorted(set((rows[1] // 64).tolist())) == [1, 3]
    cached = open_cache(tmp_path)
    batch = data.batch(torch.arange(300))
    torch.testing.assert_close(cached(batch)["logits"], live(batch)["logits"], rtol=1e-2, atol=1e-2)


def test_offline_run_builds_reuses_and_refuses_a_stale_cache(tmp_path):
    from kdistill.schemes.offline import build_teacher_cache, run

    cache = tmp_path / "shared-cache"
    cfg = parse_config(tiny_config(data={"name": "digits", "transfer": {"size": 0}}, baseline=False,
                                   teacher={"name": "mlp", "kwargs": {"hidden": [32]},
                                            "train": {"steps": 20, "batch_size": 64, "log_every": 10},
                                            "cache": {"dir": str(cache), "kind": "topk", "k": 3}}))
    quiet = dict(progress=False, log=lambda m: None)
    built = build_teacher_cache(cfg, tmp_path / "a", **quiet)
    assert built.reader.num_samples == 512 and built.fields[0].temperature == 2.0
    summary = run(cfg, tmp_path / "a", **quiet)  # reuses the cache (teacher stage done, same key)
    assert summary["student"]["accuracy"] > 0
    # another teacher (its weights perturbed) on the same cache folder is refused
    from kdistill.engine.checkpoint import load_weights, save_weights

    weights = load_weights(tmp_path / "a" / "teacher.safetensors")
    next(v for v in weights.values() if v.is_floating_point()).add_(1e-3)
    save_weights(tmp_path / "other.safetensors", weights)
    other = cfg.model_copy(deep=True)
    other.teacher.weights = str(tmp_path / "other.safetensors")
    with pytest.raises(CacheError, match="stale: the teacher differs"):
        run(other, tmp_path / "b", **quiet)
    dkd = parse_config(tiny_config(data={"name": "digits", "transfer": {"size": 0}},
                                   distill={"terms": [{"loss": "dkd"}]},
                                   teacher={"name": "mlp", "cache": {"dir": str(cache), "kind": "topk"}}))
    with pytest.raises(ConfigError, match="dkd.*kind: dense"):
        build_teacher_cache(dkd, tmp_path / "c", **quiet)


def test_cli_cache_build_then_stale_is_one_line_exit_2(tmp_path, capsys):
    import yaml

    from kdistill.cli import main

    cfg = tiny_config(data={"name": "digits", "transfer": {"size": 0}}, baseline=False,
                      teacher={"name": "mlp", "kwargs": {"hidden": [16]},
                               "train": {"steps": 10, "batch_size": 64, "log_every": 10},
                               "cache": {"dir": str(tmp_path / "cache")}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["cache", "build", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert "teacher cache:" in capsys.readouterr().out and open_cache(tmp_path / "cache").reader.num_samples == 512
    cfg["teacher"]["train"]["steps"] = 11  # another teacher, same cache folder
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["cache", "build", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: error: the teacher-output cache") and "stale" in err and "\n" not in err
    assert main(["cache", "build", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "b"), "--no-progress",
                 "--rebuild"]) == 0
