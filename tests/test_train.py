"""``seqpe-kernels train`` (seqpe_kernels/training/train.py): CLI runs on the embedded data, convergence parity of the
torch and Triton encoder backends, and DistributedDataParallel (2 CPU ranks, gloo) against one process.

Kept small for a shared 2-core CPU (run with OMP_NUM_THREADS=1): every test is well under a minute. On CPU the
Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py before triton is imported), which is slow, so
the parity configurations are tiny (encoder D=32, 2 heads, 2 layers, positions < 10 / a 6x6 grid).
"""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from seqpe_kernels.training import train as T
from seqpe_kernels.backend import status

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nan(v):
    return np.array([np.nan if x is None else x for x in v], dtype=float)


# ------------------------------------------------------------------------------------------------ data
def test_embedded_corpus_is_the_generators_output():
    from seqpe_kernels.training.data.corpus import generate_chronicle, load_chronicle

    text = load_chronicle()
    assert text == generate_chronicle()
    assert 20_000 <= len(text.encode("utf-8")) <= 50_000


def test_synthetic_images_rule_and_position_blindness():
    x, y = T.synthetic_images(np.random.default_rng(0), 64, 5, 4)
    assert x.shape == (64, 3, 20, 20) and x.dtype == torch.float32 and y.shape == (64,)
    assert int(y.min()) >= 0 and int(y.max()) < T.SYNTHETIC_CLASSES
    x, y = T.synthetic_images(np.random.default_rng(1), 200, 4, 4, noise=0.0)
    cells = x[:, :, ::4, ::4] + 0.5  # one pixel per patch, [n, 3, 4, 4]
    pairs = torch.tensor(T._PAIRS, dtype=torch.float32)
    for i in range(len(y)):
        pair, side = divmod(int(y[i]), 4)
        first = (cells[i] == pairs[pair, 0][:, None, None]).all(0)  # [4, 4] cells of the first colour
        assert ((cells[i] == pairs[pair, 1][:, None, None]).all(0) | first).all()  # two flat colours only
        edge = {0: first[:, 0], 1: first[:, -1], 2: first[0, :], 3: first[-1, :]}[side]
        assert edge.all()  # the first colour touches its side
    # the bag of patch colours does not tell the side: per side, the number of first-colour cells has the
    # same distribution (cut uniform in 1..grid-1 on either side)
    counts = {s: [] for s in range(4)}
    _, yy = T.synthetic_images(np.random.default_rng(2), 4000, 4, 4, noise=0.0)
    xx, _ = T.synthetic_images(np.random.default_rng(2), 4000, 4, 4, noise=0.0)
    red = ((xx[:, :, ::4, ::4] + 0.5) == pairs[0, 0][:, None, None]).all(1).sum((1, 2))
    blue = ((xx[:, :, ::4, ::4] + 0.5) == pairs[1, 0][:, None, None]).all(1).sum((1, 2))
    for i in range(len(yy)):
        counts[int(yy[i]) % 4].append(int(red[i] + blue[i]))
    means = [np.mean(counts[s]) for s in range(4)]
    assert max(means) - min(means) < 0.5, means


# ------------------------------------------------------------------------------------------------ CLI runs
def _cli(tmp_path, task, *extra):
    js, png = tmp_path / f"{task}.json", tmp_path / f"{task}.png"
    rc = T.main(["--task", task, "--steps", "30", "--backend", "torch", "--json", str(js), "--plot", str(png),
                 "--no-progress", *extra])
    assert rc == 0
    assert png.exists() and png.stat().st_size > 5000
    with open(js) as f:
        d = json.load(f)
    assert set(d) >= {"losses", "main", "contrastive", "transfer", "config", "eval"}
    assert len(d["losses"]) == len(d["main"]) == len(d["contrastive"]) == len(d["transfer"]) == 30
    assert all(np.isfinite(d["losses"])) and all(np.isfinite(d["main"]))
    assert d["config"]["task"] == task and d["config"]["encoder_backend"] == "torch"
    # transfer only when P == 1 (None on shifted steps); total = main + 0.1 ct + 0.1 tr
    for tot, m, ct, tr in zip(d["losses"], d["main"], d["contrastive"], d["transfer"]):
        assert abs(tot - (m + 0.1 * ct + 0.1 * (tr or 0.0))) < 1e-4 * abs(tot)
    assert any(t is not None for t in d["transfer"])
    assert d["checks"] == {"encoder_params_without_grad": [], "model_params_without_grad": []}
    return d


def test_cli_lm_embedded_text_loss_falls(tmp_path, capsys):
    d = _cli(tmp_path, "lm", "--eval-tokens", "1024")
    main = np.array(d["main"])
    assert main[-5:].mean() < 0.8 * main[:5].mean(), main  # 5.5 -> ~3 nats in 30 steps
    ev = d["eval"]
    assert ev["metric"] == "perplexity" and [r["length"] for r in ev["rows"]] == [64, 128, 256, 512]
    assert all(r["value"] is not None and 1.0 < r["value"] < 256.0 for r in ev["rows"])
    out = capsys.readouterr().out
    assert "Extrapolation: LM perplexity" in out and "wrote" in out


def test_cli_vit_synthetic_loss_falls(tmp_path, capsys):
    d = _cli(tmp_path, "vit", "--eval-samples", "128", "--eval-scales", "1", "2")
    main = np.array(d["main"])
    assert main[-5:].mean() < main[:5].mean() - 0.2, main  # the colour pair is learnt within 30 steps
    ev = d["eval"]
    assert ev["metric"] == "accuracy" and [r["grid"] for r in ev["rows"]] == [4, 8]
    assert all(0.0 <= r["value"] <= 1.0 for r in ev["rows"])
    assert "ViT accuracy on larger patch grids" in capsys.readouterr().out


def test_python_m_entry_point_with_defaults(tmp_path):
    """``python -m seqpe_kernels.training.train`` with the default backend (auto) and the default plot path."""
    r = subprocess.run([sys.executable, "-m", "seqpe_kernels.training.train", "--task", "lm", "--steps", "2", "--no-eval",
                        "--no-progress", "--block-size", "16"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "trained 2 steps" in r.stdout
    assert (tmp_path / "seqpe_train_lm.png").exists()


def test_registered_as_seqpe_kernels_train(tmp_path):
    from seqpe_kernels import cli

    assert "train" in cli.SUBCOMMANDS
    rc = cli.main(["train", "--task", "lm", "--steps", "2", "--no-eval", "--no-progress", "--plot", "",
                   "--backend", "torch", "--block-size", "16", "--json", str(tmp_path / "t.json")])
    assert rc == 0 and (tmp_path / "t.json").exists()


def test_user_data_text_and_errors(tmp_path, capsys):
    txt = tmp_path / "t.txt"
    txt.write_text("It was a bright cold day in April. Ünïcödé is fine.\n" * 60, encoding="utf-8")
    rc = T.main(["--task", "lm", "--data", str(txt), "--steps", "3", "--block-size", "16", "--backend", "torch",
                 "--no-progress", "--plot", "", "--eval-scales", "1", "2"])
    assert rc == 0
    assert str(txt) in capsys.readouterr().out
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    assert T.main(["--task", "lm", "--data", str(bad), "--steps", "1", "--no-progress", "--plot", ""]) == 2
    assert "not a UTF-8 text file" in capsys.readouterr().err
    assert T.main(["--task", "lm", "--batch-size", "3", "--position-streams", "2", "--steps", "1", "--plot", "",
                   "--no-progress"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_user_image_folder(tmp_path, capsys, monkeypatch):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            a = (rng.random((12, 12, 3)) * 60).astype(np.uint8)
            a[: 6 if i % 2 else 12, :6] = color
            pil.fromarray(a).save(tmp_path / "imgs" / c / f"{i}.png")
    js = tmp_path / "f.json"
    rc = T.main(["--task", "vit", "--data", str(tmp_path / "imgs"), "--steps", "3", "--img-size", "8",
                 "--patch-size", "4", "--batch-size", "4", "--backend", "torch", "--no-progress", "--plot", "",
                 "--json", str(js), "--eval-scales", "1", "2"])
    assert rc == 0
    d = json.loads(js.read_text())
    assert [r["grid"] for r in d["eval"]["rows"]] == [2, 4] and d["eval"]["rows"][0]["samples"] == 2
    assert d["eval"]["position_blind_ceiling"] is None
    # without Pillow: a clear error, exit code 2
    monkeypatch.setitem(sys.modules, "PIL", None)
    rc = T.main(["--task", "vit", "--data", str(tmp_path / "imgs"), "--steps", "1", "--no-progress", "--plot", ""])
    assert rc == 2 and "Pillow" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ backend parity
PARITY = {
    # tiny on purpose: the interpreted Triton path costs ~2 s per training step even at this size
    "lm": dict(task="lm", model_dim=16, model_layers=1, model_heads=2, pe_dim=32, pe_heads=2, pe_layers=2,
               block_size=4, batch_size=2, max_position=10, contrastive_size=2, contrastive_batch=1,
               transfer_size=2, transfer_batch=1),
    "vit": dict(task="vit", model_dim=16, model_layers=1, model_heads=2, pe_dim=32, pe_heads=2, pe_layers=2,
                img_size=8, patch_size=4, batch_size=2, max_position=36, contrastive_size=2, contrastive_batch=1,
                transfer_size=2, transfer_batch=1),
}


def _assert_params_close(a: torch.nn.Module, b: torch.nn.Module, rel: float = 1e-4):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name, p in pa.items():
        q = pb[name]
        scale = max(1.0, p.detach().abs().max().item())
        diff = (p.detach() - q.detach()).abs().max().item()
        assert diff <= rel * scale, f"{name}: max |diff| {diff:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("task", ["lm", "vit"])
def test_convergence_parity_torch_vs_triton(task):
    """20 AdamW steps, dropout 0, one seed: the Triton encoder backend follows the eager reference."""
    ok, why = status("triton", torch.device(DEVICE))
    if not ok:
        pytest.skip(f"triton backend not usable on {DEVICE}: {why}")
    steps = 20
    runs = {}
    for backend in ("torch", "triton"):
        cfg = T.TrainConfig(steps=steps, backend=backend, dropout=0.0, seed=3, lr=1e-3, device=DEVICE,
                            do_eval=False, progress=False, **PARITY[task])
        runs[backend] = T.train(cfg, log=lambda *a, **k: None)
    ref, tri = runs["torch"], runs["triton"]
    assert tri["config"]["encoder_backend"] == "triton"
    # the fused CLS-only last block still gives every parameter a gradient -> DDP needs no find_unused_parameters
    assert tri["checks"] == {"encoder_params_without_grad": [], "model_params_without_grad": []}
    for key in ("losses", "main", "contrastive", "transfer"):
        a, b = _nan(ref[key]), _nan(tri[key])
        assert np.array_equal(np.isnan(a), np.isnan(b)), key
        m = ~np.isnan(a)
        np.testing.assert_allclose(b[m], a[m], rtol=1e-4, atol=1e-7, err_msg=key)
    assert ref["losses"][-1] < ref["losses"][0]
    _assert_params_close(ref["encoder"], tri["encoder"])
    _assert_params_close(ref["model"], tri["model"])


# ------------------------------------------------------------------------------------------------ DDP
DDP_ARGS = ["--task", "lm", "--dropout", "0", "--batch-size", "4", "--block-size", "16", "--model-dim", "16",
            "--model-heads", "2", "--model-layers", "1", "--pe-dim", "16", "--pe-heads", "2", "--pe-layers", "2",
            "--max-position", "256", "--contrastive-size", "4", "--contrastive-batch", "2", "--transfer-size", "4",
            "--transfer-batch", "2", "--no-eval", "--no-progress", "--plot", "", "--device", "cpu", "--seed", "0"]


def _torchrun(tmp_path, nproc: int, args, name: str):
    js, pt = tmp_path / f"{name}.json", tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "seqpe_kernels.training.train", *args,
           "--json", str(js), "--save", str(pt)]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("seqpe-kernels train: task=") == 1  # only rank 0 prints
    with open(js) as f:
        return json.load(f), torch.load(pt), r


def _single(tmp_path, args, name: str):
    js, pt = tmp_path / f"{name}.json", tmp_path / f"{name}.pt"
    assert T.main([*args, "--position-streams", "2", "--json", str(js), "--save", str(pt)]) == 0
    with open(js) as f:
        return json.load(f), torch.load(pt)


def _compare_runs(d1, s1, d2, s2, rel=1e-4):
    for key in ("losses", "main", "contrastive", "transfer"):
        a, b = _nan(d1[key]), _nan(d2[key])
        assert np.array_equal(np.isnan(a), np.isnan(b)), key
        m = ~np.isnan(a)
        np.testing.assert_allclose(a[m], b[m], rtol=rel, atol=1e-7, err_msg=key)
    for part in ("encoder", "model"):
        for k, v in s1[part].items():
            scale = max(1.0, v.abs().max().item())
            assert (v - s2[part][k]).abs().max().item() <= rel * scale, (part, k)


def test_ddp_two_ranks_match_one_process(tmp_path):
    """2 gloo ranks (each its own positions, seed + rank) vs 1 process owning both position streams.

    The global batch (4) is split 2 + 2; each rank draws main windows, contrastive and transfer batches from
    samplers seeded with seed + rank. One process with ``--position-streams 2`` draws exactly those two
    streams and averages their losses, which is what DDP's gradient averaging computes, so losses and final
    weights agree up to float summation order. Random shift at rate 0.5 makes some steps mix a shifted and a
    default stream (per-sample windows) and skip the transfer loss on one rank only.
    """
    args = DDP_ARGS + ["--steps", "4", "--backend", "torch", "--shift-rate", "0.5"]
    d_ddp, s_ddp, _ = _torchrun(tmp_path, 2, args, "ddp")
    assert d_ddp["config"]["world_size"] == 2 and d_ddp["config"]["position_streams"] == 2
    d_one, s_one = _single(tmp_path, args, "one")
    assert d_one["config"]["world_size"] == 1 and d_one["config"]["position_streams"] == 2
    _compare_runs(d_ddp, s_ddp, d_one, s_one)
    # sanity: the comparison is not vacuous -- one position stream for the whole batch is a different run
    js = tmp_path / "probe.json"
    assert T.main([*args, "--position-streams", "1", "--json", str(js)]) == 0
    probe = json.loads(js.read_text())
    assert not np.allclose(_nan(probe["contrastive"]), _nan(d_one["contrastive"]), rtol=1e-3)


def test_ddp_fused_triton_backend_needs_no_find_unused_parameters(tmp_path):
    """2 ranks with the Triton encoder (CLS-only last block): DDP without find_unused_parameters runs past step
    1 (it raises there if a parameter got no gradient) and matches the eager single-process run."""
    ok, why = status("triton", torch.device("cpu"))
    if not ok:
        pytest.skip(f"triton backend not usable on cpu (DDP test uses gloo on CPU): {why}")
    tiny = ["--task", "lm", "--dropout", "0", "--batch-size", "2", "--block-size", "4", "--model-dim", "16",
            "--model-heads", "2", "--model-layers", "1", "--pe-dim", "32", "--pe-heads", "2", "--pe-layers", "2",
            "--max-position", "10", "--contrastive-size", "2", "--contrastive-batch", "1", "--transfer-size", "2",
            "--transfer-batch", "1", "--no-eval", "--no-progress", "--plot", "", "--device", "cpu", "--steps", "2"]
    d_ddp, s_ddp, _ = _torchrun(tmp_path, 2, tiny + ["--backend", "triton"], "ddp_triton")
    assert d_ddp["config"]["encoder_backend"] == "triton"
    assert d_ddp["checks"] == {"encoder_params_without_grad": [], "model_params_without_grad": []}
    d_one, s_one = _single(tmp_path, tiny + ["--backend", "torch"], "one_torch")
    _compare_runs(d_ddp, s_ddp, d_one, s_one)


# ------------------------------------------------------------------------------------------------ save / resume
TINY = ["--task", "lm", "--backend", "torch", "--no-eval", "--no-progress", "--plot", "", "--device", "cpu",
        "--block-size", "8", "--batch-size", "2", "--model-dim", "16", "--model-heads", "2", "--model-layers", "1",
        "--pe-dim", "32", "--pe-heads", "4", "--pe-layers", "1", "--max-position", "64", "--contrastive-size", "2",
        "--contrastive-batch", "2", "--transfer-size", "2", "--transfer-batch", "1", "--shift-rate", "0.5",
        "--pe-warmup-steps", "4", "--pe-temperature", "2", "--seed", "5"]


def test_train_save_file_is_read_by_load_checkpoint(tmp_path):
    """Issue 12 item 3: `train --save run.pth` wrote {'encoder', 'model', 'config'}, which load_checkpoint could
    not read ('no SeqPE encoder weights'); now it loads the encoder with its recorded configuration, silently."""
    import warnings

    from seqpe_kernels import FusedSeqPE, load_checkpoint

    f = tmp_path / "run.pth"
    assert T.main([*TINY, "--steps", "2", "--save", str(f)]) == 0
    saved = torch.load(f, weights_only=True)  # plain data only
    assert {"encoder", "seqpe_config", "model", "config", "optimizer", "train_state"} <= set(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc = load_checkpoint(f, module_cls=FusedSeqPE, backend="torch")
    assert enc.config() == saved["seqpe_config"]
    assert (enc.num_heads, enc.temperature, enc.resid_pdrop, enc.embed_dim) == (4, 2.0, 0.1, 32)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, saved["encoder"][k]), k


def test_resume_continues_the_run_exactly(tmp_path):
    """3 steps, --save, then --resume for 3 more = 6 uninterrupted steps, bit for bit (dropout on, random shift,
    regulariser warm-up): weights, AdamW state, samplers, data and torch RNGs all travel in the file."""
    def run(name, steps, *extra):
        js, pt = tmp_path / f"{name}.json", tmp_path / f"{name}.pt"
        assert T.main([*TINY, "--steps", str(steps), "--json", str(js), "--save", str(pt), *extra]) == 0
        return json.loads(js.read_text()), torch.load(pt, weights_only=True)

    d_all, s_all = run("all", 6)
    d_a, _ = run("first", 3)
    d_b, s_b = run("second", 3, "--resume", str(tmp_path / "first.pt"))
    assert d_a["losses"] + d_b["losses"] == d_all["losses"]
    assert d_b["config"]["resume"] == str(tmp_path / "first.pt")
    assert s_b["train_state"]["step"] == s_all["train_state"]["step"] == 6
    for part in ("encoder", "model"):
        for k, v in s_all[part].items():
            assert torch.equal(v, s_b[part][k]), (part, k)
    # the resumed run takes the saved run's sizes when they are not given
    sizes = ["--pe-dim", "--pe-heads", "--model-dim", "--model-heads"]
    short = [a for i, a in enumerate(TINY) if a not in sizes and (i == 0 or TINY[i - 1] not in sizes)]
    assert T.main([*short, "--steps", "1", "--resume", str(tmp_path / "all.pt")]) == 0


def test_resume_refuses_a_different_run(tmp_path, capsys):
    f = tmp_path / "a.pt"
    assert T.main([*TINY, "--steps", "1", "--save", str(f)]) == 0
    capsys.readouterr()
    other = [*TINY, "--steps", "1", "--resume", str(f), "--pe-heads", "2", "--dropout", "0"]
    assert T.main(other) == 2
    err = capsys.readouterr().err
    assert "pe_heads: saved 4, this run 2" in err and "dropout: saved 0.1, this run 0.0" in err
    from seqpe_kernels import SeqPE, save_checkpoint

    enc_only = save_checkpoint(SeqPE(32, 4, 2), tmp_path / "enc.pth")
    assert T.main([*TINY, "--steps", "1", "--resume", str(enc_only)]) == 2
    assert "not a file written by seqpe-kernels train --save" in capsys.readouterr().err
    assert T.main([*TINY, "--steps", "1", "--resume", str(tmp_path / "missing.pt")]) == 2


def test_resume_from_an_older_train_file(tmp_path, capsys):
    """Files written before this change hold only encoder/model/config: the weights resume, AdamW restarts."""
    f = tmp_path / "new.pt"
    assert T.main([*TINY, "--steps", "1", "--save", str(f)]) == 0
    saved = torch.load(f, weights_only=True)
    torch.save({k: saved[k] for k in ("encoder", "model", "config")}, tmp_path / "old.pt")
    capsys.readouterr()
    assert T.main([*TINY, "--steps", "1", "--resume", str(tmp_path / "old.pt")]) == 0
    assert "no optimizer state saved: AdamW restarts" in capsys.readouterr().out


def test_resume_with_only_resume_and_steps_continues_the_saved_run_exactly(tmp_path, capsys):
    """Every flag left out takes the saved run's value, also those with a default (backend, seed, dropout, task,
    streams, ...): `--resume F --steps N` alone reproduces the uninterrupted run bit for bit. Learning rates given
    for the resumed run replace the saved AdamW groups' (they were silently kept), window sizes must match, and
    --save refuses a .safetensors name (it wrote a pickle)."""
    base = [*TINY, "--position-streams", "2", "--dropout", "0.2", "--lr", "0.01"]
    js_all, js_b = tmp_path / "all.json", tmp_path / "b.json"
    assert T.main([*base, "--steps", "4", "--json", str(js_all)]) == 0
    assert T.main([*base, "--steps", "2", "--save", str(tmp_path / "a.pt")]) == 0
    minimal = ["--no-eval", "--no-progress", "--plot", "", "--device", "cpu"]
    assert T.main([*minimal, "--steps", "2", "--resume", str(tmp_path / "a.pt"), "--json", str(js_b)]) == 0
    d_all, d_b = json.loads(js_all.read_text()), json.loads(js_b.read_text())
    assert d_all["losses"][2:] == d_b["losses"]
    for k in ("backend", "seed", "dropout", "position_streams", "lr", "task", "pe_temperature"):
        assert d_b["config"][k] == d_all["config"][k], k
    js_c = tmp_path / "c.json"
    capsys.readouterr()
    assert T.main([*minimal, "--steps", "2", "--resume", str(tmp_path / "a.pt"), "--lr", "0.5",
                   "--json", str(js_c)]) == 0
    assert "lr 0.01 -> 0.5" in capsys.readouterr().out
    assert json.loads(js_c.read_text())["losses"] != d_b["losses"]
    assert T.main([*minimal, "--steps", "1", "--resume", str(tmp_path / "a.pt"), "--block-size", "16"]) == 2
    assert "block_size: saved 8, this run 16" in capsys.readouterr().err
    assert T.main([*TINY, "--steps", "1", "--save", str(tmp_path / "x.safetensors")]) == 2
    assert "use a .pth name" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--backend", "cpu"], ["--pe-dim", "8"], ["--pe-temperature", "2"],
                                  ["--contrastive-size", "4"], ["--shift-pool", "10"]])
def test_baseline_refuses_seqpe_only_flags(flag, capsys):
    """They were accepted and ignored with --pe learned (identical losses with and without)."""
    assert T.main(["--pe", "learned", "--steps", "1", "--no-eval", "--no-progress", "--plot", "", *flag]) == 2
    assert "--pe learned has neither" in capsys.readouterr().err


def test_shift_pool_smaller_than_the_windows_fails_before_the_first_step():
    """A shifted step draws one window per sample; a pool with fewer fails at once, not at the first shifted
    step (a random step, possibly hundreds in)."""
    steps = []
    cfg = T.TrainConfig(task="lm", steps=50, shift_pool=4, batch_size=8, block_size=8, model_dim=16, model_layers=1,
                        model_heads=2, pe_dim=16, pe_heads=2, pe_layers=1, max_position=256, contrastive_size=4,
                        contrastive_batch=2, transfer_size=4, transfer_batch=2, backend="torch", device="cpu",
                        do_eval=False, progress=False)
    with pytest.raises(ValueError, match="shift pool holds 4"):
        T.train(cfg, log=lambda *a, **k: steps.append(a))
    assert not any("step" in str(a) for a in steps)


def _tiny_built(task, **kw):
    """(resolved config, encoder, model) of a tiny run on CPU, built as train() builds them."""
    cfg = T.resolve_config(T.TrainConfig(task=task, backend="torch", device="cpu", pe_dim=16, pe_heads=2,
                                         pe_layers=1, model_dim=16, model_layers=1, model_heads=2, progress=False,
                                         **kw))
    enc, model, _ = T._build(cfg, torch.device("cpu"), num_classes=4)
    return cfg, enc, model


@pytest.mark.parametrize("task", ["lm", "vit"])
def test_encoder_weight_decay_groups_follow_each_reference_pipeline(task):
    """SEQPE_SPEC §8.2 item 8: the text pipeline decays every encoder parameter whose name matches none of
    no_weight_decay_keywords (biases included); the image pipeline decays matrices only."""
    cfg, enc, model = _tiny_built(task)
    groups = T._param_groups(enc, model, cfg)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    # SEQPE_SPEC §2's set, written out (the module's own list as the oracle could not see one dropped from it)
    skip = ("pos_of_seqpe_embed", "token_of_seqpe_embed", "layernorm", "cls_token_embed", "dim_token_embed")
    assert any("layernorm" in n for n, _ in enc.named_parameters())
    for name, p in enc.named_parameters():
        want = not any(k in name for k in skip) and (p.dim() >= 2 or task == "lm")
        assert (id(p) in decayed) == want, name
    assert any(n.endswith("c_attn.bias") for n, p in enc.named_parameters() if id(p) in decayed) == (task == "lm")
    for name, p in model.named_parameters():  # the model: matrices only, in both
        assert (id(p) in decayed) == (p.dim() >= 2 and not any(k in name for k in ("wte", "cls_token"))), name


@pytest.mark.parametrize("task,pe_lr", [("vit", None), ("lm", 2e-4)])
def test_encoder_trains_at_pe_lr_and_the_model_at_lr(task, pe_lr):
    """The image pipeline trains the encoder 10x slower than the model (config.py: the difference between
    learning and collapsing); an explicit pe_lr applies to the encoder on either task, lr to the model."""
    cfg, enc, model = _tiny_built(task, pe_lr=pe_lr)
    assert cfg.pe_lr is not None and cfg.pe_lr != cfg.lr
    lr_of = {id(p): g["lr"] for g in T._param_groups(enc, model, cfg) for p in g["params"]}
    assert {lr_of[id(p)] for p in enc.parameters()} == {cfg.pe_lr}
    assert {lr_of[id(p)] for p in model.parameters()} == {cfg.lr}


def test_evaluation_runs_encoder_and_model_in_eval_mode():
    """Evaluation switches both to eval (no dropout in the PE table or the model) and restores training after;
    a tiny model's perplexity digits do not show encoder dropout, so the modes are read directly."""
    from seqpe_kernels.training import evaluate as E

    for task, extra in (("lm", dict(block_size=8, eval_scales=(1.0, 2.0), eval_tokens=100)),
                        ("vit", dict(img_size=8, patch_size=4, eval_scales=(1.0,), eval_samples=8))):
        cfg = T.TrainConfig(task=task, steps=1, backend="torch", device="cpu", do_eval=False, progress=False,
                            batch_size=2, model_dim=16, model_heads=2, model_layers=1, pe_dim=16, pe_heads=2,
                            pe_layers=1, dropout=0.5, contrastive_size=2, contrastive_batch=2, transfer_size=2,
                            transfer_batch=1, **extra)
        out = T.train(cfg, log=lambda *a, **k: None)
        rcfg = T.resolve_config(cfg)
        enc, model = out["encoder"].train(), out["model"].train()
        seen = []
        enc.register_forward_pre_hook(lambda mod, args: seen.append(("enc", mod.training)))
        model.register_forward_pre_hook(lambda mod, args: seen.append(("model", mod.training)))
        E.evaluate(rcfg, enc, model, T.TextData(rcfg.data) if task == "lm" else None, torch.device("cpu"))
        assert {w for w, _ in seen} == {"enc", "model"} and not any(t for _, t in seen), (task, seen)
        assert enc.training and model.training  # restored afterwards


def test_image_folder_without_held_out_images_is_not_scored_on_training_images(tmp_path):
    """One image per class leaves no held-out split: accuracy was then measured on the training images and
    reported as held-out. Now those rows are n/a with the reason."""
    pil = pytest.importorskip("PIL.Image")
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        pil.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)).save(
            tmp_path / "imgs" / c / "0.png")
    cfg = T.TrainConfig(task="vit", pe="learned", steps=1, batch_size=2, img_size=8, patch_size=4, model_dim=16,
                        model_heads=2, model_layers=1, max_position=16, eval_scales=(1,), data=str(tmp_path / "imgs"),
                        backend="torch", progress=False)
    row = T.train(cfg, log=lambda *a, **k: None)["eval"]["rows"][0]
    assert row["value"] is None and "no held-out images" in row["note"]


def test_losses_read_in_batches_are_the_per_step_losses(tmp_path, monkeypatch):
    """On CUDA the logged losses are read every _LOG_EVERY steps (one host sync each) instead of every step: the
    per-step history must not change by it (also for a run length that is not a multiple of the interval, with
    the transfer term inactive on some steps: its None entries kept in place)."""
    log_every = T._log_every

    def run(name, every):
        monkeypatch.setattr(T, "_log_every", lambda device: every)
        js = tmp_path / f"{name}.json"
        assert T.main([*TINY, "--steps", "7", "--json", str(js)]) == 0
        return json.loads(js.read_text())

    one, three = run("one", 1), run("three", 3)
    for k in ("losses", "main", "contrastive", "transfer"):
        assert len(one[k]) == 7 and one[k] == three[k], k
    assert None in one["transfer"] and any(v is not None for v in one["transfer"])  # (the case is exercised)
    assert log_every(torch.device("cpu")) == 1 and log_every(torch.device("cuda")) == T._LOG_EVERY > 1


def test_positions_checked_on_the_host_while_training(monkeypatch):
    """The encoder's range check (a host sync per call on CUDA) is off during the loop because the merged positions
    are checked on the host first: an out-of-range position still raises, with the encoder's message, and the
    encoder's own setting is back after training."""
    from seqpe_kernels.training import samplers

    cfg = T.TrainConfig(task="lm", steps=2, backend="torch", device="cpu", do_eval=False, progress=False,
                        block_size=8, batch_size=2, model_dim=16, model_heads=2, model_layers=1, pe_dim=16,
                        pe_heads=2, pe_layers=1, max_position=64, contrastive_size=2, contrastive_batch=2,
                        transfer_size=2, transfer_batch=1)
    seen = []
    orig_train = T._build

    def build(*a, **k):
        enc, model, mcfg = orig_train(*a, **k)
        seen.append(enc)
        return enc, model, mcfg

    monkeypatch.setattr(T, "_build", build)
    out = T.train(cfg, log=lambda *a, **k: None)
    assert out["encoder"].check_range is True and len(out["losses"]) == 2

    merge = samplers.merge_positions

    def bad_merge(*a, **k):
        merged, layout = merge(*a, **k)
        merged = merged.clone()
        merged[-1] = seen[-1].base ** seen[-1].max_digits  # one digit too many
        return merged, layout

    monkeypatch.setattr(samplers, "merge_positions", bad_merge)
    with pytest.raises(ValueError, match="needs more than max_digits") as e:
        T.train(cfg, log=lambda *a, **k: None)
    assert not any(f.path.name == "fused.py" for f in e.traceback)  # the host check raised, not the encoder's
    assert seen[-1].check_range is True  # restored also when the loop raises


def test_host_to_device_copies_are_non_blocking_from_pinned_memory(monkeypatch):
    """_to_device: CPU -> CUDA through pinned memory, non-blocking (a pageable .to() waits for the stream); where
    pinning fails, blocking copies from then on; anything else a plain .to()."""
    calls = []

    class Host:
        device = torch.device("cpu")

        def __init__(self, pin_ok=True, pinned=False):
            self.pin_ok, self.pinned = pin_ok, pinned

        def pin_memory(self):
            if not self.pin_ok:
                raise RuntimeError("cannot allocate page-locked memory")
            return Host(pinned=True)

        def to(self, device, non_blocking=False):
            calls.append((self.pinned, non_blocking))
            return "moved"

    cuda = torch.device("cuda")
    monkeypatch.setattr(T, "_PIN", [True])
    assert T._to_device(Host(), cuda) == "moved" and calls == [(True, True)]
    calls.clear()
    assert T._to_device(Host(pin_ok=False), cuda) == "moved" and calls == [(False, False)] and T._PIN == [False]
    calls.clear()
    assert T._to_device(Host(), cuda) == "moved" and calls == [(False, False)]  # (not tried again)
    monkeypatch.setattr(T, "_PIN", [True])
    calls.clear()
    assert T._to_device(Host(), torch.device("cpu")) == "moved" and calls == [(False, False)]


# ------------------------------------------------------------------ no host-device sync per training step (CUDA)
SYNC_FREE_FROM_STEP = 4  # steps 1-3: CUDA / cuBLAS initialisation, Triton compilation, CUDA-graph captures


def _train_with_sync_guard(monkeypatch, cfg, set_mode, synchronize):
    """``train(cfg)`` with torch's CUDA sync debug mode at "error" from step SYNC_FREE_FROM_STEP on, except for
    the one read of the logged losses at the end (logging every step would be the per-step sync this guards
    against): any other synchronising operation in a step raises, naming itself."""
    from seqpe_kernels.reference import losses

    calls = [0]
    step, flush = losses.PeWeightScheduler.step, T._flush_stats

    def guarded_step(self):  # the first thing of every training step
        calls[0] += 1
        if calls[0] == SYNC_FREE_FROM_STEP:
            synchronize()
            set_mode("error")
        return step(self)

    def unguarded_flush(*a, **k):
        set_mode("default")
        return flush(*a, **k)

    monkeypatch.setattr(losses.PeWeightScheduler, "step", guarded_step)
    monkeypatch.setattr(T, "_flush_stats", unguarded_flush)
    monkeypatch.setattr(T, "_log_every", lambda device: 10 ** 9)  # one read, after the last step
    try:
        return T.train(cfg, log=lambda *a, **k: None)
    finally:
        set_mode("default")


def _sync_guard_cfg(device, backend, graphs):
    # dropout on, as the paper trains (dedup, which has to sync, is off then); no random shift: one positions
    # shape, so no new graph capture after the first step
    return T.TrainConfig(task="lm", steps=8, device=device, backend=backend, dropout=0.1, shift_rate=0.0, seed=3,
                         progress=False, do_eval=False, cuda_graphs=graphs)


def test_sync_guard_harness_switches_at_the_right_steps(monkeypatch):
    """The GPU test below, on CPU with stand-ins for the CUDA calls: the mode goes to "error" at the start of step
    SYNC_FREE_FROM_STEP (after a device sync) and back to "default" before the losses are read, once."""
    events = []
    out = _train_with_sync_guard(monkeypatch, _sync_guard_cfg("cpu", "torch", None), events.append,
                                 lambda: events.append("sync"))
    assert events == ["sync", "error", "default", "default"]  # (the last: the finally)
    assert len(out["losses"]) == 8 and all(math.isfinite(x) for x in out["losses"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend,graphs", [("triton", None), ("triton", False), ("cuda", False)])
def test_training_steps_do_not_synchronise_with_the_host(monkeypatch, backend, graphs):
    """After warm-up a `seqpe-kernels train` step on CUDA makes no host-device sync (torch's sync debug mode
    raises on any), so the host's samplers and launches run ahead of the GPU: with the encoder replayed as CUDA
    graphs (the default) and eager (as under DDP), Triton and C++/CUDA backends."""
    if backend == "cuda":
        from conftest import require_ext

        require_ext("cuda")
    out = _train_with_sync_guard(monkeypatch, _sync_guard_cfg("cuda", backend, graphs),
                                 torch.cuda.set_sync_debug_mode, torch.cuda.synchronize)
    assert out["config"]["encoder_cuda_graphs"] is (graphs is None)
    assert len(out["losses"]) == 8 and all(math.isfinite(x) for x in out["losses"])


def test_evaluation_sums_on_the_device_equal_the_per_batch_reads(monkeypatch):
    """evaluate() sums the LM's NLL (fp64) and the ViT's hits on the device and reads them once per length /
    grid: the same perplexities and accuracies, bit for bit, as summing per-batch host reads (the old loop)."""
    from seqpe_kernels.training import evaluate as E
    from seqpe_kernels.training.samplers import grid_positions

    for task, extra in (("lm", dict(block_size=8, eval_scales=(1.0, 2.0), eval_tokens=200)),
                        ("vit", dict(img_size=8, patch_size=4, eval_scales=(1.0, 2.0), eval_samples=70))):
        cfg = T.TrainConfig(task=task, steps=2, backend="torch", device="cpu", do_eval=False, progress=False,
                            batch_size=2, model_dim=16, model_heads=2, model_layers=1, pe_dim=16, pe_heads=2,
                            pe_layers=1, contrastive_size=2, contrastive_batch=2, transfer_size=2, transfer_batch=1,
                            **extra)
        out = T.train(cfg, log=lambda *a, **k: None)
        rcfg = T.resolve_config(cfg)
        data = T.TextData(rcfg.data) if task == "lm" else None
        ev = E.evaluate(rcfg, out["encoder"], out["model"], data, torch.device("cpu"))
        enc, model = out["encoder"].eval(), out["model"].eval()
        with torch.no_grad():
            for row in ev["rows"]:
                if task == "lm":
                    L, toks = row["length"], data.eval
                    n_seq = min(len(toks) // L, max(1, rcfg.eval_tokens // L))
                    seqs = torch.from_numpy(toks[:n_seq * L].reshape(n_seq, L))
                    pe = enc(torch.arange(L)).view(1, L, -1)
                    nll, cnt = 0.0, 0
                    for i in range(0, n_seq, 8):  # the old loop: a host read per batch
                        _, loss = model(seqs[i:i + 8], pe=pe, labels=seqs[i:i + 8])
                        k = seqs[i:i + 8].shape[0] * (L - 1)
                        nll += loss.item() * k
                        cnt += k
                    assert n_seq > 8  # (several batches summed)
                    assert row["value"] == math.exp(nll / cnt) and row["tokens"] == cnt
                else:
                    grid = row["grid"]
                    x, lab = T.synthetic_images(np.random.default_rng([rcfg.seed, 31337, grid]), rcfg.eval_samples,
                                                grid, rcfg.patch_size)
                    pe = enc(torch.from_numpy(grid_positions(0, 0, grid, grid))).view(1, grid * grid, -1)
                    hits = sum(int((model(x[i:i + 64], pe=pe).argmax(-1) == lab[i:i + 64]).sum())
                               for i in range(0, len(lab), 64))
                    assert row["value"] == hits / len(lab) and row["samples"] == len(lab) > 64
