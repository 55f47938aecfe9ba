"""`kdistill search`: Optuna studies over a config's ``search:`` section (docs/search.md).

* `config`: the ``search:`` section (`SearchConfig`: space, objectives, constraints) and the constraint syntax;
* `space`: search paths checked against the config, values sampled and written into the trial configs;
* `plan`: the trials' base config, the storage, the teacher trained once;
* `trials`: one trial (a real short run in ``OUT/trials/NNNN``), one worker (ask / run / tell);
* `run`: the search (resume, re-queued interrupted trials, parallel worker processes on one SQLite storage);
* `results`, `report`: ``search.json``, ``best.yaml``, ``report.html``.

Only `config` is imported by the config classes; the rest (and Optuna) is imported on use.
"""

from __future__ import annotations

__all__ = ["search"]


def search(config, **options) -> dict:
    """`kdistill.search.run.search` (imported on use: Optuna is the ``search`` extra)."""
    from kdistill.search.run import search as run_search

    return run_search(config, **options)
