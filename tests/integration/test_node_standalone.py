"""The node program stands alone: a copy of node/ runs with testbed/ and emulation/ made
unimportable, as on a Raspberry Pi where only node/ and its requirements are installed."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BLOCK = "import sys; sys.modules['testbed'] = None; sys.modules['emulation'] = None; "


def _alone(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    shutil.copytree(ROOT / "node", tmp_path / "node", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return subprocess.run([sys.executable, "-c", BLOCK + f"sys.path.insert(0, {str(tmp_path)!r}); " + code],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_node_imports_and_starts_without_testbed_or_emulation(tmp_path):
    proc = _alone(tmp_path, "import runpy; sys.argv = ['node', '--help']; runpy.run_module('node', run_name='__main__')")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--connect" in proc.stdout and "--server-key" in proc.stdout


def test_node_trains_a_plan_without_testbed_or_emulation(tmp_path):
    code = ("import node, numpy as np; assert node.__file__.startswith(sys.path[0]); from node import trainer; "
            "from node.data import load_dataset; "
            "base, tok = trainer.load_base(trainer.ModelSpec(num_layers=1)); ds = load_dataset('rotten_tomatoes'); "
            "data = trainer.Tokenized(tok, ds.texts[:32], ds.labels[:32], 16); "
            "from node.plan import LoraSpec, Plan, TrainSpec; "
            "plan = Plan.from_dict(Plan('lora', lora=LoraSpec(r=2, alpha=4), "
            "train=TrainSpec(local_steps=2, batch_size=8, lr=0.01, max_len=16, seed=0)).to_dict()); "
            "state = trainer.trainable_state(trainer.build_model(base, plan)); "
            "out, m = trainer.train(base, plan, state, data); "
            "print('trained', len(out), m['trained_params'] > 0)")
    proc = _alone(tmp_path, code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "True" in proc.stdout.split("trained", 1)[1]


def test_install_script_is_valid_sh_and_uses_the_image_pins():
    script = ROOT / "node" / "install.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for req in ("docker/requirements.txt", "docker/requirements-nodeps.txt"):
        assert req in text and (ROOT / req).is_file()
    # torch of the CPU index by default (PyPI's Linux wheels are CUDA builds, on arm64 too), the image's pin
    assert "TORCH_INDEX:-https://download.pytorch.org/whl/cpu" in text
    assert "grep '^torch==' docker/requirements.txt" in text
    pin = [r for r in (ROOT / "docker/requirements.txt").read_text().split() if r.startswith("torch==")]
    assert pin == ["torch==2.13.0"]
