"""The kfac-swa command line and every YAML in configs/."""
import glob
import os

import pytest
import yaml

from lightning_kfac_swa.cli import KfacSwaCLI, main
from lightning_kfac_swa.module import ImageClassifier
from lightning_kfac_swa.schedules import HoldDecayLR
from test_swa import hold_decay_reference

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
RUNS = sorted(p for p in glob.glob(os.path.join(CONFIGS, "*.yaml")) if not p.endswith(("base.yaml", "quickstart.yaml")))
TINY_DATA = {"class_path": "lightning_kfac_swa.data.DigitsDataModule",
             "init_args": {"batch_size": 8, "val_size": 16, "limit": 64}}


def test_there_is_a_config_for_every_run_of_the_paper():
    names = {os.path.basename(p)[:-5] for p in RUNS}
    for net in ("vgg16", "preresnet110"):
        for opt in ("sgd", "adam", "kfac"):
            assert {f"{net}_{opt}", f"{net}_{opt}_swa"} <= names
    assert {"weightnorm_preresnet110_kfac", "weightnorm_preresnet110_kfac_swa"} <= names


@pytest.mark.parametrize("path", RUNS, ids=os.path.basename)
def test_paper_config_parses_instantiates_and_trains_two_epochs(path, tmp_path):
    base = yaml.safe_load(open(os.path.join(CONFIGS, "base.yaml")))
    run = yaml.safe_load(open(path))
    base["data"] = TINY_DATA  # data override: the paper's CIFAR-100 is not downloaded in tests
    for logger in base["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(tmp_path)
    base["trainer"].update(max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu",
                           devices=1, enable_progress_bar=False)
    cbs = run.get("trainer", {}).get("callbacks", [])
    for cb in cbs:
        if cb["class_path"].endswith("SWA"):
            cb["init_args"]["swa_epoch_start"] = 1  # the paper's epoch 160 (or 75) is past 2 epochs
        if cb["class_path"].endswith("KFAC") and "vgg16" in path:
            # eigh of VGG16's five 4609x4609 factors takes ~35 s on 2 cores; the inverse route ~5 s
            cb["init_args"]["method"] = "inverse"
    run.get("trainer", {}).pop("max_epochs", None)
    files = []
    for name, cfg in (("base", base), ("run", run)):
        files.append(tmp_path / f"{name}.yaml")
        files[-1].write_text(yaml.safe_dump(cfg))
    cli = KfacSwaCLI(ImageClassifier, __import__("lightning").pytorch.LightningDataModule, subclass_mode_data=True,
                     save_config_kwargs={"overwrite": True},
                     args=["fit", "--config", str(files[0]), "--config", str(files[1])])
    trainer = cli.trainer
    assert trainer.current_epoch == 2 and trainer.global_step == 4
    kinds = {type(cb).__name__ for cb in trainer.callbacks}
    assert ("KFAC" in kinds) == ("kfac" in path) and ("SWA" in kinds) == ("swa" in path)
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["weight_decay"] == 5e-4
    assert type(opt).__name__ == ("Adam" if "adam" in path else "SGD")
    if "swa" in path:
        assert "swa/val/acc" in trainer.callback_metrics
        assert os.path.exists(os.path.join(trainer.checkpoint_callback.dirpath, "swa.ckpt"))
    assert os.path.exists(os.path.join(trainer.log_dir, "metrics.csv"))


def test_print_config_output_reruns(tmp_path, capsys, monkeypatch):
    quick = os.path.abspath(os.path.join(CONFIGS, "quickstart.yaml"))
    monkeypatch.chdir(tmp_path)  # the quickstart logs to ./runs
    with pytest.raises(SystemExit):
        main(["fit", "--config", quick, "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    main(["fit", "--config", str(printed), "--trainer.fast_dev_run=2", "--data.init_args.limit=400",
          "--trainer.enable_progress_bar=false"])


def test_hold_decay_lr_from_yaml(tmp_path):
    cfg = tmp_path / "sched.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"network": {"class_path": "lightning_kfac_swa.models.PreResNet",
                              "init_args": {"depth": 8, "num_classes": 10}}},
        "data": TINY_DATA,
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}},
        "lr_scheduler": {"class_path": "lightning_kfac_swa.HoldDecayLR",
                         "init_args": {"total_epochs": 300, "final_ratio": 0.01}},
    }))
    cli = KfacSwaCLI(ImageClassifier, __import__("lightning").pytorch.LightningDataModule, subclass_mode_data=True,
                     args=["--config", str(cfg)], run=False)
    (opt,), (sched,) = cli.model.configure_optimizers()  # LightningCLI's default: interval "epoch"
    assert isinstance(sched, HoldDecayLR)
    for t in range(300):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * hold_decay_reference(t, 300, 0.01), rel=1e-12)
        opt.step()
        sched.step()
