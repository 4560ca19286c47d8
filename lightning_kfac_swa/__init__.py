"""K-FAC preconditioning and Stochastic Weight Averaging for PyTorch Lightning.

Architecture (imports flow one way, from the top of this list to the bottom):

* ``kfac_math``, ``kfac_layers``, ``averaging``, ``schedules``, ``distributed``: pure
  torch functions and small helpers, no Lightning.
* ``kfac`` (:class:`KFAC`), ``swa`` (:class:`SWA`): Lightning callbacks, thin glue.
* ``models``, ``data``, ``module``, ``cli``, ``bench``: the paper's networks, data,
  LightningModule, command line and benchmark.
"""
from lightning_kfac_swa.kfac import KFAC
from lightning_kfac_swa.schedules import HoldDecayLR
from lightning_kfac_swa.swa import SWA

__all__ = ["KFAC", "SWA", "HoldDecayLR"]
__version__ = "0.1.0"
