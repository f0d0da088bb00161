"""`forward_packed`: clips of different T/H/W, text lengths and timesteps in one sequence give exactly what each
clip gives alone (and what diffusers gives it), for every model family; gradients add up per clip.

Tolerance: max |diff| <= 1e-5 (fp32, CPU) on outputs of magnitude ~3 (weights N(0, 0.1)). The packed and the
single-clip runs do the same arithmetic on different matrix sizes, so they differ by rounding only.
"""
from __future__ import annotations

import pytest
import torch

from families import FAMILIES, make_diffusers_model, pipeline_rope

import cogvx_mega

TOLERANCE = 1e-5

# (latent frames, height, width, text length) of three clips per family. The absolute-position families
# (sin-cos, learned) take exactly max_text_seq_length=5 text tokens, so only the RoPE ones vary it.
CLIPS = {
    "sincos-2b": [(3, 8, 12, 5), (2, 6, 8, 5), (1, 4, 4, 5)],
    "rope-5b": [(3, 8, 12, 5), (2, 10, 6, 3), (1, 4, 4, 4)],
    # diffusers' 5B-I2V runs at its sample resolution only; the first clip (sample size) uses the learned table,
    # the others diffusers' sin-cos fallback for other frame counts
    "i2v-5b": [(3, 8, 12, 5), (2, 8, 12, 5), (1, 8, 12, 5)],
    "v15-5b": [(4, 8, 12, 5), (2, 6, 8, 3), (2, 4, 4, 1)],
    "v15-i2v": [(4, 8, 12, 5), (2, 6, 8, 3), (2, 4, 4, 1)],
}
TIMESTEPS = torch.tensor([3, 999, 500])


def clip_inputs(config, family: str, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = [torch.randn(t, config.in_channels, h, w, generator=generator) for t, h, w, _ in CLIPS[family]]
    texts = [torch.randn(length, config.text_embed_dim, generator=generator) for *_, length in CLIPS[family]]
    return latents, texts


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_models(request, tmp_path_factory):
    family = request.param
    reference = make_diffusers_model(family, std=0.1)
    folder = tmp_path_factory.mktemp(family)
    reference.save_pretrained(folder)
    return family, reference, cogvx_mega.from_pretrained(str(folder))


def test_packed_clips_equal_each_clip_alone_and_diffusers(family_models):
    family, reference, ours = family_models
    latents, texts = clip_inputs(reference.config, family)
    ofs = {"ofs": 2.0} if reference.config.ofs_embed_dim else {}
    with torch.no_grad():
        packed = ours.forward_packed(latents, texts, TIMESTEPS, **ofs)
        assert len(packed) == len(latents)
        for index, (clip, text) in enumerate(zip(latents, texts)):
            alone = ours(clip[None], text[None], TIMESTEPS[index:index + 1], **ofs)[0]
            frames, _, height, width = clip.shape
            extra = {"ofs": torch.tensor([2.0])} if ofs else {}
            expected = reference(clip[None], text[None], TIMESTEPS[index:index + 1],
                                 image_rotary_emb=pipeline_rope(reference, frames, height, width),
                                 return_dict=False, **extra)[0][0]
            assert packed[index].shape == expected.shape == (frames, reference.config.out_channels, height, width)
            assert (packed[index] - alone).abs().max().item() <= TOLERANCE, (family, index)
            assert (packed[index] - expected).abs().max().item() <= TOLERANCE, (family, index)


def test_packed_gradients_are_the_sum_of_per_clip_gradients(family_models):
    family, reference, ours = family_models
    latents, texts = clip_inputs(reference.config, family, seed=2)
    ofs = {"ofs": 2.0} if reference.config.ofs_embed_dim else {}
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(t, reference.config.out_channels, h, w, generator=generator) for t, h, w, _ in
               CLIPS[family]]

    def gradients(loss):
        ours.zero_grad(set_to_none=True)
        loss.backward()
        return {name: p.grad.clone() for name, p in ours.named_parameters() if p.grad is not None}

    packed = gradients(sum((out * w).sum() for out, w in
                           zip(ours.forward_packed(latents, texts, TIMESTEPS, **ofs), weights)))
    summed: dict = {}
    for index, (clip, text, w) in enumerate(zip(latents, texts, weights)):
        for name, grad in gradients((ours(clip[None], text[None], TIMESTEPS[index:index + 1], **ofs)[0] * w).sum()
                                    ).items():
            summed[name] = summed.get(name, 0) + grad
    assert set(packed) == set(summed) and packed
    for name, grad in summed.items():
        scale = max(1.0, grad.abs().max().item())
        assert (packed[name] - grad).abs().max().item() <= TOLERANCE * scale, name


@pytest.mark.parametrize("kernel", ["sdpa_mask", "flex"])
def test_every_varlen_kernel_computes_the_same_attention(kernel):
    from cogvx_mega.parallel.varlen import varlen_attention

    generator = torch.Generator().manual_seed(0)
    cu_q, cu_k = [0, 30, 50, 97], [0, 25, 50, 90]  # queries include pad rows; keys are the real tokens
    q, k, v = (torch.randn(n, 2, 16, generator=generator) for n in (97, 90, 90))
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)).transpose(0, 1)
        for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])])
    assert (varlen_attention(q, k, v, cu_q, cu_k, None, "per_clip") - expected).abs().max() <= 1e-6
    assert (varlen_attention(q, k, v, cu_q, cu_k, None, kernel) - expected).abs().max() <= 1e-6


def test_pack_layout_pads_each_clip_for_context_parallel_and_refuses_unpadded_spans():
    from cogvx_mega.config.megatron import build_transformer_config
    from cogvx_mega.config.model import ModelConfig
    from cogvx_mega.config.parallel import ParallelConfig
    from cogvx_mega.model.packing import ClipShape, plan_pack_layout
    from cogvx_mega.parallel.context import segment_token_indices
    from cogvx_mega.parallel.varlen import check_packed_split, packed_sequence_params

    model = ModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=16, text_embed_dim=8,
                        max_text_seq_length=5, sample_height=8, sample_width=8, sample_frames=9,
                        positional_embedding="rope")
    clips = [ClipShape(3, 8, 12, 5), ClipShape(1, 4, 4, 3)]  # 5 + 72 = 77 and 3 + 4 = 7 tokens
    cp2_sp = build_transformer_config(model, ParallelConfig(context_parallel_size=2, tensor_model_parallel_size=2,
                                                            sequence_parallel=True))
    layout = plan_pack_layout(model, clips, cp2_sp)
    assert layout.lengths == (77, 7)
    # each span a multiple of 2 x CP = 4; the pack a multiple of 2 x CP x TP = 8 (the last span takes the rest)
    assert layout.segments == (0, 80, 88)
    assert layout.video_mask().sum().item() == 72 + 4
    check_packed_split(layout.sequence_params(), 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_pack_layout(model, clips, cp2_sp, length=90)  # not a multiple of 8
    unpadded = packed_sequence_params([77, 7], [0, 77, 84], None)
    with pytest.raises(ValueError, match="refused rather than truncated"):
        check_packed_split(unpadded, 2)
    with pytest.raises(ValueError, match="refused rather than truncated"):
        segment_token_indices(84, 2, 0, [0, 77, 84])
    no_padding_given = packed_sequence_params([76, 8], [0, 76, 84], None)
    no_padding_given.cu_seqlens_q_padded = None
    with pytest.raises(ValueError, match="cu_seqlens_q_padded"):
        check_packed_split(no_padding_given, 2)


def test_forward_packed_refuses_mismatched_inputs(family_models):
    family, reference, ours = family_models
    if family != "rope-5b":
        pytest.skip("input checks are family independent")
    latents, texts = clip_inputs(reference.config, family)
    with pytest.raises(ValueError, match="one per clip"):
        ours.forward_packed(latents, texts, TIMESTEPS[:2])
    with pytest.raises(ValueError, match="one of each per clip"):
        ours.forward_packed(latents, texts[:2], TIMESTEPS)
    with pytest.raises(ValueError, match="no batch dimension"):
        ours.forward_packed([latents[0][None]], texts[:1], TIMESTEPS[:1])
