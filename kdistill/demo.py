"""The embedded default job of `kdistill demo`: mnist1d, a 1-D CNN teacher, an MLP student.

The teacher (a 4-block 1-D CNN, ~58k parameters) is trained on the 4000 labelled mnist1d samples; the student
(an MLP with two hidden layers of 192, ~47k parameters and ~30x fewer FLOPs) is trained twice with the same
steps: on the labels alone (baseline), and with Hinton KD on the labelled set plus a transfer set of 40000
unlabeled inputs drawn from the same generator with another seed, labelled only by the teacher.
"""

DEMO_CONFIG = {
    "seed": 0,
    "data": {"name": "mnist1d", "transfer": {"size": 40000, "seed": 1}},
    "teacher": {
        "name": "cnn1d",
        "kwargs": {"channels": 64, "depth": 4},
        "train": {"steps": 3000, "batch_size": 128, "lr": 0.003, "schedule": "onecycle", "log_every": 100},
    },
    "student": {"name": "mlp", "kwargs": {"hidden": [192, 192]}},
    "distill": {"alpha": 0.9, "temperature": 2.0},
    "train": {"steps": 6000, "batch_size": 256, "lr": 0.003, "schedule": "onecycle", "log_every": 100,
              "checkpoint_every": 1000},
    "baseline": True,
}
