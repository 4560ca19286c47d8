"""K-FAC preconditioning and Stochastic Weight Averaging for PyTorch Lightning.

Architecture (imports flow downwards only):

* ``kfac_math``, ``kfac_layers``, ``averaging``, ``schedules``, ``distributed``: pure
  torch functions and small helpers, no Lightning.
* ``kfac`` (:class:`KFAC`), ``swa`` (:class:`SWA`): Lightning callbacks, thin glue.
* ``models``, ``data``, ``module``, ``cli``, ``bench``: the paper's networks, data,
  LightningModule, command line and benchmark.
"""
from lightning_kfac_swa.kfac import KFAC

__all__ = ["KFAC"]
__version__ = "0.1.0"
