"""Defaults that are honest: presets keep each method's own settings and each data set's own
options, the thread count is picked by model size (never by machine load), and a key that no
code reads is refused (composition only, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdkit.cli import CONFIG_DIR, main
from kdkit.pipeline import run as run_module
from kdkit.pipeline.keys import unread_keys

METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "distill").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# the classification pipeline's data modules (experiment=minilm's sentences are read by its task)
DATASETS = sorted(
    p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml") if "_target_" in OmegaConf.load(p)
)


def _compose(overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*overrides, "paths.output_dir=/tmp/unused"])


def _method_file_settings(method: str) -> dict:
    """The scalar settings of distill/<method>.yaml over the shared block, read as files."""
    base = OmegaConf.load(Path(CONFIG_DIR) / "_distill_base.yaml")
    own = OmegaConf.load(Path(CONFIG_DIR) / "distill" / f"{method}.yaml")
    own.pop("defaults", None)
    merged = OmegaConf.to_container(OmegaConf.merge(base, own))
    return {k: v for k, v in merged.items() if not isinstance(v, dict | list)}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("method", METHODS)
def test_presets_keep_each_methods_own_loss_weights(experiment: str, method: str) -> None:
    cfg = _compose([f"experiment={experiment}", f"distill={method}"])
    composed = OmegaConf.to_container(cfg.distill)
    for key, value in _method_file_settings(method).items():
        assert composed[key] == value, f"experiment={experiment} changed distill.{key}"


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8), color=(255, 0, 0)).save(folder / "0.png")
    return root


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("data", DATASETS)
def test_every_preset_composes_with_every_data_set(
    experiment: str, data: str, tmp_path: Path
) -> None:
    extra = [f"data.root={_image_folder(tmp_path)}"] if data == "image_folder" else []
    cfg = _compose([f"experiment={experiment}", f"data={data}", *extra])
    assert cfg.data.name == data
    dm = instantiate(cfg.data, _convert_="all")  # checks every option against the data set
    assert dm.num_classes >= 2
    if data in ("digits", "synthetic", "image_folder"):  # no files to fetch: build it too
        assert len(dm.prepare().train) > 0


def test_an_option_the_data_set_does_not_take_is_refused() -> None:
    cfg = _compose(["data=synthetic", "+data.download=true"])
    with pytest.raises(Exception) as info:  # noqa: B017  (Hydra wraps it; the cause is ours)
        instantiate(cfg.data, _convert_="all")
    assert isinstance(info.value.__cause__, ValueError)
    message = str(info.value.__cause__)
    assert "data.download" in message and "synthetic" in message and "size" in message


def _threads_seen(cfg) -> int:
    """The intra-op thread count a command of ``cfg`` runs with (the command is a probe)."""
    saved = torch.get_num_threads()
    probe = dict(run_module.COMMANDS)
    probe["probe"] = (lambda _cfg: torch.get_num_threads(), "")
    cfg.command = "probe"
    try:
        torch.set_num_threads(2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(run_module, "COMMANDS", probe)
            return run_module.dispatch(cfg)
    finally:
        torch.set_num_threads(saved)


def test_small_models_default_to_one_thread() -> None:
    assert _threads_seen(_compose([])) == 1  # digits: small_cnn -> mlp


def test_large_models_keep_torchs_thread_default() -> None:
    cfg = _compose(["experiment=cifar100_resnet32x4_resnet8x4"])
    assert _threads_seen(cfg) == 2


def test_explicit_threads_win() -> None:
    assert _threads_seen(_compose(["threads=2"])) == 2


def test_unread_key_is_reported_with_the_closest_known_key() -> None:
    cfg = _compose(["+distill.temprature=2"])
    assert unread_keys(cfg, ["+distill.temprature=2"]) == [
        ("+distill.temprature=2", "distill.temperature")
    ]


@pytest.mark.parametrize(
    "override",
    [
        "+trainer.fast_dev_run=true",  # Lightning reads every trainer key
        "+optimizer.momentum=0.9",
        "+data.val_size=100",
        "+student.kwargs.dropout=0.1",
        "+distill.terms.kd2={_target_:kdkit.Term,loss:{_target_:kdkit.losses.KLDivLoss},weight:1}",
        "+callbacks.early={_target_:lightning.pytorch.callbacks.EarlyStopping,monitor:val/acc}",
        "logger=tensorboard",  # a group, not a key
        "distill.temperature=2",
    ],
)
def test_keys_that_code_reads_are_accepted(override: str) -> None:
    cfg = _compose([override])
    assert unread_keys(cfg, [override]) == []


def test_interpolated_new_key_is_read() -> None:
    overrides = [
        "+distill.extra_weight=2",
        "+distill.terms.extra={_target_:kdkit.Term,loss:{_target_:kdkit.losses.KLDivLoss},"
        "weight:${distill.extra_weight}}",
    ]
    assert unread_keys(_compose(overrides), overrides) == []


def test_cli_refuses_a_key_nothing_reads(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "+distill.temprature=2", f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "distill.temprature" in err and "distill.temperature=2" in err
    assert "Traceback" not in err
    assert not (tmp_path / "teacher").exists()  # refused before any training
