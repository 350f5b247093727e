"""load_checkpoint / save_checkpoint: the authors' containers (SEQPE_SPEC §3.3), config inference from
tensor shapes, the DDP ``module.`` prefix, strict loading and the plain-words errors."""
import sys
import types
import warnings

import pytest
import torch

from seqpe_kernels import FusedSeqPE, SeqPE
from seqpe_kernels.checkpoint import infer_config, load_checkpoint, read_state_dict, save_checkpoint

safetensors_torch = pytest.importorskip("safetensors.torch")



def small(**kw):
    cfg = dict(embed_dim=128, num_heads=2, max_digits=3, data_dim=1, out_dim=48)  # 128 // 64 = 2 heads
    cfg.update(kw)
    m = SeqPE(**cfg)
    with torch.no_grad():  # distinguishable values everywhere (LayerNorm included)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def assert_same_module(a, b, positions):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    a.eval()
    b.eval()
    assert torch.equal(a(positions), b(positions))


def _fake_yacs(monkeypatch, removable=True):
    """A stand-in for yacs.config.CfgNode (a dict subclass) in an importable throw-away module."""
    mod = types.ModuleType("fake_yacs_config")

    class CfgNode(dict):
        def __getattr__(self, k):
            try:
                return self[k]
            except KeyError as e:
                raise AttributeError(k) from e

    CfgNode.__module__ = mod.__name__
    CfgNode.__qualname__ = "CfgNode"
    mod.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod, CfgNode


# ============================================================================ round trips
@pytest.mark.parametrize("data_dim, max_digits", [(1, 5), (2, 2), (3, 2)])
def test_image_pth_round_trip(tmp_path, data_dim, max_digits):
    m = small(data_dim=data_dim, max_digits=max_digits, attn_direction="bi", mask_padding=True)
    f = save_checkpoint(m, tmp_path / "best_model.pth")
    assert f == tmp_path / "best_model.pth"
    raw = torch.load(f, weights_only=True)
    assert set(raw) == {"pe_model"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain {"pe_model": ...} file loads with weights_only=True, silently
        loaded = load_checkpoint(f, attn_direction="bi", mask_padding=True)
    assert type(loaded) is SeqPE
    assert (loaded.data_dim, loaded.max_digits, loaded.num_heads) == (data_dim, max_digits, 2)
    pos = torch.randint(0, 10 ** max_digits, (9, data_dim) if data_dim > 1 else (9,))
    assert_same_module(m, loaded, pos)


def test_safetensors_round_trip(tmp_path):
    m = small(data_dim=2, max_digits=2, out_dim=20, num_layers=3, use_last_layernorm=False)
    f = save_checkpoint(m, tmp_path / "enc.safetensors")
    assert set(safetensors_torch.load_file(str(f))) == set(m.state_dict())
    loaded = load_checkpoint(f)
    assert (loaded.num_layers, loaded.out_dim, loaded.use_last_layernorm) == (3, 20, False)
    assert_same_module(m, loaded, torch.randint(0, 100, (7, 2)))


def test_text_accelerate_directory(tmp_path):
    m = small(max_digits=5)
    d = tmp_path / "best_model"
    f = save_checkpoint(m, d)  # no suffix: accelerate-style directory
    assert f == d / "model_1.safetensors"
    # the GPT-2 weights sit next to it in model.safetensors
    safetensors_torch.save_file({"transformer.wte.weight": torch.zeros(4, 8),
                                 "transformer.h.0.attn.c_attn.weight": torch.zeros(8, 24)}, str(d / "model.safetensors"))
    (d / "optimizer.bin").write_bytes(b"not an encoder")
    loaded = load_checkpoint(d)
    assert_same_module(m, loaded, torch.randint(0, 10 ** 5, (11,)))
    _, info = read_state_dict(d)
    assert info["format"] == "text-dir" and info["file"] == f
    # pointing at GPT-2's file by mistake names the right one
    with pytest.raises(ValueError, match="GPT-2 main-model weights.*model_1.safetensors"):
        load_checkpoint(d / "model.safetensors")


def test_bare_state_dict_pth(tmp_path):
    m = small()
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    assert_same_module(m, load_checkpoint(tmp_path / "sd.pt"), torch.arange(0, 999, 37))
    _, info = read_state_dict(tmp_path / "sd.pt")
    assert info["format"] == "state-dict-pth"


@pytest.mark.parametrize("container", ["image", "bare", "safetensors"])
def test_module_prefix_is_stripped(tmp_path, container):
    m = small()
    sd = {"module." + k: v for k, v in m.state_dict().items()}
    if container == "image":
        torch.save({"pe_model": sd}, tmp_path / "c.pth")
        f = tmp_path / "c.pth"
    elif container == "bare":
        torch.save(sd, tmp_path / "c.pth")
        f = tmp_path / "c.pth"
    else:
        f = tmp_path / "c.safetensors"
        safetensors_torch.save_file(sd, str(f))
    assert_same_module(m, load_checkpoint(f), torch.arange(0, 999, 53))


def test_full_image_checkpoint_with_pickled_config(tmp_path, monkeypatch):
    """The image training script saves model/pe_model/max_accuracy/epoch/config, config being a pickled yacs
    CfgNode: weights_only=True refuses it, the loader warns and retries; yacs need not be importable."""
    mod, CfgNode = _fake_yacs(monkeypatch)
    cfg = CfgNode(NUM_ATTENTION_HEADS=4, SEQPE_ATTN_DIRECTION="causal", SEQPE_MASK_PADDING=False,
                  MODEL=CfgNode(EMBED_DIM=192))
    m = small(num_heads=4, data_dim=2, max_digits=2)
    f = tmp_path / "ckpt_epoch_10.pth"
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, "pe_model": m.state_dict(),
                "max_accuracy": 81.2, "epoch": 10, "config": cfg,
                "optimizer": {"state": {}, "param_groups": []}}, f)
    with pytest.raises(ValueError, match="allow_unsafe_pickle=True"):
        load_checkpoint(f, allow_unsafe_pickle=False)
    with pytest.warns(UserWarning, match=r"weights_only=True\) refused.*fake_yacs_config\.CfgNode.*weights_only=False"):
        loaded = load_checkpoint(f)
    assert loaded.num_heads == 4  # taken from the config's NUM_ATTENTION_HEADS (128 // 64 would give 2)
    assert_same_module(m, loaded, torch.randint(0, 100, (5, 2)))
    # yacs not installed: the config unpickles into a placeholder that still reads like a dict
    monkeypatch.delitem(sys.modules, mod.__name__)
    with pytest.warns(UserWarning, match="weights_only"):
        sd, info = read_state_dict(f)
    assert info["format"] == "image-pth" and info["config"]["NUM_ATTENTION_HEADS"] == 4
    with pytest.warns(UserWarning):
        assert load_checkpoint(f).num_heads == 4
    # an explicit num_heads wins over the config
    with pytest.warns(UserWarning):
        assert load_checkpoint(f, num_heads=8).num_heads == 8


def test_config_disagreement_is_reported(tmp_path, monkeypatch):
    _, CfgNode = _fake_yacs(monkeypatch)
    m = small()
    torch.save({"pe_model": m.state_dict(), "config": CfgNode(SEQPE_ATTN_DIRECTION="bi", SEQPE_MASK_PADDING=True)},
               tmp_path / "c.pth")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        load_checkpoint(tmp_path / "c.pth")
    text = " | ".join(str(x.message) for x in w)
    assert "SEQPE_ATTN_DIRECTION='bi'" in text and "attn_direction='bi'" in text
    assert "SEQPE_MASK_PADDING=True" in text
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        load_checkpoint(tmp_path / "c.pth", attn_direction="bi", mask_padding=True)
    assert not any("records" in str(x.message) for x in w)


def test_module_cls_and_overrides(tmp_path):
    m = small(data_dim=2, max_digits=2)
    f = save_checkpoint(m, tmp_path / "e.pth")
    fused = load_checkpoint(f, module_cls=FusedSeqPE)
    assert isinstance(fused, FusedSeqPE)
    o = load_checkpoint(f, num_heads=4, attn_direction="bi", mask_padding=True, resid_pdrop=0.3, attn_pdrop=0.1,
                        temperature=2.0, init="image")
    assert (o.num_heads, o.attn_direction, o.mask_padding, o.resid_pdrop, o.attn_pdrop, o.temperature) == \
        (4, "bi", True, 0.3, 0.1, 2.0)
    assert all(p.device.type == "cpu" for p in o.parameters())


def test_low_precision_file_loads_into_fp32_module(tmp_path):
    m = small()
    f = save_checkpoint(m.to(torch.bfloat16), tmp_path / "bf16.safetensors")
    loaded = load_checkpoint(f)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, m.state_dict()[k].float())


def test_save_checkpoint_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="unknown suffix '.npz'"):
        save_checkpoint(small(), tmp_path / "x.npz")


# ============================================================================ config inference
@pytest.mark.parametrize("name, kwargs, expect_heads", [
    ("text", dict(embed_dim=768, num_heads=12, max_digits=5, out_dim=768), 12),
    ("vit_b", dict(embed_dim=384, num_heads=6, max_digits=2, data_dim=2, out_dim=768, init="image"), 6),
])
def test_paper_configs_inferred(tmp_path, name, kwargs, expect_heads):
    m = SeqPE(**kwargs, use_last_layernorm=True)
    cfg = infer_config(m.state_dict())
    assert cfg == dict(embed_dim=kwargs["embed_dim"], max_digits=kwargs["max_digits"], num_layers=2,
                       data_dim=kwargs.get("data_dim", 1), out_dim=kwargs["out_dim"], use_last_layernorm=True,
                       base=10)
    f = save_checkpoint(m, tmp_path / ("best_model" if name == "text" else "best_model.pth"))
    loaded = load_checkpoint(f)
    assert loaded.num_heads == expect_heads  # embed_dim // 64, as the authors' CLI defaults
    assert loaded.config() == dict(m.config(), init=loaded.init_scheme)


@pytest.mark.parametrize("kwargs", [
    dict(embed_dim=64, num_heads=4, max_digits=4, num_layers=1, use_last_layernorm=False),
    dict(embed_dim=64, num_heads=4, max_digits=3, num_layers=4, data_dim=3, out_dim=5),
    dict(embed_dim=64, num_heads=4, max_digits=3, base=16, out_dim=16),
])
def test_infer_config_variants(kwargs):
    m = SeqPE(**kwargs)
    cfg = infer_config(m.state_dict())
    for k in ("embed_dim", "max_digits", "num_layers", "data_dim", "base", "use_last_layernorm"):
        assert cfg[k] == getattr(m, k), k
    assert cfg["out_dim"] == m.out_dim


def test_num_heads_cannot_default_for_narrow_width(tmp_path):
    f = save_checkpoint(SeqPE(48, 4, 2), tmp_path / "n.pth")
    with pytest.raises(ValueError, match="pass num_heads="):
        load_checkpoint(f)
    assert load_checkpoint(f, num_heads=4).num_heads == 4


# ============================================================================ errors in plain words
def test_wrong_file_without_encoder(tmp_path):
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(2)}, "epoch": 3}, tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"no SeqPE encoder weights: no key 'pe_model' and no "
                                         r"'transformers.0.attn.c_attn.weight'; keys found: \['model', 'epoch'\]"):
        load_checkpoint(tmp_path / "vit.pth")
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(2), "patch_embed.proj.weight": torch.zeros(2)},
               tmp_path / "vit_sd.pth")
    with pytest.raises(ValueError, match=r"no SeqPE encoder weights.*ViT main-model weights.*'pe_model'"):
        load_checkpoint(tmp_path / "vit_sd.pth")
    safetensors_torch.save_file({"foo": torch.zeros(3)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(ValueError, match=r"no SeqPE encoder weights.*keys found: \['foo'\]"):
        load_checkpoint(tmp_path / "foo.safetensors")


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "garbage.pth").write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="could not read it as a torch.save file"):
        load_checkpoint(tmp_path / "garbage.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01nonsense")
    with pytest.raises(ValueError, match="could not read it as a safetensors file"):
        load_checkpoint(tmp_path / "garbage.safetensors")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pe_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has no model_1.safetensors.*\['pe_config.json'\]"):
        load_checkpoint(tmp_path / "run")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pth")


def test_missing_unexpected_and_mismatched_keys(tmp_path):
    m = small()
    sd = dict(m.state_dict())
    del sd["transformers.1.mlp.c_fc.bias"]
    sd["extra.weight"] = torch.zeros(2)
    torch.save({"pe_model": sd}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as ei:
        load_checkpoint(tmp_path / "bad.pth")
    msg = str(ei.value)
    assert "keys the module needs but the file lacks: ['transformers.1.mlp.c_fc.bias']" in msg
    assert "keys in the file the module does not have: ['extra.weight']" in msg
    # Conv1D weights saved in nn.Linear layout are recognised as transposed
    sd = dict(m.state_dict())
    sd["transformers.0.mlp.c_fc.weight"] = sd["transformers.0.mlp.c_fc.weight"].t().contiguous()
    torch.save(sd, tmp_path / "t.pth")
    with pytest.raises(ValueError, match=r"shape mismatches: transformers.0.mlp.c_fc.weight: file \[512, 128\] vs "
                                         r"module \[128, 512\] \(transposed"):
        load_checkpoint(tmp_path / "t.pth")
    # an override that contradicts the file
    f = save_checkpoint(m, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match=r"out_proj.weight: file \[48, 128\] vs module \[7, 128\]"):
        load_checkpoint(f, out_dim=7)
    with pytest.raises(ValueError, match="cannot build SeqPE.*does not divide"):
        load_checkpoint(f, num_heads=7)


def test_inconsistent_shapes_are_explained(tmp_path):
    m = small(data_dim=2, max_digits=2)
    sd = dict(m.state_dict())
    sd["pos_of_seqpe_embed.weight"] = torch.zeros(5, 128)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="5 rows, not a multiple of data_dim=2"):
        load_checkpoint(tmp_path / "odd.pth")
    sd = dict(m.state_dict())
    sd["transformers.3.attn.c_attn.bias"] = sd.pop("transformers.1.attn.c_attn.bias")
    torch.save(sd, tmp_path / "gap.pth")
    with pytest.raises(ValueError, match=r"block indices are not 0..n-1: found \[0, 1, 3\]"):
        load_checkpoint(tmp_path / "gap.pth")
