"""T5 text embeddings from local folders: padded/truncated to the model's text length and equal to what
diffusers' CogVideoX pipeline computes for the same captions; a missing folder is one clear error."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cogvx_mega.config import ConfigError
from cogvx_mega.data.text import T5TextEncoder


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    from text_encoder import make_tiny_t5

    return make_tiny_t5(tmp_path_factory.mktemp("t5"))


def test_embeddings_equal_the_cogvideox_pipeline(t5_folder):
    from diffusers import CogVideoXPipeline

    captions = ["a red square moving left", "a big blue circle over the dark background " * 4, ""]
    ours = T5TextEncoder(str(t5_folder), max_length=16)
    embeds = ours.encode(captions)
    assert embeds.shape == (3, 16, 32) and embeds.dtype == torch.float32
    ids = ours.token_ids(captions)
    assert (ids[0] == 0).any() and not (ids[1] == 0).any()  # short captions padded, long ones truncated
    oracle = SimpleNamespace(tokenizer=ours.tokenizer, text_encoder=ours.encoder, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        expected = CogVideoXPipeline._get_t5_prompt_embeds(oracle, captions, max_sequence_length=16,
                                                           device=torch.device("cpu"))
    assert torch.equal(embeds, expected)


def test_missing_or_incomplete_folder_is_a_clear_error(t5_folder, tmp_path):
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        T5TextEncoder(str(tmp_path / "nowhere"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer"):
        T5TextEncoder(str(tmp_path / "half"))
