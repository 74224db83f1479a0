"""Shared fixtures: the built-in tiny backbones (`laps/tiny-*`, no downloads) and one synthetic data folder per session."""
import hashlib
from pathlib import Path
import pytest
import torch
from laps.data.synthetic import generate_synthetic
from laps.model.encoders import backbone_config

# The shared synthetic folder: 8 train, 10 dev and 12 test scenes (5 captions each), one probe pair of each kind.
SYNTHETIC = dict(seed=0, n_train=8, n_dev=10, n_test=12, dev_probe_pairs=1, test_probe_pairs=1)


@pytest.fixture
def tiny_vit():
    "`laps/tiny-vit`: a 1-layer ViT, 32 px images, 8 px patches -> 16 spatial patches + [CLS]."
    return backbone_config('laps/tiny-vit')


@pytest.fixture
def tiny_swin():
    "`laps/tiny-swin`: a 3-stage Swin, 32 px images -> 16 spatial tokens, no [CLS]."
    return backbone_config('laps/tiny-swin')


@pytest.fixture
def tiny_bert():
    """`laps/tiny-bert` (a 1-layer, 24-wide BERT) with its vocabulary cut to 60 ids: these tests feed ids below 60, and their
    seeded draws stay the ones their expectations were checked with (with the full vocabulary the later draws differ, and
    at seed 0 `attn`'s i2t map gets no gradient on tiny Swin with score selection)."""
    config = backbone_config('laps/tiny-bert')
    config.vocab_size = 60
    return config


def _digest(folder: Path) -> str:
    "One sha256 over every file's relative path and bytes under `folder`."
    h = hashlib.sha256()
    for p in sorted(folder.rglob('*')):
        if p.is_file(): h.update(str(p.relative_to(folder)).encode() + b'\0' + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope='session')
def synthetic_data(tmp_path_factory) -> Path:
    """A data root holding `synthetic/` (`SYNTHETIC`), generated once for the session and shared: read-only. A test that
    changes its data copies it first (`shutil.copytree(synthetic_data, tmp_path / 'data')`); at the end the folder must
    be as generated."""
    root = tmp_path_factory.mktemp('synthetic_data')
    generate_synthetic(root / 'synthetic', **SYNTHETIC)
    before = _digest(root)
    yield root
    assert _digest(root) == before, f"a test changed the shared synthetic folder {root}; copy it into tmp_path first"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
