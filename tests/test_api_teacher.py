"""Black-box teachers: a real local HTTP server (counting what it is sent), the answer cache across a killed run,
the budget, retries with back-off, answer forms, and the CLI's one-line errors."""

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import yaml

from kdistill.cli import main
from kdistill.teachers.api import (ApiError, ApiTeacher, ApiTeacherModel, CallableBackend, HttpBackend,
                                   distributions, parse_answers)
from kdistill.teachers.api_cache import AnswerCache



def fitted_weights():
    """A linear teacher for scikit-learn's digits (inputs / 16, as kdistill loads them): ridge on one-hot."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.images.reshape(-1, 64) / 16.0, np.eye(10)[d.target]
    return 8 * np.linalg.solve(x.T @ x + np.eye(64), x.T @ y)


W = fitted_weights()


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def linear_teacher(rows):
    """A callable teacher (import path tests.test_api_teacher:linear_teacher): probabilities of a linear model."""
    rows = np.asarray(rows, dtype=np.float64)
    return softmax(rows.reshape(len(rows), -1) @ W)


class Server:
    """A local teacher endpoint: `mode` is probs | labels | topk | badjson; the first `fail` requests get 503."""

    def __init__(self):
        self.requests, self.rows, self.seen, self.fail, self.mode = 0, 0, [], 0, "probs"
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests += 1
                if owner.fail > 0:
                    owner.fail -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                x = np.asarray(body["inputs"], dtype=np.float64)
                owner.rows += len(x)
                owner.seen += [hashlib.sha1(r.astype(np.float32).tobytes()).hexdigest() for r in x]
                p = linear_teacher(x)
                answer = {"probs": {"probs": p.tolist()}, "labels": {"labels": p.argmax(1).tolist()},
                          "topk": {"topk": {"indices": np.argsort(-p, 1)[:, :3].tolist(),
                                            "probs": np.sort(p, 1)[:, ::-1][:, :3].tolist()}}}.get(owner.mode)
                data = b"{not json" if answer is None else json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/predict"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def http_teacher(server, path, **options):
    backend = HttpBackend(server.url, timeout=5)
    options = {"batch_size": 50, "retries": 0, "backoff": 0.0, "log": lambda line: None, **options}
    return ApiTeacher(backend, AnswerCache(path, backend.identity), **options)


ROWS = np.random.default_rng(1).normal(size=(300, 64)).astype(np.float32)


def test_killed_run_restarts_without_resending_answered_rows(server, tmp_path):
    db = tmp_path / "answers.sqlite"
    first = http_teacher(server, db)
    real, calls = first.backend, []

    def killed_after_three(batch):  # the process dies before its 4th request
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(len(batch))
        return real(batch)

    first.backend = killed_after_three
    with pytest.raises(KeyboardInterrupt):
        first.answers(ROWS)
    assert (server.requests, server.rows) == (3, 150)
    second = http_teacher(server, db)  # a new process, the same answer file
    got = distributions(second.answers(ROWS), 10)
    assert (server.requests, server.rows) == (6, 300) and len(set(server.seen)) == 300  # nothing sent twice
    assert np.allclose(got, linear_teacher(ROWS), atol=1e-6)
    assert second.cache.sent() == 300
    http_teacher(server, db).answers(ROWS[::-1])  # everything cached: no request at all
    assert server.requests == 6


def test_budget_is_checked_before_sending_and_never_exceeded(server, tmp_path):
    db = tmp_path / "answers.sqlite"
    with pytest.raises(ApiError, match="budget of 250 rows is too small.*nothing was sent"):
        http_teacher(server, db, budget=250).answers(ROWS)
    assert server.requests == 0
    teacher = http_teacher(server, db, budget=300)
    teacher.answers(ROWS[:200])
    teacher.answers(ROWS[:200])  # cached rows cost nothing
    more = np.random.default_rng(2).normal(size=(150, 64)).astype(np.float32)
    with pytest.raises(ApiError, match=r"at least 350"):
        http_teacher(server, db, budget=300).answers(more)  # a restart sees the rows already sent
    assert server.rows == 200 and AnswerCache(db, teacher.backend.identity).sent() == 200


def test_retries_back_off_on_503_then_succeed_and_are_bounded(server, tmp_path):
    waits = []
    server.fail = 2
    teacher = http_teacher(server, tmp_path / "a.sqlite", retries=3, backoff=0.25, max_backoff=0.4,
                           sleep=waits.append)
    teacher.answers(ROWS[:10])
    assert waits == [0.25, 0.4] and server.requests == 3 and server.rows == 10
    server.fail = 10
    with pytest.raises(ApiError, match=r"did not answer after 2 attempt\(s\): HTTP 503"):
        http_teacher(server, tmp_path / "b.sqlite", retries=1, sleep=waits.append).answers(ROWS[:10])
    assert AnswerCache(tmp_path / "b.sqlite", teacher.backend.identity).sent() == 0  # failed requests released


def test_answer_forms_and_hard_labels(server, tmp_path):
    p = linear_teacher(ROWS[:20])
    server.mode = "labels"
    teacher = http_teacher(server, tmp_path / "l.sqlite")
    model = ApiTeacherModel(teacher, 10, label_smoothing=0.1)
    logits = model(torch.from_numpy(ROWS[:20]))
    want = np.full((20, 10), 0.01)
    want[np.arange(20), p.argmax(1)] = 0.91
    assert np.allclose(torch.softmax(logits.double(), -1).numpy(), want, atol=1e-6)
    server.mode = "topk"
    top = distributions(http_teacher(server, tmp_path / "t.sqlite").answers(ROWS[:20]), 10)
    order = np.argsort(-p, 1)
    assert np.allclose(np.take_along_axis(top, order[:, :3], 1), np.take_along_axis(p, order[:, :3], 1), atol=1e-6)
    rest = 1 - np.sort(p, 1)[:, ::-1][:, :3].sum(1)
    assert np.allclose(np.take_along_axis(top, order[:, 3:], 1), (rest / 7)[:, None], atol=1e-6)
    # a callable answering a (indices, probs) tuple, and configurable field names
    assert parse_answers((np.array([[2]]), np.array([[0.7]])), 1) == [{"i": [2], "p": [0.7]}]
    assert parse_answers({"scores": [[0.25, 0.75]]}, 1, {"probs": "scores"}) == [{"p": [0.25, 0.75]}]
    for bad, match in (({"probs": [[0.5, 0.9]]}, "probabilities"), ({"labels": [1, 2]}, "2 labels for 1 rows"),
                       ({"other": 1}, "none of the fields")):
        with pytest.raises(ApiError, match=match):
            parse_answers(bad, 1)


def test_log_probs_as_logits_keep_the_temperature_exact(tmp_path):
    """softmax(log p / T) == softmax(z / T) for the teacher's hidden logits z (float64 reference)."""
    backend = CallableBackend("tests.test_api_teacher:linear_teacher")
    model = ApiTeacherModel(ApiTeacher(backend, AnswerCache(tmp_path / "c.sqlite", backend.identity)), 10, 0.0)
    rows = ROWS[:30] / 4  # logits within +-5: no probability near the 1e-8 floor
    z = rows.astype(np.float64) @ W
    for temperature in (1.0, 4.0):
        got = torch.softmax(model(torch.from_numpy(rows)).double() / temperature, -1).numpy()
        assert np.allclose(got, softmax(z / temperature), atol=1e-5)


def test_sklearn_ensemble_teacher_through_the_callable_path(tmp_path):
    from kdistill.teachers.sklearn_teacher import fit_sklearn_teacher

    x, y = ROWS[:120, :5], (ROWS[:120, 0] > 0).astype(int)
    path = fit_sklearn_teacher(x, y, tmp_path / "t.joblib", model="random_forest", n_estimators=10)
    backend = CallableBackend("kdistill.teachers.sklearn_teacher:sklearn_teacher", {"path": str(path)})
    assert "sklearn:" in backend.identity
    teacher = ApiTeacher(backend, AnswerCache(tmp_path / "a.sqlite", backend.identity), batch_size=32)
    probs = teacher.probabilities(x, 2)
    assert (probs.argmax(1) == y).mean() > 0.95 and teacher.requests == 4


def test_sklearn_teacher_fitted_on_a_configs_training_split(tmp_path, capsys):
    """`python -m kdistill.teachers.sklearn_teacher CONFIG --out FILE` fits on the rows the run reads (here
    standardised), so the saved teacher answers the run's inputs; a bad config is one line, exit 2."""
    import pandas as pd

    from kdistill.config import load_config
    from kdistill.data import load_data
    from kdistill.teachers.sklearn_teacher import main as fit_main
    from kdistill.teachers.sklearn_teacher import sklearn_teacher

    x = ROWS[:150, :4] * 50 + 100  # far from standardised
    frame = pd.DataFrame(x, columns=list("abcd"))
    frame["label"] = (ROWS[:150, 0] > 0).astype(int)
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = {"data": {"train": str(tmp_path / "t.csv"), "test": {"fraction": 0.2}, "standardize": True},
           "teacher": {"kind": "api", "call": "kdistill.teachers.sklearn_teacher:sklearn_teacher",
                       "kwargs": {"path": str(tmp_path / "t.joblib")}}, "student": {"name": "mlp"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert fit_main([str(tmp_path / "c.yaml"), "--out", str(tmp_path / "t.joblib"), "--model", "random_forest"]) == 0
    bundle = load_data(load_config(tmp_path / "c.yaml").data)
    predict = sklearn_teacher(str(tmp_path / "t.joblib"))
    assert (predict(bundle.test.tensors["x"].numpy()).argmax(1) == bundle.test.tensors["y"].numpy()).mean() > 0.9
    (tmp_path / "bad.yaml").write_text("teacher: {kind: api}\nstudent: {name: mlp}\n")
    assert fit_main([str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x.joblib")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_python_api_distils_from_a_black_box(tmp_path):
    """`kdistill.distill` takes a black-box teacher module (copied with its own cache connection)."""
    import kdistill
    from kdistill.models import build_model
    from kdistill.teachers.api import black_box

    teacher = black_box(10, str(tmp_path / "a.sqlite"), call="tests.test_api_teacher:linear_teacher", batch_size=40)
    x = np.random.default_rng(3).random((80, 1, 8, 8)).astype(np.float32)
    y = linear_teacher(x).argmax(1)
    student = build_model("mlp", {"hidden": [8]}, input_shape=(1, 8, 8), num_classes=10)
    result = kdistill.distill(teacher, student, (x, y), steps=3, batch_size=16, baseline=False, progress=False,
                              log=lambda line: None, eval_options={"latency_repeats": 1, "threads": 1,
                                                                   "throughput_batch": 2})
    assert result.summary["teacher"]["accuracy"] == 1.0
    cache = AnswerCache(tmp_path / "a.sqlite", teacher.teacher.backend.identity + "|")
    asked = cache._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    assert 0 < asked <= 80 and cache.sent() == asked  # rows asked lazily, batch by batch, each once


# -- the CLI: a whole run from a config, and its one-line errors -------------------------------------------------

def api_config(tmp_path, url, **teacher):
    cfg = {"data": {"name": "digits", "train_size": 128, "test_size": 64},
           "teacher": {"kind": "api", "url": url, "answers": str(tmp_path / "answers.sqlite"), "batch_size": 100,
                       "retries": 1, "backoff": 0.01, **teacher},
           "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
           "train": {"steps": 8, "batch_size": 32, "log_every": 4}, "baseline": False,
           "eval": {"latency_repeats": 1, "throughput_batch": 4, "threads": 1}}
    path = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_run_labels_each_row_once_and_a_restart_sends_nothing(server, tmp_path, capsys):
    from kdistill.config import load_config
    from kdistill.data import load_data
    from kdistill.teachers.setup import api_rows, api_teacher, check_api_budget

    path = api_config(tmp_path, server.url, budget=192)
    code, err = run_cli(["run", path, "--out", tmp_path / "r1"], capsys)
    assert code == 0, err
    assert server.rows == 192 and len(set(server.seen)) == 192  # 128 train + 64 test rows, each once
    summary = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert 0 <= summary["student"]["accuracy"] <= 1 and summary["teacher"]["accuracy"] > 0.5
    # a restarted run (same config, same answer file) finds every row answered, even at the exhausted budget
    requests = server.requests
    cfg = load_config(path)
    bundle = load_data(cfg.data)
    model = api_teacher(cfg.teacher, bundle.num_classes, tmp_path / "r2")
    assert check_api_budget(model, api_rows(bundle), log=lambda line: None) == 0
    assert model.label(*api_rows(bundle)) == 0 and server.requests == requests


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_bad_teachers_exit_2_with_one_line(server, tmp_path, capsys):
    cases = [(api_config(tmp_path, f"http://127.0.0.1:{free_port()}/x"), r"did not answer after 2 attempt"),
             (api_config(tmp_path, server.url, budget=100), r"budget of 100 rows is too small"),
             (api_config(tmp_path, server.url, answers=str(tmp_path / "bad.sqlite")), r"not JSON"),
             (api_config(tmp_path, server.url, weights="t.safetensors"), r"does not use weights")]
    server.mode = "badjson"
    for path, match in cases:
        before = server.requests
        code, err = run_cli(["run", path, "--out", tmp_path / path.stem], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert re.search(match, lines[0]), lines[0]
        if "budget" in match:
            assert server.requests == before  # refused before sending anything
