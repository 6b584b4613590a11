"""The scale-out path of the README, on CPU: `accelerate launch` with 2 processes runs `kd logits` and `kd data`'s
SFT on a tiny model and trains the same weights as one process with the same global batch (2 × 2 = 1 × 4).
GAD refuses to start under a multi-process launch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

from conftest import tiny_gemma, tiny_tokenizer  # noqa: E402

from stillroom.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "green", "blue", "apple", "pear", "car", "bus", "the", "a", "is"]
LABELS = ["fruit", "colour", "vehicle"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from stillroom.backends.embedded import save_model_folder

    root = tmp_path_factory.mktemp("launch")
    corpus = [f"Input: {w} {i}\nAnswer: {lab}" for w in WORDS for i in range(3) for lab in LABELS]
    tok = tiny_tokenizer(corpus, vocab_size=300)
    save_model_folder(tiny_gemma(tok, seed=0), tok, root / "teacher")
    save_model_folder(tiny_gemma(tok, seed=1), tok, root / "student")
    (root / "task.jsonl").write_text("".join(
        json.dumps({"id": f"x{i}", "input": f"{WORDS[i % len(WORDS)]} {i}", "label": LABELS[i % 3]}) + "\n"
        for i in range(24)))
    return root


def _env():
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="true")
    env.pop("WORLD_SIZE", None)
    return env


def _kd_args(root: Path, run: Path, batch: int) -> list[str]:
    return ["kd", "logits", "--task", str(root / "task.jsonl"), "--teacher", f"hf:{root / 'teacher'}",
            "--student", str(root / "student"), "--top-k", "8", "--full", "--max-steps", "3", "--lr", "1e-3",
            "--batch-size", str(batch), "--eval-limit", "2", "--run-dir", str(run)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe), "launch"] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kd_logits_under_accelerate_launch_matches_one_process(setup, tmp_path):
    one = subprocess.run([sys.executable, "-m", "stillroom.cli", *_kd_args(setup, tmp_path / "one", 4)],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    # `--cpu` with several processes starts one process unless mpirun is configured (accelerate's simple
    # launcher); `--multi_gpu` starts them through torchrun, and with ACCELERATE_USE_CPU=true (see `_env`) they
    # form one gloo group on the CPU.
    launch = [*_accelerate(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              "-m", "stillroom.cli", *_kd_args(setup, tmp_path / "two", 2)]
    two = subprocess.run(launch, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = _weights(tmp_path / "one" / "student"), _weights(tmp_path / "two" / "student")
    base = _weights(setup / "student")
    assert a.keys() == b.keys() and a
    moved = max(float((a[k].float() - base[k].float()).abs().max()) for k in a)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert moved > 1e-4  # training changed the weights ...
    assert diff < 1e-2 * moved + 1e-5  # ... and two processes changed them as one did
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["train"]["steps"] == m2["train"]["steps"] == 3
    # Sharded data: 3 global batches of 4 cover the 12 training examples once in both runs (unsharded ranks would
    # each have walked half an epoch with batches of 2).
    epochs = [json.loads((tmp_path / r / "train.json").read_text())["log_history"][-1]["epoch"] for r in ("one", "two")]
    assert epochs == [1.0, 1.0]
    shutil.rmtree(tmp_path / "one", ignore_errors=True)


def test_sft_under_accelerate_launch_matches_one_process(setup, tmp_path):
    # `kd data` with the scripted echo teacher, which repeats the input's last line: inputs that name their label
    # give answers to keep. The SFT step is what is compared.
    task = tmp_path / "named.jsonl"
    task.write_text("".join(json.dumps({"id": f"n{i}", "input": f"{WORDS[i % len(WORDS)]} {LABELS[i % 3]}",
                                        "label": LABELS[i % 3]}) + "\n" for i in range(24)))

    def args(run, batch):
        return ["kd", "data", "--task", str(task), "--teacher", "scripted:echo", "--no-filter",
                "--student", str(setup / "student"), "--full", "--max-steps", "3", "--lr", "1e-3",
                "--batch-size", str(batch), "--eval-limit", "2", "--run-dir", str(run)]

    one = subprocess.run([sys.executable, "-m", "stillroom.cli", *args(tmp_path / "one", 4)], env=_env(),
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    launch = [*_accelerate(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              "-m", "stillroom.cli", *args(tmp_path / "two", 2)]
    two = subprocess.run(launch, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = _weights(tmp_path / "one" / "student"), _weights(tmp_path / "two" / "student")
    base = _weights(setup / "student")
    moved = max(float((a[k].float() - base[k].float()).abs().max()) for k in a)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert moved > 1e-4 and diff < 1e-2 * moved + 1e-5


def test_gad_refuses_a_multi_process_launch(monkeypatch):
    from stillroom.gad.train import refuse_multi_process

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"GAD runs in one process, but this is one of 2"):
        refuse_multi_process()
    monkeypatch.setenv("WORLD_SIZE", "1")
    refuse_multi_process()
