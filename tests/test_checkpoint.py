"""load_checkpoint / save_checkpoint: the authors' containers (SEQPE_SPEC §3.3), the recorded configuration,
config inference from tensor shapes, the DDP ``module.`` prefix, strict loading, the plain-words errors, the
warnings for guessed settings, and safe unpickling (nothing from a file runs unless the caller opts in).

Randomness: every test runs after ``torch.manual_seed(SEED)`` (autouse fixture below); the hypothesis property
tests draw their own seed, which hypothesis prints with a failing example (and print_blob=True replays it).
Only the tests that write or read .safetensors files skip when safetensors is missing.
"""
import importlib
import json
import collections
import os
import pickle
import subprocess
import sys
import types
import uuid
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqpe_kernels import FusedSeqPE, SeqPE
from seqpe_kernels.checkpoint import (CheckpointConfigWarning, InertObject, InertPickleWarning, infer_config,
                                      load_checkpoint, read_state_dict, save_checkpoint)

try:
    import safetensors.torch as safetensors_torch
except ImportError:  # pragma: no cover - depends on the environment
    safetensors_torch = None
needs_safetensors = pytest.mark.skipif(safetensors_torch is None,
                                       reason="needs the 'safetensors' package (pip install safetensors)")

SEED = 1234


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(SEED)  # fixed: a failure replays as is


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


def quiet_load(*args, **kwargs):
    """load_checkpoint that fails on any warning (a file with a recorded config loads silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_checkpoint(*args, **kwargs)


def _fake_yacs(monkeypatch):
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
    raw = torch.load(f, weights_only=True)  # the authors' layout plus the config, all plain data
    assert set(raw) == {"pe_model", "seqpe_config"} and raw["seqpe_config"] == m.config()
    loaded = quiet_load(f)  # direction and padding come from the file: no arguments, no warning
    assert type(loaded) is SeqPE and loaded.config() == m.config()
    assert (loaded.data_dim, loaded.max_digits, loaded.num_heads) == (data_dim, max_digits, 2)
    pos = torch.randint(0, 10 ** max_digits, (9, data_dim) if data_dim > 1 else (9,))
    assert_same_module(m, loaded, pos)
    assert quiet_load(f, attn_direction="bi", mask_padding=True).config() == m.config()  # agreeing args: silent


@needs_safetensors
def test_safetensors_round_trip(tmp_path):
    m = small(data_dim=2, max_digits=2, out_dim=20, num_layers=3, use_last_layernorm=False)
    f = save_checkpoint(m, tmp_path / "enc.safetensors")
    assert set(safetensors_torch.load_file(str(f))) == set(m.state_dict())
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as fh:
        assert json.loads(fh.metadata()["seqpe_config"]) == m.config()
    loaded = quiet_load(f)
    assert (loaded.num_layers, loaded.out_dim, loaded.use_last_layernorm) == (3, 20, False)
    assert_same_module(m, loaded, torch.randint(0, 100, (7, 2)))


@needs_safetensors
def test_text_accelerate_directory(tmp_path):
    m = small(max_digits=5)
    d = tmp_path / "best_model"
    f = save_checkpoint(m, d)  # no suffix: accelerate-style directory
    assert f == d / "model_1.safetensors"
    # the GPT-2 weights sit next to it in model.safetensors
    safetensors_torch.save_file({"transformer.wte.weight": torch.zeros(4, 8),
                                 "transformer.h.0.attn.c_attn.weight": torch.zeros(8, 24)}, str(d / "model.safetensors"))
    (d / "optimizer.bin").write_bytes(b"not an encoder")
    loaded = quiet_load(d)
    assert_same_module(m, loaded, torch.randint(0, 10 ** 5, (11,)))
    _, info = read_state_dict(d)
    assert info["format"] == "text-dir" and info["file"] == f and info["seqpe_config"] == m.config()
    # pointing at GPT-2's file by mistake names the right one
    with pytest.raises(ValueError, match="GPT-2 main-model weights.*model_1.safetensors"):
        load_checkpoint(d / "model.safetensors")


_PE_CONFIG_YAML = """MODEL: {{}}
NUM_ATTENTION_HEADS: {heads}
PE_DATA_DIM: 1
PE_EMBED_DIM: {dim}
PE_TYPE: seq_pe
SEQPE_ACTIVATION_FUNCTION: {act}
SEQPE_ATTN_DIRECTION: bi
SEQPE_ATTN_PDROP: 0.0
SEQPE_LAST_LAYERNORM: true
SEQPE_LAYER_NUM: {layers}
SEQPE_MASK_PADDING: true
SEQPE_MAX_DIGITS: 5
SEQPE_PRETRAINED: null
SEQPE_RESID_PDROP: 0.1
SEQPE_SCALE_ATTN_WEIGHTS: true
SEQPE_TEMPERATURE: 0.5
"""


def _authors_text_run(tmp_path, m, files=("pe_config.json",), heads=4, act="gelu_new", layers=None):
    """An authors' text run folder: output_dir/{pe_config.json (a yacs YAML dump), train_args.json} and
    output_dir/step_5/model_1.safetensors as accelerate's save_state writes it under DDP (``module.`` keys, no
    seqpe_config metadata)."""
    run = tmp_path / "250610_run"
    (run / "step_5").mkdir(parents=True)
    safetensors_torch.save_file({"module." + k: v.contiguous() for k, v in m.state_dict().items()},
                                str(run / "step_5" / "model_1.safetensors"))
    if "pe_config.json" in files:
        (run / "pe_config.json").write_text(_PE_CONFIG_YAML.format(heads=heads, dim=m.embed_dim, act=act,
                                                                   layers=layers or m.num_layers))
    if "train_args.json" in files:
        (run / "train_args.json").write_text(json.dumps({
            "num_attention_heads": heads, "pe_embed_dim": m.embed_dim, "seqpe_layer_num": layers or m.num_layers,
            "seqpe_attn_direction": "bi", "seqpe_mask_padding": True, "seqpe_temperature": 0.5,
            "seqpe_attn_pdrop": 0.0, "seqpe_resid_pdrop": 0.1, "seqpe_scale_attn_weights": True,
            "seqpe_activation_function": act, "mixed_precision": "bf16"}, indent=2))
    return run / "step_5"


@needs_safetensors
@pytest.mark.parametrize("files", [("pe_config.json",), ("train_args.json",), ("pe_config.json", "train_args.json")])
def test_authors_text_run_settings_are_read(tmp_path, files):
    """The authors' text checkpoints record heads / direction / masking / temperature in the run folder above the
    save_state folder (pe_config.json, train_args.json), not in model_1.safetensors: loading guessed
    num_heads = D // 64 (here 2 instead of 4: every output wrong, with only a warning)."""
    m = small(num_heads=4, attn_direction="bi", mask_padding=True, temperature=0.5, max_digits=5)
    step = _authors_text_run(tmp_path, m, files)
    pos = torch.randint(0, 10 ** 5, (13,))
    for where in (step, step / "model_1.safetensors"):
        o = quiet_load(where).eval()  # every setting read: no guess, no warning
        assert (o.num_heads, o.attn_direction, o.mask_padding, o.temperature) == (4, "bi", True, 0.5)
        assert torch.equal(o(pos), m(pos))
    _, info = read_state_dict(step)
    assert [f.name for f in info["config_files"]] == list(files)


@needs_safetensors
def test_authors_text_run_pe_config_wins_over_train_args(tmp_path):
    """Where the two run files disagree, pe_config.json (the PE's own config dump) is read first and
    train_args.json only fills what it lacks (the test above writes the same values to both)."""
    m = small(num_heads=4, attn_direction="bi", mask_padding=True, temperature=0.5, max_digits=5)
    step = _authors_text_run(tmp_path, m, ("pe_config.json", "train_args.json"))
    args = json.loads((step.parent / "train_args.json").read_text())
    args.update(seqpe_attn_direction="causal", seqpe_temperature=2.0, seqpe_mask_padding=False)
    (step.parent / "train_args.json").write_text(json.dumps(args))
    o = quiet_load(step).eval()
    assert (o.num_heads, o.attn_direction, o.mask_padding, o.temperature) == (4, "bi", True, 0.5)
    pos = torch.randint(0, 10 ** 5, (13,))
    assert torch.equal(o(pos), m(pos))


@needs_safetensors
def test_authors_text_run_other_activation_or_other_run_is_refused(tmp_path):
    m = small(num_heads=4, max_digits=5)
    for act in ("gelu", "relu"):  # SeqPE computes gelu_new only
        with pytest.raises(ValueError, match=f"SEQPE_ACTIVATION_FUNCTION='{act}'.*gelu_new"):
            load_checkpoint(_authors_text_run(tmp_path / act, m, act=act))
    assert quiet_load(_authors_text_run(tmp_path / "tanh", m, act="gelu_pytorch_tanh")).num_heads == 4
    # a run file describing other weights (3 layers, these have 2) is not this checkpoint's: warned, not used
    step = _authors_text_run(tmp_path / "other", m, layers=3)
    with pytest.warns(CheckpointConfigWarning) as w:
        o = load_checkpoint(step)
    text = " | ".join(str(x.message) for x in w)
    assert "SEQPE_LAYER_NUM=3 (weights: 2)" in text and "num_heads=2 (embed_dim // 64" in text
    assert o.num_heads == 2


def test_bare_state_dict_pth(tmp_path):
    m = small()
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    with pytest.warns(CheckpointConfigWarning):  # a bare state dict records no settings
        assert_same_module(m, load_checkpoint(tmp_path / "sd.pt"), torch.arange(0, 999, 37))
    _, info = read_state_dict(tmp_path / "sd.pt")
    assert info["format"] == "state-dict-pth" and info["seqpe_config"] is None


@pytest.mark.parametrize("container", ["image", "bare", pytest.param("safetensors", marks=needs_safetensors)])
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
    with pytest.warns(CheckpointConfigWarning):
        assert_same_module(m, load_checkpoint(f), torch.arange(0, 999, 53))


def test_ddp_wrapped_module_saves_the_inner_encoder(tmp_path):
    m = small(num_heads=8)
    wrapper = torch.nn.Module()
    wrapper.module = m  # what DistributedDataParallel looks like to save_checkpoint
    f = save_checkpoint(wrapper, tmp_path / "ddp.pth")
    assert quiet_load(f).config() == m.config()


# ============================================================================ issue 12, item 2: heads recorded
@pytest.mark.parametrize("fmt", ["pth", pytest.param("safetensors", marks=needs_safetensors),
                                 pytest.param("dir", marks=needs_safetensors)])
def test_heads_other_than_width_over_64_round_trip(tmp_path, fmt):
    """FusedSeqPE(64, 4, 3) used to come back with 64 // 64 = 1 head and outputs 1e-2 off, silently."""
    m = FusedSeqPE(64, 4, 3, backend="torch").eval()
    f = save_checkpoint(m, tmp_path / {"pth": "e.pth", "safetensors": "e.safetensors", "dir": "e"}[fmt])
    loaded = quiet_load(f, module_cls=FusedSeqPE, backend="torch")
    assert loaded.num_heads == 4 and loaded.config() == m.config()
    assert_same_module(m, loaded, torch.arange(0, 999, 7))
    ref = quiet_load(f)  # the reference class, same config
    assert type(ref) is SeqPE and ref.config() == m.config()
    torch.testing.assert_close(ref.eval()(torch.arange(0, 999, 7)), m(torch.arange(0, 999, 7)))


def test_guessed_heads_are_announced(tmp_path):
    """A file without a record: the guess (embed_dim // 64) is stated with the argument that overrides it."""
    m = FusedSeqPE(64, 4, 3)
    torch.save({"pe_model": m.state_dict()}, tmp_path / "authors.pth")
    with pytest.warns(CheckpointConfigWarning, match=r"num_heads=1 \(embed_dim // 64.*pass num_heads=\.\.\.") as w:
        guessed = load_checkpoint(tmp_path / "authors.pth")
    text = str(w[0].message)
    for name in ("attn_direction='causal'", "mask_padding=False", "temperature=1.0", "resid_pdrop=0.1",
                 "attn_pdrop=0.0", "scale_attn_weights=True"):
        assert name in text
    assert guessed.num_heads == 1
    everything = dict(num_heads=4, attn_direction="causal", mask_padding=False, temperature=1.0, resid_pdrop=0.1,
                      attn_pdrop=0.0, scale_attn_weights=True)
    assert quiet_load(tmp_path / "authors.pth", **everything).config() == m.config()


def test_argument_contradicting_the_record_warns_naming_both(tmp_path):
    f = save_checkpoint(small(num_heads=4, temperature=2.0), tmp_path / "c.pth")
    with pytest.warns(CheckpointConfigWarning, match=r"num_heads=8 was passed, the file records num_heads=4.*"
                                                     r"temperature=1.0 was passed, the file records temperature=2.0"):
        o = load_checkpoint(f, num_heads=8, temperature=1.0)
    assert (o.num_heads, o.temperature) == (8, 1.0)  # the caller's values win


def test_record_contradicting_the_weights_is_an_error(tmp_path):
    m = small()
    torch.save({"pe_model": m.state_dict(), "seqpe_config": dict(m.config(), embed_dim=64)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"seqpe_config contradicts its own weights: embed_dim=64 \(weights: 128\)"):
        load_checkpoint(tmp_path / "x.pth")
    torch.save({"pe_model": m.state_dict(), "seqpe_config": dict(m.config(), future_knob=3)}, tmp_path / "y.pth")
    with pytest.warns(CheckpointConfigWarning, match="does not know, ignored: \\['future_knob'\\]"):
        assert load_checkpoint(tmp_path / "y.pth").config() == m.config()


# ============================================================================ property: save -> load is identity
@st.composite
def encoder_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    embed_dim = heads * draw(st.sampled_from([4, 8, 16]))
    return dict(embed_dim=embed_dim, num_heads=heads, max_digits=draw(st.integers(1, 3)),
                num_layers=draw(st.integers(1, 2)), data_dim=draw(st.integers(1, 3)),
                out_dim=draw(st.one_of(st.none(), st.integers(1, 24))),
                attn_direction=draw(st.sampled_from(["causal", "bi"])), mask_padding=draw(st.booleans()),
                use_last_layernorm=draw(st.booleans()),
                resid_pdrop=draw(st.sampled_from([0.0, 0.1, 0.3])), attn_pdrop=draw(st.sampled_from([0.0, 0.1])),
                temperature=draw(st.sampled_from([0.5, 1.0, 2.0, 1.0 / 3.0])),
                layer_norm_eps=draw(st.sampled_from([1e-5, 1e-6])), init=draw(st.sampled_from(["text", "image"])),
                base=draw(st.sampled_from([2, 10, 16])), scale_attn_weights=draw(st.booleans()))


@pytest.mark.parametrize("fmt", ["pth", pytest.param("safetensors", marks=needs_safetensors),
                                 pytest.param("dir", marks=needs_safetensors)])
@settings(max_examples=15, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=encoder_configs(), seed=st.integers(0, 2 ** 31 - 1))
def test_round_trip_is_identity(tmp_path_factory, fmt, cfg, seed):
    torch.manual_seed(seed)
    m = SeqPE(**cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("rt")
    f = save_checkpoint(m, d / {"pth": "e.pth", "safetensors": "e.safetensors", "dir": "enc"}[fmt])
    loaded = quiet_load(f)
    assert loaded.config() == m.config()
    g = torch.Generator().manual_seed(seed)
    hi = cfg["base"] ** cfg["max_digits"]
    pos = torch.randint(0, hi, (6, cfg["data_dim"]) if cfg["data_dim"] > 1 else (6,), generator=g)
    assert_same_module(m, loaded, pos)
    # training mode too: same dropout draws from the same seed
    m.train()
    loaded.train()
    torch.manual_seed(seed)
    a = m(pos)
    torch.manual_seed(seed)
    assert torch.equal(a, loaded(pos))


# ============================================================================ issue 12, item 3: train --save files
def _train_file(tmp_path, with_record: bool):
    enc = FusedSeqPE(32, 4, 2, data_dim=2, out_dim=16, temperature=2.0, resid_pdrop=0.2, init="image")
    obj = {"encoder": enc.state_dict(), "model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)},
           "config": {"task": "vit", "pe_dim": 32, "pe_heads": 4, "pe_layers": 2, "pe_temperature": 2.0,
                      "dropout": 0.2, "max_digits": 2, "pe_out_dim": 16}}
    if with_record:
        obj["seqpe_config"] = enc.config()
    torch.save(obj, tmp_path / "run.pth")
    return enc, tmp_path / "run.pth"


@pytest.mark.parametrize("with_record", [True, False])
def test_train_save_file_loads(tmp_path, with_record):
    """A `seqpe-kernels train --save` file ('encoder', 'model', 'config'): the encoder with its settings, from
    its seqpe_config or, in files written before it existed, from the run's config (pe_heads, ...)."""
    enc, f = _train_file(tmp_path, with_record)
    loaded = quiet_load(f, module_cls=FusedSeqPE)
    assert loaded.config() == enc.config()
    _, info = read_state_dict(f)
    assert info["format"] == "train-pth" and info["config"]["pe_heads"] == 4


# ============================================================================ the authors' image checkpoints
def _yacs_module(tmp_path, name):
    """An importable module `name` with a yacs-like CfgNode (a dict subclass setting __dict__ flags in
    __init__); every construction is logged in CALLS, so a test can tell whether loading built one."""
    (tmp_path / f"{name}.py").write_text(
        "CALLS = []\n"
        "class CfgNode(dict):\n"
        "    def __new__(cls, *a, **k):\n"
        "        CALLS.append('new')\n"
        "        return super().__new__(cls)\n"
        "    def __init__(self, init_dict=None):\n"
        "        super().__init__(init_dict or {})\n"
        "        self.__dict__['__immutable__'] = False\n"
        "        self.__dict__['__deprecated_keys__'] = set()\n"
        "    def __getattr__(self, k):\n"
        "        try:\n"
        "            return self[k]\n"
        "        except KeyError as e:\n"
        "            raise AttributeError(k) from e\n"
        "    def __setstate__(self, state):\n"
        "        CALLS.append('setstate')\n"
        "        self.__dict__.update(state)\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    return importlib.import_module(name)


@pytest.mark.parametrize("importable", [True, False])
def test_image_checkpoint_with_yacs_config_loads_by_default(tmp_path, importable):
    """The image training script saves model/pe_model/max_accuracy/epoch/config, config a pickled yacs CfgNode:
    weights_only=True refuses it; the default loader reads it as inert data (nothing constructed), whether or
    not its module can be imported, and uses NUM_ATTENTION_HEADS."""
    name = f"fake_yacs_{uuid.uuid4().hex[:8]}"
    mod = _yacs_module(tmp_path, name)
    try:
        cfg = mod.CfgNode({"NUM_ATTENTION_HEADS": 4, "SEQPE_ATTN_DIRECTION": "bi", "SEQPE_MASK_PADDING": True,
                           "SEQPE_TEMPERATURE": 1.0, "MODEL": mod.CfgNode({"EMBED_DIM": 192})})
        m = small(num_heads=4, data_dim=2, max_digits=2, attn_direction="bi", mask_padding=True)
        f = tmp_path / "ckpt_epoch_10.pth"
        torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, "pe_model": m.state_dict(),
                    "max_accuracy": 81.2, "epoch": 10, "config": cfg,
                    "optimizer": {"state": {}, "param_groups": []}}, f)
        if not importable:
            sys.modules.pop(name)
            sys.path.remove(str(tmp_path))
            (tmp_path / f"{name}.py").unlink()
        else:
            mod.CALLS.clear()
        rest = dict(resid_pdrop=m.resid_pdrop, attn_pdrop=m.attn_pdrop, scale_attn_weights=True)
        loaded = quiet_load(f, **rest)  # no InertPickleWarning for a CfgNode, no guess left
        assert (loaded.num_heads, loaded.attn_direction, loaded.mask_padding) == (4, "bi", True)
        assert_same_module(m, loaded, torch.randint(0, 100, (5, 2)))
        _, info = read_state_dict(f)
        assert info["format"] == "image-pth" and info["unpickler"] == "inert"
        assert info["inert_globals"] == [f"{name}.CfgNode"]
        c = info["config"]
        assert isinstance(c, InertObject) and type(c).pickled_class == f"{name}.CfgNode"
        assert c["NUM_ATTENTION_HEADS"] == 4 and c.NUM_ATTENTION_HEADS == 4 and c.MODEL.EMBED_DIM == 192
        assert c.pickled_state["__immutable__"] is False
        if importable:
            assert mod.CALLS == []  # the real class was never constructed
            # explicit opt-in: the old behaviour (real unpickling)
            _, info = read_state_dict(f, allow_unsafe_pickle=True)
            assert type(info["config"]) is mod.CfgNode and info["unpickler"] == "unsafe" and mod.CALLS
        else:
            assert name not in sys.modules
        with pytest.warns(CheckpointConfigWarning, match="num_heads=8 was passed, the file records num_heads=4"):
            assert load_checkpoint(f, num_heads=8, **rest).num_heads == 8  # an explicit argument wins
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_authors_heads_minus_one_means_width_over_64(tmp_path, monkeypatch):
    _, CfgNode = _fake_yacs(monkeypatch)
    m = small(num_heads=2)  # 128 // 64
    torch.save({"pe_model": m.state_dict(), "config": CfgNode(NUM_ATTENTION_HEADS=-1)}, tmp_path / "c.pth")
    with pytest.warns(CheckpointConfigWarning) as w:
        assert load_checkpoint(tmp_path / "c.pth").num_heads == 2
    assert all("num_heads" not in str(x.message) for x in w)  # recorded (-1 = D/64), not guessed


def test_config_disagreement_is_reported(tmp_path, monkeypatch):
    _, CfgNode = _fake_yacs(monkeypatch)
    m = small()
    torch.save({"pe_model": m.state_dict(), "config": CfgNode(SEQPE_ATTN_DIRECTION="bi", SEQPE_MASK_PADDING=True)},
               tmp_path / "c.pth")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o = load_checkpoint(tmp_path / "c.pth")
    assert (o.attn_direction, o.mask_padding) == ("bi", True)  # the file's record, not a default
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o = load_checkpoint(tmp_path / "c.pth", attn_direction="causal", mask_padding=False)
    text = " | ".join(str(x.message) for x in w)
    assert "attn_direction='causal' was passed, the file records attn_direction='bi'" in text
    assert "mask_padding=False was passed, the file records mask_padding=True" in text
    assert (o.attn_direction, o.mask_padding) == ("causal", False)


# ============================================================================ issue 12, item 4: nothing runs
class _Payload:
    """Pickles as ``func(*args)``: what a malicious checkpoint hides beside the weights."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    m = str(marker)
    return {
        "os.system": _Payload(os.system, f"touch '{m}'"),
        "subprocess.call": _Payload(subprocess.call, ["touch", m]),
        "builtins.exec": _Payload(exec, f"open({m!r}, 'w').write('x')"),
        "builtins.eval": _Payload(eval, f"__import__('os').system(\"touch '{m}'\")"),
        "open": _Payload(open, m, "w"),
        "getattr": _Payload(getattr, _Payload(__import__, "os"), "system"),
    }


@pytest.mark.parametrize("payload", ["os.system", "subprocess.call", "builtins.exec", "builtins.eval", "open",
                                     "getattr"])
@pytest.mark.parametrize("beside_a_config", [True, False])
def test_pickled_code_does_not_run_by_default(tmp_path, monkeypatch, payload, beside_a_config):
    """Issue 12 item 4. With a custom class (a yacs-like config) pickled first, torch's weights-only loader
    reports that class and the old code retried the whole file with weights_only=False: the payload ran."""
    marker = tmp_path / "trace"
    m = small(num_heads=4)
    f = tmp_path / "evil.pth"
    obj = {}
    if beside_a_config:
        _, CfgNode = _fake_yacs(monkeypatch)
        obj["config"] = CfgNode(NUM_ATTENTION_HEADS=4)
    obj.update(pe_model=m.state_dict(), seqpe_config=m.config(), extra=_payloads(marker)[payload])
    torch.save(obj, f)
    with pytest.warns(InertPickleWarning, match="nothing was imported or called"):
        loaded = load_checkpoint(f)
    assert not marker.exists()
    assert_same_module(m, loaded, torch.arange(0, 999, 11))  # the weights still load
    with pytest.warns(InertPickleWarning):
        _, info = read_state_dict(f)
    assert info["unpickler"] == "inert" and not marker.exists()
    assert isinstance(info["inert_globals"], list) and info["inert_globals"]
    if payload == "open":  # the explicit opt-in keeps the old behaviour (weights_only=False)
        load_checkpoint(f, allow_unsafe_pickle=True)
        assert marker.exists()


def test_reduce_payload_runs_only_with_explicit_opt_in(tmp_path, monkeypatch):
    """The issue's reproduction: a custom class made the old default retry with weights_only=False, and the
    os.system payload beside it ran (a file appeared, with only a warning)."""
    marker = tmp_path / "trace"
    _, CfgNode = _fake_yacs(monkeypatch)
    m = small()
    f = tmp_path / "evil.pth"
    torch.save({"config": CfgNode(NUM_ATTENTION_HEADS=2), "pe_model": m.state_dict(), "seqpe_config": m.config(),
                "x": _payloads(marker)["os.system"]}, f)
    with pytest.warns(InertPickleWarning, match="posix.system|nt.system"):
        load_checkpoint(f)
    assert not marker.exists()
    load_checkpoint(f, allow_unsafe_pickle=True)
    assert marker.exists()


def test_module_named_by_the_pickle_is_not_imported(tmp_path):
    """A class from a module whose import has side effects: the loader never imports it."""
    name = f"side_effect_mod_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    mod = types.ModuleType(name)

    class Thing:
        pass

    Thing.__module__, Thing.__qualname__ = name, "Thing"
    mod.Thing = Thing
    sys.modules[name] = mod
    try:
        m = small()
        f = tmp_path / "c.pth"
        torch.save({"pe_model": m.state_dict(), "seqpe_config": m.config(), "t": Thing()}, f)
    finally:
        del sys.modules[name]
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Thing: pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.warns(InertPickleWarning, match=f"{name}.Thing"):
            loaded = load_checkpoint(f)
        assert not marker.exists() and name not in sys.modules
        assert_same_module(m, loaded, torch.arange(0, 999, 13))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_rebuild_from_type_cannot_smuggle_a_call(tmp_path):
    """torch's own _rebuild_from_type_v2 calls its first argument: only a trusted rebuild function may go there."""
    marker = tmp_path / "trace"

    class Smuggle:
        def __reduce__(self):
            return torch._tensor._rebuild_from_type_v2, (os.system, torch.Tensor, (f"touch '{marker}'",), {})

    m = small()
    f = tmp_path / "s.pth"
    torch.save({"pe_model": m.state_dict(), "x": Smuggle()}, f)
    with pytest.raises(ValueError, match="restricted unpickler.*untrusted function"):
        load_checkpoint(f)
    assert not marker.exists()


def test_inert_objects_run_nothing():
    from seqpe_kernels.checkpoint import _inert_class

    cls = _inert_class("posix.system")
    obj = cls("touch /tmp/should_not_exist")  # calling the stand-in records, runs nothing
    assert isinstance(obj, InertObject) and obj.pickled_args == ("touch /tmp/should_not_exist",)
    assert len(obj) == 0 and not callable(obj)
    assert "posix.system" in repr(obj)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(obj)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*TorchScript archive:UserWarning")
def test_torchscript_archive_is_refused(tmp_path):
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "ts.pt"))
    with pytest.raises(ValueError, match="could not read it as a torch.save file"):
        load_checkpoint(tmp_path / "ts.pt")


def test_module_cls_and_overrides(tmp_path):
    m = small(data_dim=2, max_digits=2)
    f = save_checkpoint(m, tmp_path / "e.pth")
    fused = quiet_load(f, module_cls=FusedSeqPE)
    assert isinstance(fused, FusedSeqPE) and fused.config() == m.config()
    with pytest.warns(CheckpointConfigWarning, match="the file records"):
        o = load_checkpoint(f, num_heads=4, attn_direction="bi", mask_padding=True, resid_pdrop=0.3,
                            attn_pdrop=0.1, temperature=2.0, init="image")
    assert (o.num_heads, o.attn_direction, o.mask_padding, o.resid_pdrop, o.attn_pdrop, o.temperature) == \
        (4, "bi", True, 0.3, 0.1, 2.0)
    assert all(p.device.type == "cpu" for p in o.parameters())


@needs_safetensors
def test_low_precision_file_loads_into_fp32_module(tmp_path):
    m = small()
    f = save_checkpoint(m.to(torch.bfloat16), tmp_path / "bf16.safetensors")
    loaded = quiet_load(f)
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
    m = SeqPE(**kwargs, use_last_layernorm=True, attn_pdrop=0.0)
    cfg = infer_config(m.state_dict())
    assert cfg == dict(embed_dim=kwargs["embed_dim"], max_digits=kwargs["max_digits"], num_layers=2,
                       data_dim=kwargs.get("data_dim", 1), out_dim=kwargs["out_dim"], use_last_layernorm=True,
                       base=10)
    torch.save({"pe_model": m.state_dict()}, tmp_path / "authors.pth")  # the authors' files record no config
    with pytest.warns(CheckpointConfigWarning, match=f"num_heads={expect_heads}"):
        loaded = load_checkpoint(tmp_path / "authors.pth")
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
    m = SeqPE(48, 4, 2)
    torch.save(m.state_dict(), tmp_path / "n.pth")
    with pytest.raises(ValueError, match="pass num_heads="):
        load_checkpoint(tmp_path / "n.pth")
    with pytest.warns(CheckpointConfigWarning):
        assert load_checkpoint(tmp_path / "n.pth", num_heads=4).num_heads == 4
    assert quiet_load(save_checkpoint(m, tmp_path / "rec.pth")).num_heads == 4  # recorded: no default needed


# ============================================================================ errors in plain words
def test_wrong_file_without_encoder(tmp_path):
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(2)}, "epoch": 3}, tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"no SeqPE encoder weights: no key 'pe_model' \(image checkpoint\) or "
                                         r"'encoder' .* and no 'transformers.0.attn.c_attn.weight'; keys found: "
                                         r"\['model', 'epoch'\]"):
        load_checkpoint(tmp_path / "vit.pth")
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(2), "patch_embed.proj.weight": torch.zeros(2)},
               tmp_path / "vit_sd.pth")
    with pytest.raises(ValueError, match=r"no SeqPE encoder weights.*ViT main-model weights.*'pe_model'"):
        load_checkpoint(tmp_path / "vit_sd.pth")


@needs_safetensors
def test_wrong_safetensors_file_without_encoder(tmp_path):
    safetensors_torch.save_file({"foo": torch.zeros(3)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(ValueError, match=r"no SeqPE encoder weights.*keys found: \['foo'\]"):
        load_checkpoint(tmp_path / "foo.safetensors")
    m = small()
    safetensors_torch.save_file(m.state_dict(), str(tmp_path / "bad.safetensors"), metadata={"seqpe_config": "{"})
    with pytest.raises(ValueError, match="'seqpe_config' metadata is not valid JSON"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "garbage.pth").write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="could not read it as a torch.save file"):
        load_checkpoint(tmp_path / "garbage.pth")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pe_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has no model_1.safetensors.*\['pe_config.json'\]"):
        load_checkpoint(tmp_path / "run")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pth")


@needs_safetensors
def test_unreadable_safetensors(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01nonsense")
    with pytest.raises(ValueError, match="could not read it as a safetensors file"):
        load_checkpoint(tmp_path / "garbage.safetensors")


def test_missing_unexpected_and_mismatched_keys(tmp_path):
    m = small()
    sd = dict(m.state_dict())
    del sd["transformers.1.mlp.c_fc.bias"]
    sd["extra.weight"] = torch.zeros(2)
    torch.save({"pe_model": sd, "seqpe_config": m.config()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as ei:
        load_checkpoint(tmp_path / "bad.pth")
    msg = str(ei.value)
    assert "keys the module needs but the file lacks: ['transformers.1.mlp.c_fc.bias']" in msg
    assert "keys in the file the module does not have: ['extra.weight']" in msg
    # Conv1D weights saved in nn.Linear layout are recognised as transposed
    sd = dict(m.state_dict())
    sd["transformers.0.mlp.c_fc.weight"] = sd["transformers.0.mlp.c_fc.weight"].t().contiguous()
    torch.save({"pe_model": sd, "seqpe_config": m.config()}, tmp_path / "t.pth")
    with pytest.raises(ValueError, match=r"shape mismatches: transformers.0.mlp.c_fc.weight: file \[512, 128\] vs "
                                         r"module \[128, 512\] \(transposed"):
        load_checkpoint(tmp_path / "t.pth")
    # an override that contradicts the file
    f = save_checkpoint(m, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match=r"out_proj.weight: file \[48, 128\] vs module \[7, 128\]"):
        load_checkpoint(f, out_dim=7)
    with pytest.warns(CheckpointConfigWarning), pytest.raises(ValueError, match="cannot build SeqPE.*does not divide"):
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


# ============================================================================ crafted files: size, time, state
def test_expanded_views_are_refused_before_anything_is_built(tmp_path):
    """A ~2 KB file of stride-0 views named sizes of tens of GB: the loader built the module at those sizes first."""
    sd = small().state_dict()
    sd["token_of_seqpe_embed.weight"] = torch.zeros(1).expand(*sd["token_of_seqpe_embed.weight"].shape)
    torch.save({"pe_model": sd}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="expanded view"):
        load_checkpoint(tmp_path / "x.pth", num_heads=2)


def test_sizes_are_checked_before_the_module_is_allocated(tmp_path):
    """20 000 block keys of one tiny tensor each made the loader build a 20 000-block encoder (132 GiB at D=384)
    before comparing shapes; the comparison now runs on a one-block meta module."""
    sd = small().state_dict()
    tiny = torch.zeros(1)
    for i in range(2, 300):
        sd[f"transformers.{i}.attn.c_attn.weight"] = tiny
    built = []

    class Counting(SeqPE):
        def __init__(self, **kw):
            built.append((kw["num_layers"], torch.empty(0).device.type))
            super().__init__(**kw)

    torch.save({"pe_model": sd}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint(tmp_path / "x.pth", num_heads=2, module_cls=Counting)
    assert built == [(1, "meta")]


def test_nested_wrapper_prefixes(tmp_path):
    """One key under N 'module.' prefixes took O(N^2) to strip (14 s at 1 MB): nesting is capped."""
    sd = small().state_dict()
    cfg = small().config()
    torch.save({"pe_model": {"module._orig_mod.module." + k: v for k, v in sd.items()}, "seqpe_config": cfg},
               tmp_path / "ok.pth")
    assert set(quiet_load(tmp_path / "ok.pth").state_dict()) == set(sd)
    torch.save({"pe_model": {"module." * 20000 + k: v for k, v in sd.items()}}, tmp_path / "deep.pth")
    with pytest.raises(ValueError, match="more than 8 wrapper prefixes"):
        load_checkpoint(tmp_path / "deep.pth", num_heads=2)


def test_authors_scale_and_dropout_settings_are_read(tmp_path, monkeypatch):
    """The authors' image config records SEQPE_SCALE_ATTN_WEIGHTS / SEQPE_RESID_PDROP / SEQPE_ATTN_PDROP; they
    were ignored and guessed (True / 0.1 / 0.1) with a warning saying the file does not record them."""
    _, CfgNode = _fake_yacs(monkeypatch)
    m = small(scale_attn_weights=False, resid_pdrop=0.3, attn_pdrop=0.05, init="image")
    torch.save({"pe_model": m.state_dict(), "config": CfgNode(
        NUM_ATTENTION_HEADS=2, SEQPE_ATTN_DIRECTION="causal", SEQPE_MASK_PADDING=False, SEQPE_TEMPERATURE=1.0,
        SEQPE_SCALE_ATTN_WEIGHTS=False, SEQPE_RESID_PDROP=0.3, SEQPE_ATTN_PDROP=0.05)}, tmp_path / "c.pth")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o = load_checkpoint(tmp_path / "c.pth").eval()
    assert all("scale_attn_weights" not in str(x.message) and "pdrop" not in str(x.message) for x in w)
    assert (o.scale_attn_weights, o.resid_pdrop, o.attn_pdrop, o.config()["init"]) == (False, 0.3, 0.05, "image")
    pos = torch.arange(50)
    assert torch.equal(o(pos), m(pos))


def test_mixed_fp64_file_is_not_rounded(tmp_path):
    m = small().double()
    sd = m.state_dict()
    sd["out_proj.bias"] = sd["out_proj.bias"].float()
    torch.save({"pe_model": sd, "seqpe_config": m.config()}, tmp_path / "x.pth")
    with pytest.warns(CheckpointConfigWarning, match="mixes"):
        o = load_checkpoint(tmp_path / "x.pth")
    assert o.out_proj.weight.dtype == torch.float64 and torch.equal(o.out_proj.weight, m.out_proj.weight)


def test_only_storage_persistent_ids_and_no_inert_arguments(tmp_path):
    """Hardening of the restricted unpickler: torch's legacy 'module' persistent ids made torch read source files;
    trusted functions were callable with stand-in objects whose attributes the file chose."""
    import io

    from seqpe_kernels.safe_pickle import _InertUnpickler

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "x.py", "source") if obj == "MOD" else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(["MOD"])
    u = _InertUnpickler(io.BytesIO(buf.getvalue()))
    u.persistent_load = lambda pid: pytest.fail("a non-storage persistent id reached torch")
    with pytest.raises(pickle.UnpicklingError, match="only tensor storages"):
        u.load()

    class Duck:
        def __reduce__(self):
            return collections.OrderedDict, (_Inert(),)

    class _Inert:
        def __reduce__(self):
            return os.system, ("true",)

    u = _InertUnpickler(io.BytesIO(pickle.dumps(Duck(), protocol=2)))
    with pytest.raises(pickle.UnpicklingError, match="untrusted class"):
        u.load()
