"""Shared fixtures: tiny backbones built from transformers config classes (no downloads)."""
import pytest
import torch
from transformers import ViTConfig, SwinConfig, BertConfig


@pytest.fixture
def tiny_vit():
    "A 1-layer ViT: 32 px images, 8 px patches -> 16 spatial patches + [CLS]."
    return ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     image_size=32, patch_size=8)


@pytest.fixture
def tiny_swin():
    "A 3-stage Swin: 32 px images -> 16 spatial tokens, no [CLS]."
    return SwinConfig(image_size=32, patch_size=2, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 2, 2], window_size=4)


@pytest.fixture
def tiny_bert():
    return BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=60)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
