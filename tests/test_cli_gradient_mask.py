"""GradientMask configured from LightningCLI YAML: inline coordinates/regex/bool, or a mask file."""

from pathlib import Path

import torch
import yaml

from utils import REPO_ROOT, run_script

EXAMPLE = REPO_ROOT / "examples" / "frozen_edges.py"
CONFIG = REPO_ROOT / "examples" / "configs" / "gradient_mask.yaml"


def fit_with(config: dict, tmp_path: Path) -> dict:
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["trainer"].update(max_epochs=1, max_steps=2, enable_progress_bar=False, default_root_dir=str(tmp_path))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_script(EXAMPLE, "fit", "--config", str(path))
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    (state,) = (v for k, v in torch.load(checkpoint, weights_only=False)["callbacks"].items() if "GradientMask" in k)
    return state["masks"]


def test_inline_spec_from_the_shipped_config(tmp_path):
    masks = fit_with(yaml.safe_load(CONFIG.read_text()), tmp_path)
    expected = torch.zeros(16, 8, dtype=torch.bool)
    expected[[0, 0, 1, 1, 2], [0, 1, 0, 1, 3]] = True
    assert torch.equal(masks["net.0.weight"], expected)
    assert torch.equal(masks["net.2.bias"], torch.zeros(1, dtype=torch.bool))


def test_spec_as_a_mask_file(tmp_path):
    from safetensors.torch import save_file

    mask = torch.rand(16, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    file = tmp_path / "masks.safetensors"
    save_file({"net.0.weight": mask}, str(file))
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["trainable"] = str(file)
    assert torch.equal(fit_with(config, tmp_path)["net.0.weight"], mask)
