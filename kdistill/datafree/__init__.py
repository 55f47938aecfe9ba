"""Data-free distillation: a transfer set synthesised from a BatchNorm teacher (DeepInversion), a generator trained
against the student (DFAD), and boundary samples that enrich any transfer set. See docs/data_free.md.

Modules: `config` (the ``data_free:`` section and ``data.transfer.boundary``), `inversion` (BN statistics hooks,
the DeepInversion terms, one synthesised batch), `cache` (synthesised sets on disk), `synthesis` (a cached
transfer set), `dfad` (generator and adversarial loop), `boundary` (PGD boundary samples, `BoundaryDistiller`),
`job` (the classification job of such a config). Imported on use: importing this package stays cheap.
"""
