"""The user's own data from the config (`kdistill.data.user`): every format read into a run through the CLI, the
loaded splits equal to the files they came from, and every malformed input one line on stderr with exit 2."""

import json

import numpy as np
import pytest
import yaml

from kdistill.cli import main
from kdistill.config import parse_config
from kdistill.data import load_data, load_without_train
from kdistill.errors import DataError

pd = pytest.importorskip("pandas", reason="tables need the data extra (pandas)")
pytest.importorskip("pyarrow", reason="Parquet needs the data extra (pyarrow)")
datasets = pytest.importorskip("datasets", reason="datasets folders need the data extra (datasets)")
load_breast_cancer = pytest.importorskip("sklearn.datasets", reason="real data from scikit-learn").load_breast_cancer

MODULE = "kdistill_user_data_pairs"  # the Dataset module the tests write next to their configs
DATASET_CODE = '''
import torch
from torch.utils.data import Dataset

class Pairs(Dataset):
    """(x, y) items of the rows of an .npz file."""
    def __init__(self, path, limit=None):
        import numpy as np
        with np.load(path) as f:
            self.x, self.y = f["x"][:limit], f["y"][:limit]
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return torch.as_tensor(self.x[i]), int(self.y[i])

NOT_A_DATASET = [1, 2, 3]
'''
QUICK = {"teacher": {"name": "mlp", "kwargs": {"hidden": [32]}, "train": {"steps": 8, "batch_size": 32}},
         "student": {"name": "mlp", "kwargs": {"hidden": [4]}}, "baseline": False,
         "train": {"steps": 8, "batch_size": 32, "log_every": 4, "eval_every": 4},
         "eval": {"latency_repeats": 1, "throughput_batch": 4, "threads": 1}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Breast cancer (569 x 30, 2 classes) written in every format: npz, npy pair, CSV, Parquet, datasets folder
    and a Dataset module."""
    root = tmp_path_factory.mktemp("userdata")
    bc = load_breast_cancer(as_frame=True).frame
    x, y = bc.drop(columns="target").to_numpy(), bc["target"].to_numpy()
    np.savez(root / "train.npz", inputs=x[:300], labels=y[:300])
    np.savez(root / "pairs.npz", x=x[:300], y=y[:300])
    np.save(root / "test_x.npy", x[300:400])
    np.save(root / "test_y.npy", y[300:400])
    bc.iloc[300:450].to_csv(root / "test.csv", index=False)
    bc.iloc[450:500].to_parquet(root / "val.parquet")
    datasets.Dataset.from_pandas(bc.iloc[500:].reset_index(drop=True)).save_to_disk(str(root / "transfer_hf"))
    (root / f"{MODULE}.py").write_text(DATASET_CODE)
    return {"root": root, "x": x, "y": y, "frame": bc}


def write(folder, name, data, **extra):
    path = folder / name
    path.write_text(yaml.safe_dump({"data": data, **QUICK, **extra}))
    return path


def cli(argv, capsys):
    code = main([str(a) for a in argv] + ["--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_arrays_tables_and_datasets_folder_in_one_run(files, capsys, monkeypatch, tmp_path):
    root = files["root"]
    data = {"train": {"path": "train.npz", "x": "inputs", "y": "labels"},
            "validation": {"path": "val.parquet", "label": "target"},
            "test": {"path": "test.csv", "label": "target"},
            "transfer": {"path": "transfer_hf", "label": "target"}, "standardize": True, "test_size": 149}
    config = write(root, "run_files.yaml", data)
    code, out, err = cli(["run", config, "--out", root / "run_files"], capsys)
    assert code == 0, err
    summary = json.loads((root / "run_files" / "summary.json").read_text())
    assert summary["dataset"] == "train" and summary["student"]["accuracy"] > 0.5
    # the resolved config.yaml reads back as the same config (old and new forms both reload)
    resolved = yaml.safe_load((root / "run_files" / "config.yaml").read_text())["data"]
    assert resolved["train"]["x"] == "inputs" and resolved["test"]["path"] == str(root / "test.csv")
    monkeypatch.chdir(tmp_path)  # the run directory's config names its files absolutely: it resumes from anywhere
    code, out, err = cli(["run", root / "run_files" / "config.yaml", "--out", root / "run_files"], capsys)
    assert code == 0 and "done earlier" in out, err
    metrics = [json.loads(line) for line in (root / "run_files" / "metrics.jsonl").read_text().splitlines()]
    # evaluated during training on the 50 validation rows (k / 50), not on the 149 test rows
    during = [m["eval"]["accuracy"] for m in metrics if "eval" in m]
    assert during and all(abs(a * 50 - round(a * 50)) < 1e-4 for a in during) and any(0 < a < 1 for a in during)


def test_dataset_import_path_and_npy_pair_in_one_run(files, capsys):
    root = files["root"]
    data = {"train": {"dataset": f"{MODULE}:Pairs", "kwargs": {"path": str(root / "pairs.npz"), "limit": 200}},
            "test": {"path": "test_x.npy", "y": "test_y.npy"}, "num_classes": 2}
    config = write(root, "run_dataset.yaml", data)
    code, out, err = cli(["run", config, "--out", root / "run_dataset"], capsys)
    assert code == 0, err
    assert json.loads((root / "run_dataset" / "summary.json").read_text())["dataset"] == "Pairs"


def test_loaded_splits_equal_their_files(files, monkeypatch):
    root, x, y = files["root"], files["x"], files["y"]
    monkeypatch.chdir(root)
    cfg = parse_config({"data": {"train": {"path": "test.csv", "label": "target", "features": ["mean radius",
                                                                                           "worst area"]},
                                 "test": {"path": "val.parquet", "label": "target", "features": ["mean radius",
                                                                                               "worst area"]},
                                 "validation": {"fraction": 0.2}, "transfer": {"fraction": 0.1}},
                        **QUICK})
    bundle = load_data(cfg.data)
    cols = [list(files["frame"].columns).index(c) for c in ("mean radius", "worst area")]
    assert len(bundle.train) + len(bundle.validation) + len(bundle.transfer) == 150 and len(bundle.validation) == 30
    joined = np.concatenate([bundle.train.tensors["x"], bundle.validation.tensors["x"], bundle.transfer.tensors["x"]])
    order = np.lexsort(joined.T)
    expected = x[300:450][:, cols].astype(np.float32)
    assert np.array_equal(joined[order], expected[np.lexsort(expected.T)])  # a partition of the training rows
    assert "y" not in bundle.transfer.tensors and bundle.num_classes == 2 and bundle.input_shape == (2,)
    assert np.array_equal(bundle.test.tensors["y"].numpy(), y[450:500])
    assert np.array_equal(bundle.test.tensors["x"].numpy(), x[450:500][:, cols].astype(np.float32))


def test_old_builtin_form_and_its_dump_still_load():
    cfg = parse_config({"data": {"name": "digits", "seed": 1, "train_size": 50}, **QUICK})
    dumped = yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert dumped["data"]["name"] == "digits" and parse_config(dumped) == cfg
    assert type(parse_config(QUICK).data).__name__ == "DataConfig"


def test_train_none_is_representable_and_the_hook_gives_the_rest(files, monkeypatch):
    from kdistill.config import UserDataConfig

    monkeypatch.chdir(files["root"])
    data = UserDataConfig.model_validate({"train": "none", "test": {"path": "test.csv", "label": "target"}})
    assert data.data_free and data.model_dump(mode="json")["train"] == "none"
    assert UserDataConfig.model_validate(data.model_dump(mode="json")) == data
    bundle = load_without_train(data)
    assert bundle.train is None and len(bundle.test) == 150 and bundle.input_shape == (30,)
    assert bundle.num_classes == 2 and bundle.info["sources"]["train"] == "none"
    with pytest.raises(DataError, match="no training split is read"):
        load_data(data)


BAD_CSV = {"nan.csv": "a,b,label\n1,2,0\n3,,1\n", "float_labels.csv": "a,b,label\n1,2,0.5\n3,4,1\n",
           "text_labels.csv": "a,b,label\n1,2,cat\n3,4,dog\n", "empty.csv": "a,b,label\n",
           "ok.csv": "a,b,label\n1,2,0\n3,4,1\n", "big_label.csv": "a,b,label\n1,2,0\n3,4,7\n",
           "three.csv": "a,b,c,label\n1,2,3,0\n3,4,5,1\n", "book.xlsx": "not a table\n"}
MALFORMED = {
    "missing file": ({"train": "absent.csv", "test": "ok.csv"}, "file not found: absent.csv"),
    "unknown format": ({"train": "book.xlsx", "test": "ok.csv"}, "unknown data format '.xlsx'"),
    "wrong column": ({"train": {"path": "ok.csv", "label": "target"}, "test": "ok.csv"},
                     "column 'target' not in ok.csv; available: a, b, label"),
    "wrong feature": ({"train": {"path": "ok.csv", "features": ["a", "z"]}, "test": "ok.csv"},
                      "column 'z' not in ok.csv; available: a, b, label"),
    "wrong array": ({"train": {"path": "rows.npz", "x": "images"}, "test": "ok.csv"},
                    "array 'images' not in rows.npz; available: x, y"),
    "rows differ": ({"train": "rows.npz", "test": "ok.csv"}, "5 input rows but 4 labels"),
    "shapes differ": ({"train": "ok.csv", "test": "three.csv"}, "inputs of shape (3,) per row, but data.train has (2,)"),
    "label out of range": ({"train": "ok.csv", "test": "big_label.csv", "num_classes": 2},
                           "label 7 of split test is outside the class range 0..1"),
    "fractional labels": ({"train": "float_labels.csv", "test": "ok.csv"}, "labels must be class indices"),
    "text labels": ({"train": "text_labels.csv", "test": "ok.csv"}, "are not class indices"),
    "empty split": ({"train": "empty.csv", "test": "ok.csv"}, "empty.csv has no rows"),
    "nan features": ({"train": "nan.csv", "test": "ok.csv"}, "feature column 'b' of nan.csv has NaN or Inf"),
    "no such module": ({"train": {"dataset": "no_such_module_xyz:Data"}, "test": "ok.csv"},
                       "cannot import module 'no_such_module_xyz'"),
    "no such attribute": ({"train": {"dataset": f"{MODULE}:Missing"}, "test": "ok.csv"},
                          f"module '{MODULE}' has no attribute 'Missing'"),
    "not a dataset": ({"train": {"dataset": f"{MODULE}:NOT_A_DATASET"}, "test": "ok.csv"},
                      "gives a list, not a map-style torch Dataset"),
    "no test split": ({"train": "ok.csv"}, "data: test: give a test split"),
    "train none with a carved test split": ({"train": "none", "test": {"fraction": 0.2}},
                                            "train: none reads no training split, so test cannot be a fraction"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_is_one_line_exit_2(case, files, capsys):
    root = files["root"] / "bad"
    if not root.is_dir():
        root.mkdir()
        for name, text in BAD_CSV.items():
            (root / name).write_text(text)
        np.savez(root / "rows.npz", x=np.zeros((5, 2)), y=np.zeros(4, dtype=int))
        (root / f"{MODULE}.py").write_text(DATASET_CODE)
    data, expected = MALFORMED[case]
    config = write(root, f"{case.replace(' ', '_')}.yaml", data)
    code, out, err = cli(["run", config, "--out", root / "runs" / case.replace(" ", "_")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kdistill: error: "), err
    assert "Traceback" not in err and expected in lines[0], lines[0]



class WordTokenizer:
    """One id per distinct lowercase word (0 is the end of a document)."""

    eos_token_id = 0

    def __init__(self):
        self.ids = {}

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[self.ids.setdefault(w, len(self.ids) + 1) for w in t.lower().split()] for t in texts]}


def test_lm_corpus_from_a_text_file_and_a_table_column(tmp_path):
    gensim_utils = pytest.importorskip("gensim.test.utils", reason="news documents from gensim's test data")
    pytest.importorskip("transformers", reason="the causal-LM task needs the llm extra")
    from kdistill.llm.job import load_lm_corpus
    from kdistill.tasks import load_any

    news = open(gensim_utils.datapath("lee_background.cor"), encoding="utf-8").read().splitlines()[:20]
    (tmp_path / "news.txt").write_text("\n\n".join(news) + "\n")
    pd.DataFrame({"body": news, "n": range(20)}).to_parquet(tmp_path / "news.parquet")
    base = "task: causal_lm\nteacher: {path: somewhere}\ndata: {block_size: 16, heldout_fraction: 0.25, corpus: %s}\n"
    for corpus in ("news.txt", "{path: news.parquet, column: body}"):
        config = tmp_path / "lm.yaml"
        config.write_text(base % corpus)
        _, cfg = load_any(config)
        blocks = load_lm_corpus(cfg, WordTokenizer())
        assert blocks["info"]["articles"] == 20 and blocks["info"]["heldout_articles"] == 5
        assert blocks["train"].shape[1] == 16 and len(blocks["train"]) > len(blocks["heldout"]) > 0
    config.write_text(base % "{path: news.parquet, column: text}")
    with pytest.raises(DataError, match=r"column 'text' not in news.parquet; available: body, n \(data.corpus.column\)"):
        load_lm_corpus(load_any(config)[1], WordTokenizer())
