"""LoRA family: full-size formats resolve and touch the right layers; parity with diffusers/peft; alpha, composition,
merge/unmerge and refusal of LoRAs that do not fit."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from test_motion import TINY_SITES, tiny_set
from test_unet import TINY_SD15, diffusers_twin, random_unet
from vidsynth.checkpoints import Checkpoint
from vidsynth.errors import CheckpointError, ConfigError
from vidsynth.lora import NameMap, build_lora, unet_name_map
from vidsynth.manager import ModelManager
from vidsynth.models.motion import MotionConfig, MotionModuleSet
from vidsynth.models.text import CLIPTextModel, OpenCLIPTextModel, TextEncoderConfig
from vidsynth.models.unet import PREFIX, UNetConfig, UNetModel

TOLERANCE = 1e-4  # max abs error relative to the output's largest magnitude, fp32
ATTENTION = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
MOTION_ATTENTION = re.compile(r"attention_blocks\.[01]\.(to_q|to_k|to_v|to_out\.0)$")


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------------------- full-size, on meta


def manifest_shapes(shared_dir, name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((shared_dir / "checkpoint-layouts" / f"{name}.json").read_text())["tensors"].items()}


def meta_models(shared_dir, base: str, motion: str | None = None) -> dict[str, nn.Module]:
    """Full-size modules on the meta device, configured from the real files' shapes (no weights)."""
    shapes = manifest_shapes(shared_dir, base)
    strip = lambda prefix: {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}  # noqa: E731
    texts = {"text_encoder": "cond_stage_model.transformer."} if "v1-5" in base else {
        "text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."}
    with torch.device("meta"):
        models = {"unet": UNetModel(UNetConfig.from_state_dict(strip(PREFIX)))}
        for name, prefix in texts.items():
            config = TextEncoderConfig.from_state_dict(strip(prefix))
            models[name] = (OpenCLIPTextModel if config.layout == "open_clip" else CLIPTextModel)(config)
        if motion:
            models["motion_modules"] = MotionModuleSet(MotionConfig.from_state_dict(manifest_shapes(shared_dir, motion)))
    return models


@pytest.fixture(scope="module")
def sd15_meta(shared_dir):
    return meta_models(shared_dir, "v1-5-pruned-emaonly.safetensors", "mm_sd_v15_v2.ckpt")


def meta_manager(models: dict[str, nn.Module]) -> ModelManager:
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.models.update(models)
    return manager


def names(models: dict[str, nn.Module], component: str, pattern: str) -> set[str]:
    return {f"{component}.{n}" for n, _ in models[component].named_modules() if re.search(pattern, n)}


@pytest.mark.parametrize("file", ["v3_sd15_adapter.ckpt", "v2_lora_ZoomIn.ckpt", "kohya_lora_sd15_rank32.safetensors"])
def test_full_size_files_touch_exactly_their_layers(file, full_checkpoint, sd15_meta, shared_dir):
    path = full_checkpoint(file)
    manager = meta_manager(sd15_meta)
    info = manager.load_model(path)  # routed to load_lora by the file's kind
    lora = manager.loras[-1]
    assert lora.kind == info.kind and info.family == "sd15"
    assert 2 * len(lora.targets) == sum(k.endswith("weight") for k in manifest_shapes(shared_dir, file))
    attention = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
    if file.startswith("v3"):  # spatial attn1 + attn2 q/k/v/out of all 16 transformer blocks
        expected = names(sd15_meta, "unet", attention)
        assert len(expected) == 16 * 2 * 4
    elif file.startswith("v2_lora"):  # every temporal attention of the 21 v2 modules (mid included)
        expected = names(sd15_meta, "motion_modules", MOTION_ATTENTION.pattern)
        assert len(expected) == 21 * 2 * 4
    else:  # Transformer2DModel internals of the UNet + CLIP attention and MLP
        expected = names(sd15_meta, "unet", rf"\.1\.(proj_in|proj_out|{attention[:-1]}|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))$")
        expected |= names(sd15_meta, "text_encoder", r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
        assert len(expected) == 16 * 12 + 12 * 6
    assert len(lora.targets) == len(set(lora.targets)) and set(lora.targets) == expected
    # the kohya file's .alpha = rank: scale 1, as for the AnimateDiff files; pairs sit on the model's device/dtype
    assert all(layer.scale == 1.0 and layer.down.is_meta and layer.up.dtype == torch.float32 for layer in lora.layers)
    assert Checkpoint(path).main_dtype() == (torch.float16 if file.startswith("kohya") else torch.float32)
    manager.remove_lora(lora)
    assert not manager.loras and not any("_lora_site" in m.__dict__ for m in sd15_meta["unet"].modules())


def test_sd15_lora_refused_by_sdxl_and_motion_lora_without_motion_modules(full_checkpoint, shared_dir, sd15_meta):
    sdxl = meta_models(shared_dir, "sd_xl_base_1.0.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit.*layer names match no module.*shapes do not fit") as err:
        meta_manager(sdxl).load_lora(full_checkpoint("kohya_lora_sd15_rank32.safetensors"))
    # SD 1.5 down block 0 has attention, SDXL's has none; 768-wide cross-attention keys meet SDXL's 2048
    assert "96 (lora_unet_down_blocks_0_attentions_0_proj_in" in str(err.value)
    assert "attn2.to_k: down [32, 768] / up [640, 32], the layer needs [32, 2048]" in str(err.value)
    assert not any("_lora_site" in m.__dict__ for m in sdxl["unet"].modules())  # nothing half-attached
    without_motion = {k: v for k, v in sd15_meta.items() if k != "motion_modules"}
    with pytest.raises(CheckpointError, match=r"168 \(down_blocks\.0\.motion_modules\.0"):
        meta_manager(without_motion).load_lora(full_checkpoint("v2_lora_ZoomIn.ckpt"))


def test_name_map_covers_every_layer_of_sdxl(shared_dir):
    sdxl = meta_models(shared_dir, "sd_xl_base_1.0.safetensors")["unet"]
    mapped = unet_name_map(sdxl)
    weighted = {n for n, m in sdxl.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    diffusers_names = set(mapped) - weighted
    assert set(mapped.values()) == weighted and len(diffusers_names) == len(weighted)  # a diffusers name for each
    assert mapped["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"] == \
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k"
    assert mapped["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert mapped["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert mapped["add_embedding.linear_2"] == "label_emb.0.2"
    resolve = NameMap({"unet": sdxl}).resolve  # kohya's SDXL scripts name the UNet in the LDM layout
    assert resolve("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q").name == \
        resolve("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q").name == \
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q"
    assert resolve("lora_unet_down_blocks_1_resnets_0_conv_shortcut").name == "input_blocks.4.0.skip_connection"
    assert resolve("lora_unet_down_blocks_3_attentions_0_proj_in") is None  # SDXL has 3 levels


# ------------------------------------------------------------------------------------------ tiny, with weights


def kohya_state(named: dict[str, nn.Module], rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA over diffusers-named modules ``{lora_name: module}``: LoCon for 3x3 convs, alpha != rank."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in named.items():
        if isinstance(module, nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * 0.2
            up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * 0.2
        else:
            down = torch.randn(rank, module.in_features, generator=g) * 0.2
            up = torch.randn(module.out_features, rank, generator=g) * 0.2
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                  f"{name}.alpha": torch.tensor(float(rank) / 2)}
    return state


def test_kohya_lora_matches_diffusers_peft():
    from diffusers import StableDiffusionPipeline

    model = random_unet(TINY_SD15)
    twin = diffusers_twin(model)
    picked = r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.(0\.proj|2)|resnets\.\d\.(conv1|conv2|conv_shortcut|time_emb_proj))$"
    targets = {"lora_unet_" + n.replace(".", "_"): m for n, m in twin.named_modules()
               if re.search(picked, n) and isinstance(m, (nn.Linear, nn.Conv2d))}
    assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in targets.values())  # LoCon included
    state = kohya_state(targets)
    torch.manual_seed(2)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 20.0]), torch.randn(2, 7, TINY_SD15.context_dim)
    with torch.no_grad():
        base = model(x, t, context)
        lora = build_lora({"unet": model}, state, kind="lora_kohya", alpha=0.7)
        ours = model(x, t, context)
        converted, alphas = StableDiffusionPipeline.lora_state_dict(dict(state))
        StableDiffusionPipeline.load_lora_into_unet(converted, alphas, unet=twin)
        twin.set_adapters(["default_0"], weights=[0.7])
        theirs = twin(x, t, context).sample
    assert len(lora.targets) == len(targets)
    assert max_rel_error(ours, theirs) < TOLERANCE
    assert max_rel_error(ours, base) > 0.05  # the LoRA matters
    # the same LoRA in diffusers' own forms (old ".lora.down", peft "lora_A") with ".alpha" keys
    lora.remove()
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    peft_form = convert_unet_state_dict_to_peft(converted)
    peft_form |= {k.replace("lora_A.weight", "alpha"): torch.tensor(2.0) for k in peft_form if "lora_A" in k}
    old_form = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in peft_form.items()}
    for state in (peft_form, old_form):
        lora = build_lora({"unet": model}, state, alpha=0.7)
        with torch.no_grad():
            assert lora.kind == "lora_diffusers" and max_rel_error(model(x, t, context), theirs) < TOLERANCE
        lora.remove()


def motion_lora_state(motion: MotionModuleSet, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A MotionLoRA in the AnimateDiff file form (``processor.to_q_lora.down.weight``)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in motion.named_modules():
        if MOTION_ATTENTION.search(name):
            key = name.replace(".to_out.0", ".to_out").rsplit(".", 1)
            stem = f"{key[0]}.processor.{key[1]}_lora"
            state[f"{stem}.down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
            state[f"{stem}.up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    return state


def test_motion_lora_matches_diffusers_animatediff():
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    motion = tiny_set("sdxl_beta")  # frame-pooled motion GroupNorm, as diffusers computes it
    state = motion_lora_state(motion)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                            motion_max_seq_length=motion.config.pe_length, use_motion_mid_block=True)
    weights = convert_animatediff_checkpoint_to_diffusers(motion.state_dict())
    for name, table in motion.state_dict().items():
        if name.endswith("attention_blocks.0.pos_encoder.pe"):
            weights[f"{name.split('.temporal_transformer.')[0]}.transformer_blocks.0.pos_embed.pe"] = table
    adapter.load_state_dict(weights, strict=True)
    unet2d = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=16,
                                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    twin = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    # diffusers' AnimateDiff LoRAs name the motion attention as its MotionAdapter does (attn1/attn2, no
    # temporal_transformer) under "unet.", in the old "lora.down/up" form that diffusers converts to peft
    theirs_state = {"unet." + k.replace(".temporal_transformer.", ".").replace("attention_blocks.0", "attn1")
                    .replace("attention_blocks.1", "attn2").replace(".processor.", ".").replace("_lora.", ".lora.")
                    .replace("to_out.lora", "to_out.0.lora"): v for k, v in state.items()}
    converted, alphas = AnimateDiffPipeline.lora_state_dict(theirs_state)
    AnimateDiffPipeline.load_lora_into_unet(converted, alphas, unet=twin)
    twin.set_adapters(["default_0"], weights=[0.6])
    lora = build_lora({"motion_modules": motion}, state, alpha=0.6)
    assert lora.kind == "motion_lora" and len(lora.targets) == len(TINY_SITES) * 8
    frames = 6
    torch.manual_seed(1)
    with torch.no_grad():
        for name, channels in TINY_SITES.items():
            h = torch.randn(2 * frames, channels, 4, 3)
            ours = motion.site(name)(h, frames)
            assert max_rel_error(ours, twin.get_submodule(name)(h, num_frames=frames)) < TOLERANCE, name
            lora.alpha = 0.0
            assert max_rel_error(ours, motion.site(name)(h, frames)) > 1e-3  # the LoRA matters
            lora.alpha = 0.6


def test_alpha_composition_merge_and_unmerge():
    motion = tiny_set("v2")
    base_weights = {k: v.clone() for k, v in motion.state_dict().items()}
    h = torch.randn(2 * 5, 64, 3, 3)
    site = motion.site("up_blocks.0.motion_modules.1")
    with torch.no_grad():
        base = site(h, 5)
        a = build_lora({"motion_modules": motion}, motion_lora_state(motion, seed=1), path="a.ckpt", alpha=0.0)
        assert torch.equal(site(h, 5), base)  # alpha 0: exactly the base
        a.alpha = 0.8
        only_a = site(h, 5)
        a.alpha = 0.0
        b = build_lora({"motion_modules": motion}, motion_lora_state(motion, seed=2, rank=3), path="b.ckpt", alpha=-1.3)
        only_b = site(h, 5)
        a.alpha = 0.8
        both = site(h, 5)
        # the update is linear in each projection, not in the output: compare the summed weight updates
        q = "up_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_q"
        deltas = {lora.name: next(l for l in lora.layers if l.target.name == q) for lora in (a, b)}
        summed = 0.8 * deltas["a"].delta() - 1.3 * deltas["b"].delta()
        x = torch.randn(7, 64)
        to_q = motion.get_submodule(q)
        torch.testing.assert_close(to_q(x), x @ (base_weights[q + ".weight"] + summed).T, rtol=0, atol=1e-5)
        assert max_rel_error(both, only_a) > 1e-3 and max_rel_error(both, only_b) > 1e-3
        a.merge()
        b.merge()
        merged_state = motion.state_dict()
        assert merged_state.keys() == base_weights.keys()  # hooks add no keys
        assert max_rel_error(site(h, 5), both) < TOLERANCE  # merged == runtime
        torch.testing.assert_close(merged_state[q + ".weight"], base_weights[q + ".weight"] + summed, rtol=0, atol=1e-5)
        a.alpha = 0.0  # re-weighting a merged LoRA
        assert max_rel_error(site(h, 5), only_b) < TOLERANCE
        a.alpha = 0.8
        b.unmerge()
        b.remove()
        assert max_rel_error(site(h, 5), only_a) < TOLERANCE
        a.remove()
        for k, v in motion.state_dict().items():  # unmerge restores the weights within float tolerance
            torch.testing.assert_close(v, base_weights[k], rtol=0, atol=1e-6)
        assert max_rel_error(site(h, 5), base) < 1e-5
    with pytest.raises(ConfigError, match="removed"):
        a.merge()


def test_fused_open_clip_projection_matches_diffusers_on_hf_bigG():
    """SDXL kohya LoRAs name bigG in the Hugging Face layout (lora_te2_..._self_attn_q_proj): q/k/v land on row
    blocks of open_clip's fused in_proj_weight. Checked against diffusers/peft on the converted HF model."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = TextEncoderConfig(vocab_size=100, width=64, layers=2, heads=4, max_positions=12, activation="gelu",
                               projection_dim=32, layout="open_clip")
    torch.manual_seed(0)
    ours = OpenCLIPTextModel(config).eval()
    hf_config = CLIPTextConfig(vocab_size=100, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=12, hidden_act="gelu", projection_dim=32)
    twin = CLIPTextModelWithProjection(hf_config).eval()
    prefix = "conditioner.embedders.1.model."
    twin.load_state_dict(convert_open_clip_checkpoint(twin, {prefix + k: v for k, v in ours.state_dict().items()},
                                                      prefix), strict=False)
    targets = {"lora_te2_" + n.replace(".", "_"): m for n, m in twin.named_modules()
               if re.search(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$", n)}
    state = kohya_state(targets, seed=3)
    ids = torch.tensor([[49, 3, 7, 99, 0, 0]])
    with torch.no_grad():
        in_proj = ours.transformer.resblocks[0].attn.in_proj_weight.clone()
        base = ours(ids, hidden_layer=-2, final_norm=False)[0]
        torch.testing.assert_close(base, twin(ids, output_hidden_states=True).hidden_states[-2], rtol=0, atol=1e-5)
        lora = build_lora({"text_encoder_2": ours}, state, kind="lora_kohya", alpha=0.9)
        runtime = ours(ids, hidden_layer=-2, final_norm=False)[0]
        assert torch.equal(ours.transformer.resblocks[0].attn.in_proj_weight, in_proj)  # run time: weight untouched
        lora.merge()
        merged = ours(ids, hidden_layer=-2, final_norm=False)[0]
        scaled = {k: v * 0.9 if "lora_up" in k else v for k, v in state.items()}  # alpha 0.9 on diffusers' side
        converted, alphas = StableDiffusionXLPipeline.lora_state_dict(scaled)
        StableDiffusionXLPipeline.load_lora_into_text_encoder(converted, alphas, text_encoder=twin,
                                                              prefix="text_encoder_2")
        theirs = twin(ids, output_hidden_states=True).hidden_states[-2]
    assert len(lora.targets) == 2 * 6 and "text_encoder_2.transformer.resblocks.1.attn[64:128]" in lora.targets
    assert max_rel_error(runtime, theirs) < TOLERANCE and max_rel_error(merged, theirs) < TOLERANCE
    assert max_rel_error(runtime, base) > 0.05
